"""A layer's stored vectors as lookup and audit see them: one interface, two kinds.

``dense`` layers are a FAISS index (one vector per example); a ``tokens`` layer is the word
embeddings' exact token side (``token_rows``), which no FAISS index can hold. Callers prepare
their queries with the layer for a metric (cosine: unit rows) and ask for exact float64
scores against every example, a query row per stored example (``rows``, a query by id) or the
squared norms (self-influence), and never branch on the kind; ``nearest`` (lookup.py) alone
asks whether FAISS can search the layer for that metric (``searchable``). The metric is the
query's choice (``metrics``: what the layer can answer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .faiss_layers import exact_flat, flat_vectors, make_reconstructable, normalise, read_faiss
from .token_rows import TokenRows

TOKEN_FILES = ("indptr", "tokens", "values")
BY_TOKEN = "by_token.npy"  # the entries sorted by token (the posting lists), written at build
EXACT_NORMS = "exact_norms.npy"  # layers/NAME.exact_norms.npy: each example's exact gradient norm


def tokens_folder(root: Path, layer: str) -> Path:
    return root / "layers" / f"{layer}.tokens"


def finite(scores: np.ndarray, source: Path) -> np.ndarray:
    """Scores as computed, or one line naming the file: a damaged store shows in what it
    gives (cheap, N x queries) rather than by scanning every stored number at open."""
    if not np.isfinite(scores).all():
        raise UserError(f"index file {source} holds NaN or infinite values; rebuild the index.")
    return scores


CHUNK_BYTES = 2 ** 21  # per float64 block: one that stays in cache (8192 rows of 770 dims, 50 MB,
# made the head's scan 3x slower: benchmarks/results/scale.md), never a float64 copy of the layer


def chunked_product(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``rows @ queries`` in float64, a block of rows at a time (a memory-mapped layer is read
    once, in order, and never copied whole)."""
    out = np.empty((rows.shape[0], queries.shape[1]))
    chunk = max(64, CHUNK_BYTES // (8 * max(1, rows.shape[1])))
    for start in range(0, rows.shape[0], chunk):
        out[start:start + chunk] = rows[start:start + chunk].astype(np.float64) @ queries
    return out


def per_example(file: Path, n: int, what: str) -> np.ndarray:
    """A layer's per-example float array beside its vectors, checked: n finite values (float64),
    or one line naming the file."""
    try:
        values = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{file} is missing or damaged ({type(exc).__name__}); rebuild the index.") from None
    if values.shape != (n,) or not np.isfinite(values).all():
        raise UserError(f"{file} does not hold {n} finite {what}; rebuild the index.")
    return values.astype(np.float64)


def _unit_scale(norms: np.ndarray) -> np.ndarray:
    return 1 / np.where(norms > 0, norms, 1)


class ExactNorms:
    """Each example's exact gradient norm in the layer (``NAME.exact_norms.npy``, from builds
    that computed them): what self-influence is and cosine could divide by. A sketch keeps
    a varying share of each example's gradient, so its own norms are not these."""

    def __init__(self, root: Path, info: dict, n: int):
        self.file, self.n = root / "layers" / f"{info['name']}.{EXACT_NORMS}", n
        self.stored = bool(info.get("exact_norms"))
        self._values = None

    def kept_share(self, sketch_norms, sample: int = 2000) -> float | None:
        """The median share of an example's squared gradient norm that the stored sketch keeps
        (over up to ``sample`` evenly spaced examples; ``sketch_norms(ids)`` gives theirs): a
        layer kept at 0.05 is judged on a twentieth of its gradient, which ``info`` shows."""
        exact = self.values()
        if exact is None or not self.n:
            return None
        ids = np.unique(np.linspace(0, self.n - 1, min(sample, self.n)).astype(np.int64))
        ids = ids[exact[ids] > 0]
        return float(np.median((sketch_norms(ids) / exact[ids]) ** 2)) if ids.size else None

    def values(self) -> np.ndarray | None:
        if self.stored and self._values is None:
            self._values = per_example(self.file, self.n, "norms")
        return self._values


class DenseLayer:
    """A FAISS layer. Format 2 stores unit rows in FAISS (what cosine and every ANN index
    search) and each example's norm beside them (``NAME.norms.npy``), so both metrics are
    exact from one build: dot is the unit row times its norm. Format 1 stored raw rows (a dot
    build: cosine normalises them) or unit rows without norms (a cosine build: no dot)."""

    kind = "dense"

    def __init__(self, root: Path, info: dict, n: int, holds: str):
        self.file, self.dim, self.n, self.holds = root / "layers" / f"{info['name']}.faiss", info["dim"], n, holds
        self.norms_file = root / "layers" / f"{info['name']}.norms.npy"
        self.exact = ExactNorms(root, info, n)
        self._index = self._norms = None

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("cosine",) if self.holds == "unit" else ("cosine", "dot")

    def searchable(self, metric: str) -> bool:
        """Whether FAISS's inner product is this metric's (else score every example)."""
        return (metric == "dot") == (self.holds == "raw")

    @property
    def index(self):
        if self._index is None:
            self._index = read_faiss(self.file, self.dim, self.n)
        return self._index

    def norms(self) -> np.ndarray:
        if self._norms is None:
            if self.holds != "unit+norms":  # format 1: the rows themselves (raw, or unit for cosine)
                self._norms = np.linalg.norm(self._stored().astype(np.float64), axis=1)
            else:
                self._norms = per_example(self.norms_file, self.n, "norms")
        return self._norms

    def _stored(self, ids=None) -> np.ndarray:
        index, flat = self.index, exact_flat(self.index)
        if flat is not None:  # a view of FAISS's own memory: no copy (ids: those rows read)
            return flat_vectors(flat) if ids is None else flat_vectors(flat)[np.asarray(ids, dtype=np.int64)]
        make_reconstructable(index)
        if ids is None:
            return index.reconstruct_n(0, self.n)
        ids = np.asarray(ids, dtype=np.int64)
        return index.reconstruct_batch(ids) if ids.size else np.zeros((0, index.d), np.float32)

    def vectors(self, ids=None, metric: str = "cosine") -> np.ndarray:
        """Rows as ``metric`` compares them: unit rows (cosine) or raw ones (dot); exact for
        Flat/HNSW/IVF/compact, approximate for PQ and SQ."""
        stored = self._stored(ids)
        if metric == "cosine":
            return normalise(stored) if self.holds == "raw" else stored
        if self.holds == "raw":
            return stored
        norms = self.norms() if ids is None else self.norms()[np.asarray(ids, dtype=np.int64)]
        return (stored * norms[:, None]).astype(np.float32)

    def rows(self, ids) -> np.ndarray:
        """Stored examples as queries (raw where the index can tell: ``prepare`` normalises)."""
        return self.vectors(ids, "dot" if "dot" in self.metrics else "cosine")

    def prepare(self, queries: np.ndarray, metric: str) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return normalise(queries) if metric == "cosine" else queries

    def scores(self, prepared: np.ndarray, metric: str) -> np.ndarray:
        """(N, queries) exact inner products in float64 (dot: the unit rows' times the norms)."""
        rows = self.vectors(None, metric) if self.holds == "raw" or metric == "cosine" else self._stored()
        scores = chunked_product(rows, np.asarray(prepared, np.float64).T)
        if self.holds != "raw" and metric == "dot":
            scores *= self.norms()[:, None]
        return finite(scores, self.file)

    def squared_norms(self, metric: str) -> np.ndarray:
        return (self.norms() > 0).astype(np.float64) if metric == "cosine" else self.norms() ** 2

    def kept_share(self) -> float | None:
        return None if self.holds == "unit" else self.exact.kept_share(lambda ids: self.norms()[ids])


class TokenLayer:
    """The embeddings' exact token rows, stored raw: cosine divides by the norms."""

    kind = "tokens"
    metrics = ("cosine", "dot")

    def __init__(self, root: Path, info: dict, n: int, holds: str = "raw"):
        self.folder, self.dim, self.n = tokens_folder(root, info["name"]), info["dim"], n
        self.entries = info.get("entries")
        self.exact = ExactNorms(root, info, n)
        self._rows = self._norms = None

    def searchable(self, metric: str) -> bool:
        return False

    @property
    def stored(self) -> TokenRows:
        """The raw rows, memory-mapped and checked against the manifest on first use."""
        if self._rows is None:
            arrays = {}
            for name in TOKEN_FILES:
                file = self.folder / f"{name}.npy"
                try:
                    arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise UserError(f"{file} is missing or damaged ({type(exc).__name__}); rebuild the index.") from None
            indptr, tokens, values = arrays["indptr"], arrays["tokens"], arrays["values"]
            nnz = int(indptr[-1]) if len(indptr) else -1
            if (indptr.shape != (self.n + 1,) or tokens.shape != (nnz,) or values.shape != (nnz, self.dim)
                    or (self.entries is not None and nnz != self.entries)):
                raise UserError(f"the token rows in {self.folder} do not match the manifest ({self.n} examples, "
                                f"dim {self.dim}); rebuild the index.")
            self._rows = TokenRows(np.asarray(indptr, np.int64), tokens, values)
            try:
                self._rows.postings(self._stored_order(nnz))
            except (ValueError, IndexError):
                raise UserError(f"{self.folder / BY_TOKEN} is damaged; rebuild the index.") from None
        return self._rows

    def _stored_order(self, nnz: int) -> np.ndarray | None:
        """The build's by-token order, if it is there and fits (else it is sorted on use)."""
        try:
            order = np.load(self.folder / BY_TOKEN, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        return order if order.shape == (nnz,) else None

    def norms(self) -> np.ndarray:
        if self._norms is None:
            self._norms = self.stored.norms()
        return self._norms

    def rows(self, ids) -> TokenRows:
        return self.stored.subset(ids)

    def prepare(self, queries: TokenRows, metric: str) -> TokenRows:
        return queries.scaled(_unit_scale(queries.norms())) if metric == "cosine" else queries

    def scores(self, prepared: TokenRows, metric: str) -> np.ndarray:
        """(N, queries) exact inner products in float64 (with unit stored rows for cosine)."""
        scores = self.stored.gram(prepared).T
        return finite(scores * _unit_scale(self.norms())[:, None] if metric == "cosine" else scores, self.folder)

    def squared_norms(self, metric: str) -> np.ndarray:
        return (self.norms() > 0).astype(np.float64) if metric == "cosine" else finite(self.norms() ** 2, self.folder)

    def kept_share(self) -> float | None:
        return self.exact.kept_share(lambda ids: self.rows(ids).norms())


def layer_view(root: Path, info: dict, n: int, holds: str):
    """``holds``: what a dense layer's FAISS file holds ("unit" rows with norms beside them
    from format 2; format 1: "raw" for a dot build, "unit" without norms for a cosine one)."""
    return (TokenLayer if info.get("kind") == "tokens" else DenseLayer)(root, info, n, holds)
