"""How many dims each side of a unit's projection keeps: one size for both sides or one per
side, units small enough to store whole, mixed's output width from its gradients' energy, and
the build's note when a size exceeds the model's width."""

from __future__ import annotations

import torch

from .layers import Unit


def per_side(k) -> tuple[int, int]:
    """(k_in, k_out) of a size given as one number for both sides or as a pair."""
    return (k, k) if isinstance(k, int) else (int(k[0]), int(k[1]))


def stored_whole(unit: Unit, proj_dim: int, exact_max: int = 0, proj_dim_in: int | None = None) -> bool:
    """A matrix with one side already no wider than the projection (kept exactly anyway) and
    at most ``exact_max`` numbers in all: a classifier head, a small LoRA matrix. Storing those
    whole costs little, and the projection of their other side was the only thing lost."""
    widest = max(proj_dim, proj_dim_in or proj_dim)
    return min(unit.in_dim, unit.out_dim) <= widest and unit.in_dim * unit.out_dim <= exact_max


def unit_k(unit: Unit, proj_dim: int, exact_max: int = 0, proj_dim_in: int | None = None):
    """Dims kept per side of a unit: ``proj_dim`` on both, or (``proj_dim_in``, ``proj_dim``)
    when the input side has its own size, or all of them when ``stored_whole``. A side no
    wider than its k is the identity (``Side``), so it keeps min(k, width) dims."""
    if stored_whole(unit, proj_dim, exact_max, proj_dim_in):
        return max(unit.in_dim, unit.out_dim)
    return proj_dim if proj_dim_in in (None, proj_dim) else (proj_dim_in, proj_dim)


def unit_dim(unit: Unit, proj_dim: int, exact_max: int = 0, proj_dim_in: int | None = None) -> int:
    """Numbers one example's vector holds for this unit, as its projector will have them."""
    k_in, k_out = per_side(unit_k(unit, proj_dim, exact_max, proj_dim_in))
    return min(k_in, unit.in_dim) * min(k_out, unit.out_dim)


def clamp_note(units: list[Unit], layers: dict[str, list[Unit]], proj_dim: int, exact_max: int,
               hidden: int | None, proj_dim_in: int | None = None) -> str | None:
    """One line when a side's size is wider than sides of the model's width, which are then
    kept at their full width (the identity: exact, but fewer dims than asked for); None
    otherwise. Only sides at least ``hidden`` wide count: a head's class side (2 < 8) or a LoRA
    rank side narrower than proj_dim is the documented, expected case, not a request cut
    short; units stored whole by --exact-max are what that option asks for. Said at build
    time, before the fitting pass, with the dims the index will store."""
    if not hidden:
        return None
    k_in, k_out = proj_dim_in or proj_dim, proj_dim
    clamped = [u for u in units if not stored_whole(u, proj_dim, exact_max, proj_dim_in)
               and (hidden <= u.in_dim < k_in or hidden <= u.out_dim < k_out)]
    if not clamped:
        return None
    blocks = {name: us for name, us in layers.items() if name == f"block{us[0].block}"}
    scope, where = (blocks, "block") if blocks else (layers, "layer")
    sizes = sorted({(sum(unit_dim(u, proj_dim, exact_max, proj_dim_in) for u in us), len(us) * k_in * k_out)
                    for us in scope.values()})
    (low, asked), (high, _) = sizes[0], sizes[-1]
    stored = f"{low:,} dims per {where} instead of {asked:,}" if len(sizes) == 1 else f"{low:,}-{high:,} dims per {where}"
    flag = f"--proj-dim {proj_dim}" if k_in == k_out else f"--proj-dim-in {k_in} / --proj-dim {k_out}"
    return (f"{flag} exceeds the sides of {len(clamped)} unit{'s' * (len(clamped) > 1)} "
            f"(hidden {hidden}); they are stored at their full width, {stored}.")


def energy_k(covariance: torch.Tensor, share: float) -> int:
    """The fewest top eigen directions of a covariance that hold ``share`` of its trace."""
    values = torch.linalg.eigvalsh(covariance.double()).flip(0).clamp_min(0)
    total = float(values.sum())
    if total <= 0:
        return 1
    held = torch.cumsum(values, 0) / total
    return int(torch.searchsorted(held, torch.tensor([share - 1e-12], dtype=held.dtype))[0]) + 1


def mixed_k_out(covariance: torch.Tensor, k_out: int, energy: float, k_max: int) -> int:
    """The output width of a fitted mixed side: ``k_out``, widened to the energy rule's
    ``energy_k`` (capped at ``k_max``) when ``energy`` > 0. Why: how many directions a side's
    gradients need differs 10x between layers (MiniLM/SST-2: 4 hold 17-50% of block0's
    output-gradient energy, 60-94% of block5's), and a layer whose sketch keeps little of its
    gradient ranks differently from exact gradients (README, Projection): one share for every
    layer distorts every layer alike, which is what comparing layers needs."""
    if energy <= 0 or covariance.dim() != 2 or k_out >= covariance.shape[0]:
        return k_out
    return max(k_out, min(k_max, energy_k(covariance, energy)))
