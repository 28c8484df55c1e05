"""NDR and the cancellation ratio checked against brute-force references written with loops."""

import math
from fractions import Fraction

import numpy as np
import pytest

from lite_influence.errors import UserError
from lite_influence.ndr import (auc_ndr, cancellation_ratio, detection_curve, ndr_at,
                                perfect_ndr_at, random_auc_ndr, random_ndr_at, summarise)


# ---------- brute-force references (independent of the code under test) ----------

def ref_curve(ranking, noisy):
    m = sum(bool(x) for x in noisy)
    out, found = [], 0
    for idx in ranking:
        found += bool(noisy[int(idx)])
        out.append(found / m)
    return out


def ref_cutoff(n, pct):
    """round(p*N) in exact rational arithmetic (Fraction rounds half to even, like round)."""
    return round(Fraction(pct, 100) * n)


def ref_auc(ranking, noisy):
    """Normalised so the perfect ranking scores 1: divide by the perfect ranking's curve sum."""
    perfect = sorted(range(len(noisy)), key=lambda i: not noisy[i])
    return sum(ref_curve(ranking, noisy)) / sum(ref_curve(perfect, noisy))


def make(n, m, seed):
    rng = np.random.default_rng(seed)
    noisy = np.zeros(n, dtype=bool)
    noisy[rng.choice(n, m, replace=False)] = True
    return noisy, rng.permutation(n)


@pytest.mark.parametrize("n,m,seed", [(1, 1, 0), (10, 3, 1), (37, 5, 2), (200, 40, 3)])
def test_curve_ndr_auc_match_reference(n, m, seed):
    noisy, ranking = make(n, m, seed)
    ref = ref_curve(ranking, noisy)
    np.testing.assert_allclose(detection_curve(ranking, noisy), ref, rtol=0, atol=1e-12)
    for pct in range(1, 101):
        j = ref_cutoff(n, pct)
        expected = 0.0 if j == 0 else ref[j - 1]
        assert ndr_at(ranking, noisy, pct / 100) == pytest.approx(expected, abs=1e-12)
    assert auc_ndr(ranking, noisy) == pytest.approx(ref_auc(ranking, noisy), abs=1e-12)


def test_cutoff_is_round_half_even_and_float_robust():
    assert ndr_at(np.arange(45), np.ones(45, bool), 0.7) == 32 / 45  # 31.499999999999996 -> 31.5 -> 32
    assert ndr_at(np.arange(50), np.ones(50, bool), 0.05) == 2 / 50  # 2.5 -> 2 (half to even)
    assert ndr_at(np.arange(50), np.ones(50, bool), 0.07) == 4 / 50  # 3.5 -> 4
    assert ndr_at(np.arange(10), np.ones(10, bool), 0.3) == 0.3  # 0.3*10 -> 3
    assert ndr_at(np.arange(10), np.ones(10, bool), 0.04) == 0.0  # j = 0 inspects nothing


@pytest.mark.parametrize("n,m", [(1, 1), (10, 1), (10, 3), (57, 11), (100, 100)])
def test_perfect_ranking(n, m):
    noisy = np.zeros(n, dtype=bool)
    noisy[n - m:] = True  # flagged ids are the last ones, the ranking puts them first
    ranking = np.concatenate([np.arange(n - m, n), np.arange(n - m)])
    assert auc_ndr(ranking, noisy) == 1.0
    for pct in range(1, 101):
        p = pct / 100
        if ref_cutoff(n, pct) >= m:
            assert ndr_at(ranking, noisy, p) == 1.0
        assert ndr_at(ranking, noisy, p) == pytest.approx(perfect_ndr_at(n, m, p), abs=1e-12)


@pytest.mark.parametrize("n,m", [(10, 3), (57, 11), (100, 1)])
def test_worst_ranking(n, m):
    noisy = np.zeros(n, dtype=bool)
    noisy[:m] = True
    ranking = np.arange(n)[::-1]  # all noisy last
    for pct in range(1, 101):
        j = ref_cutoff(n, pct)
        expected = max(0, j - (n - m)) / m
        assert ndr_at(ranking, noisy, pct / 100) == pytest.approx(expected, abs=1e-12)
    assert auc_ndr(ranking, noisy) == pytest.approx((m + 1) / (2 * n - m + 1), abs=1e-12)
    assert auc_ndr(ranking, noisy) == pytest.approx(ref_auc(ranking, noisy), abs=1e-12)


def test_random_rankings_monte_carlo():
    n, m, trials = 50, 10, 2000
    rng = np.random.default_rng(12345)
    noisy = np.zeros(n, dtype=bool)
    noisy[:m] = True
    ndr = {p: [] for p in (0.1, 0.2, 0.3)}
    aucs = []
    for _ in range(trials):
        ranking = rng.permutation(n)
        for p in ndr:
            ndr[p].append(ndr_at(ranking, noisy, p))
        aucs.append(auc_ndr(ranking, noisy))
    for p, vals in ndr.items():
        j = round(p * n)
        # c_j is (hypergeometric count)/M: exact variance, so 5 standard errors of the mean
        var = j * (m / n) * (1 - m / n) * (n - j) / (n - 1) / m**2
        se = math.sqrt(var / trials)
        assert p == random_ndr_at(n, m, p)
        assert abs(np.mean(vals) - p) < 5 * se, (p, np.mean(vals), se)
    se_auc = np.std(aucs, ddof=1) / math.sqrt(trials)
    assert abs(np.mean(aucs) - random_auc_ndr(n, m)) < 5 * se_auc
    assert random_auc_ndr(n, m) == pytest.approx((n + 1) / 2 / (n - (m - 1) / 2))


def test_random_auc_closed_form_exact_by_enumeration():
    """All 5! rankings of 5 examples with 2 noisy: the mean AUC equals the closed form."""
    import itertools
    noisy = np.array([True, True, False, False, False])
    vals = [auc_ndr(np.array(r), noisy) for r in itertools.permutations(range(5))]
    assert sum(vals) / len(vals) == pytest.approx(random_auc_ndr(5, 2), abs=1e-12)


def test_summarise_keys_and_values():
    noisy, ranking = make(40, 6, 9)
    s = summarise(ranking, noisy)
    assert list(s) == ["ndr@10", "ndr@20", "ndr@30", "auc_ndr"]
    ref = ref_curve(ranking, noisy)
    assert s["ndr@20"] == pytest.approx(ref[8 - 1])
    assert s["auc_ndr"] == pytest.approx(ref_auc(ranking, noisy))
    assert list(summarise(ranking, noisy, levels=(0.05, 0.5))) == ["ndr@5", "ndr@50", "auc_ndr"]


def test_perfect_and_random_lines():
    assert perfect_ndr_at(100, 30, 0.1) == pytest.approx(10 / 30)
    assert perfect_ndr_at(100, 30, 0.3) == 1.0
    assert random_ndr_at(100, 30, 0.2) == pytest.approx(0.2)
    assert random_ndr_at(50, 5, 0.05) == 2 / 50  # round-half-even of 2.5


def test_no_noisy_examples():
    with pytest.raises(UserError, match="no noisy examples"):
        ndr_at(np.arange(4), np.zeros(4, bool), 0.1)


@pytest.mark.parametrize("ranking,noisy,msg", [
    (np.array([0, 1, 1]), np.array([True, False, False]), "permutation"),
    (np.array([0, 1]), np.array([True, False, False]), "same length"),
    (np.array([0.0, 1.0]), np.array([True, False]), "integer"),
    (np.array([0, 1]), np.array([2, 0]), "boolean"),
])
def test_bad_ranking_or_noisy(ranking, noisy, msg):
    with pytest.raises(UserError, match=msg):
        auc_ndr(ranking, noisy)


@pytest.mark.parametrize("p", [0, 1.01, -0.5, float("nan")])
def test_bad_p(p):
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        ndr_at(np.arange(3), np.array([True, False, False]), p)


def test_bad_n_m():
    with pytest.raises(UserError):
        random_auc_ndr(5, 0)
    with pytest.raises(UserError):
        perfect_ndr_at(5, 6, 0.1)


def ref_cancellation(scores):
    ratios = []
    for row in scores:
        num = sum(abs(float(x)) for x in row)
        den = abs(sum(float(x) for x in row))
        ratios.append(math.inf if den == 0 else num / den)
    return sum(ratios) / len(ratios)


def test_cancellation_ratio():
    assert cancellation_ratio(np.array([[1.0, 2.0, 3.0], [-1.0, -0.5, -4.0]])) == 1.0
    assert cancellation_ratio(np.array([[1.0, -1.0, 2.0, -2.0]])) == math.inf
    assert cancellation_ratio(np.array([[3.0, -1.0], [1.0, 1.0]])) == pytest.approx((2.0 + 1.0) / 2)
    rng = np.random.default_rng(4)
    s = rng.normal(size=(7, 30))
    assert cancellation_ratio(s) == pytest.approx(ref_cancellation(s.tolist()), rel=1e-12)
    with pytest.raises(UserError):
        cancellation_ratio(np.array([1.0, 2.0]))
    with pytest.raises(UserError, match="NaN"):
        cancellation_ratio(np.array([[1.0, np.nan]]))
