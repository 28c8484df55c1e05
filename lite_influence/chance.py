"""Is the model better than guessing the majority class on these queries?

Influence explains what a model learned; when it learned nothing (an untrained head, labels it
could not fit), every ranking is noise however confident its table looks. One binomial test
tells the user: under "the model is no better than always answering the majority class", the
number of correct queries is Binomial(n, majority share). Pure Python and numpy: the audit,
the query command and the server call it with labels they already have.

Decisions: one-sided test at ``alpha = 0.05``; the majority share is that of the queries' own
labels (what a constant answer would score on them); below the number of queries at which even
a perfect score could not be told from chance (``majority ** n >= alpha``) nothing is said,
because the test has no power there (one query never warns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05


@dataclass(frozen=True)
class ChanceCheck:
    n: int
    accuracy: float
    majority: float
    p_value: float  # P(at least this many correct | the model is a majority-class guesser)

    @property
    def at_chance(self) -> bool:
        return self.p_value > ALPHA

    def warning(self) -> str | None:
        if not self.at_chance:
            return None
        return (f"the model is at chance on these queries (accuracy {self.accuracy:.2f}, majority class "
                f"{self.majority:.2f}, {self.n} queries, binomial p = {self.p_value:.2f}): influence rankings are noise")


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space so n in the thousands is exact."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
            + j * math.log(p) + (n - j) * math.log1p(-p) for j in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def check_chance(labels, predicted) -> ChanceCheck | None:
    """None when the test cannot tell (too few queries, or no labels to compare with)."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    n = int(labels.size)
    if n == 0 or labels.shape != predicted.shape:
        return None
    _, counts = np.unique(labels, return_counts=True)
    majority = float(counts.max() / n)
    if majority ** n >= ALPHA:
        return None
    correct = int((labels == predicted).sum())
    return ChanceCheck(n=n, accuracy=correct / n, majority=majority, p_value=binomial_tail(correct, n, majority))
