"""mean / rank / vote checked against brute-force references written with plain loops."""

import math

import numpy as np
import pytest

from lite_influence.aggregate import (AGGREGATIONS, aggregate, mean_ranks, mean_scores, order,
                                      vote_depth, votes)
from lite_influence.errors import UserError


# ---------- brute-force references (independent of the code under test) ----------

def ref_order(values, higher_first):
    """Selection sort by (value, id): the most relevant value first, smaller id on ties."""
    remaining = list(range(len(values)))
    out = []
    while remaining:
        best = remaining[0]
        for i in remaining[1:]:
            better = values[i] > values[best] if higher_first else values[i] < values[best]
            if better:  # equal values keep the earlier (smaller) id
                best = i
        out.append(best)
        remaining.remove(best)
    return out


def ref_mean_scores(scores):
    rows, cols = len(scores), len(scores[0])
    return [sum(float(scores[l][m]) for l in range(rows)) / rows for m in range(cols)]


def ref_mean_ranks(lists, n):
    out = []
    for i in range(n):
        total = 0
        for lst in lists:
            ids = [int(x) for x in lst]
            total += ids.index(i) if i in ids else len(ids)
        out.append(total / len(lists))
    return out


def ref_votes(lists, n, p, depth):
    out = [0.0] * n
    for lst in lists:
        for r in range(depth):
            out[int(lst[r])] += p * n - r
    return out


def rankings_from_scores(scores):
    """One full list per row: ids by descending score, smaller id first on ties."""
    return [np.array(ref_order(list(row), True)) for row in scores]


SHAPES = [(1, 5), (3, 7), (4, 10), (6, 25)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_mean_matches_reference(shape, ties):
    rng = np.random.default_rng(shape[0] * 100 + shape[1] + ties)
    scores = rng.integers(-2, 3, size=shape).astype(float) if ties else rng.normal(size=shape)
    ids, vals = aggregate("mean", scores=scores)
    ref = ref_mean_scores(scores.tolist())
    np.testing.assert_allclose(mean_scores(scores), ref, rtol=0, atol=1e-12)
    # integer scores give exact ties; normal scores have no near-ties, so orders agree exactly
    assert ids.tolist() == ref_order(ref, True)
    np.testing.assert_allclose(vals, [ref[i] for i in ids.tolist()], atol=1e-12)
    assert all(vals[k] >= vals[k + 1] for k in range(len(vals) - 1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [None, 1, 3])
def test_rank_matches_reference(shape, k):
    rng = np.random.default_rng(7 + shape[1])
    scores = rng.integers(-3, 4, size=shape).astype(float)
    lists = rankings_from_scores(scores)
    if k is not None:  # truncated top-k lists: missing ids take rank k
        lists = [lst[:k] for lst in lists]
    n = shape[1]
    ref = ref_mean_ranks(lists, n)
    assert mean_ranks(lists, n).tolist() == ref
    ids, vals = aggregate("rank", lists=lists, n=n)
    assert ids.tolist() == ref_order(ref, False)
    assert vals.tolist() == [ref[i] for i in ids.tolist()]


def test_rank_missing_takes_rank_k_by_hand():
    lists = [np.array([2, 0]), np.array([1, 2, 3])]
    # id0: 1 and 3 -> 2; id1: 2 and 0 -> 1; id2: 0 and 1 -> .5; id3: 2 and 2 -> 2; id4: 2 and 3
    assert mean_ranks(lists, 5).tolist() == [2.0, 1.0, 0.5, 2.0, 2.5]
    ids, _ = aggregate("rank", lists=lists, n=5)
    assert ids.tolist() == [2, 1, 0, 3, 4]


@pytest.mark.parametrize("n,p", [(10, 0.2), (10, 0.25), (7, 0.3), (25, 0.1), (13, 1.0), (100, 0.2)])
def test_vote_matches_reference(n, p):
    rng = np.random.default_rng(n)
    scores = rng.integers(-3, 4, size=(5, n)).astype(float)
    lists = rankings_from_scores(scores)
    depth = math.ceil(round(p * n, 9))
    ref = ref_votes(lists, n, p, depth)
    np.testing.assert_allclose(votes(lists, n, p), ref, rtol=0, atol=1e-9)
    ids, vals = aggregate("vote", lists=lists, n=n, p=p)
    # votes may differ by an ulp from the reference; compare orders on rounded references
    assert ids.tolist() == ref_order([round(v, 6) for v in ref], True)


def test_vote_weights_by_hand():
    # n=10, p=0.25 -> p*n = 2.5, depth 3, weights 2.5, 1.5, 0.5; the 4th entry is ignored
    got = votes([np.array([4, 1, 7, 2]), np.array([1, 4, 0])], 10, 0.25)
    expected = [0.0] * 10
    expected[4], expected[1], expected[7], expected[0] = 2.5 + 1.5, 1.5 + 2.5, 0.5, 0.5
    assert got.tolist() == expected


@pytest.mark.parametrize("n,p", [(10, 0.2), (9, 0.2), (31, 0.15), (100, 0.07)])
def test_vote_exact_from_truncated_lists(n, p):
    rng = np.random.default_rng(n)
    full = [rng.permutation(n) for _ in range(6)]
    d = vote_depth(n, p)
    assert votes([f[:d] for f in full], n, p).tolist() == votes(full, n, p).tolist()


def test_vote_depth_is_robust():
    assert vote_depth(100, 0.2) == 20
    assert vote_depth(10, 0.3) == 3  # 0.3*10 = 3.0000000000000004
    assert vote_depth(10, 0.7) == 7  # 0.7*10 = 7.000000000000001
    assert vote_depth(10, 0.25) == 3
    assert vote_depth(7, 0.3) == 3
    assert vote_depth(5, 1.0) == 5
    for n in range(1, 60):
        for pct in range(1, 101):
            assert vote_depth(n, pct / 100) == -(-(pct * n) // 100)  # exact integer ceil


def test_order_ties_smaller_id_first():
    v = np.array([1.0, 3.0, 3.0, 1.0, 2.0])
    assert order(v, True).tolist() == [1, 2, 4, 0, 3]
    assert order(v, False).tolist() == [0, 3, 4, 1, 2]


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UserError) as e:
        aggregate("median", scores=np.zeros((1, 2)))
    for name in AGGREGATIONS:
        assert name in str(e.value)


@pytest.mark.parametrize("p", [0, -0.1, 1.5, float("nan"), True])
def test_bad_p(p):
    with pytest.raises(UserError, match="p must be"):
        votes([np.arange(5)], 5, p)


def test_short_vote_list_says_how_many():
    with pytest.raises(UserError, match="at least 4"):
        votes([np.arange(10), np.arange(3)], 20, 0.2)


@pytest.mark.parametrize("lists,msg", [
    ([np.array([0, 5])], "outside"),
    ([np.array([-1])], "outside"),
    ([np.array([1, 1])], "repeats"),
    ([np.array([0.5])], "integer"),
    ([], "at least one"),
])
def test_bad_lists(lists, msg):
    with pytest.raises(UserError, match=msg):
        mean_ranks(lists, 5)


def test_bad_scores_and_missing_inputs():
    with pytest.raises(UserError, match="NaN"):
        mean_scores(np.array([[1.0, np.nan]]))
    with pytest.raises(UserError):
        mean_scores(np.zeros(3))
    with pytest.raises(UserError, match="full scores"):
        aggregate("mean", lists=[np.arange(3)], n=3)
    with pytest.raises(UserError, match="lists and n"):
        aggregate("rank", scores=np.zeros((1, 3)))
    with pytest.raises(UserError, match="n must be"):
        mean_ranks([np.arange(3)], 0)


def test_top_order_is_the_prefix_of_the_full_order_ties_included():
    from lite_influence.aggregate import order, top_order

    rng = np.random.default_rng(3)
    values = np.round(rng.normal(size=500), 1)  # many ties
    for higher_first in (True, False):
        full = order(values, higher_first)
        for depth in (1, 7, 100, 499, 500, 600):
            assert top_order(values, depth, higher_first).tolist() == full[:depth].tolist()


def test_partial_votes_count_what_each_short_list_retrieved():
    """An approximate search's lists may be shorter than ceil(p n): each id it holds gets
    p n - rank, missing ids nothing (by hand: p n = 2.5, depth 3)."""
    got = votes([np.array([4, 1]), np.array([1, 4, 0, 2])], 10, 0.25, partial=True)
    expected = np.zeros(10)
    expected[[4, 1]] += [2.5, 1.5]
    expected[[1, 4, 0]] += [2.5, 1.5, 0.5]
    np.testing.assert_allclose(got, expected)
    with pytest.raises(Exception, match="ceil"):
        votes([np.array([4, 1])], 10, 0.25)
