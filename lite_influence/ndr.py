"""Noise Detection Rate: how well a ranking (most detrimental first) finds known-mislabeled data.

It scores an influence ranking without retraining the model: the earlier the flagged examples
appear, the better. Also the cancellation-effect baseline of Yeh et al. Pure numpy; no files.
"""

from __future__ import annotations

import numpy as np

from lite_influence.errors import UserError

_TOL = 1e-9


def _half_snap(x: float) -> float:
    """p*N in floating point can land an ulp off a .5 (0.05*50), flipping round-half-even;
    snapping to the nearest half-integer keeps round(p*N) what a user means."""
    y = 2.0 * x
    r = round(y)
    return r / 2.0 if abs(y - r) <= _TOL * max(1.0, abs(y)) else x


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not 0 < p <= 1:
        raise UserError(f"p must be a fraction in (0, 1], got {p!r}.")
    return float(p)


def _cutoff(n: int, p) -> int:
    return int(round(_half_snap(_check_p(p) * n)))


def _check_nm(n, m) -> tuple[int, int]:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"n must be a positive integer, got {n!r}.")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= n:
        raise UserError(f"m (noisy examples) must be an integer in [1, n={n}], got {m!r}.")
    return int(n), int(m)


def _check(ranking, noisy) -> tuple[np.ndarray, np.ndarray, int]:
    """A ranking that is not a permutation, or a noise column that does not line up with it,
    would give a plausible-looking but meaningless rate, so refuse both."""
    nz = np.asarray(noisy)
    if nz.ndim != 1 or not (nz.dtype == bool or (np.issubdtype(nz.dtype, np.integer)
                                                  and np.isin(nz, (0, 1)).all())):
        raise UserError("noisy must be a 1-D boolean (or 0/1) array, one flag per training example.")
    nz = nz.astype(bool)
    r = np.asarray(ranking)
    if r.ndim != 1 or r.size != nz.size or (r.size and not np.issubdtype(r.dtype, np.integer)):
        raise UserError(f"ranking must be 1-D integer ids of the same length as noisy ({nz.size}).")
    if not np.array_equal(np.sort(r), np.arange(nz.size)):
        raise UserError(f"ranking must be a permutation of 0..{nz.size - 1} (every example once).")
    m = int(nz.sum())
    if m < 1:
        raise UserError("no noisy examples: NDR needs a noise column with at least one flagged example.")
    return r.astype(np.int64), nz, m


def detection_curve(ranking: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """Fraction of all noisy examples found after inspecting the first j = 1..N of the ranking."""
    r, nz, m = _check(ranking, noisy)
    return np.cumsum(nz[r]) / m


def ndr_at(ranking: np.ndarray, noisy: np.ndarray, p: float) -> float:
    """NDR@p = c at j = round(p*N), Python's round-half-even; j = 0 inspects nothing, so 0.0."""
    c = detection_curve(ranking, noisy)
    j = _cutoff(c.size, p)
    return 0.0 if j == 0 else float(c[j - 1])


def _auc_norm(n: int, m: int) -> float:
    """sum_j c_j of the perfect ranking (all M noisy first) is (M+1)/2 + (N-M) = N - (M-1)/2,
    so dividing by it makes a perfect ranking exactly 1.0. DESIGN's N - M/2 is its large-N form
    (they differ by 1/2), which would put a perfect ranking slightly above 1."""
    return n - (m - 1) / 2.0


def auc_ndr(ranking: np.ndarray, noisy: np.ndarray) -> float:
    """Area under the detection curve, sum_j c_j / (N - (M-1)/2): 1.0 exactly for a perfect
    ranking, (M+1)/(2N-M+1) for the worst (all noisy last)."""
    r, nz, m = _check(ranking, noisy)
    return float(np.cumsum(nz[r]).sum() / m / _auc_norm(r.size, m))


def random_auc_ndr(n: int, m: int) -> float:
    """A uniformly random ranking has E[c_j] = j/N, so E[sum_j c_j] = (N+1)/2 and the expected
    AUC-NDR is (N+1)/(2N-M+1), about 0.5/(1 - M/(2N)) for large N as DESIGN says."""
    n, m = _check_nm(n, m)
    return (n + 1) / 2.0 / _auc_norm(n, m)


def perfect_ndr_at(n: int, m: int, p: float) -> float:
    """The best NDR@p any ranking can reach, the "perfect" line of a report."""
    n, m = _check_nm(n, m)
    return min(1.0, _cutoff(n, p) / m)


def random_ndr_at(n: int, m: int, p: float) -> float:
    """Expected NDR@p of a uniformly random ranking, the "random" line of a report."""
    n, m = _check_nm(n, m)
    return _cutoff(n, p) / n


def level_key(level: float) -> str:
    """The table key of an NDR level given as a fraction: 0.1 -> "ndr@10", 0.125 -> "ndr@12.5".
    The one spelling every report, table and baseline uses."""
    pct = float(level) * 100
    return f"ndr@{round(pct)}" if abs(pct - round(pct)) <= 1e-6 else f"ndr@{pct:g}"


def summarise(ranking: np.ndarray, noisy: np.ndarray, levels=(0.1, 0.2, 0.3)) -> dict:
    """The numbers a report shows per layer, group and aggregation: NDR at each level (keys as
    integer percentages, "ndr@10") and AUC-NDR."""
    out = {level_key(p): ndr_at(ranking, noisy, p) for p in levels}
    out["auc_ndr"] = auc_ndr(ranking, noisy)
    return out


def cancellation_ratio(scores: np.ndarray) -> float:
    """Yeh et al.'s cancellation effect for one layer: per query sum_i |s_i| / |sum_i s_i|, then
    the mean over the Q queries. 1.0 means all influences share a sign; large means they cancel.
    A query whose influences sum to exactly zero (all zeros too) gets inf, and so does the mean."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise UserError(f"scores must be a non-empty (queries, training examples) matrix, got {s.shape}.")
    if not np.isfinite(s).all():
        raise UserError("scores contain NaN or inf: the cancellation ratio needs finite influences.")
    num = np.abs(s).sum(axis=1)
    den = np.abs(s.sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.inf)
    return float(ratio.mean())
