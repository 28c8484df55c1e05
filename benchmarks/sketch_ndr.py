"""How far each sketch's audit is from exact gradients, per layer, against its dims.

Reads a finished ``ndr_sst2.py`` run folder (``--work-dir --keep-work``: the fine-tuned model,
its training rows with the flipped labels, the queries and ``stage-exact.pkl``, the exact
per-layer score matrices of every query against every training example). For each spec it
builds an index of those rows with ``lite-influence build`` (cached in the run folder as
``sketch-NAME``), scores every query against every row from the stored vectors (dot, and
cosine from the sketch's own norms, as ``audit`` does), and prints per layer and group:
NDR@30 minus exact gradients' (mean / rank / vote over the queries), the stored dims, the
median share of each example's exact squared gradient norm the sketch keeps, and Spearman of
the sketch's scores against the exact ones over (query, example) pairs.

A spec is ``NAME:PROJECTION:K_OUT:K_IN:TOKEN_DIM[:ENERGY[:K_MAX]]`` (``-`` for K_IN: one size
for both sides; ENERGY 0 by default: a fixed width). The default specs are the library's
default before and after ``--energy`` and the widths around it:

    python benchmarks/sketch_ndr.py /tmp/ndr_work/full-s1 /tmp/ndr_work/full-s0
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ndr_sst2  # noqa: E402  (its exact_rows: NDR of full score matrices)

import lite_influence  # noqa: E402
from lite_influence.audit import noise_flags  # noqa: E402
from lite_influence.data import load_examples  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPECS = ("mixed64x4:mixed:4:64:64", "mixed32-e0.8:mixed:4:32:192:0.8", "mixed64-e0.8:mixed:4:64:192:0.8",
         "mixed64-e0.7:mixed:4:64:192:0.7", "mixed64-e0.9:mixed:4:64:192:0.9:128", "mixed64x16:mixed:16:64:64",
         "mixed64x64:mixed:64:64:64", "pca32:pca:32:-:64", "random32:random:32:-:64")
AGGS = ("mean", "rank", "vote")


def parse(spec: str) -> dict:
    """A spec as build options; a NAME ending in ``@S`` builds with projection seed S (another
    draw of the same sketch), else the run's own seed."""
    name, projection, k_out, k_in, token_dim, *rest = spec.split(":")
    out = dict(name=name, projection=projection, proj_dim=int(k_out), proj_dim_in=None if k_in == "-" else int(k_in),
               token_dim=int(token_dim), energy=float(rest[0]) if rest else 0.0,
               proj_dim_max=int(rest[1]) if len(rest) > 1 else 64)
    if "@" in name:
        out["seed"] = int(name.rsplit("@", 1)[1])
    return out


def build(run: Path, seed: int, spec: dict) -> tuple[Path, float, float]:
    """The spec's index over the run's training rows (cached), its build time and the load."""
    folder, load = run / f"sketch-{spec['name']}", os.getloadavg()[0]
    start = time.perf_counter()
    if not (folder / "manifest.json").exists():
        options = {k: v for k, v in spec.items() if k not in ("name", "seed")}
        lite_influence.build_index(run / "model", run / "model" / "train_used.tsv", folder, force=True, metric="dot",
                                   seed=spec.get("seed", seed), max_length=128, batch_size=16, **options)
    return folder, time.perf_counter() - start, load


def sketch_scores(index, queries) -> tuple[dict, dict, dict]:
    """Per layer: dot (Q x N), cosine from the sketch's own norms, and each row's stored norm."""
    labels = [index.manifest["label_names"][l] if isinstance(l, int) else l for l in queries.labels]
    grads = index.gradients(queries.texts, labels=labels)
    dot, cos, norms = {}, {}, {}
    for layer in index.layers:
        view = index.store.layer(layer)
        q = grads.vectors[layer]
        scores = np.asarray(view.scores(view.prepare(q, "dot"), "dot"), np.float64).T
        q_norm = np.asarray(q.norms(), np.float64) if hasattr(q, "norms") else \
            np.sqrt((np.asarray(q, np.float64) ** 2).sum(1))
        norms[layer] = np.asarray(view.norms(), np.float64)
        dot[layer] = scores
        cos[layer] = scores / np.outer(np.where(q_norm > 0, q_norm, 1), np.where(norms[layer] > 0, norms[layer], 1))
    return dot, cos, norms


def layer_facts(index, exact, dot, cos, norms) -> dict:
    rng = np.random.default_rng(0)
    facts = {}
    for layer in index.layers:
        eq, et = np.sqrt(exact["query_sq"][layer]), np.sqrt(exact["train_sq"][layer])
        ex_cos = exact["scores"][layer] / np.outer(eq, et)
        pairs = rng.choice(dot[layer].size, min(200_000, dot[layer].size), replace=False)
        facts[layer] = {
            "dim": int(index.store.layer(layer).dim),
            "kept": float(np.median(norms[layer] ** 2 / np.maximum(exact["train_sq"][layer], 1e-30))),
            "spearman_dot": float(spearmanr(dot[layer].ravel()[pairs], exact["scores"][layer].ravel()[pairs])[0]),
            "spearman_cos": float(spearmanr(cos[layer].ravel()[pairs], ex_cos.ravel()[pairs])[0])}
    return facts


def ndr_gaps(index, exact, dot, cos) -> dict:
    """{metric: {scope: {agg: sketch NDR@30 minus exact's}}}."""
    noisy = noise_flags(index.examples, None)
    scopes = {name: [name] for name in index.layers}
    scopes.update(dict(index.groups))
    subsets = {"all": np.ones(len(exact["correct"]), bool)}
    ex_cos = {l: exact["scores"][l] / np.outer(np.sqrt(exact["query_sq"][l]), np.sqrt(exact["train_sq"][l]))
              for l in index.layers}
    gaps = {}
    for metric, sketch, reference in (("dot", dot, exact["scores"]), ("cosine", cos, ex_cos)):
        mine, _ = ndr_sst2.exact_rows(sketch, scopes, subsets, noisy)
        theirs, _ = ndr_sst2.exact_rows({l: reference[l] for l in index.layers}, scopes, subsets, noisy)
        gaps[metric] = {s: {a: mine[s][a]["ndr@30"] - theirs[s][a]["ndr@30"] for a in AGGS} for s in scopes}
    return gaps


@functools.lru_cache(maxsize=1)
def run_inputs(run: Path) -> tuple[int, dict, object]:
    """A run's seed, exact score matrices and queries: read once for all its specs."""
    seed = int(run.name.split("-s")[1])
    with open(run / "stage-exact.pkl", "rb") as f:
        exact = pickle.load(f)
    return seed, exact, load_examples(run.parent / f"queries-s{seed}.tsv")


def run_one(run: Path, spec_text: str) -> dict:
    seed, exact, queries = run_inputs(run)
    spec = parse(spec_text)
    folder, seconds, load = build(run, seed, spec)
    index = lite_influence.InfluenceIndex.open(folder)
    dot, cos, norms = sketch_scores(index, queries)
    return {"spec": spec_text, "build_s": seconds, "load": load, "layers": layer_facts(index, exact, dot, cos, norms),
            "gaps": ndr_gaps(index, exact, dot, cos), "total_dim": sum(index.store.layer(l).dim for l in index.layers)}


def table(results: dict) -> str:
    lines = ["# Sketches against exact gradients on the NDR audit (SST-2, MiniLM, n = 2000, 20% flipped)", "",
             "Generated by `python benchmarks/sketch_ndr.py RUN...` from `ndr_sst2.py` run folders. Cells: NDR@30 of "
             "the sketch minus exact gradients' (mean / rank / vote over the 436 queries); `kept`: median share of an "
             "example's exact squared gradient norm the sketch keeps; Spearman over 200k (query, example) pairs; "
             "dims per example (embeddings: per distinct token). Spec: projection:k_out:k_in:token_dim[:energy[:k_max]].", ""]
    for run, by_spec in results.items():
        lines += [f"## {run}", ""]
        for name, r in by_spec.items():
            lines += [f"### {name} (`{r['spec']}`): {r['total_dim']:,} dims, build {r['build_s']:.0f} s at load {r['load']:.1f}", "",
                      "| scope | dims | kept | Spearman dot / cos | cosine gap mean/rank/vote | dot gap mean/rank/vote |",
                      "|---|---|---|---|---|---|"]
            for scope, gap in r["gaps"]["cosine"].items():
                f = r["layers"].get(scope)
                facts = (f"{f['dim']:,} | {f['kept']:.2f} | {f['spearman_dot']:.3f} / {f['spearman_cos']:.3f}"
                         if f else "| | ")
                cells = ["/".join(f"{g[a]:+.3f}" for a in AGGS) for g in (gap, r["gaps"]["dot"][scope])]
                lines.append(f"| {scope} | {facts} | {cells[0]} | {cells[1]} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="ndr_sst2.py run folders (e.g. /tmp/ndr_work/full-s1)")
    parser.add_argument("--specs", default=";".join(SPECS), help="';'-separated specs (module docstring)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    path = args.out / "sketch_ndr.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for run in args.runs:
        for spec in args.specs.split(";"):
            name = parse(spec)["name"]
            if name in results.get(run.name, {}):
                continue
            results.setdefault(run.name, {})[name] = run_one(run, spec)
            r = results[run.name][name]
            print(f"{run.name} {name}: {r['total_dim']:,} dims; cosine gaps " + ", ".join(
                f"{s} {min(r['gaps']['cosine'][s].values()):+.3f}" for s in r["gaps"]["cosine"]), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
            (args.out / "sketch_ndr.md").write_text(table(results))


if __name__ == "__main__":
    main()
