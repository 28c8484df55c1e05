import math

import numpy as np
import pytest
from scipy.stats import binom

from lite_influence.chance import binomial_tail, check_chance


@pytest.mark.parametrize("k,n,p", [(0, 5, 0.5), (3, 5, 0.5), (60, 100, 0.53), (540, 1000, 0.5), (10, 10, 0.9)])
def test_binomial_tail_matches_scipy(k, n, p):
    assert binomial_tail(k, n, p) == pytest.approx(binom.sf(k - 1, n, p), rel=1e-9, abs=1e-300)


def test_a_majority_guesser_is_at_chance():
    labels = np.array([0] * 53 + [1] * 47)
    check = check_chance(labels, np.zeros(100, int))  # always the majority class
    assert check.at_chance and check.accuracy == pytest.approx(0.53) and check.majority == pytest.approx(0.53)
    assert "at chance" in check.warning() and "0.53" in check.warning()


def test_a_model_that_learned_is_not():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    predicted = np.where(rng.random(200) < 0.85, labels, 1 - labels)
    check = check_chance(labels, predicted)
    assert not check.at_chance and check.warning() is None


def test_shuffled_predictions_are_at_chance():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    assert check_chance(labels, rng.permutation(labels)).at_chance


def test_too_few_queries_say_nothing():
    assert check_chance([1], [1]) is None
    assert check_chance([0, 1, 1], [0, 1, 1]) is None  # even 3/3 is p = (2/3)^3 = 0.30
    assert check_chance([], []) is None
    assert check_chance([0, 1] * 3, [0, 1] * 3) is not None  # 0.5^6 < 0.05: a perfect score can tell
