"""Atomic, durable writes: one helper for a file, one for swapping a folder into place.

Everything the store writes goes through ``write_file`` (temporary name in the same folder,
fsync, rename, fsync of the folder) so a reader, a crash or a kill sees the old file or the
new one, never half of one. ``swap_folder`` puts a finished folder at a path where an old one
may be: on Linux with ``renameat2(RENAME_EXCHANGE)``, so there is no instant at which the path
is missing; elsewhere (or on a file system without it) the old folder is moved aside to
``.NAME.old`` and ``restore_swap`` puts it back if a kill struck between the two renames.

``crash_point(name)`` marks each step of these operations: tests set ``_crash_hook`` to kill
the process at the N-th step (fault injection); in normal runs it does nothing.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Callable

_crash_hook: Callable[[str], None] | None = None
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_exchange_supported = True  # tests turn it off to exercise the fallback


def crash_point(name: str) -> None:
    """A step of a write; the test hook may kill the process here."""
    if _crash_hook is not None:
        _crash_hook(name)


def fsync_dir(folder: Path) -> None:
    """Make renames and deletions inside ``folder`` durable (POSIX; a no-op elsewhere)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """``fill(tmp)`` writes the content to a temporary path; it is fsync'd and renamed to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fill(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        crash_point(f"{path.name} written, not renamed")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    crash_point(f"{path.name} renamed")
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, data) -> Path:
    return write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    global _exchange_supported
    if not _exchange_supported:
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        _exchange_supported = False
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        _exchange_supported = False
        return False
    raise OSError(code, os.strerror(code), str(b))


def aside(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def swap_folder(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out``. What was at ``out`` ends at ``new`` (exchange) or is
    removed; the caller removes ``new`` afterwards either way."""
    if not out.exists():
        os.replace(new, out)
        fsync_dir(out.parent)
        crash_point("renamed into place")
        return
    if _exchange(new, out):
        fsync_dir(out.parent)
        crash_point("exchanged with the old folder")
        return
    old = aside(out)
    remove(old)
    os.replace(out, old)
    crash_point("old folder moved aside")
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    fsync_dir(out.parent)
    crash_point("new folder renamed into place")
    remove(old)


def restore_swap(out: Path) -> None:
    """Finish what a swap killed between its two renames left: the old folder comes back
    when ``out`` is missing; a stale ``.NAME.old`` beside a complete ``out`` is removed."""
    old = aside(out)
    if not old.is_dir():
        remove(old)  # only a trash folder a kill left mid-removal, if any
        return
    if not out.exists():
        os.replace(old, out)
        fsync_dir(out.parent)
    else:
        remove(old)


def remove(path: Path) -> None:
    """Delete a folder we own: renamed to a trash name first, so a kill mid-way leaves a
    name nothing reads rather than a half-deleted folder under a meaningful one."""
    trash = path.with_name(path.name + ".trash")
    if trash.exists():  # left by a kill mid-way
        shutil.rmtree(trash)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    os.replace(path, trash)
    fsync_dir(path.parent)
    crash_point(f"{path.name} moved to trash")
    shutil.rmtree(trash)
