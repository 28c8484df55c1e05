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


def leave(code: int) -> None:
    """Exit with ``code``. A torchrun rank (WORLD_SIZE > 1) leaves at once after flushing its
    output: its work is on disk and the process group torn down, but C++ threads that torch
    leaves behind sometimes abort the interpreter's teardown ("terminate called without an
    active exception", SIGABRT; seen in CI after a rank had finished), which torchrun then
    reports as a failed rank."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
