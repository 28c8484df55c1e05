"""``--score curvature`` against the plain gradient score on the NDR audit (issue 15, item 1).

    python benchmarks/curvature_ndr.py --model MODEL --train MODEL/train_used.tsv \\
        --queries QUERIES.tsv --work /tmp/curv_bench --out-dir benchmarks/results

MODEL: a classifier fine-tuned on noisy labels (``lite-influence train --noise 0.2``; e.g. the
``full-s0/model`` that ``benchmarks/ndr_sst2.py --n 2000 --keep-work`` keeps, whose
``train_used.tsv`` flags the flipped rows), QUERIES: the clean influence set
(``queries-s0.tsv`` beside it). One pca index is built with the library's defaults
(``--metric dot``; reused when ``--work`` holds it), then the same audit (groups, rank and
vote, all queries and the ``-c`` subset) runs four times: score gradient / curvature x metric
dot / cosine. Printed and written (``curvature_ndr.json``, ``.md``): NDR@30 and AUC-NDR per
group and aggregation, the training-loss baseline, each audit's wall time and the first
computation of the curvature moments (the cache), with the load average of each step (the
machine is shared: timings are indicative, the NDR figures are not affected).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COMBOS = [("gradient", "dot"), ("curvature", "dot"), ("gradient", "cosine"), ("curvature", "cosine")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True, help="the training rows, with a noisy column")
    parser.add_argument("--queries", type=Path, required=True, help="the clean, labelled influence set")
    parser.add_argument("--work", type=Path, required=True, help="folder for the index (reused when present)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="curvature_ndr")
    parser.add_argument("--aggs", default="rank,vote")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="index only the first N training rows (smoke)")
    return parser.parse_args(argv)


def timed(fn):
    load = os.getloadavg()[0]
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 2), round(load, 2)


def main(argv=None) -> dict:
    import torch

    torch.set_num_threads(1)
    from lite_influence import InfluenceIndex, build_index
    from lite_influence.curvature import CACHE_FOLDER, layer_view

    args = parse_args(argv)
    folder = args.work / "index-dot-pca"
    steps = {}
    if (folder / "manifest.json").exists():
        index = InfluenceIndex.open(folder)
    else:
        index, steps["build_s"], steps["build_load"] = timed(lambda: build_index(
            args.model, args.train, folder, force=True, metric="dot", limit=args.limit, batch_size=args.batch_size))
    shutil.rmtree(folder / CACHE_FOLDER, ignore_errors=True)
    _, steps["curvature_moments_s"], steps["curvature_moments_load"] = timed(
        lambda: [layer_view(index.store, layer, "curvature") for layer in index.layers])
    rows, baselines = {}, None
    for score, metric in COMBOS:
        result, seconds, load = timed(lambda: index.audit(args.queries, layers="groups", aggs=args.aggs, metric=metric,
                                                          score=score, correct_only=True, batch_size=args.batch_size))
        steps[f"audit_{score}_{metric}_s"], steps[f"audit_{score}_{metric}_load"] = seconds, load
        rows[f"{score} {metric}"] = {f"{row['scope']} {row['agg']}": {"ndr@30": row["ndr@30"], "auc_ndr": row["auc_ndr"]}
                                    for row in result.table}
        baselines = result.baselines
        print(f"{score} {metric}: audited in {seconds:.0f} s (load {load})", flush=True)
    results = {"index": str(folder), "n": len(index), "manifest_build": index.manifest["build"],
               "queries": str(args.queries), "rows": rows, "baselines": baselines, "steps": steps}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (args.out_dir / f"{args.name}.md").write_text(text)
    print(text)
    return results


def markdown(results: dict) -> str:
    combos = list(results["rows"])
    keys = list(next(iter(results["rows"].values())))
    lines = [f"# --score curvature vs gradient: NDR@30 / AUC-NDR, N = {results['n']}", "",
             "| group agg | " + " | ".join(combos) + " |", "|---|" + "---|" * len(combos)]
    for key in keys:
        cells = [f"{results['rows'][c][key]['ndr@30']:.3f} / {results['rows'][c][key]['auc_ndr']:.3f}" for c in combos]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for name, values in (results["baselines"] or {}).items():
        lines.append(f"| baseline: {name} | " + " | ".join([f"{values['ndr@30']:.3f} / {values['auc_ndr']:.3f}"] * len(combos)) + " |")
    lines += ["", "Steps (seconds, load average at their start): " + json.dumps(results["steps"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
