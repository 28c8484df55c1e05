"""Kronecker projections: a unit's gradient G (out x in) becomes R_out^T G R_in (k_out x k_in).

Because G = sum_t delta_t x_t^T, the projection is sum_t (R_out^T delta_t)(R_in^T x_t)^T, so
it is computed from the two sides separately and the full gradient is never formed. Ways to
choose R (DESIGN.md):

* ``random``: Gaussian entries with variance 1/k on each side, so E<phi(a), phi(b)> equals
  <G(a), G(b)>. Generated on the CPU from (seed, unit name, side): any machine regenerates the
  same matrices, so nothing but the seed needs storing.
* ``pca``: the top eigenvectors of the unit's input covariance sum x x^T and output-gradient
  covariance sum delta delta^T (the K-FAC eigenbasis), fitted on a sample of the training set.
  They keep the directions where gradients live, so far more of the inner product survives at
  the same size. Stored in the index with their eigenvalues.
* ``mixed``: a seeded random input side and the eigenbasis output side, each of its own size
  (``--proj-dim-in``, ``--proj-dim``): a rare input feature (a trigger token's activations)
  keeps its unbiased share, and a few-class loss's gradients live in few output directions.
* ``hybrid``: the eigenbasis's top directions plus a random sketch of what they
  leave out, so a rare cause (a backdoor token, a feature few examples share) keeps a share of
  the inner product instead of none (DESIGN.md, "What a sketch must keep"). A dense side is
  ``[U_top, c (I - U U^T) G / sqrt(k2)]`` with G seeded Gaussian (dim x k2): with c = 1, R R^T
  has the expectation ``U U^T + (I - U U^T) = I``, so the kept part is exact and the complement
  unbiased. How many columns go to the eigenbasis and the weight c are set per side
  (``HYBRID_KEPT``, ``HYBRID_SCALE``), from benchmarks/fidelity.py and
  benchmarks/planted_backdoor.py (results/projection_candidates.md): the input side is half
  eigenbasis, half an unbiased (c = 1) sketch of the complement, because a rare cause (the
  trigger token's activations) lives off the input's usual directions; the output-gradient
  side is the eigenbasis alone, because gradients of a few-class loss live in few directions
  and random columns there cost fidelity for every pair (measured: random output sides lose
  up to 0.25 Spearman on the blocks). A projected embeddings' token side keeps the most
  frequent tokens exactly and count-sketches the others (column h(v), sign s(v), seeded).

By default the word embeddings' token side is not projected at all (``token_projector``,
``--token-dim``): each example keeps its own tokens' rows exactly (store/token_rows.py; README,
Projection, for the figures). What follows about that side is for ``--token-dim 0`` and tied
embeddings.

A side no wider than k is kept exactly (the identity; a fitted side: its whole eigenbasis): a
2-class head's output side costs 2 dims and loses nothing. The embeddings' input side (one-hot
tokens) has a diagonal covariance (token counts), so its eigenbasis keeps the k most frequent
tokens exactly and drops the rest. DESIGN.md expected that to be poor and chose random there;
we measured the opposite on MiniLM/SST-2 (Spearman vs exact 0.82 against 0.04 at 64 dims):
between two different texts the exact embedding influence lives almost entirely in the rows of
shared frequent tokens ([CLS], [SEP], "the", ...), and random mixing of the rare tokens adds
cross-token noise that swamps it. In ``random`` mode it stays random. A dense side too large
for a covariance matrix (see ``MAX_COVARIANCE_DIM``) is random.

Tied embeddings (a causal LM whose LM head shares them, ``Unit.tied``) are the exception: their
vocabulary side also carries the head's logit gradients, dense over the whole vocabulary and
largest at the *predicted* tokens, which the k most frequent input tokens do not cover. That
side is random in ``pca`` mode too (benchmarks/planted_facts.py, tiny GPT-2, k=8: recall@1 of
a fact's own statements from the embeddings layer 0.60 with token counts, 1.00 random, 1.00
exact); the hidden side is fitted as usual.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
from .layers import MAX_COVARIANCE_DIM, Unit
from .sizes import clamp_note, energy_k, mixed_k_out, per_side, stored_whole, unit_dim, unit_k  # noqa: F401 (re-exported)

PROJECTIONS = ("random", "pca", "hybrid", "mixed")
FITTED = ("pca", "hybrid", "mixed")  # projections fitted in a pass over the data and stored in the index

# Share of a side's k columns that hybrid gives to the eigenbasis; the rest sketch the
# complement. Chosen from benchmarks/fidelity.py and benchmarks/planted_backdoor.py (README).
# Keyed by side: "in" (a dense unit's input activations), "out" (its output gradients),
# "tokens" (the embeddings' vocabulary side). A share of 1 keeps that side a pure eigenbasis.
HYBRID_KEPT = {"in": 0.5, "out": 1.0, "tokens": 0.5}
# Weight c of the complement sketch's columns: E[R R^T] = U U^T + c^2 (I - U U^T). c = 1 is
# unbiased; c < 1 trades the sketch's variance for a bias towards the eigenbasis (better
# average fidelity, fewer planted causes found: c = 0.5 on both sides was the default until
# the measurements in results/projection_candidates.md).
HYBRID_SCALE = {"in": 1.0, "out": 1.0, "tokens": 0.5}


@dataclass
class Side:
    """One side of a unit's projection: a (dim x k) matrix, or None for the identity."""

    matrix: torch.Tensor | None
    dim: int
    eigenvalues: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.dim if self.matrix is None else self.matrix.shape[1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Project the last axis of x (dim features) to k features."""
        return x if self.matrix is None else x @ self.matrix


@dataclass
class UnitProjector:
    """The two sides of one unit; ``phi = sum_t out(delta_t) in(x_t)^T``, flattened."""

    unit: Unit
    inp: Side
    out: Side
    tokens_exact: bool = False  # the embeddings' token side kept exactly, as sparse rows

    @property
    def dim(self) -> int:
        """Numbers per example; for exact token rows, per (example, distinct token) entry."""
        return self.out.k if self.tokens_exact else self.inp.k * self.out.k

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in features) -> (..., k_in); appends the bias's constant 1 implicitly."""
        if self.unit.kind == "embedding":
            return self._embedding_rows(x)
        if self.inp.matrix is None:
            return self.unit.with_bias(x)
        if self.unit.has_bias:
            return x @ self.inp.matrix[:-1] + self.inp.matrix[-1]
        return x @ self.inp.matrix

    def _embedding_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.inp.matrix is None:
            return torch.nn.functional.one_hot(token_ids, self.inp.dim).float()
        return self.inp.matrix[token_ids]

    def project_output(self, delta: torch.Tensor) -> torch.Tensor:
        return self.out.apply(delta)


def _seed_for(seed: int, unit_name: str, side: str) -> int:
    digest = hashlib.sha256(f"{seed}:{unit_name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_side(dim: int, k: int, seed: int, unit_name: str, side: str) -> Side:
    """Seeded Gaussian (dim x k) with variance 1/k, or the identity when k >= dim."""
    if k >= dim:
        return Side(None, dim)
    generator = torch.Generator(device="cpu").manual_seed(_seed_for(seed, unit_name, side))
    matrix = torch.randn(dim, k, generator=generator, dtype=torch.float32) / k**0.5
    return Side(matrix, dim)


def eigen_side(covariance: torch.Tensor, k: int) -> Side:
    """Top-k eigenvectors of a covariance, signs fixed so the result is reproducible; k >= dim
    keeps them all (exact, and K-FAC's diagonal basis: curvature.py). A 1-D covariance is a
    diagonal (token counts): its eigenvectors are the k heaviest coordinates, all: the identity."""
    dim, k = covariance.shape[0], min(k, covariance.shape[0])
    if k == dim and covariance.dim() == 1:
        return Side(None, dim)
    if covariance.dim() == 1:
        counts = covariance.double().numpy()
        order = torch.from_numpy(np.lexsort((np.arange(dim), -counts))[:k].copy())
        matrix = torch.zeros(dim, k)
        matrix[order, torch.arange(k)] = 1.0
        return Side(matrix, dim, covariance[order].float())
    values, vectors = torch.linalg.eigh(covariance.double())
    order = torch.argsort(values, descending=True)[:k]
    values, vectors = values[order], vectors[:, order]
    largest = vectors.abs().argmax(0)
    signs = torch.sign(vectors[largest, torch.arange(k)])
    signs[signs == 0] = 1
    return Side((vectors * signs).float().contiguous(), dim, values.clamp_min(0).float())


def _rare_tokens_sketch(counts: torch.Tensor, k: int, kept: int, seed: int, name: str,
                        scale: float = 1.0) -> Side:
    """Top ``kept`` tokens one-hot in the first columns; every other token v adds s(v) in
    column ``kept + h(v)`` (a count sketch: its rows have norm 1 and distinct rows are
    uncorrelated in expectation, so inner products stay unbiased)."""
    dim = counts.shape[0]
    top = eigen_side(counts, kept) if kept else Side(torch.zeros(dim, 0), dim, torch.zeros(0))
    generator = torch.Generator(device="cpu").manual_seed(_seed_for(seed, name, "in/sketch"))
    buckets = torch.randint(0, k - kept, (dim,), generator=generator)
    signs = torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1
    sketch = torch.zeros(dim, k - kept)
    sketch[torch.arange(dim), buckets] = signs * scale
    sketch[top.matrix.sum(1) > 0] = 0  # the kept tokens are exact, not sketched as well
    return Side(torch.cat([top.matrix, sketch], 1).contiguous(), dim, top.eigenvalues)


def _complement_sketch(covariance: torch.Tensor, k: int, kept: int, seed: int, name: str,
                       side: str, scale: float = 1.0) -> Side:
    """``[U_top, c (I - U U^T) G / sqrt(k - kept)]`` (module docstring)."""
    dim = covariance.shape[0]
    top = eigen_side(covariance, kept) if kept else Side(torch.zeros(dim, 0), dim, torch.zeros(0))
    generator = torch.Generator(device="cpu").manual_seed(_seed_for(seed, name, f"{side}/sketch"))
    g = torch.randn(dim, k - kept, generator=generator, dtype=torch.float64)
    u = top.matrix.double()
    complement = (g - u @ (u.T @ g)) * (scale / (k - kept) ** 0.5)
    return Side(torch.cat([u, complement], 1).float().contiguous(), dim, top.eigenvalues)


def _kind(unit: Unit, side: str) -> str:
    return "tokens" if unit.kind == "embedding" and side == "in" else side


def hybrid_kept(unit: Unit, side: str, k: int) -> int:
    """Eigen columns of a hybrid side with k columns (the rest sketch the complement); all k
    for a share of 1 (that side is then plain pca)."""
    share = HYBRID_KEPT[_kind(unit, side)]
    return k if share >= 1 or k <= 1 else min(k - 1, max(0, round(share * k)))


def hybrid_side(unit: Unit, side: str, covariance: torch.Tensor, k: int, seed: int,
                kept: int | None = None, scale: float | None = None) -> Side:
    """A fitted side with ``kept`` eigen columns (default ``hybrid_kept``) and a random
    sketch of the complement, weighted ``scale`` (default ``HYBRID_SCALE``), in the other
    ``k - kept``; the whole eigenbasis (exact) when k >= dim."""
    kept = hybrid_kept(unit, side, k) if kept is None else kept
    scale = HYBRID_SCALE[_kind(unit, side)] if scale is None else scale
    if k >= covariance.shape[0] or kept >= k:
        return eigen_side(covariance, k)
    if covariance.dim() == 1:
        return _rare_tokens_sketch(covariance, k, kept, seed, unit.name, scale)
    return _complement_sketch(covariance, k, kept, seed, unit.name, side, scale)


def pca_fits(unit: Unit, side: str) -> bool:
    """Whether this side of this unit is fitted (else random): see the module docstring."""
    if unit.kind == "embedding" and side == "in":
        return not unit.tied  # a diagonal (token counts), however large the vocabulary
    return (unit.in_dim if side == "in" else unit.out_dim) <= MAX_COVARIANCE_DIM


def keeps_tokens(unit: Unit, token_dim: int) -> bool:
    """Whether a unit's token side is kept exactly (``token_rows``): the word embeddings
    with ``token_dim`` > 0, unless an LM head shares them (its use is dense over the whole
    vocabulary, so that side stays projected)."""
    return unit.kind == "embedding" and not unit.tied and token_dim > 0


def token_projector(kind: str, unit: Unit, token_dim: int, seed: int,
                    covariances: dict[str, torch.Tensor] | None = None,
                    stored: Side | None = None) -> UnitProjector:
    """The embeddings with an exact token side and ``token_dim`` hidden dims per token: the
    hidden side fitted like any output side (``kind``), random when not fitted, or the
    ``stored`` side of an index."""
    k, cov = min(token_dim, unit.out_dim), (covariances or {}).get("out")
    if stored is not None:
        out = stored
    elif kind == "random" or cov is None:
        out = random_side(unit.out_dim, k, seed, unit.name, "out")
    else:
        out = hybrid_side(unit, "out", cov, k, seed) if kind == "hybrid" else eigen_side(cov, k)
    return UnitProjector(unit, Side(None, unit.in_dim), out, tokens_exact=True)


def random_projector(unit: Unit, k, seed: int) -> UnitProjector:
    """``k``: dims per side, or (k_in, k_out)."""
    k_in, k_out = per_side(k)
    return UnitProjector(
        unit,
        random_side(unit.in_dim, k_in, seed, unit.name, "in"),
        random_side(unit.out_dim, k_out, seed, unit.name, "out"),
    )


def pca_projector(unit: Unit, k, seed: int, covariances: dict[str, torch.Tensor]) -> UnitProjector:
    """Eigenbasis on the sides that have a covariance, seeded random on the others."""
    sizes, sides = dict(zip(("in", "out"), per_side(k))), {}
    for side, dim in (("in", unit.in_dim), ("out", unit.out_dim)):
        if side in covariances:
            sides[side] = eigen_side(covariances[side], sizes[side])
        else:
            sides[side] = random_side(dim, sizes[side], seed, unit.name, side)
    return UnitProjector(unit, sides["in"], sides["out"])


def mixed_projector(unit: Unit, k, seed: int, covariances: dict[str, torch.Tensor],
                    energy: float = 0.0, k_max: int = 0) -> UnitProjector:
    """Seeded random input side, eigenbasis output side (module docstring), its width set by
    ``mixed_k_out``."""
    k_in, k_out = per_side(k)
    if "out" in covariances:
        out = eigen_side(covariances["out"], mixed_k_out(covariances["out"], k_out, energy, k_max))
    else:
        out = random_side(unit.out_dim, k_out, seed, unit.name, "out")
    return UnitProjector(unit, random_side(unit.in_dim, k_in, seed, unit.name, "in"), out)


def hybrid_projector(unit: Unit, k, seed: int, covariances: dict[str, torch.Tensor],
                     kept: dict[str, int] | None = None, scale: float | None = None) -> UnitProjector:
    """Eigenbasis plus complement sketch on the fitted sides, seeded random on the others.
    ``kept``: eigen columns per side ("in", "out"), overriding ``hybrid_kept``; ``scale``:
    the complement's weight on every side, overriding ``HYBRID_SCALE`` (benchmarks, tests)."""
    sizes, sides = dict(zip(("in", "out"), per_side(k))), {}
    for side, dim in (("in", unit.in_dim), ("out", unit.out_dim)):
        if side in covariances:
            sides[side] = hybrid_side(unit, side, covariances[side], sizes[side], seed, (kept or {}).get(side), scale)
        else:
            sides[side] = random_side(dim, sizes[side], seed, unit.name, side)
    return UnitProjector(unit, sides["in"], sides["out"])


def fitted_projector(kind: str, unit: Unit, k, seed: int, covariances: dict[str, torch.Tensor],
                     energy: float = 0.0, k_max: int = 0) -> UnitProjector:
    """The projector of a fitted projection (``FITTED``) from the unit's covariances;
    ``energy`` and ``k_max`` size mixed's output side (``mixed_k_out``)."""
    if kind == "mixed":
        return mixed_projector(unit, k, seed, covariances, energy, k_max)
    make = hybrid_projector if kind == "hybrid" else pca_projector
    return make(unit, k, seed, covariances)


def fitted_side(kind: str, unit: Unit, side: str) -> bool:
    """Whether projection ``kind`` stores a fitted matrix for this side of this unit (else it
    is regenerated from the seed)."""
    if kind not in FITTED or not pca_fits(unit, side):
        return False
    return side == "out" if kind == "mixed" else True


def to_arrays(projectors: list[UnitProjector]) -> dict[str, np.ndarray]:
    """The fitted sides, as arrays the index stores (random sides are regenerated instead).
    A hybrid side stores its whole matrix and the eigenvalues of its eigen columns only."""
    arrays = {}
    for p in projectors:
        for side_name, side in (("in", p.inp), ("out", p.out)):
            if side.eigenvalues is not None:
                arrays[f"{p.unit.name}/{side_name}"] = side.matrix.numpy()
                arrays[f"{p.unit.name}/{side_name}_eigenvalues"] = side.eigenvalues.numpy()
    return arrays


def from_arrays(units: list[Unit], proj_dim: int, seed: int, arrays: dict[str, np.ndarray],
                projection: str, exact_max: int = 0, token_dim: int = 0,
                proj_dim_in: int | None = None) -> list[UnitProjector]:
    """Rebuild projectors from stored eigenbases, regenerating the random sides. Every side
    that ``projection`` fits (``fitted_side``) must be stored; a missing one would silently
    become random and give wrong scores."""
    projectors = []
    for unit in units:
        tokens = keeps_tokens(unit, token_dim)
        sizes = dict(zip(("in", "out"), per_side(min(token_dim, unit.out_dim) if tokens else
                                                 unit_k(unit, proj_dim, exact_max, proj_dim_in))))
        sides = {}
        for side, dim in (("in", unit.in_dim), ("out", unit.out_dim)):
            key, k = f"{unit.name}/{side}", sizes[side]
            if tokens and side == "in":
                continue
            if fitted_side(projection, unit, side) and k < dim and key not in arrays:
                raise UserError(f"the index's projection.npz lacks the eigenbasis {key}; rebuild the index.")
            if key in arrays:
                sides[side] = Side(torch.from_numpy(np.array(arrays[key])), dim,
                                   torch.from_numpy(np.array(arrays[f"{key}_eigenvalues"])))
            else:
                sides[side] = random_side(dim, k, seed, unit.name, side)
        projectors.append(token_projector("stored", unit, token_dim, seed, stored=sides["out"]) if tokens
                          else UnitProjector(unit, sides["in"], sides["out"]))
    return projectors
