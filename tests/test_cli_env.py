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
