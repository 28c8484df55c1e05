"""One index from the rows of others: what ``merge`` (shards), ``add`` and ``delete`` share.

Each source contributes some of its rows (``Piece.rows``) at given row numbers of the result
(``Piece.dest``): a merge puts every shard's rows back at their row numbers in the whole
build, ``add`` appends a new index's rows after the old ones, ``delete`` keeps a subset. The
rows are copied as stored, never recomputed: the unit rows from FAISS, every per-example
array of a layer (``layers/NAME.*.npy``: the norms, and whatever else a build keeps one row
per example of), the embeddings' token rows, the top-level per-example arrays (losses) and the
examples table (ids renumbered), so the result holds the same bits as one build of those rows
with the same projection. Files that are not one row per example (derived statistics) are
not carried: they describe the old rows only.

The result is staged in the writer's partial folder and swapped into place (``IndexWriter``):
a kill leaves the old index or the new one. Approximate FAISS files (PQ, SQ) do not keep the
rows exactly and are refused; Flat, HNSW, IVF-Flat and compact ones are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .atomic import write_file, write_json
from .faiss_layers import exact_flat, faiss_module, flat_header, layer_factory, make_faiss_index, write_faiss, \
    write_flat_rows
from .manifest import MANIFEST, problem
from .reader import EXAMPLE_OFFSETS, SHARD_ROWS, IndexStore
from .token_rows import by_token
from .views import BY_TOKEN, TOKEN_FILES, tokens_folder
from .writer import IndexWriter, _link, _save_npy

NOT_PER_EXAMPLE = (EXAMPLE_OFFSETS, SHARD_ROWS)  # top-level arrays that are rewritten or dropped


@dataclass
class Piece:
    store: IndexStore
    rows: np.ndarray  # rows of ``store``, in the order they are taken
    dest: np.ndarray  # the row number each one gets in the result


def exact_rows(store: IndexStore, layer: str) -> bool:
    """Whether the layer's FAISS file gives its rows back exactly (Flat, HNSW, IVF-Flat, and
    compact's refining index, which keeps the float rows it re-scores with)."""
    faiss = faiss_module()
    index = faiss.downcast_index(store.faiss_index(layer))
    return exact_flat(index) is not None or isinstance(index, (faiss.IndexHNSWFlat, faiss.IndexIVFFlat))


def check_exact(store: IndexStore, what: str) -> None:
    if store.manifest["format_version"] < 2:
        raise UserError(f"index '{store.path}' was built by an older lite-influence (format 1); rebuild it "
                        f"before {what}.")
    for layer in store.manifest["layers"]:
        if layer.get("kind") != "tokens" and not exact_rows(store, layer["name"]):
            raise UserError(f"index '{store.path}' keeps approximate vectors ({store.manifest['index_factory']}), "
                            f"so {what} cannot be exact; rebuild it with a Flat, HNSW or IVF...,Flat "
                            "--index-factory.")


def combine(pieces: list[Piece], manifest: dict, writer: IndexWriter) -> Path:
    """Write the index of ``pieces`` with ``manifest`` (its ``n`` the rows in all; the token
    layers' ``entries`` are counted here) through ``writer``, and swap it into place."""
    n = int(manifest["n"])
    dest = np.concatenate([p.dest for p in pieces]) if pieces else np.zeros(0, np.int64)
    if len(dest) != n or not np.array_equal(np.sort(dest), np.arange(n)):
        raise ValueError("the pieces do not fill rows 0..n-1 exactly once")
    issue = problem(manifest)
    if issue:
        raise ValueError(f"the manifest to write is invalid: {issue}")
    stage = writer.fresh_stage()
    manifest = {**manifest, "layers": [dict(layer) for layer in manifest["layers"]]}
    for layer in manifest["layers"]:
        if layer.get("kind") == "tokens":
            layer["entries"] = _token_rows(pieces, layer["name"], n, stage)
        else:
            _dense(pieces, layer["name"], n, manifest["index_factory"], stage)
        for file in _per_example_files(pieces[0].store, f"layers/{layer['name']}."):  # norms, exact norms...
            _save(stage / file, _gathered(pieces, n, lambda store: _array(store.path / file, store.n)))
    for name in _per_example_files(pieces[0].store, ""):
        _save(stage / name, _gathered(pieces, n, lambda store: _array(store.path / name, store.n)))
    _examples(pieces, n, writer, stage)
    projection = pieces[0].store.path / "projection.npz"
    if projection.is_file():
        _link(projection, stage / "projection.npz")
    write_json(stage / MANIFEST, manifest)
    return writer.install(stage)


def _per_example_files(store: IndexStore, prefix: str) -> list[str]:
    """Names (relative to the index) of the .npy files under ``prefix`` that hold one row per
    example: top level (prefix "") or a layer's (prefix "layers/NAME.")."""
    folder = store.path / Path(prefix).parent if prefix else store.path
    stem = Path(prefix).name
    names = []
    for file in sorted(folder.glob(f"{stem}*.npy")):
        name = str(file.relative_to(store.path))
        if name in NOT_PER_EXAMPLE:
            continue
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        if array.ndim >= 1 and array.shape[0] == store.n:
            names.append(name)
    return names


def _array(file: Path, n: int) -> np.ndarray:
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{file} is missing or damaged ({type(exc).__name__}); rebuild that index.") from None
    if array.ndim < 1 or array.shape[0] != n:
        raise UserError(f"{file} holds {array.shape[:1]} rows for {n} examples; rebuild that index.")
    return array


def _gathered(pieces: list[Piece], n: int, read) -> np.ndarray:
    """``read(store)``'s rows of every piece at their places in the result."""
    first = read(pieces[0].store)
    out = np.empty((n,) + first.shape[1:], first.dtype)
    for piece in pieces:
        source = first if piece is pieces[0] else _alike(piece, read(piece.store), pieces[0], first)
        out[piece.dest] = source[piece.rows]
    return out


def _alike(piece: Piece, source: np.ndarray, first_piece: Piece, first: np.ndarray) -> np.ndarray:
    """``source`` (a piece's rows), refused unless its rows have the first piece's shape and type."""
    if source.shape[1:] != first.shape[1:] or source.dtype != first.dtype:
        raise UserError(f"index '{piece.store.path}' stores rows of another shape or type than "
                        f"'{first_piece.store.path}'; they were not built alike.")
    return source


def _save(path: Path, array: np.ndarray) -> None:
    write_file(path, lambda tmp: _save_npy(tmp, array))


def _dense(pieces: list[Piece], name: str, n: int, factory: str, stage: Path) -> None:
    """The unit rows into a new FAISS file as they are (metric "dot": not normalised again,
    which could move a last bit). A Flat file is streamed block by block in row order
    (``write_flat_rows``): gathering the layer in memory and handing it to FAISS held it twice
    (34k dims x 60k rows: 8 GB for MiniLM's default block0... head) and copied it twice more."""
    def read(store):
        return store.vectors(name, None, "cosine")

    dim = int(read(pieces[0].store).shape[1])
    header = flat_header(dim, n) if layer_factory(factory, n, dim) == "Flat" else None
    if header is None:
        write_faiss(make_faiss_index(_gathered(pieces, n, read), "dot", factory), stage / "layers" / f"{name}.faiss")
    else:
        write_flat_rows(stage / "layers" / f"{name}.faiss", header, _blocks(pieces, n, read))


BLOCK_BYTES = 2 ** 26  # a merge streams a Flat layer in blocks of about this many bytes


def _blocks(pieces: list[Piece], n: int, read):
    """``read(store)``'s rows of every piece in the result's row order, about ``BLOCK_BYTES``
    a block (what ``_gathered`` gives, a block at a time)."""
    first = read(pieces[0].store)
    sources = [first] + [_alike(piece, read(piece.store), pieces[0], first) for piece in pieces[1:]]
    owner, row = np.empty(n, np.int64), np.empty(n, np.int64)
    for number, piece in enumerate(pieces):
        owner[piece.dest], row[piece.dest] = number, piece.rows
    step = max(1, BLOCK_BYTES // max(1, first.dtype.itemsize * int(np.prod(first.shape[1:]))))
    for start in range(0, n, step):
        block = np.empty((min(step, n - start),) + first.shape[1:], first.dtype)
        owners, rows = owner[start:start + step], row[start:start + step]
        for number, source in enumerate(sources):
            mine = owners == number
            if mine.any():
                block[mine] = source[rows[mine]]
        yield block


def _token_rows(pieces: list[Piece], name: str, n: int, stage: Path) -> int:
    """The embeddings' sparse rows (CSR), each example's entries copied whole; their count."""
    views = [piece.store.layer(name).stored for piece in pieces]
    counts = np.zeros(n, np.int64)
    for piece, rows in zip(pieces, views):
        counts[piece.dest] = np.diff(rows.indptr)[piece.rows]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    tokens = np.empty(int(indptr[-1]), views[0].tokens.dtype)
    values = np.empty((int(indptr[-1]), views[0].k), views[0].values.dtype)
    for piece, rows in zip(pieces, views):
        source, target = _entries(rows.indptr, piece.rows), _entries(indptr, piece.dest)
        tokens[target], values[target] = rows.tokens[source], rows.values[source]
    folder = tokens_folder(stage, name)
    folder.mkdir()
    for file, array in zip(TOKEN_FILES, (indptr, tokens, values)):
        _save(folder / f"{file}.npy", array)
    _save(folder / BY_TOKEN, by_token(tokens))
    return len(tokens)


def _entries(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The entry numbers of ``rows`` (CSR), row after row."""
    starts, lengths = np.asarray(indptr)[rows], np.diff(indptr)[rows]
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return offsets + np.arange(int(lengths.sum()))


def _examples(pieces: list[Piece], n: int, writer: IndexWriter, stage: Path) -> None:
    """The examples table in the result's order, each row's id its new row number."""
    rows: list = [None] * n
    for piece in pieces:
        table = piece.store.examples
        for row, place in zip(piece.rows, piece.dest):
            rows[int(place)] = {**table[int(row)], "id": int(place)}
    writer.write_examples(rows)
    for name in ("examples.jsonl", EXAMPLE_OFFSETS):
        _link(writer.partial / name, stage / name)
