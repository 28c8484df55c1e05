"""Kronecker projections: a unit's gradient G (out x in) becomes R_out^T G R_in (k_out x k_in).

Because G = sum_t delta_t x_t^T, the projection is sum_t (R_out^T delta_t)(R_in^T x_t)^T, so
it is computed from the two sides separately and the full gradient is never formed. Two ways to
choose R (DESIGN.md):

* ``random``: Gaussian entries with variance 1/k on each side, so E<phi(a), phi(b)> equals
  <G(a), G(b)>. Generated on the CPU from (seed, unit name, side): any machine regenerates the
  same matrices, so nothing but the seed needs storing.
* ``pca``: the top eigenvectors of the unit's input covariance sum x x^T and output-gradient
  covariance sum delta delta^T (the K-FAC eigenbasis), fitted on a sample of the training set.
  They keep the directions where gradients live, so far more of the inner product survives at
  the same size. Stored in the index with their eigenvalues.

A side whose dimension is not larger than k is kept exactly (identity): a 2-class head's
output side costs 2 dims and loses nothing. The embeddings' input side (one-hot tokens) has a
diagonal covariance (token counts), so its eigenbasis keeps the k most frequent tokens
exactly and drops the rest. DESIGN.md expected that to be poor and chose random there; we
measured the opposite on MiniLM/SST-2 (Spearman vs exact 0.82 against 0.04 at 64 dims):
between two different texts the exact embedding influence lives almost entirely in the rows
of shared frequent tokens ([CLS], [SEP], "the", ...), and random mixing of the rare tokens
adds cross-token noise that swamps it. In ``random`` mode it stays random. A dense side too
large for a covariance matrix (see ``MAX_COVARIANCE_DIM``) is random.

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

PROJECTIONS = ("random", "pca")


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

    @property
    def dim(self) -> int:
        return self.inp.k * self.out.k

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in features) -> (..., k_in); appends the bias's constant 1 implicitly."""
        if self.unit.kind == "embedding":
            return self._embedding_rows(x)
        if self.inp.matrix is None:
            return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], -1) if self.unit.has_bias else x
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
    """Top-k eigenvectors of a covariance, signs fixed so the result is reproducible. A 1-D
    covariance is a diagonal (token counts): its eigenvectors are the k heaviest coordinates."""
    dim = covariance.shape[0]
    if k >= dim:
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


def pca_fits(unit: Unit, side: str) -> bool:
    """Whether this side of this unit is fitted (else random): see the module docstring."""
    if unit.kind == "embedding" and side == "in":
        return not unit.tied  # a diagonal (token counts), however large the vocabulary
    return (unit.in_dim if side == "in" else unit.out_dim) <= MAX_COVARIANCE_DIM


def unit_k(unit: Unit, proj_dim: int, exact_max: int = 0) -> int:
    """Dims kept per side of a unit: ``proj_dim``, or all of them for a matrix with one side
    already no wider than ``proj_dim`` (kept exactly anyway) and at most ``exact_max`` numbers
    in all: a classifier head, a small LoRA matrix. Storing those whole costs little, and the
    projection of their other side was the only thing lost."""
    small = min(unit.in_dim, unit.out_dim) <= proj_dim and unit.in_dim * unit.out_dim <= exact_max
    return max(unit.in_dim, unit.out_dim) if small else proj_dim


def random_projector(unit: Unit, k: int, seed: int) -> UnitProjector:
    return UnitProjector(
        unit,
        random_side(unit.in_dim, k, seed, unit.name, "in"),
        random_side(unit.out_dim, k, seed, unit.name, "out"),
    )


def pca_projector(unit: Unit, k: int, seed: int, covariances: dict[str, torch.Tensor]) -> UnitProjector:
    """Eigenbasis on the sides that have a covariance, seeded random on the others."""
    sides = {}
    for side, dim in (("in", unit.in_dim), ("out", unit.out_dim)):
        if side in covariances:
            sides[side] = eigen_side(covariances[side], k)
        else:
            sides[side] = random_side(dim, k, seed, unit.name, side)
    return UnitProjector(unit, sides["in"], sides["out"])


def to_arrays(projectors: list[UnitProjector]) -> dict[str, np.ndarray]:
    """The fitted sides, as arrays the index stores (random sides are regenerated instead)."""
    arrays = {}
    for p in projectors:
        for side_name, side in (("in", p.inp), ("out", p.out)):
            if side.eigenvalues is not None:
                arrays[f"{p.unit.name}/{side_name}"] = side.matrix.numpy()
                arrays[f"{p.unit.name}/{side_name}_eigenvalues"] = side.eigenvalues.numpy()
    return arrays


def from_arrays(units: list[Unit], proj_dim: int, seed: int, arrays: dict[str, np.ndarray],
                fitted: bool, exact_max: int = 0) -> list[UnitProjector]:
    """Rebuild projectors from stored eigenbases, regenerating the random sides. ``fitted``:
    the index used the pca projection, so every side ``pca_fits`` must be stored; a missing
    one would silently become random and give wrong scores."""
    projectors = []
    for unit in units:
        sides, k = {}, unit_k(unit, proj_dim, exact_max)
        for side, dim in (("in", unit.in_dim), ("out", unit.out_dim)):
            key = f"{unit.name}/{side}"
            if fitted and pca_fits(unit, side) and k < dim and key not in arrays:
                raise UserError(f"the index's projection.npz lacks the eigenbasis {key}; rebuild the index.")
            if key in arrays:
                sides[side] = Side(torch.from_numpy(np.array(arrays[key])), dim,
                                   torch.from_numpy(np.array(arrays[f"{key}_eigenvalues"])))
            else:
                sides[side] = random_side(dim, k, seed, unit.name, side)
        projectors.append(UnitProjector(unit, sides["in"], sides["out"]))
    return projectors
