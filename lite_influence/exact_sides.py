"""What the gradient hooks keep of an example's gradient exactly, beside its projection: each
unit's squared norm ||G||^2 (cosine and self-influence need the full gradient's, which no sketch
keeps) and the word embeddings' token rows (each distinct token's summed projected output
gradient). ``gradients.ProjectedGradients`` calls these from its backward hooks; they take the
two sides the hooks hold (inputs x_t, output gradients delta_t) and never form G when that
costs more. Model side: torch and numpy, no faiss (``store.token_rows`` is plain numpy).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .store.token_rows import TokenRows


def exact_squared_norms(x: torch.Tensor, delta: torch.Tensor, gram: Callable | None = None) -> torch.Tensor:
    """||G||^2 = ||sum_t delta_t x_t^T||^2 per example (float64), from the two sides the hooks
    already hold: sum_{t,s} (delta_t . delta_s)(x_t . x_s) when tokens are few (no G formed),
    else through G, whichever costs less. ``x`` is (batch, tokens, in) features, or (batch,
    tokens) token ids for the word embeddings (then x_t . x_s is [id_t == id_s]); padding
    positions must be zero in ``delta``. ``gram``: x's Gram, when units that read the same
    input share it (``SharedInput``)."""
    delta = delta.double()
    tokens = delta.shape[1]
    if x.dim() == 2:  # one-hot token rows: only equal tokens meet
        same = (x[:, :, None] == x[:, None, :]).double()
        return (same * torch.einsum("bto,bso->bts", delta, delta)).sum((1, 2))
    x = x.double()
    if tokens * (x.shape[-1] + delta.shape[-1]) <= x.shape[-1] * delta.shape[-1]:
        x_gram = gram() if gram is not None else torch.einsum("bti,bsi->bts", x, x)
        return (x_gram * torch.einsum("bto,bso->bts", delta, delta)).sum((1, 2))
    return torch.einsum("bto,bti->boi", delta, x).square().sum((1, 2))


class SharedInput:
    """One input tensor's exact side (float64, bias feature, padding zeroed) and its Gram,
    made once for every unit that reads it: a block's query, key and value (Llama's gate and
    up too) see the same hidden states, so each would otherwise convert and multiply them
    again (the same operations on the same numbers: the norms do not change by a bit)."""

    def __init__(self, x: torch.Tensor):
        self.x = x.double()
        self._gram = None

    def gram(self) -> torch.Tensor:
        if self._gram is None:
            self._gram = torch.einsum("bti,bsi->bts", self.x, self.x)
        return self._gram


def batch_token_rows(token_ids: torch.Tensor, mask: torch.Tensor, b: torch.Tensor):
    """The batch's ``TokenRows`` in one pass over all its tokens, rather than one per example:
    the entries are sorted by (example, token) as ``TokenRows.from_lists`` sorts them, and each
    entry's values are summed in float64 in token order, as there, so the rows are the same to
    the bit."""
    kept = mask.numpy()
    ids = token_ids.numpy()[kept].astype(np.int64)
    width = int(ids.max(initial=0)) + 1
    example = np.broadcast_to(np.arange(kept.shape[0])[:, None], kept.shape)[kept]
    keys, inverse = np.unique(example * width + ids, return_inverse=True)
    summed = torch.zeros((len(keys), b.shape[-1]), dtype=torch.float64)  # rows added in order, as np.add.at
    summed.index_add_(0, torch.from_numpy(inverse.reshape(-1)), b[torch.from_numpy(kept)].double())
    owner = keys // width
    indptr = np.searchsorted(owner, np.arange(kept.shape[0] + 1)).astype(np.int64)
    return TokenRows(indptr, keys - owner * width, summed.float().numpy())
