"""Search, then exact rescoring: the one routine behind ``query`` and ``audit``.

FAISS (or the store's numpy scan) finds candidates in float32, and an approximate index
(HNSW, IVF, PQ) may miss or misorder some; so each query's candidates, a few more than asked
for, are re-scored with float64 inner products against the stored vectors and ordered by
that, ties by id (duplicate texts have identical vectors, which FAISS orders arbitrarily).
For a flat index the result is what a full sort of every training example would give.

``nearest`` is the per-layer routine; ``lookup`` combines the layers' lists of one or more
queries into the proponents or opponents of a ``query`` result.
"""

from __future__ import annotations

import numpy as np

from .aggregate import aggregate


def nearest(store, layer: str, queries: np.ndarray, sign: float, depth: int) -> list[np.ndarray]:
    """Per query, the ids of the ``depth`` examples of highest ``sign`` * influence, in
    exact order. ``queries`` are prepared (``store.prepare_queries``)."""
    n = store.n
    depth = min(depth, n)
    margin = min(n - depth, max(16, depth // 100))
    _, candidates = store.search(layer, sign * queries, depth + margin)
    result = []
    for q, ids in enumerate(candidates):
        ids = ids[ids >= 0]
        exact = store.vectors(layer, ids).astype(np.float64) @ queries[q].astype(np.float64)
        result.append(ids[np.lexsort((ids, -sign * exact))[:depth]])
    return result


def lookup(store, examples: list[dict], vectors: dict, layers: list[str], sign: float, k: int,
           agg: str) -> list[dict]:
    """Top-k rows (proponents: sign 1, opponents: -1) of the queries ``vectors`` (raw, layer
    -> (queries, dim)) over ``layers``, combined by ``agg``; see ``InfluenceIndex.query``."""
    lists, found_in = [], {}
    prepared = {layer: store.prepare_queries(vectors[layer]) for layer in layers}
    for layer in layers:
        for row in nearest(store, layer, prepared[layer], sign, k):
            lists.append(row)
            for i in row:  # several queries may retrieve the same example in one layer
                seen = found_in.setdefault(int(i), [])
                seen.extend([layer] if layer not in seen else [])
    candidates = np.array(sorted(found_in), dtype=np.int64)
    exact = {layer: sign * store.vectors(layer, candidates) @ prepared[layer].T
             for layer in layers}  # (candidates, queries) per layer
    if agg == "mean":
        ids, values = aggregate("mean", scores=np.concatenate([s.T for s in exact.values()]))
        ids, values = candidates[ids], sign * values  # the mean influence: < 0 for opponents
    else:
        p = min(1.0, k / store.n) if agg == "vote" else 0.2
        ids, values = aggregate(agg, lists=lists, n=store.n, p=p)
        keep = np.isin(ids, candidates)
        ids, values = ids[keep], values[keep]
    position = {int(c): j for j, c in enumerate(candidates)}
    return [_row(examples[int(i)], int(i), float(value), {layer: float(sign * exact[layer][position[int(i)]].mean())
                                                          for layer in layers}, found_in[int(i)])
            for i, value in zip(ids[:k], values[:k])]


def _row(example: dict, i: int, score: float, per_layer: dict, retrieved_in: list[str]) -> dict:
    return {"id": i, "score": score, "label": example.get("label"),
            "text": example.get("text"), "pair": example.get("pair"),
            **({"completion": example["completion"]} if "completion" in example else {}),
            "per_layer": per_layer, "retrieved_in": retrieved_in,
            "extra": {key: v for key, v in example.items() if key not in ("id", "text", "pair", "label", "completion")}}
