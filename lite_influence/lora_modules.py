"""Which modules of a model LoRA adapts: the attention query and value projections, by name,
and the classification head that is trained whole (peft's ``target_modules`` and
``modules_to_save``). Apart from train.py so that training stays readable."""

from __future__ import annotations

import torch

from .errors import UserError

LORA_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",), ("q_lin", "v_lin"),
                ("query_key_value",))


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The attention query and value projections' module names, for peft's ``target_modules``."""
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
              if not list(m.children()) and getattr(m, "weight", None) is not None}
    for names in LORA_TARGETS:
        if all(n in leaves for n in names):
            return list(names)
    kind = getattr(model.config, "model_type", type(model).__name__)
    known = ", ".join("/".join(n) for n in LORA_TARGETS)
    raise UserError(f"LoRA cannot find the attention query and value projections of a '{kind}' model "
                    f"(known names: {known}); drop --lora-rank to fine-tune every weight.")


def head_modules(model: torch.nn.Module) -> list[str]:
    """The children outside the base model that hold weights: the classification head."""
    base = getattr(model, "base_model_prefix", "")
    heads = [name for name, child in model.named_children()
             if name != base and any(True for _ in child.parameters())]
    if not heads:
        raise UserError(f"cannot find the classification head of a '{type(model).__name__}'; "
                        "drop --lora-rank to fine-tune every weight.")
    return heads
