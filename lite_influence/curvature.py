"""``--score curvature``: influence through a damped inverse curvature, from the stored vectors.

Why: plain gradient similarity (TracIn at one checkpoint) lets the directions in which every
example's gradient is large decide every ranking. Influence functions divide by the curvature
instead; with EK-FAC (George et al. 2018, as Kronfluence uses it) that lifts the linear
datamodeling score several-fold on BERT and GPT-2 (issue 15).

The maths. With the pca projection a unit's stored vector is ``phi = Q_out^T G Q_in``
(flattened), the Q the eigenvectors of its output-gradient and input covariances
(projection.eigen_side). K-FAC's Fisher ``S (x) A`` is diagonal in the basis ``Q_out (x) Q_in``,
and EK-FAC replaces its eigenvalues by the second moment of the gradients in that basis,
``Lambda_j = mean_i phi_ij^2`` over the training examples: the index holds it already, so no
extra pass over the model. Then

    dot:    I(i, q) = phi_q^T (Lambda + lambda)^-1 phi_i
    cosine: the same with ``(Lambda + lambda)^-1/2`` applied to both sides, each then of unit
            length (TrackStar): ``(w q).phi_i / (|w^1/2 q| |w^1/2 phi_i|)``, w = 1 / (Lambda + lambda)

so only the query is scaled (per coordinate) and each stored row's curvature norm
``|w^1/2 phi_i|`` is computed once. Damping: ``lambda = DAMPING_SCALE x mean(Lambda)`` over each
unit's coordinates (Kronfluence's heuristic, per module; coordinates of one unit share nothing
with another's; ``--damping`` sets the 0.1); a unit whose training vectors are all zero gets
weight 0 (it scores nothing).
Like the fitted covariances, Lambda comes from the gradients at the training labels: the
empirical Fisher (Kronfluence samples labels from the model by default).

What the diagonal is, per kind of stored coordinate:

* pca (both sides eigenbases): EK-FAC restricted to the kept eigen directions; at full width
  (``--proj-dim`` >= the sides) exactly EK-FAC (a full-width fitted side keeps its eigenbasis).
* the embeddings' exact token side: the one-hot input covariance is diagonal (token counts),
  so its eigenbasis is the tokens themselves and Lambda per (token, hidden column) pair is
  EK-FAC; the damping is the mean over the pairs of tokens the training set holds (over the
  whole vocabulary it would depend on the vocabulary's size); a token no training example
  holds has Lambda 0.
* random projection, hybrid's complement sketch, mixed's input side: a diagonal second moment
  in a (partly) random basis. Allowed, but not EK-FAC: it mostly rescales units and
  directions against each other.
* a side stored as the identity (a random build's full-width sides and whole head; indexes
  built before full-width sides kept their eigenbasis): the diagonal empirical Fisher there.

The per-layer result (Lambda, and the rows' curvature norms per damping once cosine needs
them) is cached as ``INDEX/curvature/NAME.npz``, written atomically, with N and a digest of
the manifest: an index that is rebuilt, grown or shrunk has another manifest, and the cache
is recomputed (so is a missing or damaged one; a read-only index recomputes it in memory).
Pure numpy on the stored vectors: no torch, no model.
"""

from __future__ import annotations

import hashlib
import weakref
import zipfile
from pathlib import Path

import numpy as np

from .errors import UserError

DAMPING_SCALE = 0.1  # lambda = 0.1 x mean(Lambda) per unit (Kronfluence's heuristic damping)
CACHE_FOLDER = "curvature"
CACHE_VERSION = 1
CHUNK = 8192  # stored rows (or token entries x 8) per float64 block
_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # store -> {layer: CurvedLayer}


def layer_view(store, layer: str, score: str = "gradient", damping: float = DAMPING_SCALE):
    """The layer as ``score`` compares it: the store's own view (gradient), or a
    ``CurvedLayer`` over it (curvature, damped by ``damping`` x mean(Lambda) per unit),
    computed once per open store; over every checkpoint of a TracIn-CP index, each
    checkpoint's such view, weighted (``tracin.CombinedView``)."""
    from .tracin import combined_view

    combined = combined_view(store, layer, lambda sub: single_view(sub, layer, score, damping))
    return combined if combined is not None else single_view(store, layer, score, damping)


def single_view(store, layer: str, score: str = "gradient", damping: float = DAMPING_SCALE):
    """``layer_view`` of one checkpoint: the store's own layer."""
    from .config import check_score

    view, damping = store.layer(layer), float(damping)
    if check_score(score) == "gradient":
        return view
    per_store = _VIEWS.setdefault(store, {})
    if (layer, damping) not in per_store:
        if "dot" not in view.metrics:
            raise UserError(f"index '{store.path}' holds unit vectors only (built for cosine by an older "
                            "lite-influence), so the second moment of its gradients that --score curvature "
                            "divides by is unknown; rebuild it (one build now serves both).")
        if layer not in per_store:
            per_store[layer] = Moments(store, layer, view)
        per_store[(layer, damping)] = CurvedLayer(view, per_store[layer], damping)
    return per_store[(layer, damping)]


def unit_slices(info: dict) -> list[slice]:
    """Each unit's coordinates in a dense layer's vector (units concatenated in manifest order,
    ``k_out x k_in`` each); the whole layer when the manifest does not say."""
    sizes = [int(u.get("k_in", 0)) * int(u.get("k_out", 0)) for u in info.get("units", [])]
    if not sizes or sum(sizes) != info["dim"]:
        return [slice(0, info["dim"])]
    ends = np.cumsum(sizes)
    return [slice(int(end - size), int(end)) for size, end in zip(sizes, ends)]


def dense_second_moment(view, n: int) -> np.ndarray:
    """``mean_i phi_ij^2`` of a dense layer's raw stored rows, a block of ids at a time."""
    total = np.zeros(view.dim)
    for start in range(0, n, CHUNK):
        rows = view.vectors(np.arange(start, min(n, start + CHUNK)), "dot").astype(np.float64)
        total += np.einsum("ij,ij->j", rows, rows)
    return total / max(n, 1)


def token_second_moment(rows, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens the training set holds, sorted; ``mean_i phi_i[t, c]^2`` per such token t and
    column c) of exact token rows (an example lacking t has phi_i[t] = 0)."""
    seen, inverse = np.unique(np.asarray(rows.tokens), return_inverse=True)
    total = np.zeros((len(seen), rows.k))
    step = CHUNK * 8
    for start in range(0, len(inverse), step):
        values = np.asarray(rows.values[start:start + step], np.float64)
        np.add.at(total, inverse[start:start + step], values * values)
    return seen, total / max(n, 1)


def damped_inverse(second: np.ndarray, parts: list, damping: float) -> np.ndarray:
    """``1 / (Lambda + lambda)`` with ``lambda = damping x mean(Lambda)`` over each part (a
    unit's coordinates); 0 for a part with no training mass."""
    weights = np.zeros_like(second, dtype=np.float64)
    for part in parts:
        floor = damping * second[part].mean() if second[part].size else 0.0
        if floor > 0:
            weights[part] = 1.0 / (second[part] + floor)
    return weights


class Moments:
    """One layer's Lambda (and, for token rows, the tokens it covers), from its cache file when
    that matches the index, else computed from the stored rows and saved; the rows' curvature
    norms per damping, computed when cosine first needs them and saved beside it."""

    def __init__(self, store, layer: str, view):
        self.view, self.file, self.stamp = view, cache_file(store, layer), _stamp(store)
        self.parts = [slice(None)] if view.kind == "tokens" else unit_slices(store.layer_info(layer))
        self.arrays = _read_cache(self.file, self.stamp, view)
        if self.arrays is None:
            if view.kind == "tokens":
                seen, second = token_second_moment(view.stored, view.n)
                self.arrays = {"second": second, "seen": seen}
            else:
                self.arrays = {"second": dense_second_moment(view, view.n)}
            self._save()

    @property
    def second(self) -> np.ndarray:
        return self.arrays["second"]

    def norms(self, layer: "CurvedLayer") -> np.ndarray:
        key = f"norms@{layer.damping!r}"
        if key not in self.arrays:
            self.arrays[key] = row_norms(self.view, layer)
            self._save()
        return self.arrays[key]

    def _save(self) -> None:
        """Atomically; skipped where the index folder cannot take it (the arrays stay in memory)."""
        from .store.atomic import write_file

        arrays = {**{key: np.asarray(value) for key, value in self.stamp.items()}, **self.arrays}
        try:
            self.file.parent.mkdir(exist_ok=True)
            write_file(self.file, lambda tmp: _save(tmp, arrays))
        except OSError:
            pass


class CurvedLayer:
    """A layer view (store/views.py) whose scores are curvature-weighted: the same
    ``prepare`` / ``scores`` / ``rows`` / ``squared_norms`` calls, exact scans of every row
    (FAISS holds the plain unit rows, so it cannot search this inner product)."""

    def __init__(self, view, moments: Moments, damping: float = DAMPING_SCALE):
        self.view, self.kind, self.dim, self.n = view, view.kind, view.dim, view.n
        self.metrics, self.moments, self.damping = view.metrics, moments, damping
        self.weights = damped_inverse(moments.second, moments.parts, damping)
        if view.kind == "tokens":
            self.seen = moments.arrays["seen"]
            floor = damping * moments.second.mean() if moments.second.size else 0.0
            self.unseen = 1.0 / floor if floor > 0 else 0.0

    def searchable(self, metric: str) -> bool:
        return False

    def rows(self, ids):
        return self.view.rows(ids)

    def norms(self) -> np.ndarray:
        """Each stored row's curvature norm ``|w^1/2 phi_i|`` (cached per damping)."""
        return self.moments.norms(self)

    def _scaled(self, queries):
        """``w q``: dense rows times the weights; token rows times their (token, column)'s."""
        if self.kind != "tokens":
            return queries * self.weights.astype(np.float32)
        from .store.token_rows import TokenRows

        return TokenRows(queries.indptr, queries.tokens, (queries.values * self.token_weights(queries.tokens))
                         .astype(np.float32))

    def token_weights(self, tokens: np.ndarray) -> np.ndarray:
        """(entries, k) weights of the given token ids; a token unseen in training: 1 / lambda."""
        tokens = np.asarray(tokens)
        out = np.full((len(tokens), self.weights.shape[1]), self.unseen)
        if len(self.seen):
            at = np.minimum(np.searchsorted(self.seen, tokens), len(self.seen) - 1)
            known = self.seen[at] == tokens
            out[known] = self.weights[at[known]]
        return out

    def prepare(self, queries, metric: str):
        raw = self.view.prepare(queries, "dot")
        scaled = self._scaled(raw)
        if metric != "cosine":
            return scaled
        if self.kind == "tokens":
            products = np.einsum("ij,ij->i", raw.values, scaled.values, dtype=np.float64)
            lengths = np.sqrt(np.bincount(np.repeat(np.arange(raw.n), np.diff(raw.indptr)), products, raw.n))
            return scaled.scaled(1 / np.where(lengths > 0, lengths, 1))
        lengths = np.sqrt(np.einsum("ij,ij->i", raw, scaled, dtype=np.float64))[:, None]
        return (scaled / np.where(lengths > 0, lengths, 1)).astype(np.float32)

    def scores(self, prepared, metric: str) -> np.ndarray:
        scores = self.view.scores(prepared, "dot")
        if metric == "cosine":
            norms = self.norms()
            scores = scores / np.where(norms > 0, norms, 1)[:, None]
        return scores

    def squared_norms(self, metric: str) -> np.ndarray:
        """Self-influence under the curvature (dot), or 1 for every nonzero row (cosine)."""
        norms = self.norms()
        return (norms > 0).astype(np.float64) if metric == "cosine" else norms ** 2


def row_norms(view, curved: CurvedLayer) -> np.ndarray:
    """Each stored row's ``|w^1/2 phi_i|``, a block of rows (or token entries) at a time."""
    if view.kind == "tokens":
        rows = view.stored
        squares = np.zeros(len(rows.tokens))
        step = CHUNK * 8
        for start in range(0, len(squares), step):
            values = np.asarray(rows.values[start:start + step], np.float64)
            weights = curved.token_weights(rows.tokens[start:start + step])
            squares[start:start + step] = np.einsum("ij,ij->i", values * weights, values)
        return np.sqrt(np.bincount(np.repeat(np.arange(rows.n), np.diff(rows.indptr)), squares, rows.n))
    out = np.empty(view.n)
    for start in range(0, view.n, CHUNK):
        rows = view.vectors(np.arange(start, min(view.n, start + CHUNK)), "dot").astype(np.float64)
        out[start:start + len(rows)] = np.sqrt(np.einsum("ij,ij,j->i", rows, rows, curved.weights))
    return out


def cache_file(store, layer: str) -> Path:
    return Path(store.path) / CACHE_FOLDER / f"{layer}.npz"


def _stamp(store) -> dict:
    """What a cache must match: its format, N and the manifest's digest."""
    from .store import MANIFEST

    try:
        digest = hashlib.sha256((Path(store.path) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        digest = ""
    return {"version": CACHE_VERSION, "n": store.n, "manifest": digest}


def _save(path: Path, arrays: dict) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _read_cache(file: Path, stamp: dict, view) -> dict | None:
    """The cached arrays, or None when missing, damaged, stale or of the wrong shape."""
    try:
        with np.load(file, allow_pickle=False) as data:
            if any(data[key].item() != value for key, value in stamp.items()):
                return None
            arrays = {key: np.asarray(data[key]) for key in data.files if key not in stamp}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    second = arrays.get("second")
    if second is None or not np.isfinite(second).all():
        return None
    if any(key.startswith("norms@") and value.shape != (view.n,) for key, value in arrays.items()):
        return None
    if view.kind == "tokens":
        ok = "seen" in arrays and second.shape == (len(arrays["seen"]), view.dim)
    else:
        ok = second.shape == (view.dim,)
    return arrays if ok else None
