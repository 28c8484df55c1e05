"""A long command's progress on stderr: bars and a spinner on a terminal, plain lines in a log.

The library side of every command reports ``(stage, done, total)`` (``build.Progress``); this
is the one place that draws it, for build, train, audit, query and demo alike. Stage ``model``
is the model loading, reported ``(0, 1)`` when it starts and ``(1, 1)`` when it is done: a
spinner on a terminal, since how long it takes is unknown.

When stderr is not a terminal (a log file, CI, ``nohup``), a live display cannot redraw: rich
prints its bars once, when the command ends, so a log would show nothing of a run for hours.
There each stage is a plain line instead, ``projected gradients 1,200/5,000 (24%), 12 s``: at
most one every ``EVERY`` seconds, plus the last of each stage (so a quick stage is one line),
and nothing for the spinner. On a terminal and off it, nothing is printed before the first
report, so an input error stays the only line on stderr; ``quiet`` prints nothing at all.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

EVERY = 5.0  # seconds between two plain lines
LABELS = {"model": "loading the model", "fit": "fitting eigenbasis", "gradients": "projected gradients",
          "faiss": "writing FAISS"}
SPINNERS = frozenset({"model"})  # stages of unknown length


def label(stage: str) -> str:
    return LABELS.get(stage, stage)


@contextmanager
def reporting(console, quiet: bool = False, *, every: float = EVERY, clock=time.monotonic):
    """A progress callback ``(stage, done, total)`` drawn on ``console`` (rich, stderr) as the
    module docstring says; whatever it shows is stopped when the block ends, error or not."""
    if quiet:
        yield lambda stage, done, total: None
        return
    shown = _Bars(console) if console.is_terminal else _Lines(console, every, clock)
    try:
        yield shown
    finally:
        shown.close()


class _Bars:
    """A terminal: one rich bar per stage with examples/s and time left; the spinner stage is a
    rich status line. Two live displays cannot share a console, so each stops the other."""

    COLUMNS = (TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())

    def __init__(self, console):
        self.console, self.bar, self.tasks, self.status = console, None, {}, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage in SPINNERS:
            self._stop_bar()
            if done < total and self.status is None:
                self.status = self.console.status(label(stage))
                self.status.start()
            elif done >= total:
                self._stop_status()
            return
        self._stop_status()
        if self.bar is None:  # a new block of bars (the old one, if any, stays printed above)
            self.bar, self.tasks = Progress(*self.COLUMNS, console=self.console, transient=False), {}
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(label(stage), total=total, rate="")
        task = self.bar.tasks[self.tasks[stage]]
        rate = done / task.elapsed if task.elapsed else 0
        self.bar.update(self.tasks[stage], completed=done, total=total,
                        rate=f"{rate:,.1f} ex/s" if stage != "faiss" else "")

    def _stop_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def close(self) -> None:
        self._stop_status()
        self._stop_bar()


class _Lines:
    """Not a terminal: a plain line per stage at most every ``every`` seconds, plus its last."""

    def __init__(self, console, every: float, clock):
        self.console, self.every, self.clock = console, every, clock
        self.began: dict[str, float] = {}
        self.finished: set[str] = set()
        self.last: float | None = None  # when the last line was printed (or the first report came)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage in SPINNERS:
            return
        now = self.clock()
        if self.last is None:
            self.last = now
        last = total <= 0 or done >= total
        if stage not in self.began or (stage in self.finished and not last):  # (re)started
            self.began[stage] = now
            self.finished.discard(stage)
        if stage in self.finished or not (last or now - self.last >= self.every):
            return
        if last:
            self.finished.add(stage)
        percent = 100 if total <= 0 else int(100 * done / total)
        self.console.print(f"{label(stage)} {done:,}/{total:,} ({percent}%), {now - self.began[stage]:.0f} s",
                           markup=False, highlight=False, soft_wrap=True)
        self.last = now

    def close(self) -> None:
        pass
