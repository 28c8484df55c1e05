"""One build at a time per ``--out``: an flock on ``.NAME.lock`` beside the partial folder.

The lock is advisory and held only by builds; queries never take it, so they keep reading the
old index while a build runs. The kernel drops it when the holder dies (a kill -9 leaves no
stale lock). The file is removed on release; an acquirer checks that the file it locked is
still the one at the path, so removing it cannot let two builds in.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


class BuildLock:
    def __init__(self, out: Path):
        self.out, self.path, self._fd = out, lock_path(out), None

    def acquire(self) -> "BuildLock":
        """Take the lock or raise BlockingIOError with the holder's pid as its filename."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise BlockingIOError(11, "locked", holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self._fd = fd
                return self
            os.close(fd)  # released and removed by its holder meanwhile: take the new file

    def hold(self) -> "BuildLock":
        """``acquire``, with the one line a user sees when another build has it."""
        try:
            return self.acquire()
        except BlockingIOError as exc:
            raise UserError(f"another build (pid {exc.filename}) is writing {self.out}; wait for it "
                            "to finish or stop it.") from None
        except OSError as exc:
            raise UserError(f"cannot write beside --out '{self.out}': {exc.strerror}; "
                            "choose a folder you can write to.") from None

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    @classmethod
    @contextmanager
    def try_hold(cls, out: Path):
        lock = cls(out).acquire()
        try:
            yield lock
        finally:
            lock.release()
