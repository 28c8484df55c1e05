"""The FAISS calls: making, writing, reading and searching one index per layer.

Every index is an inner-product index of unit rows (format 2: the writer normalises on the
way in, and keeps the norms beside it, views.DenseLayer), so FAISS's own search is cosine's.
"""

from __future__ import annotations

import errno
import math
from pathlib import Path

import numpy as np

from ..errors import UserError
from .atomic import write_file

FEW_QUERIES = 4  # up to this many queries a flat index is scanned with numpy, beyond it FAISS batches


def faiss_module():
    """faiss, with the BLAS threshold that faiss 1.15 raised set back (5-7x faster batches)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 20
    return faiss


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit rows; all-zero rows stay zero (an example the model fits exactly has no gradient)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1)).astype(np.float32)


AUTO = "auto"  # --index-factory auto: Flat below AUTO_FLAT_BELOW examples, auto_ann(N) from there
AUTO_FLAT_BELOW = 100_000  # measured: a Flat lookup of 8 layers takes 0.4 s at 100k, 5-23 s at 1M (results/scale.md)


def auto_ann(n: int) -> str:
    """IVF with 4 sqrt(N) lists (probing 1/32 of them, ``PROBE_SHARE``): on SST-2's real
    gradients its lookup recall@10 was 0.97-0.99 on every layer, HNSW32's 0.87 on the head
    (benchmarks/results/ann_sst2.md)."""
    return f"IVF{int(round(4 * math.sqrt(n)))},Flat"


def resolve_factory(factory: str, n: int) -> str:
    """The factory string a build of ``n`` examples writes (``auto`` resolved by the rule above;
    ``compact`` stays, as each layer's FAISS string depends on its dim: ``compact_factory``)."""
    return factory if factory != AUTO else ("Flat" if n < AUTO_FLAT_BELOW else auto_ann(n))


COMPACT = "compact"  # --index-factory compact: what a query holds in RAM ~10x smaller than Flat
REFINE_FACTOR = 16  # compact: FAISS's 4-bit codes find 16 x k candidates, re-scored exactly from
# the float rows (mapped, read row by row): on SST-2's real gradients 1,600 candidates per list
# kept lookup recall@10 at 0.93-1.00 per layer, 800 at 0.83-0.94 (benchmarks/results/ann_sst2.md)


def compact_factory(n: int, dim: int) -> str:
    """IVF (4 sqrt(N) lists, residuals) with 4-bit fast-scan PQ codes of 2 dims each (dim/4
    bytes a row, 10-16x less than float32), over float rows kept for the exact re-scoring
    (``RFlat``: memory-mapped, so a query reads the candidates' rows, not the layer)."""
    if n < 16:  # too few rows to train 16 centroids a code: kept exactly (and this small, Flat is cheap)
        return "Flat"
    nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))  # FAISS asks >= 39 training rows a list
    m = max(m for m in range(1, max(1, dim // 2) + 1) if dim % m == 0)
    return f"IVF{nlist},PQ{m}x4fs,RFlat"


def layer_factory(factory: str, n: int, dim: int) -> str:
    """The FAISS string one layer of ``n`` rows of ``dim`` is built with."""
    return compact_factory(n, dim) if factory == COMPACT else resolve_factory(factory, n)


def approximate(factory: str) -> bool:
    """Whether FAISS's search of this factory can miss or misorder examples (all but Flat)."""
    return factory.replace(" ", "") not in ("Flat", "IDMap,Flat")


PROBE_SHARE = 32  # an IVF index is written probing 1/32 of its lists: on SST-2's real gradients
# (60k rows, 985 lists) 16-32 probes gave lookup recall@10 0.94-0.99, 1-8 only 0.82-0.90
# (benchmarks/results/ann_sst2.md); FAISS stores nprobe in the file, a user may lower it
ROWS = 65_536  # rows per block when a layer is normalised or measured on its way into FAISS


def row_norms(vectors: np.ndarray) -> np.ndarray:
    """Each row's norm in float64 arithmetic (float32 result), a block at a time: a memory-
    mapped layer of 1M rows is never copied whole (a float64 copy of one is 2 GB per 256 dims)."""
    return np.concatenate([np.linalg.norm(np.asarray(vectors[s:s + ROWS], np.float64), axis=1)
                           for s in range(0, len(vectors), ROWS)] or [np.zeros(0)]).astype(np.float32)


def check_factory(factory: str) -> None:
    """Refuse a factory string FAISS cannot parse before the slow gradient pass, not after.
    (Whether it suits the data, e.g. PQ's dim or IVF's training size, shows only at the end.)"""
    if factory in (AUTO, COMPACT):
        return
    faiss = faiss_module()
    try:
        faiss.index_factory(5040, factory, faiss.METRIC_INNER_PRODUCT)  # 5040: divisible by 1..10
    except RuntimeError as exc:
        if "could not parse" in str(exc):
            raise UserError(f"--index-factory '{factory}' is not a FAISS index factory string; "
                            "use e.g. Flat, HNSW32, IVF256,Flat or PQ32.") from None


TRAIN_PER_LIST = 64  # IVF's k-means sees at most this many rows per list (FAISS asks >= 39):
# at 1M rows and 4,000 lists, all rows would take an hour of one core, a 64-per-list sample minutes


def _training_rows(vectors: np.ndarray, ivf) -> np.ndarray:
    """What an index is trained on: every row, or for IVF a seeded sample, in id order."""
    if ivf is None or len(vectors) <= TRAIN_PER_LIST * ivf.nlist:
        return vectors
    return vectors[np.sort(np.random.default_rng(0).choice(len(vectors), TRAIN_PER_LIST * ivf.nlist, replace=False))]


def make_faiss_index(vectors: np.ndarray, metric: str, factory: str):
    """An inner-product index of the given factory string, trained if it needs training."""
    faiss = faiss_module()
    factory = layer_factory(factory, len(vectors), vectors.shape[1])

    def prepared(rows):
        data = normalise(rows) if metric == "cosine" else np.ascontiguousarray(rows, np.float32)
        if not np.isfinite(data).all():
            raise UserError("some gradients are NaN or infinite (model weights or inputs overflow); "
                            "check the model, or lower --max-length.")
        return data
    try:  # added a block at a time: no normalised copy of the layer beside FAISS's own
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(prepared(_training_rows(vectors, _ivf(index))))
        for start in range(0, len(vectors), ROWS):
            index.add(prepared(vectors[start:start + ROWS]))
        ivf = _ivf(index)
        if ivf is not None and ivf.nprobe == 1:  # FAISS's default probe finds ~0.8 of the top 10
            ivf.nprobe = -(-ivf.nlist // PROBE_SHARE)
        if _refine(index) is not None:
            _refine(index).k_factor = REFINE_FACTOR
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "FAISS error"
        raise UserError(f"FAISS index '{factory}' failed on {vectors.shape[0]} vectors of dim "
                        f"{vectors.shape[1]}: {message}; try --index-factory Flat.") from exc
    return index


def write_faiss(index, path: Path) -> None:
    """Atomically, like every file of the store; FAISS's own write error becomes an OSError
    so that a full disk reads as one (ENOSPC) rather than as a FAISS bug."""
    def fill(tmp: Path) -> None:
        try:
            faiss_module().write_index(index, str(tmp))
        except RuntimeError as exc:
            if "No space" in str(exc):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise OSError(errno.EIO, f"FAISS could not write the file ({exc})", str(path)) from None
    write_file(path, fill)


def flat_header(dim: int, n: int) -> bytes | None:
    """The first 45 bytes of FAISS's own file of a Flat inner-product index of ``n`` rows of
    ``dim``: FAISS's header of an empty one (serialised by FAISS) with ntotal (bytes 8-16) and
    the row vector's length in floats (bytes 37-45) set; the rows follow as float32. None if
    FAISS's header is not laid out so (another FAISS version): the caller then lets FAISS write."""
    empty = faiss_module().serialize_index(faiss_module().IndexFlatIP(dim)).tobytes()
    if len(empty) != 45 or empty[:4] != b"IxFI" or empty[8:16] != bytes(8) or empty[37:45] != bytes(8):
        return None
    return empty[:8] + int(n).to_bytes(8, "little") + empty[16:37] + int(n * dim).to_bytes(8, "little")


def write_flat_rows(path: Path, header: bytes, blocks) -> None:
    """A Flat index file written from ``blocks`` of float32 rows in id order (``header``:
    ``flat_header``), never the whole layer in memory: the bytes FAISS's ``write_index`` gives
    for the same rows (tests/test_store.py), without its in-memory copy of every row."""
    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(header)
            for block in blocks:
                np.ascontiguousarray(block, np.float32).tofile(handle)
    write_file(path, fill)


def read_faiss(file: Path, dim: int, n: int):
    """A layer's index, checked against the manifest (size, dim). A flat index is memory-mapped
    (``IO_FLAG_MMAP_IFC``: opening reads nothing, a scan pages in what it touches); its values
    are checked where they are used (``views``: scores must be finite), not by a scan here."""
    faiss = faiss_module()
    if not file.is_file():
        raise UserError(f"index file {file} is missing; rebuild the index.")
    try:
        try:
            index = faiss.read_index(str(file), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError:  # an index kind that cannot be mapped is read whole
            index = faiss.read_index(str(file))
    except RuntimeError as exc:
        raise UserError(f"index file {file} is damaged (FAISS cannot read it); rebuild the index.") from exc
    if index.d != dim or index.ntotal != n:
        raise UserError(f"index file {file} holds {index.ntotal} vectors of dim {index.d}, the "
                        f"manifest says {n} of dim {dim}; rebuild the index.")
    return index


def _ivf(index):
    """The IVF part of an index (None for Flat, HNSW, PQ...)."""
    try:
        return faiss_module().extract_index_ivf(index)
    except RuntimeError:
        return None


def flat_vectors(index) -> np.ndarray:
    """The vectors of a flat index, as a numpy view of FAISS's own memory (no copy)."""
    faiss = faiss_module()
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def exact_flat(index):
    """The flat index of an index's exact float rows (itself for Flat, the re-scoring rows of
    a refining one: ``compact``), or None (HNSW, IVF, PQ, SQ: reconstructed through FAISS)."""
    faiss = faiss_module()
    refine = _refine(index)
    inner = faiss.downcast_index(refine.refine_index) if refine is not None else index
    return inner if isinstance(inner, faiss.IndexFlat) else None


def aligned_product(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``queries @ vectors.T`` in float32, an aligned copy of a block of rows at a time: a
    memory-mapped FAISS Flat file puts its rows at byte 45, and numpy gives unaligned arrays to
    no BLAS (60k x 256: 108 ms instead of 2.7 ms, benchmarks/results/ann_sst2.md)."""
    out = np.empty((len(queries), len(vectors)), np.float32)
    step = max(64, 2 ** 21 // (4 * max(1, vectors.shape[1])))
    for start in range(0, len(vectors), step):
        out[:, start:start + step] = queries @ np.array(vectors[start:start + step]).T
    return out


def _scan(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product for a few queries: one matrix product and a partial sort.
    For a lookup's one or two queries this is 2-3x faster than FAISS's flat search
    (benchmarks/query_latency.py), and ties go to the smaller id."""
    scores = aligned_product(queries, vectors)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (len(queries), 1))
    ids = np.empty_like(top)
    for row in range(len(queries)):
        candidates = top[row]
        ids[row] = candidates[np.lexsort((candidates, -scores[row, candidates]))]
    return np.take_along_axis(scores, ids, 1), ids.astype(np.int64)


def _refine(index):
    """The refining wrapper of an index (``...,RFlat``: codes searched, float rows re-score), or None."""
    index = faiss_module().downcast_index(index)
    return index if isinstance(index, faiss_module().IndexRefine) else None


def _hnsw(index):
    index = faiss_module().downcast_index(index)
    return index if isinstance(index, faiss_module().IndexHNSW) else None


def make_reconstructable(index) -> None:
    """IVF indexes reconstruct only through a direct map; build it on first use (a refining
    index reconstructs from its float rows, not its codes)."""
    ivf = _ivf(index) if _refine(index) is None else None
    if ivf is not None and ivf.direct_map.type == faiss_module().DirectMap.NoMap:
        ivf.make_direct_map()


def search_parameters(index, k: int):
    """What a search of depth ``k`` must tell FAISS: HNSW explores max(efSearch, k) nodes (with
    efSearch 16 a search of depth 12,123 on SST-2's block3 returned 301-445 ids, with k all of
    them); a refining index fetches k_factor x k candidates, at most all N."""
    faiss = faiss_module()
    refine, params = _refine(index), None
    hnsw = _hnsw(refine.base_index if refine is not None else index)
    if hnsw is not None and hnsw.hnsw.efSearch < k:
        params = faiss.SearchParametersHNSW()
        params.efSearch = k
    if refine is not None:
        outer = faiss.IndexRefineSearchParameters()
        outer.k_factor = float(max(1.0, min(refine.k_factor, index.ntotal / max(1, k))))
        if params is not None:
            outer.base_index_params = params
        outer.inner = params  # kept alive as long as the outer one
        params = outer
    return params


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: (scores, ids), best first. An IVF index pads with id -1 when the
    lists it probes hold fewer than k vectors; vote and rank need full lists, so the probe is
    widened until every row has k ids."""
    if len(queries) <= FEW_QUERIES and isinstance(index, faiss_module().IndexFlat):
        return _scan(flat_vectors(index), queries, k)
    params = search_parameters(index, k)
    scores, ids = index.search(queries, k, params=params)
    ivf = _ivf(index)
    stored = ivf.nprobe if ivf is not None else None
    while ivf is not None and (ids < 0).any() and ivf.nprobe < ivf.nlist:
        ivf.nprobe = min(ivf.nlist, 2 * ivf.nprobe)
        scores, ids = index.search(queries, k, params=params)
    if ivf is not None:  # widened for this search only: a deep audit search must not slow later lookups
        ivf.nprobe = stored
    return scores, ids
