"""How a command-line process starts and ends, where that differs from a library call."""

from __future__ import annotations

import os
import sys

# OpenMP threads that sleep when idle instead of spinning: with two busy processes on this
# machine's 2 cores a 300-row MiniLM build took 13 s instead of 23-38 s; unloaded it costs
# 1.05-1.25x (benchmarks/results/thread_policy.md). Set before torch loads OpenMP, and only when
# the user has not chosen (OMP_WAIT_POLICY=ACTIVE restores spinning).
WAIT_POLICY = "PASSIVE"


def quiet_threads() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


AT_ONCE = ("query", "info")  # commands that write nothing, whose process may skip the teardown


def leave(code: int, at_once: bool = False) -> None:
    """Exit with ``code``. With ``at_once`` (a read-only command run as the program: ``query``,
    ``info``), and always for a torchrun rank (WORLD_SIZE > 1), the process leaves right after
    flushing its output, without the interpreter's teardown: after a query, tearing torch and
    transformers down took 1.3-3 s (the stage "exit" of benchmarks/results/cold_query.md), all of
    it after the answer was printed. A torchrun rank's work is on disk and its process group
    torn down, but C++ threads that torch leaves behind sometimes abort the teardown
    ("terminate called without an active exception", SIGABRT; seen in CI after a rank had
    finished), which torchrun then reports as a failed rank."""
    if at_once or os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (| head): nothing more can be said
                pass
        os._exit(code)
    sys.exit(code)
