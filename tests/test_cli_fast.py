"""cli_fast: `lite-influence query INDEX --text ...` asked of a running server before typer,
rich or numpy load, with the options config.py declares; every other command line, and a
missing or stale server, goes to the full CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from lite_influence import cli_fast  # noqa: E402
from lite_influence.config import QueryConfig, QueryText, flag_of  # noqa: E402
from lite_influence.serve import state_path  # noqa: E402
from test_serve import QUERY, dead_pid, index_path, reference  # noqa: E402,F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
PROBE = ("import sys; from lite_influence.cli_fast import answer\n"
         "code = answer(sys.argv[1:])\n"
         "print('LOADED=' + ','.join(m for m in ('typer', 'rich', 'numpy', 'torch', 'faiss') if m in sys.modules), "
         "file=sys.stderr)\nsys.exit(3 if code is None else code)")


def probe(*args):
    """(exit code: 3 when the full CLI must answer, stdout, modules loaded) of cli_fast.answer."""
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=ENV)
    loaded = next(line for line in done.stderr.splitlines() if line.startswith("LOADED="))[len("LOADED="):]
    return done.returncode, done.stdout, set(filter(None, loaded.split(","))), done.stderr


def test_every_declared_option_is_read_from_its_dataclass():
    known = cli_fast.flags(QueryText, QueryConfig)
    for cls in (QueryText, QueryConfig):
        for f in fields(cls):
            assert known[flag_of(f)][:2] == (cls, f.name)
    index, asked, config = cli_fast.parse(["query", "idx", "-t", "a text", "-k", "3", "--vote-p=0.5",
                                           "--agg", "rank", "--json", "--label", "1", "--aggregate", "--no-aggregate"])
    assert (index, asked.text, asked.label, asked.as_json) == ("idx", "a text", "1", True)
    assert (config.k, config.vote_p, config.agg, config.aggregate) == (3, 0.5, "rank", False)


@pytest.mark.parametrize("argv", [
    ["build", "m", "t.tsv"], ["query", "idx"], ["query", "idx", "--id", "3"], ["query", "idx", "--text", "x", "--local"],
    ["query", "idx", "--text", "x", "--help"], ["query", "idx", "--text", "x", "-k", "three"],
    ["query", "idx", "other", "--text", "x"], ["query", "idx", "--text"], ["--quiet", "query", "idx", "--text", "x"],
    ["query", "idx", "--text", "x", "--json=yes"]])
def test_what_it_does_not_fully_understand_goes_to_the_full_cli(argv):
    assert cli_fast.parse(argv) is None or cli_fast.answer(argv) is None


@pytest.fixture(scope="module")
def live_server(index_path):  # noqa: F811
    from conftest import start_server

    process = start_server(index_path, Path(index_path).parent / "fast-server.log")
    yield process
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def test_server_found_answers_without_typer_rich_or_numpy(live_server, index_path, reference):  # noqa: F811
    code, out, loaded, err = probe("query", index_path, "--text", QUERY, "--json", "-k", "3", "--agg", "rank")
    assert code == 0, err
    assert loaded == set()
    answer = json.loads(out)
    answer.pop("timings")
    assert answer == json.loads(json.dumps(reference.query(QUERY, k=3, agg="rank")))


def test_the_entry_point_prints_what_the_full_cli_prints(live_server, index_path):  # noqa: F811
    args = ["query", str(index_path), "--text", QUERY, "-k", "2"]
    fast = subprocess.run([sys.executable, "-m", "lite_influence", *args], capture_output=True, text=True,
                          timeout=120, env={**ENV, "COLUMNS": "100"})
    full = subprocess.run([sys.executable, "-c", "import sys; from lite_influence.cli import main; main(sys.argv[1:])",
                           *args], capture_output=True, text=True, timeout=120, env={**ENV, "COLUMNS": "100"})
    assert fast.returncode == full.returncode == 0, fast.stderr + full.stderr
    assert fast.stdout == full.stdout and "opponents" in fast.stdout.lower()


def test_a_refused_request_is_the_full_cli_s_one_line(live_server, index_path, capsys):  # noqa: F811
    from conftest import run_cli

    code, _, _, err = probe("query", index_path, "--text", QUERY, "--completion", " x")
    local = run_cli(capsys, "query", index_path, "--text", QUERY, "--completion", " x", "--local")
    assert code == local[0] == 1
    assert err.splitlines()[0] == local[2].strip()


def test_no_server_or_a_stale_state_file_falls_back(index_path, tmp_path):  # noqa: F811
    copy = Path(shutil.copytree(index_path, tmp_path / "copy"))
    state_path(copy).unlink(missing_ok=True)
    args = ["query", copy, "--text", QUERY, "--json", "-k", "2"]
    assert probe(*args)[0] == 3  # no state file
    state_path(copy).write_text(json.dumps({"host": "127.0.0.1", "port": 9, "pid": dead_pid(),
                                            "url": "http://127.0.0.1:9"}))
    assert probe(*args)[0] == 3  # a dead server's file
    done = subprocess.run([sys.executable, "-m", "lite_influence", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    assert "timings" not in json.loads(done.stdout)  # answered in-process by the full CLI


def test_a_negative_hold_is_one_line(capsys, tmp_path):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "serve", tmp_path, "--hold-gb", "-1")
    assert code == 1 and "--hold-gb must be 0 or more" in err and len(err.strip().splitlines()) == 1
