"""The warm server: its answers equal InfluenceIndex.query, bad requests are one-line 4xx,
the state file lets a client find a real uvicorn server (and only a live one), the page uses
local assets only, and the client side imports nothing heavy."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402

from conftest import WORDS  # noqa: E402
from lite_influence.api import InfluenceIndex, build_index  # noqa: E402
from lite_influence.errors import UserError  # noqa: E402
from lite_influence.serve import (STATE_FILE, Served, ask_server, create_app, find_server,  # noqa: E402
                                  served_names, state_path)

QUERY = "the film was very good"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def index_path(bert_dir, tmp_path_factory):
    import random

    rng = random.Random(1)
    folder = tmp_path_factory.mktemp("serve")
    rows = [f"{' '.join(rng.choices(WORDS, k=rng.randint(3, 10)))}\t{i % 2}" for i in range(14)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return build_index(bert_dir, folder / "train.tsv", folder / "tiny", projection="random").path


@pytest.fixture(scope="module")
def client(index_path):
    with TestClient(create_app(Served([index_path]))) as client:
        yield client


@pytest.fixture(scope="module")
def reference(index_path):
    return InfluenceIndex.open(index_path)


def user_error(fn) -> str:
    with pytest.raises(UserError) as caught:
        fn()
    return str(caught.value)


def assert_one_line_error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert message and "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("request_", [
    {"text": QUERY},
    {"text": QUERY, "k": 3, "layers": "middle", "agg": "rank"},
    {"text": QUERY, "k": 4, "layers": "block0,head", "agg": "mean", "label": "negative"},
    {"text": "a dull plot", "label": 1, "k": 2, "agg": "vote"},
])
def test_query_equals_the_python_api(client, reference, request_):
    response = client.post("/api/query", json={"index": "tiny", **request_})
    assert response.status_code == 200, response.text
    got = response.json()
    timings = got.pop("timings")
    assert timings["query_ms"] > 0 and timings["total_ms"] >= timings["query_ms"]
    args = {key: request_[key] for key in ("k", "layers", "agg") if key in request_}
    expected = reference.query(request_["text"], request_.get("pair"), request_.get("label"), **args)
    assert got == json.loads(json.dumps(expected, allow_nan=False))  # JSON-able, and equal
    assert got["proponents"] and got["opponents"]


def test_bad_requests_are_one_line_4xx_with_the_user_error_message(client, reference):
    def post(body):
        return client.post("/api/query", json=body)

    cases = [({"index": "tiny", "text": QUERY, "k": 0}, 400, lambda: reference.query(QUERY, k=0)),
             ({"index": "tiny", "text": QUERY, "layers": "block9"}, 400, lambda: reference.query(QUERY, layers="block9")),
             ({"index": "tiny", "text": QUERY, "agg": "median"}, 400, lambda: reference.query(QUERY, agg="median")),
             ({"index": "tiny", "text": QUERY, "label": "neutral"}, 400, lambda: reference.query(QUERY, label="neutral"))]
    for body, status, same_as in cases:
        assert assert_one_line_error(post(body), status) == user_error(same_as)
    assert "'k' must be int" in assert_one_line_error(post({"index": "tiny", "text": QUERY, "k": "ten"}), 400)
    assert "'k' must be int" in assert_one_line_error(post({"index": "tiny", "text": QUERY, "k": True}), 400)
    assert "missing 'text'" in assert_one_line_error(post({"index": "tiny"}), 400)
    assert "missing 'text'" in assert_one_line_error(post({"index": "tiny", "text": ""}), 400)
    assert "unknown field 'path'" in assert_one_line_error(post({"index": "tiny", "text": QUERY, "path": "/etc"}), 400)
    assert "completion" in assert_one_line_error(post({"index": "tiny", "text": QUERY, "completion": " x"}), 400)
    for name in ("nope", "../x", str(reference.path), "tiny/../tiny"):
        message = assert_one_line_error(post({"index": name, "text": QUERY}), 404)
        assert "no served index named" in message and "served: tiny" in message
    assert "not valid JSON" in assert_one_line_error(
        client.post("/api/query", content=b"{nope", headers={"Content-Type": "application/json"}), 400)
    assert "JSON object" in assert_one_line_error(client.post("/api/query", json=[1, 2]), 400)
    assert "not allowed" in assert_one_line_error(client.get("/api/query"), 405)


def test_examples_by_id_and_paths_that_leave_the_index(client, reference):
    for i in (0, 5, len(reference) - 1):
        response = client.get(f"/api/example/tiny/{i}")
        assert response.status_code == 200 and response.json() == reference.examples[i]
    assert "no example 14" in assert_one_line_error(client.get("/api/example/tiny/14"), 404)
    assert "no example -1" in assert_one_line_error(client.get("/api/example/tiny/-1"), 404)
    assert "whole number" in assert_one_line_error(client.get("/api/example/tiny/abc"), 400)
    assert "no served index" in assert_one_line_error(client.get("/api/example/..%2e/0"), 404)
    for path in ("/api/example/..%2Fx/0", "/api/example/%2e%2e/%2e%2e/manifest.json", "/static/../serve.py",
                 "/static/%2e%2e/serve.py", "/static/index.html", "/manifest.json"):
        response = client.get(path)
        assert response.status_code in (400, 404), path
        assert "{" not in response.text.split("error", 1)[-1][3:] and "def " not in response.text


def test_indexes_describe_what_is_served(client, reference, index_path):
    (item,) = client.get("/api/indexes").json()["indexes"]
    assert item["name"] == "tiny" and item["path"] == str(Path(index_path).resolve())
    assert item["n"] == len(reference) == 14 and item["layers"] == reference.layers
    assert item["groups"] == reference.groups and item["label_names"] == ["negative", "positive"]
    assert item["task"] == "classification" and item["metric"] == reference.manifest["metric"]
    assert item["metrics"] == ["cosine", "dot"]  # one build answers both


def test_the_metric_is_the_request_s_choice(client, reference):
    for metric in ("dot", "cosine"):
        by_text = client.post("/api/query", json={"index": "tiny", "text": QUERY, "k": 4, "metric": metric}).json()
        expected = reference.query(QUERY, k=4, metric=metric)
        assert by_text["metric"] == metric and [r["id"] for r in by_text["proponents"]] == [r["id"] for r in expected["proponents"]]
        by_id = client.post("/api/query_by_id", json={"index": "tiny", "id": 3, "k": 4, "metric": metric}).json()
        assert by_id == json.loads(json.dumps(reference.query_ids([3], k=4, metric=metric)))
    assert "unknown metric 'l2'" in assert_one_line_error(
        client.post("/api/query", json={"index": "tiny", "text": QUERY, "metric": "l2"}), 400)


def test_the_score_is_the_request_s_choice(client, reference):
    """--score curvature through the server: the API's answer, by text and by id; a bad score
    is one line."""
    for request_ in ({"text": QUERY, "k": 4, "score": "curvature"}, {"text": QUERY, "k": 4, "score": "curvature", "metric": "dot"}):
        answer = client.post("/api/query", json={"index": "tiny", **request_}).json()
        expected = reference.query(QUERY, **{key: v for key, v in request_.items() if key != "text"})
        assert answer["score"] == "curvature" and [r["id"] for r in answer["proponents"]] == [r["id"] for r in expected["proponents"]]
    by_id = client.post("/api/query_by_id", json={"index": "tiny", "id": 3, "k": 4, "score": "curvature"}).json()
    assert by_id == json.loads(json.dumps(reference.query_ids([3], k=4, score="curvature")))
    assert "unknown score 'ekfac'" in assert_one_line_error(
        client.post("/api/query", json={"index": "tiny", "text": QUERY, "score": "ekfac"}), 400)


def test_served_names_are_unique_folder_names(tmp_path):
    names = served_names([tmp_path / "a" / "idx", tmp_path / "b" / "idx", tmp_path / "c"])
    assert list(names) == ["idx", "idx-2", "c"] and names["idx-2"] == (tmp_path / "b" / "idx").resolve()
    assert "nothing to serve" in user_error(lambda: Served([]))


def test_query_by_id_equals_the_python_api(client, reference):
    answer = client.post("/api/query_by_id", json={"index": "tiny", "id": 3, "k": 4, "agg": "rank"})
    assert answer.status_code == 200
    assert answer.json() == json.loads(json.dumps(reference.query_ids([3], k=4, agg="rank")))
    assert "no example 99" in assert_one_line_error(client.post("/api/query_by_id", json={"index": "tiny", "id": 99}), 404)
    assert "no served index" in assert_one_line_error(client.post("/api/query_by_id", json={"index": "..", "id": 1}), 404)


class Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [value for key, value in attrs if key in ("src", "href") and value]


def test_page_is_served_with_local_assets_only(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    parser = Assets()
    parser.feed(page.text)
    assert "/static/app.js" in parser.refs and "/static/style.css" in parser.refs
    for ref in parser.refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref
        assert client.get(ref).status_code == 200, ref
    for ref in ("/static/app.js", "/static/style.css"):
        text = client.get(ref).text
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import", text), ref
    script = client.get("/static/app.js").text
    fetched = re.findall(r"api\(\s*[`\"']([^`\"']+)", script)
    assert len(fetched) >= 4 and all(path.startswith("/api/") for path in fetched)
    assert script.count("fetch(") == 1  # every request goes through api(), to this server only
    assert "innerHTML" not in script  # training texts are untrusted: textContent only


def test_client_side_imports_nothing_heavy():
    code = ("import sys; import lite_influence.serve as s; s.find_server('/nonexistent'); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'faiss', 'starlette', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "[]"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_find_server_refuses_stale_state(index_path, tmp_path):
    assert find_server(tmp_path) is None  # no state file
    state = state_path(tmp_path)
    state.write_text("{not json")
    assert find_server(tmp_path) is None
    state.write_text(json.dumps({"host": "127.0.0.1", "port": 9, "pid": dead_pid(), "url": "http://127.0.0.1:9"}))
    assert find_server(tmp_path) is None  # dead pid
    state.write_text(json.dumps({"host": "127.0.0.1", "port": 9, "pid": os.getpid(), "url": "http://127.0.0.1:9"}))
    assert find_server(tmp_path) is None  # live pid, nothing answers


@pytest.fixture(scope="module")
def live_server(index_path, tmp_path_factory):
    """A real uvicorn server in a subprocess on a free port (port 0), until the module ends."""
    from conftest import start_server

    process = start_server(index_path, tmp_path_factory.mktemp("log") / "server.log")
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def test_real_server_is_found_and_answers_like_the_api(live_server, index_path, reference):
    state = json.loads(state_path(index_path).read_text())
    assert state["pid"] == live_server.pid and state["host"] == "127.0.0.1" and state["port"] > 0
    url = find_server(index_path)
    assert url == f"http://127.0.0.1:{state['port']}"
    got = ask_server(url, {"index": "tiny", "text": QUERY, "k": 3, "agg": "rank"})
    got.pop("timings")
    assert got == json.loads(json.dumps(reference.query(QUERY, k=3, agg="rank")))
    with pytest.raises(UserError) as caught:
        ask_server(url, {"index": "tiny", "text": QUERY, "layers": "block9"})
    assert str(caught.value) == user_error(lambda: reference.query(QUERY, layers="block9"))


HEAVY_PROBE = ("import sys; from lite_influence.cli import main\n"
               "try:\n    main(sys.argv[1:])\nfinally:\n"
               "    print('HEAVY=' + ','.join(m for m in ('torch', 'transformers', 'numpy', 'faiss', 'starlette') "
               "if m in sys.modules), file=sys.stderr)")


def heavy_modules(stderr: str) -> set[str]:
    line = next(line for line in stderr.splitlines() if line.startswith("HEAVY="))
    return set(filter(None, line[len("HEAVY="):].split(",")))


def test_cli_query_asks_the_running_server_without_loading_torch(live_server, index_path, reference):
    """`lite-influence query` finds the server by itself and imports nothing heavy (no torch,
    transformers, numpy, faiss: a Python start and one request); --local answers in-process,
    the same; every option that changes the answer travels with the request (--vote-p)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for options in (["-k", "3"], ["-k", "3", "--vote-p", "0.6", "--agg", "vote"]):
        args = [sys.executable, "-c", HEAVY_PROBE, "query", str(index_path), "--text", QUERY, "--json", *options]
        remote = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        assert remote.returncode == 0, remote.stderr
        assert heavy_modules(remote.stderr) == set()
        answer = json.loads(remote.stdout)
        assert "timings" in answer  # the server's answer
        answer.pop("timings")
        local = subprocess.run(args + ["--local"], capture_output=True, text=True, timeout=300, env=env)
        assert local.returncode == 0 and "torch" in heavy_modules(local.stderr)
        assert json.loads(local.stdout) == answer


def test_a_bad_query_asked_of_the_server_fails_with_the_cli_s_own_line(live_server, index_path, capsys):
    """The server checks a request with the CLI's code: the same one line, exit 1."""
    from conftest import run_cli

    served = run_cli(capsys, "query", index_path, "--text", QUERY, "--completion", " x")
    local = run_cli(capsys, "query", index_path, "--text", QUERY, "--completion", " x", "--local")
    assert served[0] == local[0] == 1
    assert served[2].strip() == local[2].strip() and "--completion" in served[2]


def test_shutdown_removes_the_state_file_and_then_nothing_is_found(live_server, index_path):
    url = find_server(index_path)
    assert url is not None
    live_server.send_signal(signal.SIGTERM)
    assert live_server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert not state_path(index_path).exists()
    assert find_server(index_path) is None
    with pytest.raises(ConnectionError):
        ask_server(url, {"index": "tiny", "text": QUERY})
    assert not list(Path(index_path).glob(f"{STATE_FILE}*"))  # no temporary left either


def test_busy_port_is_one_line(index_path):
    import socket

    from lite_influence.serve import listen

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        message = user_error(lambda: listen("127.0.0.1", port))
    assert f"cannot listen on 127.0.0.1:{port}" in message and "--port" in message


def test_causal_lm_index_is_served_and_warmed(tmp_path):
    from test_causal_lm import fact_rows, save_lm, write_rows

    model = save_lm(tmp_path / "gpt2", "gpt2", initializer_range=0.2)
    train = write_rows(tmp_path / "train.tsv", ("prompt", "completion"), fact_rows())
    path = build_index(model, train, tmp_path / "lm", proj_dim=4).path
    served = Served([path])
    served.warm_up()
    reference = InfluenceIndex.open(path)
    with TestClient(create_app(served)) as client:
        assert client.get("/api/indexes").json()["indexes"][0]["task"] == "causal-lm"
        for extra in ({"completion": " good movie"}, {}):
            got = client.post("/api/query", json={"index": "lm", "text": "the plot ->", "k": 3, **extra}).json()
            got.pop("timings")
            expected = reference.query("the plot ->", k=3, completion=extra.get("completion"))
            assert got == json.loads(json.dumps(expected))
        assert "causal language model" in assert_one_line_error(
            client.post("/api/query", json={"index": "lm", "text": "the plot ->", "label": 1}), 400)


def test_a_saved_audit_is_served_for_the_page(client, reference, capsys, tmp_path):
    """`audit --save` keeps the table, baselines, ranking and curves beside the index; the
    server hands them to the page, and says in one line when an index has none."""
    from conftest import run_cli

    assert "no saved audit" in assert_one_line_error(client.get("/api/audit/tiny"), 404)
    rows = [{"text": e["text"], "label": e["label"]} for e in reference.examples[:6]]
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, "audit", reference.path, queries, "--save", "--agg", "rank")
    assert code == 0, err
    saved = client.get("/api/audit/tiny").json()
    expected = reference.audit(queries, aggs="rank")
    assert saved["table"] == json.loads(json.dumps(expected.table))
    assert [r["id"] for r in saved["ranking"]["rows"]] == expected.ranking[:200].tolist()
    assert saved["metric"] == reference.manifest["metric"]
