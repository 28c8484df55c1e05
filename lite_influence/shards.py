"""Builds split into shards, and the merge that joins them into one index.

Which rows a shard holds: ``--shard i/n`` takes batches i, i+n, i+2n, ... of the single
build's batches (``gradients.length_batches``: all rows sorted by length, longest first).
Why batches rather than rows i, i+n, ... or contiguous blocks: every example then goes through
the model in exactly the batch a single build gives it (same neighbours, same padding), so the
merged index holds the same bits as a single build with the same projection; and dealing the
length-sorted batches round-robin gives each shard a like share of long and short ones, where
contiguous blocks would hand shard 0 all the longest. Every shard reads (and tokenises) the
whole file to find its batches, which costs seconds next to the gradient pass.

A shard is an ordinary index of its rows (queryable alone) whose manifest says ``shard`` (i,
n, the rows of the whole build) and which keeps ``shard_rows.npy`` (its rows' numbers in the
whole build). Its FAISS files are Flat whatever ``--index-factory`` says: the merge builds
the asked-for kind over all rows. ``merge_shards`` checks that the shards are of one build
(model, data, options, projection, layers; shard numbers complete and distinct) and writes
the index through ``store.combine``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .store import IndexStore, IndexWriter, resolve_factory
from .store.combine import Piece, check_exact, combine
from .store.reader import SHARD_ROWS

# build options that may differ between the shards of one build (paths differ between machines)
SHARD_LOCAL = ("shard", "projection_from")


def shard_batches(batches: list[list[int]], shard: tuple[int, int] | None, n: int):
    """(this shard's rows in increasing order, its batches in local row numbers); all rows
    and the batches as they are without a shard."""
    if shard is None:
        return np.arange(n), batches
    i, count = shard
    mine = batches[i::count]
    if not mine:
        raise UserError(f"--shard {i}/{count}: the {n} rows make only {len(batches)} batches, so shard {i} "
                        f"would be empty; use at most {len(batches)} shards (or a smaller --batch-size).")
    rows = np.sort(np.concatenate([np.asarray(b, np.int64) for b in mine]))
    local = {int(g): j for j, g in enumerate(rows)}
    return rows, [[local[g] for g in b] for b in mine]


def shard_manifest(manifest: dict, config, rows: int) -> dict:
    """A shard's manifest: its own rows, Flat FAISS files, and which shard of what it is."""
    i, count = config.shard_spec
    return {**manifest, "n": rows, "index_factory": "Flat",
            "shard": {"index": i, "count": count, "rows": manifest["n"]}}


def merge_shards(paths: list, out, *, force: bool = False, build: dict | None = None) -> Path:
    """Join shard indexes into one index at ``out`` (``build``: fields of the merged
    manifest's build record to set, e.g. torchrun's internal --projection-from)."""
    stores = [IndexStore.open(p) for p in paths]
    stores.sort(key=lambda s: s.manifest.get("shard", {}).get("index", -1))
    check_shards(stores)
    first = stores[0].manifest
    pieces = []
    for store in stores:
        rows = np.load(store.path / SHARD_ROWS, allow_pickle=False)
        if rows.shape != (store.n,):
            raise UserError(f"{store.path / SHARD_ROWS} does not hold {store.n} row numbers; rebuild that shard.")
        pieces.append(Piece(store, np.arange(store.n), rows.astype(np.int64)))
    manifest = merged_manifest(stores, build)
    destinations = np.concatenate([p.dest for p in pieces])
    if not np.array_equal(np.sort(destinations), np.arange(first["shard"]["rows"])):
        raise UserError("the shards' rows do not cover the build's rows exactly once; rebuild them with "
                        "the same options.")
    writer = IndexWriter(out, force=force, protect=[s.path for s in stores])
    try:
        return combine(pieces, manifest, writer)
    except BaseException:
        writer.abort()
        raise


def check_shards(stores: list[IndexStore]) -> None:
    """Refuse shards that are not the complete, distinct shards of one build."""
    for store in stores:
        if "shard" not in store.manifest:
            raise UserError(f"'{store.path}' is not a shard (built without --shard); merge joins shard indexes.")
        check_exact(store, "merging")
    first, path = stores[0].manifest, stores[0].path
    count = first["shard"]["count"]
    numbers = [s.manifest["shard"]["index"] for s in stores]
    if len(set(numbers)) != len(numbers):
        raise UserError(f"shard {next(i for i in numbers if numbers.count(i) > 1)} is given twice; pass each shard once.")
    missing = sorted(set(range(count)) - set(numbers))
    if missing:
        raise UserError(f"shards {', '.join(map(str, missing))} of {count} are missing; pass all {count}.")
    for store in stores[1:]:
        other = store.manifest
        differs = _difference(first, other)
        if differs:
            raise UserError(f"'{store.path}' and '{path}' are not shards of one build ({differs} differ); "
                            "build every shard with the same model, data and options.")
        if not _same_projection(stores[0], store):
            raise UserError(f"'{store.path}' and '{path}' have different projections (fitted separately?); fit "
                            "once with `lite-influence fit` and build every shard with --projection-from.")


def _difference(a: dict, b: dict) -> str | None:
    """What differs between two shards' manifests, in words (None: nothing that matters)."""
    def build(m):
        return {k: v for k, v in m["build"].items() if k not in SHARD_LOCAL}

    def layers(m):
        return [{k: v for k, v in layer.items() if k != "entries"} for layer in m["layers"]]

    checks = {"the model": lambda m: m["model"]["fingerprint"], "the data": lambda m: m["data"]["fingerprint"],
              "the build options": build, "the layers": layers, "the labels": lambda m: m["label_names"],
              "the shard count": lambda m: (m["shard"]["count"], m["shard"]["rows"]),
              "the format": lambda m: m["format_version"]}
    words = [name for name, get in checks.items() if get(a) != get(b)]
    return ", ".join(words) or None


def _same_projection(a: IndexStore, b: IndexStore) -> bool:
    left, right = a.projection_arrays(), b.projection_arrays()
    return left.keys() == right.keys() and all(np.array_equal(left[k], right[k]) for k in left)


def merged_manifest(stores: list[IndexStore], build: dict | None) -> dict:
    """The manifest of the whole build: shard 0's, with every shard's rows and seconds."""
    first = stores[0].manifest
    manifest = {key: value for key, value in first.items() if key != "shard"}
    manifest["n"] = first["shard"]["rows"]
    manifest["index_factory"] = resolve_factory(first["build"]["index_factory"], manifest["n"])  # auto: by N
    manifest["build"] = {**first["build"], "shard": None, **(build or {})}
    manifest["build_seconds"] = round(sum(s.manifest.get("build_seconds", 0) for s in stores), 3)
    manifest["merged_from"] = [{"path": str(s.path.resolve()), "shard": f"{s.manifest['shard']['index']}/"
                                f"{s.manifest['shard']['count']}", "n": s.n} for s in stores]
    return manifest
