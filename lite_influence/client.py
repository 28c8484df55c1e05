"""The CLI's side of the warm server: find one running for an index and ask it.

Standard library only (no torch, transformers, numpy or starlette), so that a
``lite-influence query`` answered by a server costs a Python start and one HTTP request. The
server (serve.py) writes ``INDEX/.serve.json``; a stale file, a dead or reused pid, or a server
serving other indexes all read as "no server", and the caller answers the query itself.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UserError

STATE_FILE = ".serve.json"


def state_path(index_path: str | Path) -> Path:
    return Path(index_path) / STATE_FILE


def find_server(index_path: str | Path, timeout: float = 0.5) -> str | None:
    """URL of a live server for this index, or None (see ``served_entry``)."""
    entry = served_entry(index_path, timeout)
    return None if entry is None else entry["url"]


def served_entry(index_path: str | Path, timeout: float = 0.5) -> dict | None:
    """What a live server says of this index (``/api/indexes``: name, label names, task...,
    plus its ``url``), or None: the state file must name a running pid and its server must
    serve this index (a stale file, a reused pid or a server restarted on other indexes all
    give None)."""
    try:
        state = json.loads(state_path(index_path).read_text(encoding="utf-8"))
        pid, url = int(state["pid"]), str(state["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _pid_alive(pid):
        return None
    try:
        with urllib.request.urlopen(url + "/api/indexes", timeout=timeout) as response:
            served = json.loads(response.read())
    except (OSError, ValueError):
        return None
    mine = os.path.realpath(index_path)
    for item in served.get("indexes", []) if isinstance(served, dict) else []:
        if isinstance(item, dict) and os.path.realpath(str(item.get("path", ""))) == mine and "name" in item:
            return {**item, "url": url}
    return None


def remote_query(index_path: str | Path, request: dict) -> tuple[dict, dict] | None:
    """(answer, what the server says of the index) from a server running for this index, or
    None when there is none (or it went away mid-request): the caller then answers the query
    itself. A 4xx is the UserError the CLI would have raised locally (the server checks the
    request with the same code and words)."""
    entry = served_entry(index_path)
    if entry is None:
        return None
    try:
        return ask_server(entry["url"], {**request, "index": entry["name"]}), entry
    except (ConnectionError, ValueError):  # gone, or not our server: answer locally
        return None


def query_server(index_path: str | Path, config, *, text, pair=None, label=None, completion=None):
    """``remote_query`` of a ``query --text`` with its ``QueryConfig`` (every option that changes
    the answer travels with it), or None when no server runs for the index."""
    request = {"text": text, "pair": pair, "label": label, "completion": completion,
               "k": config.k, "layers": config.layers, "agg": config.agg, "metric": config.metric,
               "vote_p": config.vote_p, "max_new_tokens": config.max_new_tokens,
               **({"score": config.score, "damping": config.damping} if config.score != "gradient" else {})}
    return remote_query(index_path, {key: value for key, value in request.items() if value is not None})


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def ask_server(url: str, request: dict, timeout: float = 120.0, route: str = "/api/query") -> dict:
    """POST a query to a running server and return its JSON answer.

    A 4xx becomes the ``UserError`` the server's one line describes (what the CLI would have
    said locally); a 5xx is a ``RuntimeError``; an unreachable server a ``ConnectionError``,
    so the caller can fall back to answering the query itself."""
    data = json.dumps(request).encode("utf-8")
    post = urllib.request.Request(url + route, data=data, method="POST",
                                  headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(post, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        message = _error_line(exc)
        if 400 <= exc.code < 500:
            raise UserError(message) from None
        raise RuntimeError(f"the server at {url} failed ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"no server answers at {url}: {exc}") from None


def _error_line(exc) -> str:
    try:
        return str(json.loads(exc.read())["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"HTTP {exc.code} {exc.reason}"
