"""An index grows and shrinks in place: ``add`` appends the rows of a file, ``delete`` removes
rows by id or by a column's value.

``add`` builds the new rows with the index's own options and its own projection (the index is
their ``--projection-from``: no refit, so old and new vectors live in one space), then joins
old and new rows (``store.combine``); ``delete`` keeps the other rows. Both write the new index
beside the old one and swap it in (a kill leaves the old index or the new one, never a mix),
both hold the index's build lock throughout, and both append what they did to the manifest's
``history`` (an added file's path, data fingerprint and rows; a deletion's selector and
count). The result is the index a fresh build over the same rows with the same projection
gives: row for row the same stored numbers (bit for bit where the batches are the same, as
with ``--batch-size 1``; else to float32 rounding, since a fresh build pads an example with
other neighbours), ids renumbered to row numbers (a deletion
shifts the rows after it down; ``input_id`` keeps an input's own ids). A saved audit
(``audit --save``) is not carried over: it describes the old rows.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import BuildConfig
from .errors import UserError
from .store import IndexStore, IndexWriter, resolve_factory
from .store.combine import Piece, check_exact, combine


def _writer(store: IndexStore, protect) -> IndexWriter:
    """The index's own writer (its lock held), refusing to discard an interrupted build."""
    writer = IndexWriter(store.path, force=True, protect=protect)
    if writer.partial.exists():
        writer.close()
        raise UserError(f"an interrupted build of '{store.path}' is kept in {writer.partial}; finish it with "
                        "`build --resume` or discard it with `build --force` first.")
    return writer


def _history(manifest: dict, entry: dict) -> list:
    return [*manifest.get("history", []), {**entry, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]


def add_rows(index: str | Path, rows_file: str | Path, *, model: str | Path | None = None, progress=None) -> dict:
    """Append the rows of ``rows_file`` to ``index``; the new manifest."""
    from .build import build_index

    store = IndexStore.open(index)
    _editable(store, "adding rows")
    model = Path(model or store.manifest["model"]["path"])
    writer = _writer(store, [rows_file, model])
    try:
        config = replace(BuildConfig.from_dict(store.manifest["build"]), projection_from=str(store.path), shard=None,
                         limit=None, index_factory="Flat")
        added = build_index(model, rows_file, writer.fresh_stage().parent / "added", config, progress=progress).store
        n, m = store.n, added.n
        manifest = {**store.manifest, "n": n + m, "index_factory": _factory(store, n + m),
                    "build_seconds": round(store.manifest.get("build_seconds", 0) + added.manifest["build_seconds"], 3),
                    "history": _history(store.manifest, {"op": "add", "file": str(Path(rows_file).resolve()),
                                                         "fingerprint": added.manifest["data"]["fingerprint"],
                                                         "rows": m, "first_id": n})}
        combine([Piece(store, np.arange(n), np.arange(n)), Piece(added, np.arange(m), n + np.arange(m))],
                manifest, writer)
        return manifest
    except BaseException:
        writer.abort()
        raise


def delete_rows(index: str | Path, *, ids: str | list | None = None, where: str | None = None) -> dict:
    """Remove the rows named by ``ids`` (numbers, or "3,7,12") or ``where`` ("column=value")
    from ``index``; the new manifest."""
    store = IndexStore.open(index)
    _editable(store, "deleting rows")
    removed, selector = _selected(store, ids, where)
    if len(removed) == store.n:
        raise UserError(f"that would delete all {store.n} rows; an index keeps at least one (remove the folder instead).")
    kept = np.setdiff1d(np.arange(store.n), removed)
    writer = _writer(store, [])
    try:
        manifest = {**store.manifest, "n": len(kept), "index_factory": _factory(store, len(kept)),
                    "history": _history(store.manifest, {"op": "delete", "selector": selector, "removed": len(removed)})}
        combine([Piece(store, kept, np.arange(len(kept)))], manifest, writer)
        return manifest
    except BaseException:
        writer.abort()
        raise


def _factory(store: IndexStore, n: int) -> str:
    """The FAISS factory for the index's new size: the build's ``--index-factory`` resolved
    again (``auto`` turns Flat into IVF at 100,000 rows and back, its lists follow N), as a
    fresh build of those rows would write it."""
    return resolve_factory(store.manifest["build"].get("index_factory", store.manifest["index_factory"]), n)


def _editable(store: IndexStore, what: str) -> None:
    if "checkpoints" in store.manifest:  # each checkpoint's sub-index would need the same change (tracin.py)
        raise UserError(f"'{store.path}' holds several checkpoints (TracIn-CP); {what} is not supported there: rebuild it.")
    if "shard" in store.manifest:
        raise UserError(f"'{store.path}' is one shard of a build; merge the shards (`lite-influence merge`) before {what}.")
    check_exact(store, what)


def _selected(store: IndexStore, ids, where) -> tuple[np.ndarray, str]:
    """(the ids to remove, sorted, distinct; the selector in words)."""
    if (ids is None) == (where is None):
        raise UserError("pass one of --ids 3,7,12 or --where column=value.")
    if ids is not None:
        text = ids if isinstance(ids, str) else ",".join(str(i) for i in ids)
        try:
            chosen = np.unique(np.asarray([int(x) for x in text.split(",") if x.strip()], np.int64))
        except ValueError:
            raise UserError(f"--ids must be row ids separated by commas (e.g. 3,7,12), got '{text}'") from None
        bad = chosen[(chosen < 0) | (chosen >= store.n)]
        if not len(chosen) or len(bad):
            raise UserError(f"--ids must name rows 0..{store.n - 1}; got {bad[0] if len(bad) else 'none'}.")
        return chosen, f"ids {text}"
    column, sep, value = where.partition("=")
    if not sep or not column.strip():
        raise UserError(f"--where must be column=value (e.g. label=negative or noisy=1), got '{where}'")
    column, wanted = column.strip(), {value}
    names = store.manifest["label_names"]
    if column == "label" and value in names:
        wanted.add(str(names.index(value)))  # the table keeps class ids
    rows = store.examples
    if not any(column in row for row in rows):
        columns = sorted({key for row in rows for key in row})
        raise UserError(f"the examples have no column '{column}'; they have: {', '.join(columns)}")
    chosen = np.asarray([i for i, row in enumerate(rows) if column in row and str(row[column]) in wanted], np.int64)
    if not len(chosen):
        raise UserError(f"no row has {column}={value}; nothing was deleted.")
    return chosen, f"where {column}={value}"
