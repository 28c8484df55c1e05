"""Hooks that turn one batch into per-example projected gradients, without forming gradients.

A forward hook projects each unit's input as it passes (R_in^T x_t) and puts a hook on the
unit's output tensor; in the backward pass that hook receives delta_t, projects it (R_out^T
delta_t) and contracts over tokens: phi = sum_t (R_out^T delta_t)(R_in^T x_t)^T. Padding
positions are masked out. Weights stay frozen (``requires_grad=False``): backward then skips
the weight-gradient matrix products it would otherwise compute, and the only gradients that
flow are the activations'. To make them flow at all, each indexed unit's output that nothing
below makes require grad is a leaf that requires grad (``_leaf_output``), so the backward
pass stops at the lowest indexed units: ``--layers late,head`` pays for a backward through
the late blocks and the head only, not through the early blocks and the embeddings.

The same hooks can instead accumulate the covariances sum x x^T and sum delta delta^T that
the eigenbasis projection is fitted on (``CovarianceCollector``).

Tied word embeddings (GPT-2's ``lm_head`` shares ``wte``; ``tie_word_embeddings``): the one
weight is used twice, so the embeddings unit's gradient is the sum of both uses. In the
embedding orientation (out side = hidden H, in side = vocabulary V) the head's use adds
``sum_t (R_out^T h_t)(R_in^T g_t)^T``, with h_t the head's input (hidden state) and g_t the
gradient of the logits (V): a forward hook on the tied head projects h_t, a hook on the logits
projects g_t. For the eigenbasis the head's use adds ``sum_t |g_t|^2 h_t h_t^T`` to the hidden
side's covariance (the t = s part of G G^T, as the input use's ``sum_t delta_t delta_t^T`` is,
a one-hot having norm 1); the vocabulary side of tied embeddings is never fitted (see
``projection``).

Requirements on the caller, so that an example's vector is its own and does not depend on the
batch or on chance: the model is in eval mode and the loss is *summed* over the batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .exact_sides import SharedInput, batch_token_rows, exact_squared_norms  # noqa: F401 (re-exported)
from .layers import Unit
from .projection import UnitProjector


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


class _Hooks:
    """Registers forward hooks on units and removes every trace of them on exit."""

    def __init__(self, model: nn.Module, units: list[Unit]):
        self.model = model
        self.units = units
        self.mask = None
        self.source = None  # the tensor the unit whose forward hook runs reads
        self._handles: list = []

    @property
    def mask(self) -> torch.Tensor | None:
        """The batch's (batch, tokens) attention mask; setting it starts a new batch."""
        return self._mask

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        self._mask, self._mask_as = mask, {}  # the mask as (batch, tokens, 1) of a dtype, made once a batch
        self.new_batch()

    def new_batch(self) -> None:
        """Forget what one batch's units shared (``ProjectedGradients``)."""

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the padding positions of a (batch, tokens, features) tensor."""
        if self._mask is None or x.dim() != 3 or x.shape[1] != self._mask.shape[1]:
            return x
        if x.dtype not in self._mask_as:
            self._mask_as[x.dtype] = self._mask[..., None].to(x.dtype)
        return x * self._mask_as[x.dtype]

    def on_unit(self, unit: Unit, inputs: torch.Tensor, output_hook: Callable) -> None:
        raise NotImplementedError

    def on_tied_head(self, unit: Unit, hidden: torch.Tensor, logits_hook: Callable) -> None:
        """The tied LM head's use of the embeddings unit's weight (module docstring)."""
        raise NotImplementedError

    def __enter__(self):
        for unit in self.units:
            module = _module(self.model, unit.name)
            self._handles.append(module.register_forward_hook(self._forward_hook(unit)))
            head = tied_head(self.model, module) if unit.kind == "embedding" else None
            if head is not None:
                self._handles.append(head.register_forward_hook(self._tied_hook(unit)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.mask = None

    def _forward_hook(self, unit: Unit):
        def hook(module, inputs, output):
            output = _leaf_output(module, inputs, output)  # the backward stops here if nothing below is indexed
            x = inputs[0].detach()
            if unit.kind != "embedding" and x.dim() == 2:
                x, squeeze = x[:, None, :], True  # a head that sees one vector per example
            else:
                squeeze = False
            self.source = inputs[0]  # what units that read the same tensor share (ProjectedGradients)
            self.on_unit(unit, x, lambda fn: output.register_hook(
                lambda g: fn(g[:, None, :] if squeeze else g)))
            return output

        return hook

    def _tied_hook(self, unit: Unit):
        def hook(module, inputs, output):
            if output.requires_grad:
                self.on_tied_head(unit, inputs[0].detach(), output.register_hook)

        return hook


def tied_head(model: nn.Module, embedding: nn.Module) -> nn.Module | None:
    """The output embeddings (LM head) when they share ``embedding``'s weight, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or head is embedding or getattr(head, "weight", None) is not embedding.weight:
        return None
    return head


def _leaf_output(module, inputs, output):
    """A unit's output that no gradient would reach (no weight requires grad, and no indexed
    unit lies below it) becomes a leaf that requires grad: the backward pass then reaches
    every indexed unit and stops at the lowest ones, never running through the blocks (and
    embeddings) below them. Where the output already requires grad it is left as it is."""
    if output.requires_grad:
        return output
    return output.detach().requires_grad_(True)


class ProjectedGradients(_Hooks):
    """Context manager: run ``forward`` + ``backward`` of a summed loss inside it, then read
    ``vectors()``: for each unit, a (batch, k_out * k_in) float32 tensor; and
    ``squared_norms()``: each example's exact ||G||^2 per unit (the full gradient's, which no
    sketch keeps: cosine and self-influence need it exactly, DESIGN.md "What a sketch must
    keep"), or None for a tied embeddings unit, whose second use (the LM head, over the whole
    vocabulary) would cost a vocabulary-wide Gram per token pair."""

    def __init__(self, model: nn.Module, projectors: list[UnitProjector], norms: bool = True):
        super().__init__(model, [p.unit for p in projectors])
        self.projectors = {p.unit.name: p for p in projectors}
        self.norms = norms  # a query needs no exact norms: only the build stores them
        self._phi: dict[str, torch.Tensor] = {}
        self._sq: dict[str, torch.Tensor | None] = {}
        self._shared: dict[tuple, tuple] = {}

    def new_batch(self) -> None:
        self._shared = {}

    def _exact_input(self, unit: Unit, x: torch.Tensor):
        """The side x_t of G as the unit sees it: token ids (embeddings), else the features
        with the bias's constant 1, padding zeroed, shared by the units that read the same
        tensor (``SharedInput``)."""
        if unit.kind == "embedding":
            return x
        key = (id(self.source), unit.has_bias)
        source, shared = self._shared.get(key, (None, None))
        if source is not self.source:  # the entry holds its tensor, so its id is not reused
            shared = SharedInput(self._masked(unit.with_bias(x.float())))
            self._shared[key] = (self.source, shared)
        return shared

    def _record_norms(self, unit: Unit, x, delta: torch.Tensor) -> None:
        if not self.norms:
            self._sq[unit.name] = None
        elif unit.name not in self._sq:  # a tied unit's second use has marked it None already
            shared = isinstance(x, SharedInput)
            self._sq[unit.name] = exact_squared_norms(x.x if shared else x, delta, x.gram if shared else None)

    def on_unit(self, unit, x, output_hook):
        projector = self.projectors[unit.name]
        exact_x = self._exact_input(unit, x) if self.norms else None
        if projector.tokens_exact:
            return self._token_rows(unit, projector, x, exact_x, output_hook)
        a = self._masked(projector.project_input(x if unit.kind == "embedding" else x.float()))

        def backward(delta):
            delta = self._masked(delta.float())
            self._record_norms(unit, exact_x, delta)
            b = projector.project_output(delta)
            phi = torch.einsum("bto,bti->boi", b, a).reshape(b.shape[0], -1)
            previous = self._phi.get(unit.name)
            self._phi[unit.name] = phi if previous is None else previous + phi

        output_hook(backward)

    def _token_rows(self, unit, projector, token_ids, exact_x, output_hook):
        """The embeddings' exact token side: per example, each distinct token's summed
        projected output gradient (``store.token_rows``), instead of a dense vector."""
        mask = self.mask if self.mask is not None else torch.ones_like(token_ids, dtype=torch.bool)

        def backward(delta):
            self._record_norms(unit, exact_x, self._masked(delta.float()))
            b = projector.project_output(delta.float()).detach()
            self._phi[unit.name] = batch_token_rows(token_ids, mask, b)

        output_hook(backward)

    def on_tied_head(self, unit, hidden, logits_hook):
        projector = self.projectors[unit.name]
        self._sq[unit.name] = None  # see the class docstring
        b = self._masked(projector.out.apply(hidden.float()))  # (batch, tokens, k_out)

        def backward(grad_logits):
            a = projector.inp.apply(self._masked(grad_logits.float()))  # (batch, tokens, k_in)
            phi = torch.einsum("bto,bti->boi", b, a).reshape(b.shape[0], -1)
            previous = self._phi.get(unit.name)
            self._phi[unit.name] = phi if previous is None else previous + phi

        logits_hook(backward)

    def vectors(self) -> dict[str, torch.Tensor]:
        self._shared = {}
        missing = [name for name in self.projectors if name not in self._phi]
        if missing:
            raise RuntimeError(f"no gradient reached units {missing}; was backward called?")
        phi, self._phi = self._phi, {}
        return phi

    def squared_norms(self) -> dict[str, torch.Tensor | None]:
        sq, self._sq = self._sq, {}
        return sq

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._phi, self._sq = {}, {}


class CovarianceCollector(_Hooks):
    """Accumulates sum x x^T (bias feature included) and sum delta delta^T per unit, for the
    sides that ``fitted(unit, side)`` says are fitted."""

    def __init__(self, model: nn.Module, units: list[Unit], fitted: Callable[[Unit, str], bool]):
        super().__init__(model, units)
        self.fitted = fitted
        self.covariances: dict[str, dict[str, torch.Tensor]] = {u.name: {} for u in units}

    def _add_counts(self, unit: Unit, token_ids: torch.Tensor) -> None:
        """The embeddings' input covariance is diagonal: how often each token occurs."""
        kept = token_ids[self.mask] if self.mask is not None else token_ids.reshape(-1)
        store = self.covariances[unit.name]
        store["in"] = store.get("in", 0) + torch.bincount(kept, minlength=unit.in_dim).double()

    def _add(self, unit: Unit, side: str, rows: torch.Tensor) -> None:
        rows = rows.reshape(-1, rows.shape[-1]).double()
        store = self.covariances[unit.name]
        store[side] = store.get(side, 0) + rows.T @ rows

    def on_unit(self, unit, x, output_hook):
        if unit.kind == "embedding" and self.fitted(unit, "in"):
            self._add_counts(unit, x)
        elif self.fitted(unit, "in"):
            self._add(unit, "in", self._masked(unit.with_bias(x.float())))
        if self.fitted(unit, "out"):
            output_hook(lambda delta: self._add(unit, "out", self._masked(delta.float())))
        else:
            output_hook(lambda delta: None)

    def on_tied_head(self, unit, hidden, logits_hook):
        hidden = self._masked(hidden.float())

        def backward(grad_logits):
            if self.fitted(unit, "out"):
                g = self._masked(grad_logits.float())
                self._add(unit, "out", hidden * g.square().sum(-1, keepdim=True).sqrt())

        logits_hook(backward)


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


def _targets(labels, batch) -> torch.Tensor | None:
    """Class ids of the batch; None (causal LM): the per-token labels inside the encodings."""
    return None if labels is None else torch.tensor([labels[i] for i in batch], dtype=torch.long)


@contextmanager
def gradient_pass(loaded, projectors: list[UnitProjector], layers: dict[str, list[Unit]], norms: bool = True,
                  summary: bool = True):
    """The per-batch pass (``batch -> layer_vectors``'s four results) with the model frozen and
    the hooks placed once for as long as the context is open: a build opens one for all its
    batches, since freezing every parameter and placing a hook per unit again for each batch
    (what ``layer_vectors`` does for a query's one batch) is work repeated for nothing.
    ``summary`` False: no output summary (None), which a build never reads (for a causal LM
    it is an argmax over the vocabulary at every token)."""
    with frozen(loaded.model), ProjectedGradients(loaded.model, projectors, norms) as capture:
        yield lambda encodings, labels, batch: _batch_vectors(loaded, capture, layers, encodings, labels, batch,
                                                              summary)


def layer_vectors(loaded, projectors: list[UnitProjector], layers: dict[str, list[Unit]],
                  encodings: list[dict], labels: list[int] | None, batch: list[int], norms: bool = True):
    """One batch's per-layer vectors (units concatenated in layer order; the embeddings'
    exact token rows as a ``TokenRows`` of the batch), losses, logits (for a causal LM, per
    example: completion tokens and teacher-forced argmax hits) and exact squared gradient
    norms per layer (float64; None for a layer with a tied embeddings unit, and for every
    layer with ``norms`` False: a query's vectors need none, and they cost a Gram per unit).

    Concatenating a layer's unit vectors makes the layer's inner product the sum of its
    units' inner products, which is that layer's influence. ``labels`` None: the encodings
    carry their own (causal LM); a label of -1 (``tasks.PREDICTED``) is the model's argmax in
    this same forward pass, so a query with no label costs one forward and one backward.
    """
    with gradient_pass(loaded, projectors, layers, norms) as run:
        return run(encodings, labels, batch)


def _batch_vectors(loaded, capture: ProjectedGradients, layers, encodings, labels, batch, summary=True):
    from .models import collate, example_losses, output_summary

    inputs = collate(loaded, [encodings[i] for i in batch])
    capture.mask = inputs["attention_mask"].bool()
    losses, logits = example_losses(loaded, inputs, _targets(labels, batch))
    losses.sum().backward()
    phi, sq = capture.vectors(), capture.squared_norms()
    vectors = {name: phi[units[0].name] if _is_tokens(phi[units[0].name]) else
               torch.cat([phi[u.name] for u in units], 1).numpy() for name, units in layers.items()}
    squares = {name: None if any(sq.get(u.name) is None for u in units) else
               sum(sq[u.name] for u in units).numpy() for name, units in layers.items()}
    return vectors, losses.detach().numpy(), output_summary(loaded, inputs, logits) if summary else None, squares


def _is_tokens(phi) -> bool:
    """A layer of exact token rows (build.token_layers: its one unit) rather than vectors."""
    return not isinstance(phi, torch.Tensor)


def fit_covariances(loaded, units: list[Unit], encodings: list[dict], labels: list[int],
                    batches: list[list[int]], fitted, on_batch=None) -> dict[str, dict[str, torch.Tensor]]:
    """The eigenbasis projection's fitting pass: covariances over the given batches."""
    from .models import collate, example_losses

    with frozen(loaded.model), CovarianceCollector(loaded.model, units, fitted) as collector:
        for batch in batches:
            inputs = collate(loaded, [encodings[i] for i in batch])
            targets = _targets(labels, batch)
            collector.mask = inputs["attention_mask"].bool()
            losses, _ = example_losses(loaded, inputs, targets)
            losses.sum().backward()
            if on_batch:
                on_batch(len(batch))
        return collector.covariances
