"""Hooks that turn one batch into per-example projected gradients, without forming gradients.

A forward hook projects each unit's input as it passes (R_in^T x_t) and puts a hook on the
unit's output tensor; in the backward pass that hook receives delta_t, projects it (R_out^T
delta_t) and contracts over tokens: phi = sum_t (R_out^T delta_t)(R_in^T x_t)^T. Padding
positions are masked out. Weights stay frozen (``requires_grad=False``): backward then skips
the weight-gradient matrix products it would otherwise compute, and the only gradients that
flow are the activations'. To make them flow at all, the word embeddings' output is made a
leaf that requires grad.

The same hooks can instead accumulate the covariances sum x x^T and sum delta delta^T that
the eigenbasis projection is fitted on (``CovarianceCollector``).

Requirements on the caller, so that an example's vector is its own and does not depend on the
batch or on chance: the model is in eval mode and the loss is *summed* over the batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .layers import Unit
from .projection import UnitProjector


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


class _Hooks:
    """Registers forward hooks on units and removes every trace of them on exit."""

    def __init__(self, model: nn.Module, units: list[Unit]):
        self.model = model
        self.units = units
        self.mask: torch.Tensor | None = None
        self._handles: list = []

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the padding positions of a (batch, tokens, features) tensor."""
        if self.mask is None or x.dim() != 3 or x.shape[1] != self.mask.shape[1]:
            return x
        return x * self.mask[..., None].to(x.dtype)

    def on_unit(self, unit: Unit, inputs: torch.Tensor, output_hook: Callable) -> None:
        raise NotImplementedError

    def __enter__(self):
        embedding = self.model.get_input_embeddings()
        for unit in self.units:
            module = _module(self.model, unit.name)
            self._handles.append(module.register_forward_hook(self._forward_hook(unit)))
        if not any(u.kind == "embedding" for u in self.units):
            self._handles.append(embedding.register_forward_hook(_leaf_output))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.mask = None

    def _forward_hook(self, unit: Unit):
        def hook(module, inputs, output):
            if unit.kind == "embedding":
                output = _leaf_output(module, inputs, output)
            x = inputs[0].detach()
            if unit.kind != "embedding" and x.dim() == 2:
                x, squeeze = x[:, None, :], True  # a head that sees one vector per example
            else:
                squeeze = False
            self.on_unit(unit, x, lambda fn: output.register_hook(
                lambda g: fn(g[:, None, :] if squeeze else g)))
            return output

        return hook


def _leaf_output(module, inputs, output):
    """Let gradients flow from the embeddings on although no weight requires grad."""
    if output.requires_grad:
        return output
    return output.detach().requires_grad_(True)


class ProjectedGradients(_Hooks):
    """Context manager: run ``forward`` + ``backward`` of a summed loss inside it, then read
    ``vectors()``: for each unit, a (batch, k_out * k_in) float32 tensor."""

    def __init__(self, model: nn.Module, projectors: list[UnitProjector]):
        super().__init__(model, [p.unit for p in projectors])
        self.projectors = {p.unit.name: p for p in projectors}
        self._phi: dict[str, torch.Tensor] = {}

    def on_unit(self, unit, x, output_hook):
        projector = self.projectors[unit.name]
        a = self._masked(projector.project_input(x if unit.kind == "embedding" else x.float()))

        def backward(delta):
            b = projector.project_output(self._masked(delta.float()))
            phi = torch.einsum("bto,bti->boi", b, a).reshape(b.shape[0], -1)
            previous = self._phi.get(unit.name)
            self._phi[unit.name] = phi if previous is None else previous + phi

        output_hook(backward)

    def vectors(self) -> dict[str, torch.Tensor]:
        missing = [name for name in self.projectors if name not in self._phi]
        if missing:
            raise RuntimeError(f"no gradient reached units {missing}; was backward called?")
        phi, self._phi = self._phi, {}
        return phi

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._phi = {}


class CovarianceCollector(_Hooks):
    """Accumulates sum x x^T (bias feature included) and sum delta delta^T per unit, for the
    sides that ``fitted(unit, side)`` says are fitted."""

    def __init__(self, model: nn.Module, units: list[Unit], fitted: Callable[[Unit, str], bool]):
        super().__init__(model, units)
        self.fitted = fitted
        self.covariances: dict[str, dict[str, torch.Tensor]] = {u.name: {} for u in units}

    def _add(self, unit: Unit, side: str, rows: torch.Tensor) -> None:
        rows = rows.reshape(-1, rows.shape[-1]).double()
        store = self.covariances[unit.name]
        store[side] = store.get(side, 0) + rows.T @ rows

    def on_unit(self, unit, x, output_hook):
        if self.fitted(unit, "in"):
            x = self._masked(x.float())
            if unit.has_bias:
                ones = self._masked(x.new_ones(x.shape[:-1] + (1,)))
                x = torch.cat([x, ones], -1)
            self._add(unit, "in", x)
        if self.fitted(unit, "out"):
            output_hook(lambda delta: self._add(unit, "out", self._masked(delta.float())))
        else:
            output_hook(lambda delta: None)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no weight gradients for the duration; restores both afterwards."""
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Example indices in batches of similar length (longest first), so padding costs little.
    Deterministic, which a resumed build relies on."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def layer_vectors(loaded, projectors: list[UnitProjector], layers: dict[str, list[Unit]],
                  encodings: list[dict], labels: list[int], batch: list[int]):
    """One batch's per-layer vectors (units concatenated in layer order), losses and logits.

    Concatenating a layer's unit vectors makes the layer's inner product the sum of its
    units' inner products, which is that layer's influence.
    """
    from .models import collate, example_losses

    inputs = collate(loaded, [encodings[i] for i in batch])
    targets = torch.tensor([labels[i] for i in batch], dtype=torch.long)
    with frozen(loaded.model), ProjectedGradients(loaded.model, projectors) as capture:
        capture.mask = inputs["attention_mask"].bool()
        losses, logits = example_losses(loaded, inputs, targets)
        losses.sum().backward()
        phi = capture.vectors()
    vectors = {name: torch.cat([phi[u.name] for u in units], 1).numpy() for name, units in layers.items()}
    return vectors, losses.detach().numpy(), logits.detach().float().numpy()


def fit_covariances(loaded, units: list[Unit], encodings: list[dict], labels: list[int],
                    batches: list[list[int]], fitted, on_batch=None) -> dict[str, dict[str, torch.Tensor]]:
    """The eigenbasis projection's fitting pass: covariances over the given batches."""
    from .models import collate, example_losses

    with frozen(loaded.model), CovarianceCollector(loaded.model, units, fitted) as collector:
        for batch in batches:
            inputs = collate(loaded, [encodings[i] for i in batch])
            targets = torch.tensor([labels[i] for i in batch], dtype=torch.long)
            collector.mask = inputs["attention_mask"].bool()
            losses, _ = example_losses(loaded, inputs, targets)
            losses.sum().backward()
            if on_batch:
                on_batch(len(batch))
        return collector.covariances
