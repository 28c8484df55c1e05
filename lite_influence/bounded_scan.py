"""Exact lookup from one float32 product per layer: float64 only where rounding leaves the order open.

Why: a lookup on a Flat index must rank every training example exactly (lookup.py), and doing
so in float64 costs a float64 copy of every stored row per query (1.8x a float32 scan on
aligned rows; more on the memory-mapped file). A float32 product answers almost every
comparison already; what it cannot settle is known in advance from a rigorous bound.

The maths (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 3.1):
for float32 vectors x, q of length d, any summation order (BLAS blocking, SIMD lanes, FMA)
gives ``|fl32(x.q) - x.q| <= gamma_d |x|.|q|`` with ``gamma_d = d u / (1 - d u)``, u = 2^-24.
The float64 reference (``views.chunked_product``: float32 rows cast to float64; their products
are exact, 24 + 24 bits < 53) is off from x.q by at most ``gamma_d`` at u = 2^-53. With
``|x|.|q| <= ||x|| ||q||`` (Cauchy-Schwarz) and ``M`` a rigorous upper bound on the stored rows'
norms (``max_norm``: their float32 sums of squares, each within gamma_d of the true one), every
row's float32 score is within ``e = (gamma32_d + gamma64_d) M ||q||`` of its float64 score
(dot on unit rows with norms: times each row's norm). All further float64 arithmetic on the
bounds is covered by ``SLACK``.

So each (layer, query) list gives every example an interval ``[a - e, a + e]`` holding its
exact score, hence a rank interval: ranks above it are the rows whose interval lies wholly
above, and so on. Vote and rank sum a weight that falls with the rank, mean the scores; the
intervals bound every example's aggregate, and only the examples whose upper bound reaches the
k-th best lower bound (the *candidates*) can be in the answer. Their exact ranks need float64
scores only for the rows whose interval overlaps one of theirs: a row outside every such
overlap is certainly above or certainly below each candidate. The answer is therefore exactly
what the float64 ranking of all N gives (ties by id), which tests/test_bounded_scan.py checks
against brute-force numpy, near-ties included. When the bound leaves too much open (very wide
intervals against tightly packed scores) ``bounded_sides`` says so (None) and lookup.py scores
every row in float64 as before.

The server holds dense rows in memory (``hold``, ``serve --hold-gb``): aligned float32 copies
that BLAS reads at full speed (the FAISS file's rows sit at byte 45, which BLAS rejects), with
their norm bound computed once.
"""

from __future__ import annotations

import math
import weakref

import numpy as np

U32, U64 = 2.0 ** -24, 2.0 ** -53
SLACK = 1 + 2.0 ** -20  # covers the float64 roundings of the bounds' own arithmetic: e >= 2^-24 |a|, so
# 2^-20 e outweighs the ulp of a - e and a + e
MAX_OPEN = 0.25  # candidates beyond this share of N: the bound settled too little, score all in float64
_HELD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # DenseLayer -> Held


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term dot product."""
    return math.inf if n * u >= 1 else n * u / (1 - n * u)


class Held:
    """A dense layer's unit rows as one aligned in-memory array (or None: read through the
    store each query) and the rigorous bound on their norms."""

    def __init__(self, rows: np.ndarray | None, max_norm: float):
        self.rows, self.max_norm = rows, max_norm


def boundable(view) -> bool:
    """Dense Flat rows of unit length (format 2, or a cosine build): what the bound covers."""
    from .store.faiss_layers import exact_flat
    from .store.views import DenseLayer

    return isinstance(view, DenseLayer) and view.holds in ("unit", "unit+norms") and exact_flat(view.index) is not None


def max_norm(rows: np.ndarray) -> float:
    """An upper bound on every row's 2-norm: float32 sums of squares (non-negative terms, so
    each within gamma_d of the true one), a block of rows at a time."""
    biggest = 0.0
    for start in range(0, rows.shape[0], _step(rows)):
        biggest = max(biggest, _largest_square(np.asarray(rows[start:start + _step(rows)])))
    return norm_bound(biggest, rows.shape[1])


def _step(rows) -> int:
    return max(64, 2 ** 21 // (4 * max(1, rows.shape[1])))  # rows per block: 2 MB, a block stays in cache


def _largest_square(block: np.ndarray) -> float:
    return float(np.einsum("ij,ij->i", block, block).max(initial=0.0))


def norm_bound(largest_square: float, d: int) -> float:
    """The norm bound from the largest float32 sum of squares of d terms."""
    return math.sqrt(largest_square / (1 - gamma(d, U32))) * SLACK


def held(view, keep: bool = False) -> Held:
    """The layer's ``Held``: its norm bound measured on first use (one float32 pass), with
    ``keep`` an aligned in-memory copy of its rows too."""
    entry = _HELD.get(view)
    if entry is None or (keep and entry.rows is None):
        rows = view.vectors(None, "cosine")
        copy = np.array(rows) if keep else None
        entry = Held(copy, entry.max_norm if entry is not None else max_norm(copy if keep else rows))
        _HELD[view] = entry
    return entry


def hold(store, layers: list[str], gb: float) -> list[str]:
    """Keep aligned copies of dense layers' rows in memory, smallest first, as long as they fit
    in ``gb`` gigabytes: a budget then holds the most layers, so the most layer selections run
    from memory alone (at --energy 0.8 the early blocks are the widest). Their norm bounds are
    measured on the copies; other layers' on first use. The layers held, in ``layers`` order."""
    views = [(layer, store.layer(layer)) for layer in layers]
    sizes = {layer: 4.0 * view.n * view.dim for layer, view in views if boundable(view)}
    budget, kept = gb * 1e9, set()
    for layer in sorted(sizes, key=sizes.get):
        if sizes[layer] <= budget:
            held(store.layer(layer), keep=True)
            budget -= sizes[layer]
            kept.add(layer)
    return [layer for layer in layers if layer in kept]


class Lists:
    """Per layer: approximate scores ``a`` (N, queries) float64, their bounds ``e`` (same shape)
    and ``exact(ids)``: the float64 scores lookup.layer_scores would give those rows."""

    def __init__(self, store, vectors: dict, layers: list[str], metric: str):
        from .curvature import layer_view

        self.approx, self.exact = {}, {}
        for layer in layers:
            view = layer_view(store, layer)
            prepared = view.prepare(vectors[layer], metric)
            if boundable(view):
                self.approx[layer] = _dense_approx(view, prepared, metric)
                self.exact[layer] = _dense_exact(view, prepared, metric)
            else:  # token rows, raw rows, several checkpoints: exact already (bound 0)
                full = view.scores(prepared, metric)
                self.approx[layer] = (full, np.zeros_like(full))
                self.exact[layer] = lambda ids, full=full: full[np.asarray(ids, np.int64)]

    def each(self, sign: float):
        """(layer, query column, a, e) of every list, in lookup's order, for side ``sign``."""
        for layer, (a, e) in self.approx.items():
            for q in range(a.shape[1]):
                yield layer, q, sign * a[:, q], e[:, q]


def _dense_approx(view, prepared: np.ndarray, metric: str):
    from .store.views import finite

    product, bound = _product(view, prepared)
    a = np.asarray(product, np.float64)
    q_norms = np.sqrt(np.einsum("ij,ij->i", prepared.astype(np.float64), prepared.astype(np.float64))) * SLACK
    e = np.broadcast_to((gamma(view.dim, U32) + gamma(view.dim, U64)) * bound * q_norms * SLACK, a.shape)
    if metric == "dot":  # unit rows times each example's norm, as DenseLayer.scores does
        norms = view.norms()[:, None]
        a = a * norms
        e = e * norms * SLACK + 4 * U64 * np.abs(a)
    return finite(a, view.file), np.array(e)


def _product(view, prepared: np.ndarray):
    """(N, queries) float32 products of the layer's unit rows and the queries, and the rows'
    norm bound: from the held copy, else over aligned blocks of the memory-mapped rows, the
    first scan measuring the norms in the same pass (a layer on disk is read once, not twice)."""
    from .store.faiss_layers import aligned_product

    entry = _HELD.get(view)
    if entry is not None and entry.rows is not None:
        return entry.rows @ prepared.T, entry.max_norm
    rows = view.vectors(None, "cosine")
    if entry is not None:
        return aligned_product(prepared, rows).T, entry.max_norm
    out, biggest, step = np.empty((rows.shape[0], len(prepared)), np.float32), 0.0, _step(rows)
    for start in range(0, rows.shape[0], step):
        block = np.array(rows[start:start + step])  # aligned: BLAS takes it
        out[start:start + step] = block @ prepared.T
        biggest = max(biggest, _largest_square(block))
    _HELD[view] = entry = Held(None, norm_bound(biggest, rows.shape[1]))
    return out, entry.max_norm


def _dense_exact(view, prepared: np.ndarray, metric: str):
    from .store.views import chunked_product

    queries = np.asarray(prepared, np.float64).T

    def exact(ids):
        ids = np.asarray(ids, np.int64)
        entry = _HELD.get(view)
        rows = entry.rows[ids] if entry is not None and entry.rows is not None else view.vectors(ids, "cosine")
        scores = chunked_product(rows, queries)
        return scores * view.norms()[ids][:, None] if metric == "dot" else scores
    return exact


def bounded_sides(store, examples, vectors: dict, layers: list[str], metric: str, k: int, agg: str,
                  vote_p: float = 0.2) -> dict | None:
    """The proponents and opponents ``lookup.ranked_rows`` would give on a Flat index, from
    float32 products and float64 rescoring of the rows left open (module docstring); None when
    the bound leaves more than ``MAX_OPEN`` of N as candidates (the caller then scores all in
    float64)."""
    from .lookup import SIDES, result_row

    lists = Lists(store, vectors, layers, metric)
    out = {}
    for side, sign in SIDES:
        found = _side(store.n, lists, sign, k, agg, vote_p)
        if found is None:
            return None
        top, values = found
        exact = {layer: lists.exact[layer](top) for layer in layers}  # (k, queries): the rows' own scores
        tops = {layer: set() for layer in layers}
        for layer, q, a, e in lists.each(sign):
            tops[layer].update(int(i) for i in list_top(a, e, _column(lists, layer, q, sign), k))
        out[side] = [result_row(examples[int(i)], int(i), float(value),
                                {layer: float(exact[layer][j].mean()) for layer in layers},
                                [layer for layer in layers if int(i) in tops[layer]])
                     for j, (i, value) in enumerate(zip(top, values))]
    return out


def _column(lists: Lists, layer: str, q: int, sign: float):
    return lambda ids: sign * lists.exact[layer](ids)[:, q]


def kth_largest(values: np.ndarray, k: int) -> float:
    return float(np.partition(values, values.size - k)[values.size - k])


def list_top(a: np.ndarray, e: np.ndarray, exact, k: int) -> np.ndarray:
    """The exact top k of one list (ties by id): only rows whose upper bound reaches the k-th
    best lower bound can be in it, and only they are rescored."""
    from .aggregate import top_order

    k = min(k, a.size)
    candidates = np.flatnonzero(a + e >= kth_largest(a - e, k))
    return candidates[top_order(exact(candidates), k)]


def _side(n: int, lists: Lists, sign: float, k: int, agg: str, vote_p: float):
    """(top ids, their aggregated values) of one side, or None when too much is left open."""
    k = min(k, n)
    each = list(lists.each(sign))
    if agg == "mean":
        return _mean_top(n, lists, each, sign, k)
    return _rank_top(n, each, sign, lists, k, agg, vote_p)


def _too_open(candidates: np.ndarray, n: int, k: int) -> bool:
    return candidates.size > max(4 * k, 256, MAX_OPEN * n)


def _mean_top(n: int, lists: Lists, each: list, sign: float, k: int):
    """Mean of the exact scores over the lists: its bounds pick the candidates, which are
    rescored in every list and averaged as aggregate.mean_scores does."""
    from .aggregate import top_order

    count = len(each)
    total, spread, size = np.zeros(n), np.zeros(n), np.zeros(n)
    for _, _, a, e in each:
        total += a
        spread += e
        size += np.abs(a) + e
    margin = spread / count * SLACK + 2 * gamma(count + 1, U64) * size / count  # the means' own roundings
    mean = total / count
    candidates = np.flatnonzero(mean + margin >= kth_largest(mean - margin, k))
    if _too_open(candidates, n, k):
        return None
    scores = {layer: lists.exact[layer](candidates) for layer in lists.exact}
    stacked = np.stack([sign * scores[layer][:, q] for layer, q, _, _ in each])
    values = stacked.mean(axis=0)
    top = top_order(values, k)
    return candidates[top], sign * values[top]


def _rank_top(n: int, each: list, sign: float, lists: Lists, k: int, agg: str, vote_p: float):
    """Vote or rank: each list's rank bounds bound every example's total weight; the candidates
    get their exact ranks (``exact_ranks``) and the aggregate.votes / mean_ranks totals."""
    from .aggregate import _snap, top_order, vote_depth

    vote = agg == "vote"
    depth = vote_depth(n, vote_p) if vote else n
    pn = _snap(float(vote_p) * n)

    def weight(ranks):  # higher is better for both: vote's p N - rank, rank's minus the rank
        return np.where(ranks < depth, pn - ranks, 0.0) if vote else -np.asarray(ranks, np.float64)

    low, high, bounds = np.zeros(n), np.zeros(n), []
    for _, _, a, e in each:
        bound = rank_bounds(a - e, a + e, depth)
        region, r_lo, r_hi = bound[:3]
        low[region] += weight(r_hi)
        high[region] += weight(r_lo)
        bounds.append(bound)
    candidates = np.flatnonzero(high >= kth_largest(low, k))
    if _too_open(candidates, n, k):
        return None
    total = np.zeros(candidates.size)
    for (layer, q, a, e), bound in zip(each, bounds):
        inside, ranks = exact_ranks(candidates, bound, a, e, _column(lists, layer, q, sign))
        part = np.zeros(candidates.size) if vote else np.full(candidates.size, np.nan)
        part[inside] = weight(ranks) if vote else ranks
        total += part
    if vote:
        top = top_order(total, k)
        return candidates[top], total[top]
    values = total / len(each)
    top = top_order(values, k, higher_first=False)
    return candidates[top], values[top]


def rank_bounds(lo: np.ndarray, hi: np.ndarray, depth: int):
    """For one list's score intervals: (the rows that may rank above ``depth``, ascending; their
    lowest and highest possible ranks; the pool of rows that may rank above any of them; the
    pool's lower bounds, sorted). A row outside the region has at least ``depth`` rows wholly
    above it; a row outside the pool lies wholly below every row of the region."""
    n = lo.size
    if depth >= n:
        region = pool = np.arange(n)
    else:
        region = np.flatnonzero(hi >= kth_largest(lo, depth))
        pool = np.flatnonzero(hi >= lo[region].min())
    lo_sorted, hi_sorted = np.sort(lo[pool]), np.sort(hi[pool])
    r_lo = pool.size - np.searchsorted(lo_sorted, hi[region], side="right")  # wholly above
    r_hi = pool.size - np.searchsorted(hi_sorted, lo[region], side="left") - 1  # not wholly below, less itself
    return region, r_lo, r_hi, pool, lo_sorted


def open_rows(pool: np.ndarray, a: np.ndarray, e: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The pool's rows whose interval may hold one of the exact scores ``points`` (a superset:
    a row's own bound is at most the pool's largest)."""
    if points.size == 0:
        return pool[:0]
    widest = float(e[pool].max())
    points = np.sort(points)
    at = np.searchsorted(points, a[pool] - widest, side="left")  # the first point not below the row's reach
    near = (at < points.size) & (points[np.minimum(at, points.size - 1)] <= a[pool] + widest)
    return pool[near]


def exact_ranks(candidates: np.ndarray, bound, a: np.ndarray, e: np.ndarray, exact):
    """(which candidates lie in the list's region, their exact ranks: ties by id). The
    candidates are rescored first; then only the rows whose interval holds a candidate's exact
    score can fall either side of it, and only they are rescored too."""
    region, _, _, pool, lo_sorted = bound
    at = np.minimum(np.searchsorted(region, candidates), region.size - 1)
    inside = region[at] == candidates
    mine = candidates[inside]
    own = exact(mine)
    rows = np.union1d(open_rows(pool, a, e, own), mine)
    scores = exact(rows)
    above = pool.size - np.searchsorted(lo_sorted, own, side="right")  # wholly above, in the pool
    above_in_rows = rows.size - np.searchsorted(np.sort(a[rows] - e[rows]), own, side="right")
    place = np.empty(rows.size, np.int64)
    place[np.lexsort((rows, -scores))] = np.arange(rows.size)
    return inside, above - above_in_rows + place[np.searchsorted(rows, mine)]
