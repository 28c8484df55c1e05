"""Combining many ranked lists of training examples into one ranking: mean, rank and vote.

Each (layer, query) pair gives one list of training-example ids, position 0 = most relevant
(for an audit: most detrimental; for a lookup: strongest proponent or strongest opponent).
The paper this tool follows found that rank and vote beat averaging raw scores, and vote is
exact from a nearest-neighbour search of depth ``vote_depth(n, p)``, so all three live here.

The ``-c`` (correct-only) variants are not a separate method: callers pass only the lists of
queries the model predicts correctly. Pure numpy; no torch, faiss or files.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lite_influence.errors import UserError

AGGREGATIONS = ("mean", "rank", "vote")

_TOL = 1e-9


def _snap(x: float) -> float:
    """p*n computed in floating point is off by an ulp (0.2*100 == 20.000000000000004 on some
    inputs); snapping to the nearest integer keeps the vote depth and weights what a user means."""
    r = round(x)
    return float(r) if abs(x - r) <= _TOL * max(1.0, abs(x)) else x


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"n must be a positive integer (the number of training examples), got {n!r}.")
    return int(n)


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not 0 < p <= 1:
        raise UserError(f"p must be a fraction in (0, 1], got {p!r}.")
    return float(p)


def vote_depth(n: int, p: float) -> int:
    """How many neighbours each list must retrieve for vote to be exact: ceil(p*n), robust to
    floating error so a caller never retrieves one neighbour more or less than intended."""
    return int(math.ceil(_snap(_check_p(p) * _check_n(n))))


def _check_lists(lists, n: int) -> list[np.ndarray]:
    """Ids out of range or repeated inside a list would silently corrupt ranks and votes."""
    if lists is None or len(lists) == 0:
        raise UserError("no ranked lists to aggregate: pass at least one (layer, query) list.")
    out = []
    for i, lst in enumerate(lists):
        a = np.asarray(lst)
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise UserError(f"list {i} must be a 1-D array of integer example ids.")
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= n):
            raise UserError(f"list {i} has ids outside [0, {n}): check n matches the index.")
        if np.unique(a).size != a.size:
            raise UserError(f"list {i} repeats an example id: each list must rank an id once.")
        out.append(a)
    return out


def mean_scores(scores: np.ndarray) -> np.ndarray:
    """Needs full scores for every candidate in every list (exact dot products), higher = more
    relevant; for an audit pass negated influences so the most detrimental score highest."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise UserError(f"scores must be a non-empty (lists, candidates) matrix, got shape {s.shape}.")
    if np.isnan(s).any():
        raise UserError("scores contain NaN: the mean aggregation needs every score.")
    return s.mean(axis=0)


def mean_ranks(lists: Sequence[np.ndarray], n: int, checked: bool = False) -> np.ndarray:
    """An id missing from a truncated top-k list takes rank k (DESIGN), i.e. ties for just past
    the end; lower = more relevant."""
    n = _check_n(n)
    total = np.zeros(n, dtype=np.float64)
    lists = [np.asarray(a, np.int64) for a in lists] if checked else _check_lists(lists, n)
    for a in lists:
        r = np.full(n, float(a.size))
        r[a] = np.arange(a.size, dtype=np.float64)
        total += r
    return total / len(lists)


def votes(lists: Sequence[np.ndarray], n: int, p: float = 0.2, partial: bool = False,
          checked: bool = False) -> np.ndarray:
    """Each list votes for its first ceil(p*n) ids with weight p*n - rank (always positive), so
    only that prefix matters and entries beyond it are ignored; higher = more relevant.
    ``partial``: lists may be shorter (an approximate search's candidates): what is missing
    gets no vote from that list."""
    n = _check_n(n)
    depth = vote_depth(n, p)
    pn = _snap(float(p) * n)
    lists = [np.asarray(a, np.int64) for a in lists] if checked else _check_lists(lists, n)
    total = np.zeros(n, dtype=np.float64)
    for i, a in enumerate(lists):
        if a.size < depth and not partial:
            raise UserError(f"list {i} has {a.size} ids but vote with p={p} needs at least "
                            f"ceil(p*n) = {depth}: retrieve at least {depth} neighbours.")
        used = min(depth, a.size)
        total[a[:used]] += pn - np.arange(used, dtype=np.float64)
    return total


def order(values: np.ndarray, higher_first: bool) -> np.ndarray:
    """Ties go to the smaller id so the same inputs always give the same ranking."""
    v = np.asarray(values, dtype=np.float64)
    key = -v if higher_first else v
    return np.argsort(key, kind="stable")  # stable over increasing ids: ties by id, one sort


def top_order(values: np.ndarray, depth: int, higher_first: bool = True) -> np.ndarray:
    """The first ``depth`` ids of ``order(values, higher_first)`` without sorting the rest: a
    partition finds the depth-th value, every id that reaches it (ties included) is sorted."""
    v = np.asarray(values, dtype=np.float64)
    if depth >= v.size:
        return order(v, higher_first)
    key = -v if higher_first else v
    kth = np.partition(key, depth - 1)[depth - 1]
    candidates = np.flatnonzero(key <= kth)  # increasing, so a stable sort breaks ties by id
    return candidates[np.argsort(key[candidates], kind="stable")][:depth]


def aggregate(method: str, *, lists=None, scores=None, n=None, p: float = 0.2, partial: bool = False,
              checked: bool = False, first: int | None = None):
    """One entry point so callers pick the method by name (e.g. from a CLI flag). Returns
    (ids, most relevant first; their aggregated values in that order). For "mean" the ids are
    candidate positions 0..M-1 of ``scores``; "rank" values are mean ranks, "vote" values votes.
    ``checked``: the lists come from the caller's own sort (unique, in range), so they are
    not checked again (at N = 1M the check cost more than the vote); ``first``: only that many
    ids are wanted (a partial sort: ``top_order``), not the order of all N."""
    if method not in AGGREGATIONS:
        raise UserError(f"unknown aggregation {method!r}: choose one of {', '.join(AGGREGATIONS)}.")
    if method == "mean":
        if scores is None:
            raise UserError("the mean aggregation needs full scores (exact dot products).")
        values, higher = mean_scores(scores), True
        if n is not None and _check_n(n) != values.size:
            raise UserError(f"n={n} does not match the {values.size} score columns.")
    else:
        if lists is None or n is None:
            raise UserError(f"the {method} aggregation needs the ranked lists and n.")
        if method == "rank":
            values, higher = mean_ranks(lists, n, checked), False
        else:
            values, higher = votes(lists, n, p, partial, checked), True
    ids = order(values, higher) if first is None else top_order(values, first, higher)
    return ids, values[ids]
