"""progress.py: what a long command prints on stderr. A log (not a terminal) gets a plain line
per stage at most every 5 s plus the stage's last, never rich bars that only appear when the
command ends; a terminal gets bars, and a spinner while the model loads; --quiet nothing."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from conftest import run_cli
from lite_influence.progress import EVERY, reporting


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def log_console():
    out = io.StringIO()
    return Console(file=out, width=60), out  # a StringIO is not a terminal, as a log file is not


def test_a_log_gets_a_line_at_most_every_five_seconds_plus_the_last():
    console, out = log_console()
    clock = Clock()
    assert not console.is_terminal and EVERY == 5.0
    with reporting(console, clock=clock) as progress:
        progress("model", 0, 1)
        clock.now += 3
        progress("model", 1, 1)  # the spinner's stage prints nothing in a log
        for done in range(0, 5001, 100):  # one batch of 100 every second
            progress("gradients", done, 5000)
            clock.now += 1
        progress("faiss", 1, 5)
        progress("faiss", 5, 5)
        progress("faiss", 5, 5)  # reported twice (build does): printed once
    lines = out.getvalue().splitlines()
    assert lines == [f"projected gradients {500 * i:,}/5,000 ({10 * i}%), {5 * i} s" for i in range(1, 11)] + [
        "writing FAISS 5/5 (100%), 0 s"]  # faiss 1/5 came 1 s after the last line: not printed


def test_a_stage_that_starts_again_is_counted_again():
    console, out = log_console()
    clock = Clock()
    with reporting(console, clock=clock) as progress:
        for run in range(2):  # e.g. the demo's two builds
            progress("gradients", 0, 3)
            clock.now += 2
            progress("gradients", 3, 3)
    assert out.getvalue().splitlines() == ["projected gradients 3/3 (100%), 2 s"] * 2


def test_quiet_prints_nothing_and_nothing_is_printed_before_the_first_report():
    console, out = log_console()
    with reporting(console, quiet=True) as progress:
        progress("gradients", 3, 3)
    with reporting(console):
        pass
    assert out.getvalue() == ""


def test_a_terminal_gets_a_spinner_while_the_model_loads_then_bars():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with reporting(console) as progress:
        progress("model", 0, 1)
        spinner = progress.status
        assert spinner is not None  # a rich status (spinner) is live while the model loads
        progress("model", 1, 1)
        assert progress.status is None
        progress("gradients", 6, 12)
        progress("gradients", 12, 12)
    printed = out.getvalue()
    assert "loading the model" in printed and "projected gradients" in printed and "━" in printed


def test_build_and_train_in_a_log_print_plain_lines(bert_dir, train_tsv, tmp_path, capsys):
    """capsys's stderr is not a terminal, like a log file: plain lines, no bar characters."""
    code, _, err = run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / "index")
    assert code == 0, err
    lines = err.splitlines()
    assert lines[:3] == [line for line in lines[:3] if re.fullmatch(r"[a-zA-Z ]+ [\d,]+/[\d,]+ \(\d+%\), \d+ s", line)]
    assert [line.rsplit(",", 1)[0] for line in lines[:3]] == [
        "fitting eigenbasis 12/12 (100%)", "projected gradients 12/12 (100%)", "writing FAISS 5/5 (100%)"]
    assert lines[3].startswith("indexed 12 examples")  # the summary (wrapped at the path), nothing after it
    assert not any(re.search(r"\(\d+%\)", line) for line in lines[3:])
    assert "━" not in err and "loading the model" not in err
    code, _, err = run_cli(capsys, "train", bert_dir, train_tsv, "--out", tmp_path / "model", "--epochs", "2")
    assert code == 0, err
    assert [line.rsplit(",", 1)[0] for line in err.splitlines()] == [
        "train epoch 1/2 12/12 (100%)", "train epoch 2/2 12/12 (100%)", "save 3/3 (100%)"]
    code, out, err = run_cli(capsys, "query", tmp_path / "index", "--text", "good film", "--local")
    assert code == 0 and err == "", err  # the model's spinner prints nothing in a log


@pytest.mark.parametrize("command", ["build", "train"])
def test_on_a_terminal_the_model_loads_under_a_spinner(bert_dir, train_tsv, tmp_path, capsys, monkeypatch, command):
    import lite_influence.cli

    out = io.StringIO()
    monkeypatch.setattr(lite_influence.cli, "err", Console(file=out, force_terminal=True, width=120))
    extra = ["--epochs", "1"] if command == "train" else []
    code, _, _ = run_cli(capsys, command, bert_dir, train_tsv, "--out", tmp_path / "out", *extra)
    assert code == 0, out.getvalue()
    printed = out.getvalue()
    first_bar = "fitting eigenbasis" if command == "build" else "train epoch 1/1"
    assert "loading the model" in printed and printed.index("loading the model") < printed.index(first_bar)
