"""Search, then exact rescoring: the one routine behind ``query`` and ``audit``.

FAISS (or the store's numpy scan) finds candidates in float32, and an approximate index
(HNSW, IVF, PQ) may miss or misorder some; so each query's candidates, a few more than asked
for, are re-scored with float64 inner products against the stored vectors and ordered by
that, ties by id (duplicate texts have identical vectors, which FAISS orders arbitrarily).
For a flat index the result is what a full sort of every training example would give.

``nearest`` is the per-layer routine; ``lookup`` combines the layers' lists of one or more
queries into the proponents or opponents of a ``query`` result.

A lookup on a Flat index scores every example exactly, so ``-k`` only truncates. On an
approximate index (HNSW, IVF, PQ, SQ: ``store.approximate``) the examples it ranks are the
*candidates*: the union over layers, queries and both sides of FAISS's top
``candidate_depth(k)`` (the token rows, which FAISS does not hold, add their exact top
lists), each re-scored exactly in every layer from the stored vectors (decoded, so
approximate for PQ/SQ). Mean averages their exact scores. Rank and vote read each list to
depth N and ceil(p N) on Flat, far past the candidates: ranking within the candidates kept only
0.62 of Flat's vote top 10 on SST-2 even with exact top-100 lists. So each candidate gets its
estimated rank among all N (``estimated_ranks``): its place among the candidates within the
searched depth, and beyond it N times the share of a fixed sample of rows (``rank_sample``,
scored exactly with the candidates) that score higher; rank and vote use those ranks (0.94 of
Flat's top 10 with 400-deep lists, benchmarks/results/ann_sst2.md). The result says so
(``approximate``, ``candidates``).
"""

from __future__ import annotations

import numpy as np

from .aggregate import aggregate
from .curvature import DAMPING_SCALE, layer_view


def nearest(store, layer: str, queries, sign: float, depth: int, metric: str,
            score: str = "gradient", damping: float = DAMPING_SCALE) -> list[np.ndarray]:
    """Per query, the ids of the ``depth`` examples of highest ``sign`` * influence, in
    exact order. ``queries`` are prepared (``layer_view(store, layer, score).prepare``) for
    ``metric``."""
    from .aggregate import top_order

    n = store.n
    depth = min(depth, n)
    view = layer_view(store, layer, score, damping)
    if not view.searchable(metric):  # token rows, or dot on unit rows: exact scores of all
        full = sign * view.scores(queries, metric)
        return [top_order(full[:, q], depth) for q in range(full.shape[1])]
    margin = min(n - depth, max(16, depth // 100))
    _, candidates = store.search(layer, sign * queries, depth + margin)
    result = []
    for q, ids in enumerate(candidates):
        ids = ids[ids >= 0]
        exact = view.vectors(ids, metric).astype(np.float64) @ queries[q].astype(np.float64)
        result.append(ids[np.lexsort((ids, -sign * exact))[:depth]])
    return result


SIDES = (("proponents", 1.0), ("opponents", -1.0))


def answer_sides(store, vectors: dict, layers: list[str], metric: str, k: int, agg: str, vote_p: float = 0.2,
                 score: str = "gradient", damping: float = DAMPING_SCALE):
    """(candidates, {"proponents": rows, "opponents": rows}) of a query: on a Flat index
    ``bounded_scan`` (float32 products, float64 only where the rounding bound leaves the order
    open: the same answer), else, or when it leaves too much open, ``lookup_scores`` and
    ``ranked_rows`` (candidates: an approximate index's, else None)."""
    if not store.approximate and score == "gradient":
        from .bounded_scan import bounded_sides

        found = bounded_sides(store, store.table, vectors, layers, metric, k, agg, vote_p)
        if found is not None:
            return None, found
    candidates, scores = lookup_scores(store, vectors, layers, metric, k, score, damping)
    return candidates, {side: ranked_rows(store, store.table, scores, layers, sign, k, agg, vote_p, candidates)
                        for side, sign in SIDES}


def lookup(store, examples: list[dict], vectors: dict, layers: list[str], sign: float, k: int,
           agg: str, vote_p: float = 0.2, metric: str | None = None, score: str = "gradient",
           damping: float = DAMPING_SCALE) -> list[dict]:
    """Top-k rows (proponents: sign 1, opponents: -1) of the queries ``vectors`` (raw, layer
    -> (queries, dim), or token rows) over ``layers``, combined by ``agg``, compared by
    ``metric`` (default: the index's) and ``score`` (curvature.py); see ``InfluenceIndex.query``."""
    candidates, scores = lookup_scores(store, vectors, layers, store.check_metric(metric), k, score, damping)
    return ranked_rows(store, examples, scores, layers, sign, k, agg, vote_p, candidates)


CANDIDATES = 400  # an approximate index's search depth per list: at least this, and 4 k (vote's
# top 10 on SST-2 with exact lists: 0.80 of Flat's at depth 100, 0.91 at 200, 0.94 at 400)
RANK_SAMPLE = 2048  # rows scored exactly on an approximate index to place the candidates (8,192: +0.02)


def candidate_depth(k: int, n: int) -> int:
    return min(n, max(CANDIDATES, 4 * k))


def rank_sample(n: int) -> np.ndarray:
    """Evenly spaced row ids whose exact scores estimate a candidate's rank among all N."""
    return np.unique(np.linspace(0, n - 1, min(n, RANK_SAMPLE)).astype(np.int64))


def estimated_ranks(column: np.ndarray, positions: np.ndarray, n: int, depth: int) -> np.ndarray:
    """Each candidate's rank among all ``n`` by its exact score in ``column`` (higher first):
    its place among the candidates within ``depth`` (the searched depth, where they are the
    top), beyond it ``n`` x the share of the sampled rows (``positions`` in ``column``) above it."""
    within = np.empty(column.size)
    within[np.lexsort((np.arange(column.size), -column))] = np.arange(column.size)
    sample = np.sort(column[positions])
    beyond = n * (sample.size - np.searchsorted(sample, column, side="right")) / max(1, sample.size)
    return np.where(within < depth, within, np.maximum(beyond, depth))


def layer_scores(store, vectors: dict, layers: list[str], metric: str,
                 score: str = "gradient", damping: float = DAMPING_SCALE) -> dict[str, np.ndarray]:
    """Every stored example's exact influence on each query: layer -> (N, queries) float64,
    computed once for both the proponents and the opponents."""
    views = {layer: layer_view(store, layer, score, damping) for layer in layers}
    return {layer: view.scores(view.prepare(vectors[layer], metric), metric) for layer, view in views.items()}


def lookup_scores(store, vectors: dict, layers: list[str], metric: str, k: int = 10,
                  score: str = "gradient", damping: float = DAMPING_SCALE):
    """(candidates, scores) of a lookup: ``layer_scores`` on a Flat index (candidates None:
    every example, in id order), else the exact scores, layer -> (candidates, queries), of
    the sorted ids FAISS found (module docstring)."""
    if not store.approximate:
        return None, layer_scores(store, vectors, layers, metric, score, damping)
    from .aggregate import top_order

    views = {layer: layer_view(store, layer, score, damping) for layer in layers}
    prepared = {layer: view.prepare(vectors[layer], metric) for layer, view in views.items()}

    depth, found, full = candidate_depth(k, store.n), [], {}
    for layer, view in views.items():
        if view.searchable(metric):
            for sign in (1.0, -1.0):
                found += [ids[ids >= 0] for ids in store.search(layer, sign * prepared[layer], depth)[1]]
        else:  # token rows (or a score FAISS does not hold): exact over all, their top lists join
            full[layer] = view.scores(prepared[layer], metric)
            found += [top_order(sign * column, depth) for column in full[layer].T for sign in (1.0, -1.0)]
    candidates = np.unique(np.concatenate(found + [rank_sample(store.n)]))
    return candidates, {layer: full[layer][candidates] if layer in full else
                        views[layer].vectors(candidates, metric).astype(np.float64) @ prepared[layer].T.astype(np.float64)
                        for layer in layers}


def ranked_rows(store, examples: list[dict], scores: dict, layers: list[str], sign: float, k: int,
                agg: str, vote_p: float = 0.2, candidates: np.ndarray | None = None) -> list[dict]:
    """The top-k rows of ``layer_scores`` for one side (``sign``).

    On a Flat index (``candidates`` None) the ranking does not depend on ``k``, which only
    truncates it: every (layer, query) list is scored exactly against every stored vector;
    rank averages full ranks, mean full scores, and vote lets each list vote for its top
    ``vote_p`` fraction (``ceil(vote_p N)``, as the audit does). On an approximate index the
    same rules run over the candidates (module docstring). ``retrieved_in`` names the layers
    in whose own top k the row is."""
    from .aggregate import top_order, vote_depth

    exact = {layer: sign * scores[layer] for layer in layers}  # (candidates, queries) per layer
    pool = store.n if candidates is None else len(candidates)
    depth = {"vote": vote_depth(store.n, vote_p), "rank": pool}.get(agg, 0)
    full = {layer: [top_order(exact[layer][:, q], max(depth, k)) for q in range(exact[layer].shape[1])]
            for layer in layers}  # positions, each list sorted only as deep as needed
    ids_of = (lambda positions: positions) if candidates is None else (lambda positions: candidates[positions])
    lists = [ids_of(ranking[:depth]) for layer in layers for ranking in full[layer]]
    if agg == "mean":
        top, values = aggregate("mean", scores=np.concatenate([s.T for s in exact.values()]), first=k)
        top, values = ids_of(top), sign * values  # the mean influence: < 0 for opponents
    elif candidates is not None:
        top, values = _estimated(agg, exact, candidates, store.n, vote_p, k)
    else:
        top, values = aggregate(agg, lists=lists, n=store.n, p=vote_p, partial=candidates is not None,
                                checked=True, first=k)
    top_in = {layer: {int(i) for ranking in full[layer] for i in ids_of(ranking[:k])} for layer in layers}
    position = (lambda i: i) if candidates is None else (lambda i: int(np.searchsorted(candidates, i)))
    return [result_row(examples[int(i)], int(i), float(value),
                 {layer: float(sign * exact[layer][position(int(i))].mean()) for layer in layers},
                 [layer for layer in layers if int(i) in top_in[layer]])
            for i, value in zip(top[:k], values[:k])]


def _estimated(agg: str, exact: dict, candidates: np.ndarray, n: int, vote_p: float, k: int):
    """Rank or vote over an approximate index's candidates from their ``estimated_ranks``."""
    from .aggregate import top_order, vote_depth

    positions, depth = np.searchsorted(candidates, rank_sample(n)), candidate_depth(k, n)
    ranks = np.stack([estimated_ranks(column, positions, n, depth) for scores in exact.values() for column in scores.T])
    if agg == "rank":
        values, higher = ranks.mean(axis=0), False
    else:
        values, higher = np.where(ranks < vote_depth(n, vote_p), vote_p * n - ranks, 0.0).sum(axis=0), True
    top = top_order(values, k, higher)
    return candidates[top], values[top]


def result_row(example: dict, i: int, score: float, per_layer: dict, retrieved_in: list[str]) -> dict:
    return {"id": i, "score": score, "label": example.get("label"),
            "text": example.get("text"), "pair": example.get("pair"),
            **({"completion": example["completion"]} if "completion" in example else {}),
            "per_layer": per_layer, "retrieved_in": retrieved_in,
            "extra": {key: v for key, v in example.items() if key not in ("id", "text", "pair", "label", "completion")}}
