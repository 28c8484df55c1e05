"""The warm local server: one process keeps each index's model loaded and answers JSON.

Why: a fresh ``lite-influence query`` pays for importing torch and transformers and loading
the model (about 7 s on a laptop CPU) before a query that itself takes tens of milliseconds.
A process that stays up pays that once. ``serve()`` opens the indexes with the public facade
``InfluenceIndex.open``, runs one warm-up query per index (model, projection and examples are
then cached by the index), and answers on localhost:

    POST /api/query            {index, text, pair, label, completion, max_new_tokens, k, layers, agg,
                                vote_p, metric, score, damping}
                               -> what InfluenceIndex.query returns, plus "timings"
    POST /api/query_by_id      {index, id, k, layers, agg, ...}: a training example explained
                               from its stored vectors (no model runs)
    GET  /api/example/NAME/ID  -> the training example, as stored
    GET  /api/audit/INDEX      -> the audit kept by `audit --save` (404 when there is none)
    GET  /api/indexes          -> what is served (name, path, N, layers, groups, labels, task)
    GET  /                     -> the page (lite_influence/static/, no build step, no CDN)

A request names an index only by its served name (the folder's name), never by a path, so no
request can read or write outside the served indexes. Bad requests get a 4xx whose body is
``{"error": "<one line>"}``, the same line a ``UserError`` carries in the CLI; anything else
is our bug: a 500 with one line (the traceback goes to the server's log only).

Finding a server: while it runs, the server keeps ``INDEX/.serve.json`` (host, port, pid, url;
written atomically, removed at shutdown) beside each index it serves. ``find_server`` and
``ask_server`` are the client side, written with the standard library only, so that the CLI
can ask a running server without importing torch, transformers, numpy or starlette.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .client import STATE_FILE, ask_server, find_server, remote_query, state_path  # noqa: F401 (the client API)
from .errors import UserError

STATIC = Path(__file__).with_name("static")
PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/static/style.css": ("style.css", "text/css; charset=utf-8")}
OPTIONS = {"k": int, "layers": str, "agg": str, "vote_p": (int, float), "metric": str, "score": str,
           "damping": (int, float)}  # QueryConfig's, as a request may set them
QUERY_FIELDS = {"index": str, "text": str, "pair": (str, type(None)), "label": (str, int, type(None)),
                "completion": (str, type(None)), "max_new_tokens": int, **OPTIONS}
BY_ID_FIELDS = {"index": str, "id": int, **OPTIONS}


# ---------------------------------------------------------------- server side


class RequestError(Exception):
    """A bad request: its HTTP status and one line (UserError is the 400 case)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def served_names(paths: list[str | Path]) -> dict[str, Path]:
    """The name each index is served under: its folder's name, with -2, -3... for repeats."""
    names: dict[str, Path] = {}
    for path in paths:
        base = Path(path).resolve().name or "index"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names[name] = Path(path).resolve()
    return names


class Served:
    """The open indexes by served name, each with a lock: a model's hooks hold per-call state,
    so two queries on one index must not run at once (queries on different indexes may)."""

    def __init__(self, paths: list[str | Path]):
        import threading

        from .api import InfluenceIndex

        if not paths:
            raise UserError("nothing to serve; pass one or more index folders.")
        self.paths = served_names(paths)
        self.indexes = {name: InfluenceIndex.open(path) for name, path in self.paths.items()}
        self.locks = {name: threading.Lock() for name in self.indexes}

    def get(self, name) -> "object":
        if not isinstance(name, str) or name not in self.indexes:
            raise RequestError(404, f"no served index named {json.dumps(name)}; served: {', '.join(self.indexes)}")
        return self.indexes[name]

    def describe(self, name: str) -> dict:
        index = self.indexes[name]
        manifest = index.manifest
        return {"name": name, "path": str(self.paths[name]), "n": len(index), "layers": index.layers,
                "groups": index.groups, "label_names": manifest.get("label_names"), "task": index.task,
                "metric": manifest.get("metric"), "metrics": list(index.store.metrics),
                "model": manifest.get("model", {}).get("path")}

    def warm_up(self, hold_gb: float = 0.0) -> dict[str, list[str]]:
        """One throw-away query per index: loads and verifies the model, reads the examples;
        the token rows are kept in memory in posting order (token_rows.keep_in_memory), and
        dense rows as aligned copies while they fit in ``hold_gb`` over all indexes
        (bounded_scan.hold). The query reads only what is in memory (``warm_layers``): at
        N = 100,000 one query over every layer reads 13 GB from disk. The layers held."""
        from .bounded_scan import hold

        kept = {}
        for name, index in self.indexes.items():
            with self.locks[name]:
                for layer in index.layers:
                    if index.store.layer(layer).kind == "tokens":
                        index.store.layer(layer).stored.keep_in_memory()
                kept[name] = hold(index.store, index.layers, hold_gb)
                hold_gb -= sum(4 * len(index) * index.store.layer(layer).dim for layer in kept[name]) / 1e9
                layers = ",".join(warm_layers(index, kept[name]))
                if index.task == "causal-lm":
                    index.query("warm up", k=1, layers=layers, completion=" up")
                else:
                    index.query("warm up", k=1, layers=layers)
        return kept


def warm_layers(index, held: list[str]) -> list[str]:
    """What the warm-up query searches: the layers in memory (held, token rows), else the
    smallest dense one; the model and its hooks run the same whatever it searches."""
    layers = held + [layer for layer in index.layers if index.store.layer(layer).kind == "tokens"]
    return layers or [min(index.layers, key=lambda layer: index.store.layer(layer).dim)]


def check_fields(body, kinds: dict, required: tuple[str, ...]) -> dict:
    """The request's fields, each of its declared JSON type; unknown or missing ones refused."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object, e.g. {\"index\": \"idx\", \"text\": \"...\"}")
    unknown = sorted(set(body) - set(kinds))
    if unknown:
        raise RequestError(400, f"unknown field '{unknown[0]}'; known: {', '.join(kinds)}")
    for key in required:
        if body.get(key) is None or body.get(key) == "":
            raise RequestError(400, f"missing '{key}'; pass it in the JSON body")
    for key, value in body.items():
        kind = kinds[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            wanted = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise RequestError(400, f"'{key}' must be {wanted.replace('NoneType', 'null')}, got {json.dumps(value)}")
    return body


def run_query(served: Served, body) -> dict:
    """The query as ``InfluenceIndex.query`` answers it, plus how long it took."""
    start = time.perf_counter()
    body = check_fields(body, QUERY_FIELDS, ("index", "text"))
    name = body.pop("index")
    index = served.get(name)
    options = {key: body[key] for key in (*OPTIONS, "max_new_tokens") if key in body}
    text, pair, label, completion = (body.get(key) for key in ("text", "pair", "label", "completion"))
    index.kind.check_query(pair=pair, label=label, completion=completion)  # the CLI's own check and words
    with served.locks[name]:
        waited = time.perf_counter()
        extra = {"completion": completion} if index.task == "causal-lm" else {}
        result = index.query(text, pair, label, **extra, **options)
    done = time.perf_counter()
    result["timings"] = {"query_ms": round(1e3 * (done - waited), 3), "total_ms": round(1e3 * (done - start), 3)}
    return result


def get_example(served: Served, name: str, id_text: str) -> dict:
    index = served.get(name)
    try:
        i = int(id_text)
    except ValueError:
        raise RequestError(400, f"an example id is a whole number from 0 to {len(index) - 1}, got '{id_text}'") from None
    if not 0 <= i < len(index):
        raise RequestError(404, f"index '{name}' has examples 0 to {len(index) - 1}; there is no example {i}")
    return index.store.table[i]


def saved_audit(served: Served, name: str) -> dict:
    """The audit ``audit INDEX QUERIES --save`` kept beside the index, for the page."""
    audit = served.get(name).store.saved_audit()
    if audit is None:
        raise RequestError(404, f"index '{name}' has no saved audit; run `lite-influence audit INDEX QUERIES --save`.")
    return audit


def query_by_id(served: Served, body) -> dict:
    """Explain training example ``id`` from its stored vectors (``InfluenceIndex.query_ids``):
    no model runs, so it needs no lock."""
    body = check_fields(body, BY_ID_FIELDS, ("index", "id"))
    get_example(served, body["index"], str(body["id"]))
    options = {key: body[key] for key in OPTIONS if key in body}
    return served.get(body["index"]).query_ids([body["id"]], **options)


def _answer(data, status: int = 200):
    from starlette.responses import Response

    return Response(json.dumps(data, allow_nan=False), status, media_type="application/json")


async def _body_of(request):
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request body is not valid JSON") from None


def _guarded(handler):
    """One JSON error line for every failure: 4xx for the user's, 500 (traceback to the log
    only) for ours."""
    async def endpoint(request):
        from starlette.concurrency import run_in_threadpool

        try:
            body = await _body_of(request) if request.method == "POST" else None
            return _answer(await run_in_threadpool(handler, request, body))
        except RequestError as exc:
            return _answer({"error": str(exc)}, exc.status)
        except UserError as exc:
            return _answer({"error": str(exc)}, 400)
        except Exception as exc:  # our bug: one line out, the traceback to the log
            import traceback

            traceback.print_exc()
            return _answer({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)
    return endpoint


def _page(request):
    from starlette.responses import Response

    file, media = PAGES[request.url.path]
    return Response((STATIC / file).read_bytes(), media_type=media, headers={"Cache-Control": "no-cache"})


async def _not_found(request, exc):
    message = {404: f"no such page or endpoint: {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return _answer({"error": message}, exc.status_code)


def _lifespan(served: Served, address):
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if address is not None:
            write_states(served, *address)
        try:
            yield
        finally:
            if address is not None:
                remove_states(served)
    return lifespan


def create_app(served: Served, address: tuple[str, int] | None = None):
    """The Starlette app over the served indexes; with ``address`` (host, port), its lifespan
    keeps the state files beside the indexes (written at start-up, removed at shutdown)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    routes = [Route("/api/query", _guarded(lambda request, body: run_query(served, body)), methods=["POST"]),
              Route("/api/query_by_id", _guarded(lambda request, body: query_by_id(served, body)), methods=["POST"]),
              Route("/api/example/{index}/{id}", _guarded(lambda request, body: get_example(
                  served, request.path_params["index"], request.path_params["id"]))),
              Route("/api/audit/{index}", _guarded(lambda request, body: saved_audit(served, request.path_params["index"]))),
              Route("/api/indexes", _guarded(lambda request, body: {
                  "indexes": [served.describe(name) for name in served.indexes]})),
              *(Route(path, _page) for path in PAGES)]
    return Starlette(routes=routes, exception_handlers={HTTPException: _not_found}, lifespan=_lifespan(served, address))


def write_states(served: Served, host: str, port: int) -> None:
    """``INDEX/.serve.json`` beside each served index, written to a temporary name and renamed
    (a reader sees no file or a whole one). An index folder we may not write to is served
    anyway; the CLI just will not find the server by itself."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    state = {"host": host, "port": port, "pid": os.getpid(), "url": url, "started": time.time()}
    for name, path in served.paths.items():
        target = state_path(path)
        tmp = target.with_name(f"{STATE_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({**state, "name": name}), encoding="utf-8")
            os.replace(tmp, target)
        except OSError as exc:
            print(f"warning: cannot write {target} ({exc.strerror}); lite-influence query will not find this server",
                  file=sys.stderr)


def remove_states(served: Served) -> None:
    """Remove our state files, and only ours: another server may have taken an index over."""
    for path in served.paths.values():
        target = state_path(path)
        try:
            if json.loads(target.read_text(encoding="utf-8")).get("pid") == os.getpid():
                target.unlink()
        except (OSError, ValueError, AttributeError):
            pass


def listen(host: str, port: int):
    """A bound, listening socket: a busy port is one clear line, before any model loads."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port "
                        f"(a server may already run there: open http://{host}:{port}/).") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(paths: list[str], host: str = "127.0.0.1", port: int = 8765, *, warm: bool = True,
          hold_gb: float = 4.0, log=sys.stderr) -> None:
    """Serve the indexes at ``paths`` until interrupted (Ctrl-C or SIGTERM shut it down cleanly
    and remove the state files); ``hold_gb``: ServeConfig's (warm-up only)."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("the server needs starlette and uvicorn: pip install 'lite-influence[serve]'") from None
    served = Served(paths)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    held = served.warm_up(hold_gb) if warm else {}
    app = create_app(served, (host, bound))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    print(f"serving {', '.join(served.indexes)} at http://{host}:{bound}/ (Ctrl-C to stop)", file=log, flush=True)
    if held:
        print(f"in memory: {'; '.join(f'{name}: {len(layers)} dense layers' for name, layers in held.items())}",
              file=log, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        remove_states(served)
        sock.close()
