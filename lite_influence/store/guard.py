"""What ``--out`` may be, and what ``--force`` may replace: never anything that is not ours.

A build replaces ``--out`` only when it is missing, an empty folder, or, with ``--force``, a
lite-influence index or a model folder written by ``train`` (it holds ``training.json``
beside ``config.json``). A folder equal to, or containing, a path the caller protects (the
model, the training data) is refused even with ``--force``: replacing it would delete them.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .manifest import MANIFEST

TRAIN_MARKER = "training.json"  # written by `lite-influence train` into every model folder
PROJECTION_RECORD = "projection.json"  # written by `lite-influence fit` beside projection.npz


def real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def target(out: str | Path) -> Path:
    """Where the index really goes: a symlink given as ``--out`` is followed (the link keeps
    pointing at the folder, which is swapped in place), a plain path is kept as given."""
    out = Path(out)
    return real(out) if out.is_symlink() else out


def kind(folder: Path) -> str:
    """'missing', 'file', 'empty', 'index', 'model' (written by train), 'projection'
    (written by fit) or 'other'."""
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "file"
    if (folder / MANIFEST).is_file():
        return "index"
    if (folder / TRAIN_MARKER).is_file() and (folder / "config.json").is_file():
        return "model"
    if (folder / PROJECTION_RECORD).is_file():
        return "projection"
    return "other" if any(folder.iterdir()) else "empty"


def check_out(out: Path, force: bool, protect=(), product: str = "the index") -> None:
    """Refuse (UserError) an ``--out`` this build (or ``train``: ``product`` "the model")
    must not write or replace."""
    where = real(out)
    for path in protect:
        guarded = real(path)
        if where == guarded or where in guarded.parents:
            raise UserError(f"--out '{out}' is or contains '{path}', which is read to make it; "
                            f"choose another folder for {product}.")
    found = kind(out)
    if found == "file":
        raise UserError(f"--out '{out}' is a file, not a folder; choose a folder for {product}.")
    if found == "other":
        raise UserError(f"--out '{out}' exists and is not a lite-influence index; choose another "
                        "folder (--force replaces only an index, a model folder written by `train` "
                        "or an empty folder).")
    if found in ("index", "model", "projection") and not force:
        what = {"index": "an index", "model": "a model folder written by `train`",
                "projection": "a projection written by `fit`"}[found]
        raise UserError(f"--out '{out}' already holds {what}; pass --force to replace it, "
                        "or choose another folder.")
