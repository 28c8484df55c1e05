"""The projection candidates both attribution benchmarks score (fidelity.py, planted_backdoor.py).

A candidate is a scheme per side of every unit and a size per side, k for both or k_in x k_out
(dims per unit k_in k_out; a MiniLM attention block of 4 units stores 4 k_in k_out), so size
and basis are reported separately:

* ``random``: seeded Gaussian (``random_side``), unbiased.
* ``pca``: the top-k eigenvectors of the side's covariance (``eigen_side``).
* ``hybrid:SHARE:C``: round(SHARE k) eigen columns plus a sketch of their complement with
  weight C (``hybrid_side``; C = 1 is unbiased).
* ``spectral:ALPHA``: a Gaussian sketch of the whole space with direction i weighted by
  lambda_i^(ALPHA/2) (normalised so the weights' mean square is 1): between random (ALPHA 0)
  and the eigenbasis (large ALPHA), every direction keeps a share but the common ones more.
* ``tokens-exact`` (the embeddings' token side only): each example keeps, per distinct token,
  the output-side projected sum R_out^T delta; influence is the sum over shared tokens. It is
  not a matrix (its width grows with the example), so ``TokensExact`` marks it and each
  benchmark scores it from the exact token-equality identity with projected deltas.

Sides without a covariance (too wide, tied vocabularies) fall back to random, as the library
does. Specs: ``"IN x OUT k=K"`` or ``"SCHEME k=K"`` for both sides, ``k=KINxKOUT`` for
different sizes per side (see ``parse``); a unit ``unit_k`` keeps whole at the larger size is
kept whole on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lite_influence.projection import (Side, UnitProjector, _seed_for, eigen_side, hybrid_side,
                                       random_side, unit_k)


@dataclass
class TokensExact:
    """Marker for the embeddings' exact token side with a projected output side ``out``."""

    unit: object
    out: Side


def spectral_side(covariance: torch.Tensor, k: int, alpha: float, seed: int, name: str, side: str) -> Side:
    """``U diag(w) G / sqrt(k)`` with ``w_i^2 = dim lambda_i^alpha / sum_j lambda_j^alpha``."""
    dim = covariance.shape[0]
    if covariance.dim() == 1:
        values, vectors = covariance.double().clamp_min(0), None
    else:
        values, vectors = torch.linalg.eigh(covariance.double())
        values = values.clamp_min(0)
    power = values ** alpha
    weights = (dim * power / power.sum().clamp_min(1e-300)).sqrt()
    generator = torch.Generator(device="cpu").manual_seed(_seed_for(seed, name, f"{side}/spectral"))
    g = torch.randn(dim, k, generator=generator, dtype=torch.float64) / k**0.5
    matrix = weights[:, None] * g if vectors is None else vectors @ (weights[:, None] * g)
    return Side(matrix.float().contiguous(), dim)


def make_side(unit, side: str, scheme: str, k: int, seed: int, covariances: dict) -> Side:
    """One side of a candidate (module docstring)."""
    dim = unit.in_dim if side == "in" else unit.out_dim
    cov = covariances.get(side)
    if k >= dim:
        return Side(None, dim)
    if scheme == "random" or cov is None:
        return random_side(dim, k, seed, unit.name, side)
    if scheme == "pca":
        return eigen_side(cov, k)
    name, *params = scheme.split(":")
    if name == "hybrid":
        share, scale = float(params[0]), float(params[1])
        return hybrid_side(unit, side, cov, k, seed, min(k - 1, round(share * k)), scale)
    if name == "spectral":
        return spectral_side(cov, k, float(params[0]), seed, unit.name, side)
    raise ValueError(f"unknown side scheme {scheme!r}")


def parse(spec: str) -> tuple[str, str, int, int]:
    """``"pca x random k=16"`` -> ("pca", "random", 16, 16); ``"random k=8"`` -> both sides;
    ``"random x pca k=32x8"`` -> ("random", "pca", 32, 8)."""
    body, k = spec.rsplit(" k=", 1)
    schemes, ks = body.split(" x "), k.split("x")
    return schemes[0], schemes[-1], int(ks[0]), int(ks[-1])


def library_default(units, seed: int, covariances: dict, exact_max: int) -> dict:
    """{unit name: projector} as ``build`` makes them with BuildConfig's defaults (the
    embeddings' exact token side as ``TokensExact``): the benchmarks score what users get."""
    from lite_influence.config import BuildConfig
    from lite_influence.projection import fitted_projector, keeps_tokens, token_projector

    d = BuildConfig().validate()
    out = {}
    for u in units:
        if keeps_tokens(u, d.token_dim):
            out[u.name] = TokensExact(u, token_projector(d.projection, u, d.token_dim, seed, covariances[u.name]).out)
        else:
            out[u.name] = fitted_projector(d.projection, u, unit_k(u, d.proj_dim, exact_max, d.proj_dim_in), seed,
                                           covariances[u.name], d.energy, d.proj_dim_max)
    return out


def candidate(spec: str, units, seed: int, covariances: dict, exact_max: int) -> dict:
    """{unit name: UnitProjector or TokensExact} for one spec; ``"default"``: the library's
    default. A ``tokens-exact`` spec covers the embeddings only (its out scheme and k_out apply
    to their hidden side)."""
    if spec == "default":
        return library_default(units, seed, covariances, exact_max)
    scheme_in, scheme_out, k_in, k_out = parse(spec)
    out = {}
    for u in units:
        cov = covariances.get(u.name, {})
        if scheme_in == "tokens-exact":
            if u.kind == "embedding":
                out[u.name] = TokensExact(u, make_side(u, "out", scheme_out, k_out, seed, cov))
            continue
        whole = unit_k(u, max(k_in, k_out), exact_max)
        ki, ko = (k_in, k_out) if whole == max(k_in, k_out) else (whole, whole)
        out[u.name] = UnitProjector(u, make_side(u, "in", scheme_in, ki, seed, cov),
                                    make_side(u, "out", scheme_out, ko, seed, cov))
    return out


# The candidates of issue 14 (items 1-2): each block scheme at several sizes, then the
# embeddings' exact token side with a pca or random hidden side.
BLOCK_SCHEMES = ("random", "pca", "hybrid:0.5:0.5", "hybrid:0.25:1", "hybrid:0.5:1", "hybrid:0.75:1",
                 "pca x random", "random x pca", "hybrid:0.5:1 x pca", "pca x hybrid:0.5:1",
                 "spectral:0.5", "spectral:0.25")
SIZES = (8, 16, 32)
TOKEN_SCHEMES = ("tokens-exact x pca k=8", "tokens-exact x pca k=16", "tokens-exact x random k=16")


def default_specs(sizes=SIZES, schemes=BLOCK_SCHEMES) -> list[str]:
    return [f"{s} k={k}" for k in sizes for s in schemes] + list(TOKEN_SCHEMES)
