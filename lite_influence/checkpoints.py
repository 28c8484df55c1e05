"""A model folder's training checkpoints, for TracIn-CP: kept by ``train --checkpoints K``, read
by ``build`` (which indexes each one: ``tracin.py``).

TracIn (Pruthi et al. 2020) sums, over the steps of training, the learning rate times the
inner product of the two examples' loss gradients at that step; TracIn-CP approximates the
sum with a few checkpoints, each standing for the steps of its span. So ``train`` cuts the
optimiser steps into K equal spans (``span_ends``: the span j ends at step round(j T / K)) and
keeps the weights at the end of each; the last is the model itself. Each checkpoint records
the mean learning rate in force over its span's steps (the rate ``optimizer.step`` used) and
the span's length; its TracIn-CP weight is their product (the sum of the rates), which with
equal spans is proportional to the mean rate (the rankings are those of the mean).

Layout of ``MODEL_DIR`` (written by ``train`` into its partial folder, so atomically)::

    MODEL_DIR/                       the model itself: the last checkpoint ("final")
      checkpoints.json               what is below, and each checkpoint's span and rate
      checkpoints/checkpoint-1/      a model folder (save_pretrained + tokenizer)
      checkpoints/checkpoint-2/ ...

Decisions where the design was silent:

- When an eval file keeps an earlier epoch (lowest eval loss), that epoch's model is the last
  checkpoint: the checkpoints after its step are dropped (they are later than the model a
  query explains), and the final span runs from the last kept checkpoint to that step.
- The snapshots are held in memory (trainable weights, on CPU) until the folder is saved:
  K - 1 copies of the model. LoRA is refused with --checkpoints > 1 for now (a checkpoint
  would be a merged model of its own; not built).
- A checkpoint that falls on the kept step is the model itself, stored once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .store.atomic import write_json

MANIFEST = "checkpoints.json"
FOLDER = "checkpoints"
FINAL = "final"
VERSION = 1


def check_count(value, lora: bool) -> None:
    """``--checkpoints`` of train: a whole number >= 1; above 1 not with LoRA."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"--checkpoints must be a whole number of at least 1, got {value!r}; "
                        "pass e.g. --checkpoints 3 to keep 3 checkpoints for TracIn-CP.")
    if value > 1 and lora:
        raise UserError("--checkpoints above 1 is not supported with --lora-rank yet; "
                        "drop one of them.")


def span_ends(total: int, k: int) -> list[int]:
    """The step (1-based) that ends each of ``k`` equal spans of ``total`` optimiser steps."""
    if k > total:
        raise UserError(f"--checkpoints {k} is more than the {total} optimiser step(s) of this run; "
                        f"pass at most {total}, or train for more steps.")
    return [round(j * total / k) for j in range(1, k + 1)]


class Recorder:
    """Watches the optimiser steps of a run: the rate of each step, and a snapshot of the
    weights at each span's end (``take``: the run's own snapshot function)."""

    def __init__(self, k: int, total: int, take):
        self.ends, self.take = span_ends(total, k), take
        self.rates: list[float] = []
        self.snapshots: dict[int, dict] = {}

    def step(self, rate: float) -> None:
        self.rates.append(float(rate))
        if len(self.rates) in self.ends[:-1]:
            self.snapshots[len(self.rates)] = self.take()

    def entries(self, kept_step: int) -> list[dict]:
        """The checkpoints up to the kept model, oldest first; the last is ``FINAL``."""
        ends = [end for end in self.ends if end < kept_step] + [kept_step]
        entries, start = [], 0
        for number, end in enumerate(ends, start=1):
            rates = self.rates[start:end]
            name = FINAL if end == kept_step else f"checkpoint-{number}"
            entries.append({"name": name, "path": "." if name == FINAL else f"{FOLDER}/{name}",
                            "first_step": start + 1, "step": end, "steps": len(rates),
                            "lr": sum(rates) / len(rates), "weight": sum(rates)})
            start = end
        return entries


def save(run, folder: Path, kept_step: int) -> list[dict] | None:
    """Each earlier checkpoint as a model folder under ``folder/checkpoints`` and the manifest;
    the run's weights are restored afterwards. None (nothing written) for one checkpoint."""
    recorder = getattr(run, "recorder", None)
    if recorder is None or len(recorder.ends) == 1:
        return None
    entries = recorder.entries(kept_step)
    current = run._snapshot()
    try:
        for entry in entries[:-1]:
            run._restore(recorder.snapshots[entry["step"]])
            target = folder / entry["path"]
            run.net.save_pretrained(target)
            run.loaded.tokenizer.save_pretrained(target)
    finally:
        run._restore(current)
    write_json(folder / MANIFEST, {"version": VERSION, "total_steps": len(recorder.rates),
                                   "kept_step": kept_step, "checkpoints": entries})
    return entries


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a model folder: its name, folder and TracIn-CP weight."""

    name: str
    path: Path
    relative: str  # its folder relative to the model folder ("." for the model itself)
    weight: float
    lr: float
    step: int


def read(model_dir: str | Path) -> list[Checkpoint] | None:
    """The checkpoints of a model folder, oldest first (the model itself last); None when it
    has none. A damaged manifest or a missing checkpoint folder is one line."""
    root = Path(model_dir)
    file = root / MANIFEST
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        result = [Checkpoint(e["name"], root / e["path"], e["path"], float(e["weight"]), float(e["lr"]), int(e["step"]))
                  for e in data["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{file} is damaged ({type(exc).__name__}: {exc}); train the model again, "
                        "or build with --checkpoints last.") from None
    for checkpoint in result:
        if not (checkpoint.path / "config.json").is_file():
            raise UserError(f"checkpoint '{checkpoint.name}' of '{root}' is missing ({checkpoint.path}); "
                            "train the model again, or build with --checkpoints last (or the ones that are there).")
    return result


def check_choice(spec: str) -> str:
    """``build --checkpoints``: all, last, or checkpoint numbers (1-based), comma-separated."""
    if not isinstance(spec, str) or not re.fullmatch(r"\s*(all|last|\d+(\s*,\s*\d+)*)\s*", spec) \
            or any(int(x) < 1 for x in re.findall(r"\d+", spec)):
        raise UserError(f"--checkpoints must be all, last or checkpoint numbers from 1 (e.g. 1,3), got {spec!r}.")
    return spec


def chosen(model_dir: str | Path, spec: str) -> list[Checkpoint]:
    """The checkpoints a build indexes (oldest first, the model itself last), or [] for a
    plain build: a folder without checkpoints, ``last``, or a choice of the model alone."""
    spec = check_choice(spec).strip()
    found = read(model_dir) if spec != "last" else None
    if not found or len(found) == 1:
        return []
    if spec == "all":
        return found
    numbers = sorted({int(x) for x in spec.split(",")})
    if numbers[-1] > len(found):
        raise UserError(f"--checkpoints {spec}: '{model_dir}' has {len(found)} checkpoints (1..{len(found)}, "
                        f"{len(found)} is the model itself).")
    picked = [found[i - 1] for i in numbers if i < len(found)] + [found[-1]]  # the model itself always
    return picked if len(picked) > 1 else []
