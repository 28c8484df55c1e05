"""The CLI's OpenMP wait policy: threads sleep when idle unless the user chose otherwise."""

from __future__ import annotations

import os

import pytest

from lite_influence.cli import main


def run_help():
    with pytest.raises(SystemExit):
        main(["--help"])


def test_the_cli_makes_idle_openmp_threads_sleep(monkeypatch, capsys):
    monkeypatch.setenv("OMP_WAIT_POLICY", "unset by the test")  # so that teardown restores the original
    monkeypatch.delenv("OMP_WAIT_POLICY")
    run_help()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_users_wait_policy_is_kept(monkeypatch, capsys):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    run_help()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_query_run_as_the_program_leaves_without_teardown_and_says_everything(bert_dir, train_tsv, tmp_path):
    """`python -m lite_influence query` (and info) leaves right after flushing its output
    (process.leave at_once): through a pipe the whole answer arrives, the exit code is 0, and
    an exit handler registered during the run does not run (the teardown was skipped)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from lite_influence import build_index

    index = build_index(bert_dir, train_tsv, tmp_path / "idx", projection="random", proj_dim=2).path
    root = Path(__file__).resolve().parents[1]
    probe = ("import atexit, runpy, sys; atexit.register(lambda: print('TEARDOWN', file=sys.stderr))\n"
             "sys.argv = ['lite-influence'] + sys.argv[1:]\nrunpy.run_module('lite_influence', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    for args, key in ((["query", str(index), "--text", "good movie", "-k", "2", "--local", "--json"], "proponents"),
                      (["info", str(index), "--json"], "manifest")):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        assert key in json.loads(done.stdout) and "TEARDOWN" not in done.stderr
    failed = subprocess.run([sys.executable, "-c", probe, "query", str(index)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert failed.returncode == 1 and "TEARDOWN" in failed.stderr  # a user error leaves as before
