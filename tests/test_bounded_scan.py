"""bounded_scan: float32 products with a rigorous rounding bound, float64 only where the order
is left open. Checked against brute-force numpy float64 on the stored vectors (and against the
full-float64 lookup path) with near-ties that float32 cannot order, duplicates included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lite_influence import bounded_scan
from lite_influence.lookup import SIDES, answer_sides, lookup_scores, ranked_rows
from test_lookup import write_store


def test_the_float32_dot_product_stays_within_highams_bound():
    """The bound against an exactly rounded reference (math.fsum of exact float64 products),
    on random rows and on rows built to cancel (big terms of both signs, small result)."""
    rng = np.random.default_rng(1)
    for d in (7, 300, 4096):
        x = rng.normal(size=(50, d)).astype(np.float32)
        x[:25, : d // 2] *= 1e3  # cancellation: large terms, small sums
        q = rng.normal(size=d).astype(np.float32)
        q[: d // 2] *= -1e-3
        approx = (x @ q).astype(np.float64)
        for i in range(len(x)):
            exact = math.fsum(float(a) * float(b) for a, b in zip(x[i], q))
            bound = bounded_scan.gamma(d, bounded_scan.U32) * float(np.abs(x[i]).astype(np.float64) @ np.abs(q))
            assert abs(approx[i] - exact) <= bound


def test_max_norm_bounds_every_row():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(300, 97)).astype(np.float32)
    rows[17] *= 40
    bound = bounded_scan.max_norm(rows)
    exact = max(math.sqrt(math.fsum(float(v) ** 2 for v in row)) for row in rows)
    assert exact <= bound <= exact * (1 + 1e-4)


def near_ties(n=600, d=64, seed=0):
    """Rows in clusters that differ by far less than float32's error over d terms, and exact
    duplicates: only float64 orders them."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n // 6, d))
    rows = np.repeat(base, 6, axis=0)
    rows += rng.normal(size=rows.shape) * 1e-6 * (np.arange(n) % 6 != 0)[:, None]
    rows[5::6] = rows[4::6]  # duplicates: ties by id
    rows *= rng.uniform(0.5, 3, size=(n, 1))  # norms differ, so dot and cosine rank differently
    return rows.astype(np.float32)


def near_tie_store(tmp_path, metric):
    rows = near_ties()
    return write_store(tmp_path, rows, metric=metric), rows


def brute_force(store, queries, metric, sign, k, agg, vote_p=0.2):
    """Independent reference: float64 products of the stored unit rows (times their norms for
    dot), then aggregate by hand: ids and values, ties by id."""
    view = store.layer("layer")
    exact = view.vectors(None, "cosine").astype(np.float64) @ queries.astype(np.float64).T
    if metric == "dot":
        exact = exact * view.norms()[:, None]
    n, ids = store.n, np.arange(store.n)
    signed = sign * exact
    if agg == "mean":
        values = signed.mean(axis=1)
        order = np.lexsort((ids, -values))
        return order[:k].tolist(), (sign * values[order[:k]]).tolist()
    ranks = np.zeros((n, signed.shape[1]))
    for q in range(signed.shape[1]):
        ranks[np.lexsort((ids, -signed[:, q])), q] = np.arange(n)
    if agg == "rank":
        values = ranks.mean(axis=1)
        order = np.lexsort((ids, values))
    else:
        depth, pn = math.ceil(vote_p * n), vote_p * n
        values = np.where(ranks < depth, pn - ranks, 0).sum(axis=1)
        order = np.lexsort((ids, -values))
    return order[:k].tolist(), values[order[:k]].tolist()


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("agg", ["vote", "rank", "mean"])
def test_bounded_lookup_equals_brute_force_with_near_ties(tmp_path, metric, agg):
    store, rows = near_tie_store(tmp_path, metric)
    rng = np.random.default_rng(3)
    queries = np.stack([rows[8], rows[100] + rng.normal(size=rows.shape[1]).astype(np.float32) * 1e-3])
    for q in (queries[:1], queries):
        vectors = {"layer": q}
        sides = bounded_scan.bounded_sides(store, store.table, vectors, ["layer"], metric, 25, agg)
        assert sides is not None  # the bound settled enough: this is the bounded scan's answer
        prepared = store.layer("layer").prepare(q, metric)
        for side, sign in SIDES:
            ids, values = brute_force(store, prepared, metric, sign, 25, agg)
            assert [r["id"] for r in sides[side]] == ids
            assert np.allclose([r["score"] for r in sides[side]], values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("agg", ["vote", "rank", "mean"])
def test_bounded_lookup_equals_the_float64_path_row_for_row(tmp_path, metric, agg, monkeypatch):
    """Every field of every row (scores, per-layer scores, retrieved_in) as the full float64
    scoring gives it; and with too much left open the bounded scan steps aside."""
    store, rows = near_tie_store(tmp_path, metric)
    vectors = {"layer": rows[40:41] * 1.5}
    _, sides = answer_sides(store, vectors, ["layer"], metric, 10, agg)
    candidates, scores = lookup_scores(store, vectors, ["layer"], metric, 10)
    for side, sign in SIDES:
        expected = ranked_rows(store, store.table, scores, ["layer"], sign, 10, agg, 0.2, candidates)
        assert [r["id"] for r in sides[side]] == [r["id"] for r in expected]
        assert [r["retrieved_in"] for r in sides[side]] == [r["retrieved_in"] for r in expected]
        assert np.allclose([r["score"] for r in sides[side]], [r["score"] for r in expected], rtol=1e-12)
        assert np.allclose([r["per_layer"]["layer"] for r in sides[side]],
                           [r["per_layer"]["layer"] for r in expected], rtol=1e-12)
    monkeypatch.setattr(bounded_scan, "MAX_OPEN", -1.0)
    monkeypatch.setattr(bounded_scan, "_too_open", lambda candidates, n, k: True)
    assert bounded_scan.bounded_sides(store, store.table, vectors, ["layer"], metric, 10, agg) is None


def test_held_rows_answer_the_same_and_respect_the_budget(tmp_path):
    store, rows = near_tie_store(tmp_path, "cosine")
    vectors = {"layer": rows[7:8]}
    before = answer_sides(store, vectors, ["layer"], "cosine", 10, "vote")[1]
    assert bounded_scan.hold(store, ["layer"], gb=1e-9) == []  # does not fit
    assert bounded_scan.hold(store, ["layer"], gb=1.0) == ["layer"]
    assert bounded_scan.held(store.layer("layer")).rows.flags["ALIGNED"]
    assert answer_sides(store, vectors, ["layer"], "cosine", 10, "vote")[1] == before


def test_the_near_ties_are_beyond_float32():
    """The fixture is a real test: float32 products misorder some of its rows."""
    rows = near_ties()
    unit = rows / np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
    unit = unit.astype(np.float32)
    exact = unit.astype(np.float64) @ unit[8].astype(np.float64)
    approx = (unit @ unit[8]).astype(np.float64)
    ids = np.arange(len(rows))
    assert np.lexsort((ids, -exact)).tolist() != np.lexsort((ids, -approx)).tolist()
