"""A layer's stored vectors as lookup and audit see them: one interface, two kinds.

``dense`` layers are a FAISS index (one vector per example); a ``tokens`` layer is the word
embeddings' exact token side (``token_rows``), which no FAISS index can hold. Callers prepare
their queries with the layer (cosine: unit rows) and ask for exact float64 scores against
every example, a query row per stored example (``rows``, a query by id) or the squared norms
(self-influence), and never branch on the kind; ``nearest`` (lookup.py) alone asks whether
FAISS can search the layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .faiss_layers import make_reconstructable, normalise, read_faiss
from .token_rows import TokenRows

TOKEN_FILES = ("indptr", "tokens", "values")


def tokens_folder(root: Path, layer: str) -> Path:
    return root / "layers" / f"{layer}.tokens"


class DenseLayer:
    kind = "dense"

    def __init__(self, root: Path, info: dict, n: int, metric: str):
        self.file, self.dim, self.n, self.metric = root / "layers" / f"{info['name']}.faiss", info["dim"], n, metric
        self._index = None

    @property
    def index(self):
        if self._index is None:
            self._index = read_faiss(self.file, self.dim, self.n)
        return self._index

    def vectors(self, ids=None) -> np.ndarray:
        """Stored vectors (unit rows for cosine), exact for Flat/HNSW/IVF, approximate for PQ."""
        index = self.index
        make_reconstructable(index)
        if ids is None:
            return index.reconstruct_n(0, self.n)
        ids = np.asarray(ids, dtype=np.int64)
        return index.reconstruct_batch(ids) if ids.size else np.zeros((0, index.d), np.float32)

    def rows(self, ids) -> np.ndarray:
        return self.vectors(ids)

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return normalise(queries) if self.metric == "cosine" else queries

    def scores(self, prepared: np.ndarray) -> np.ndarray:
        """(N, queries) exact inner products in float64."""
        return self.vectors().astype(np.float64) @ np.asarray(prepared, np.float64).T

    def squared_norms(self) -> np.ndarray:
        v = self.vectors()
        return np.einsum("ij,ij->i", v, v, dtype=np.float64)


class TokenLayer:
    kind = "tokens"

    def __init__(self, root: Path, info: dict, n: int, metric: str):
        self.folder, self.dim, self.n, self.metric = tokens_folder(root, info["name"]), info["dim"], n, metric
        self.entries = info.get("entries")
        self._rows = self._norms = None

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
            if not np.isfinite(values).all():
                raise UserError(f"the token rows in {self.folder} hold NaN or infinite values; rebuild the index.")
            self._rows = TokenRows(np.asarray(indptr, np.int64), tokens, values)
        return self._rows

    def norms(self) -> np.ndarray:
        if self._norms is None:
            self._norms = self.stored.norms()
        return self._norms

    def rows(self, ids) -> TokenRows:
        return self.stored.subset(ids)

    def prepare(self, queries: TokenRows) -> TokenRows:
        if self.metric != "cosine":
            return queries
        norms = queries.norms()
        return queries.scaled(1 / np.where(norms > 0, norms, 1))

    def scores(self, prepared: TokenRows) -> np.ndarray:
        """(N, queries) exact inner products in float64 (with unit stored rows for cosine)."""
        scores = self.stored.gram(prepared).T
        if self.metric == "cosine":
            norms = self.norms()
            scores = scores / np.where(norms > 0, norms, 1)[:, None]
        return scores

    def squared_norms(self) -> np.ndarray:
        return np.ones(self.n) * (self.norms() > 0) if self.metric == "cosine" else self.stored.squared_norms()


def layer_view(root: Path, info: dict, n: int, metric: str):
    return (TokenLayer if info.get("kind") == "tokens" else DenseLayer)(root, info, n, metric)
