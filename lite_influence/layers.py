"""Which weights we index: units, the layers they form, and the groups of layers.

A *unit* is one weight matrix whose gradient we project (a linear map, GPT-2's transposed
``Conv1D``, or the word embeddings). A *layer* is what one FAISS index holds: by default one
transformer block, plus ``embeddings`` and ``head``. A *group* is a named set of layers
(thirds of the blocks), used for reporting and aggregation. Discovery is structural, not a
table of architectures: blocks are the ``nn.ModuleList`` with one entry per hidden layer,
attention units are the linears under a module whose name says attention, the head is what
lies outside the base model. That covers BERT/RoBERTa, GPT-2 and Llama-style decoders alike.

Causal LMs: an untied LM head (Llama's default) is a unit of role ``head`` like a classifier;
a tied one (GPT-2, ``tie_word_embeddings``) shares the embeddings' weight and is not a unit of
its own: its use is added to the embeddings unit (see ``gradients``).

LoRA (a ``peft`` model, recognised structurally by modules named ``...lora_A.<adapter>`` /
``...lora_B.<adapter>``): the units are the adapter matrices only, A and B separately, under
their own parameter names (``...q_proj.lora_A.default``), each with the role and block of
the module it adapts (so the default ``attention`` selector leaves out adapters on MLP
linears; ``--layers all`` takes them); plus the trained copies of ``modules_to_save`` (a classifier:
``classifier.modules_to_save.default``, role ``head``). Frozen base weights, the embeddings
included, are not units: nothing about them was trained. LoRA on an embedding (peft's
``lora_embedding_A/B`` parameters) is not indexed. A is ``r x hidden``: its out side (r) and
B's in side (r) are no larger than ``proj_dim`` for the usual ranks and are then kept exactly,
while the hidden sides are projected (see ``projection``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from torch import nn

from .errors import UserError

GROUPS = ("embeddings", "early", "middle", "late", "head", "all")
KINDS = ("attention", "mlp", "all")
_ATTENTION = re.compile(r"(^|\.)(attention|attn|self_attn|self_attention)(\.|$)")
_LORA = re.compile(r"\.lora_[AB]\.[^.]+$")
_SAVED = re.compile(r"\.modules_to_save\.[^.]+(\.|$)")
# Above this many features a side is projected randomly even in PCA mode: its covariance
# (features x features) would not fit in memory (an LM head over a 50k vocabulary, say).
MAX_COVARIANCE_DIM = 8192


@dataclass(frozen=True)
class Unit:
    """One indexed weight, with the shapes the projection needs.

    ``out_dim`` x ``in_dim`` is the gradient in ``delta x^T`` orientation; ``in_dim`` counts
    the bias as one more input feature (a constant 1). For the embeddings, ``in_dim`` is the
    vocabulary (the input is a one-hot token) and ``out_dim`` the hidden size.
    """

    name: str
    kind: str  # "linear", "conv1d" or "embedding"
    role: str  # "embeddings", "attention", "mlp" or "head"
    block: int | None
    in_dim: int
    out_dim: int
    has_bias: bool
    params: tuple[str, ...]
    tied: bool = False  # embeddings whose weight an LM head shares (used twice: see gradients)

    @property
    def layer(self) -> str:
        return self.role if self.block is None else f"block{self.block}"

    def with_bias(self, x):
        """Input features (..., in) as the weight gradient sees them: with the bias's constant
        1 appended when the unit has a bias (its gradient is G's last column)."""
        if not self.has_bias:
            return x
        import torch

        return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], -1)


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    config = model.config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count and len(module) > 0
    ]
    if not candidates:
        raise UserError(
            f"could not find the transformer blocks of {type(model).__name__}; "
            "lite-influence supports BERT/RoBERTa-style encoders and GPT-2/Llama-style decoders."
        )
    return candidates[0]


def _linear_shape(module: nn.Module) -> tuple[str, int, int] | None:
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: y = x W + b with W of shape (in, out)
        return "conv1d", module.weight.shape[0], module.weight.shape[1]
    return None


def _unit(name: str, module: nn.Module, role: str, block: int | None) -> Unit | None:
    shape = _linear_shape(module)
    if shape is None:
        return None
    kind, n_in, n_out = shape
    has_bias = getattr(module, "bias", None) is not None
    params = (f"{name}.weight",) + ((f"{name}.bias",) if has_bias else ())
    return Unit(name, kind, role, block, n_in + has_bias, n_out, has_bias, params)


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def discover_units(model: nn.Module) -> list[Unit]:
    """Every unit of the model in forward order: embeddings, each block's linears, the head.
    For a LoRA model: the adapter matrices and trained head copies (module docstring)."""
    if any(_LORA.search(name) for name, _ in model.named_modules()):
        return _lora_units(model)
    embedding = model.get_input_embeddings()
    emb_name = _module_name(model, embedding)
    tied = any(m is not embedding and getattr(m, "weight", None) is embedding.weight for m in model.modules())
    units = [
        Unit(emb_name, "embedding", "embeddings", None, embedding.num_embeddings,
             embedding.embedding_dim, False, (f"{emb_name}.weight",), tied)
    ]
    blocks_name, blocks = _find_blocks(model)
    for index, block in enumerate(blocks):
        for sub, module in block.named_modules():
            role = "attention" if _ATTENTION.search(sub) else "mlp"
            unit = _unit(f"{blocks_name}.{index}.{sub}", module, role, index)
            if unit:
                units.append(unit)
    units.extend(_head_units(model, embedding))
    return units


def _lora_units(model: nn.Module) -> list[Unit]:
    blocks_name, blocks = _find_blocks(model)
    prefix = re.compile(re.escape(blocks_name) + r"\.(\d+)\.(.*)$")
    units = []
    for name, module in model.named_modules():
        saved = _SAVED.search(name)
        if not (_LORA.search(name) or saved):
            continue  # only lora_A/B and the linears of a trained copy (modules_to_save)
        adapted = name[: (_LORA.search(name) or saved).start()]
        inside = prefix.match(adapted)
        if inside:
            role = "attention" if _ATTENTION.search(inside.group(2)) else "mlp"
            unit = _unit(name, module, role, int(inside.group(1)))
        else:
            unit = _unit(name, module, "head", None)
        if unit:
            units.append(unit)
    if not units:
        raise UserError(f"the LoRA model {type(model).__name__} has no linear adapter matrices to index.")
    return units


def _head_units(model: nn.Module, embedding: nn.Module) -> list[Unit]:
    """Linears outside the base model: a classifier, or an LM head that is not tied."""
    base = getattr(model, model.base_model_prefix, None) if model.base_model_prefix else None
    if base is None or base is model:
        return []
    base_name = model.base_model_prefix
    heads = []
    for name, module in model.named_modules():
        if name == base_name or name.startswith(base_name + "."):
            continue
        if getattr(module, "weight", None) is embedding.weight:
            continue  # a tied LM head: its weight is the embeddings unit's
        unit = _unit(name, module, "head", None)
        if unit:
            heads.append(unit)
    return heads


def block_groups(n_blocks: int) -> dict[str, list[int]]:
    """Thirds of the blocks; for 6 blocks: early 0-1, middle 2-3, late 4-5."""
    parts = np.array_split(np.arange(n_blocks), 3)
    return {name: [int(b) for b in part] for name, part in zip(("early", "middle", "late"), parts)}


def count_blocks(units: list[Unit]) -> int:
    """The model's number of blocks, given *all* its units: counted from a selection, the
    thirds would be thirds of the selected blocks (``middle`` of 6 would become early/late)."""
    return 1 + max((u.block for u in units if u.block is not None), default=-1)


def group_layers(layer_blocks: dict[str, int | None], n_blocks: int) -> dict[str, list[str]]:
    """Map each group name to its layers, given each layer's block (None: embeddings or head)."""
    thirds = block_groups(n_blocks)
    groups = {"embeddings": [l for l, b in layer_blocks.items() if b is None and l == "embeddings"]}
    for name, blocks in thirds.items():
        groups[name] = [l for l, b in layer_blocks.items() if b is not None and b in blocks]
    groups["head"] = [l for l, b in layer_blocks.items() if b is None and l.startswith("head")]
    groups["all"] = list(layer_blocks)
    return {name: members for name, members in groups.items() if members}


def select_units(units: list[Unit], selector: str) -> list[Unit]:
    """Units picked by a comma-separated selector.

    Each term is ``attention`` (default: embeddings, attention linears, head), ``mlp``,
    ``all``, a group name (its attention units), a layer name (``block3``), or a regular
    expression matched against module names.
    """
    n_blocks = count_blocks(units)
    thirds = block_groups(n_blocks)
    chosen: set[str] = set()
    for term in [t.strip() for t in selector.split(",") if t.strip()]:
        picked = _select_term(units, term, thirds)
        if not picked:
            raise UserError(
                f"layer selector '{term}' matches no unit; use one of {', '.join(KINDS)}, "
                f"a group ({', '.join(GROUPS)}), a layer (embeddings, block0..block{n_blocks - 1}, "
                f"head) or a regex over module names such as '{units[-1].name}'."
            )
        chosen.update(u.name for u in picked)
    if not chosen:
        raise UserError("empty layer selector; pass e.g. --layers attention")
    return [u for u in units if u.name in chosen]


def _select_term(units: list[Unit], term: str, thirds: dict[str, list[int]]) -> list[Unit]:
    not_mlp = [u for u in units if u.role != "mlp"]
    if term == "all":
        return units
    if term == "attention":
        return not_mlp
    if term == "mlp":
        return [u for u in units if u.role == "mlp"]
    if term in ("embeddings", "head"):
        return [u for u in units if u.role == term]
    if term in thirds:
        return [u for u in units if u.role == "attention" and u.block in thirds[term]]
    if re.fullmatch(r"block\d+", term):
        return [u for u in not_mlp if u.layer == term]
    try:
        pattern = re.compile(term)
    except re.error:
        return []
    return [u for u in units if pattern.search(u.name)]


def layer_of(unit: Unit, granularity: str) -> str:
    """The layer (FAISS index) a unit's vector goes to."""
    if granularity == "unit" and unit.role != "embeddings":
        return unit.name if unit.role != "head" else f"head.{unit.name}"
    return unit.layer


def assign_layers(units: list[Unit], granularity: str) -> dict[str, list[Unit]]:
    """Layers in forward order, each with its units in forward order."""
    if granularity not in ("layer", "unit"):
        raise UserError(f"unknown granularity '{granularity}'; use 'layer' or 'unit'")
    layers: dict[str, list[Unit]] = {}
    for unit in units:
        layers.setdefault(layer_of(unit, granularity), []).append(unit)
    return layers
