"""``--score curvature`` against the plain gradient score on the NDR audit (issue 15, item 1).

    python benchmarks/curvature_ndr.py --model MODEL --train MODEL/train_used.tsv \\
        --queries QUERIES.tsv --work /tmp/curv_bench --out-dir benchmarks/results

MODEL: a classifier fine-tuned on noisy labels (``lite-influence train --noise 0.2``; e.g. the
``full-s0/model`` that ``benchmarks/ndr_sst2.py --n 2000 --keep-work`` keeps, whose
``train_used.tsv`` flags the flipped rows), QUERIES: the clean influence set
(``queries-s0.tsv`` beside it). One pca index is built with the library's defaults
(``--metric dot``; reused when ``--work`` holds it), then the same audit (groups, rank and
vote, all queries and the ``-c`` subset) runs for score gradient / curvature x metric
dot / cosine (curvature at each ``--dampings`` value). Printed and written (``curvature_ndr.json``, ``.md``): NDR@30 and AUC-NDR per
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--train", type=Path, help="the training rows, with a noisy column")
    parser.add_argument("--queries", type=Path, help="the clean, labelled influence set")
    parser.add_argument("--work", type=Path, help="folder for the index (reused when present)")
    parser.add_argument("--scale", type=int, default=None,
                        help="instead: time the curvature moments and a scan on a synthetic N x 256 layer")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="curvature_ndr")
    parser.add_argument("--aggs", default="rank,vote")
    parser.add_argument("--dampings", default="0.1", help="curvature's --damping values to compare, comma-separated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="index only the first N training rows (smoke)")
    return parser.parse_args(argv)


def timed(fn):
    load = os.getloadavg()[0]
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 4), round(load, 2)


def main(argv=None) -> dict:
    import torch

    torch.set_num_threads(1)
    from lite_influence import InfluenceIndex, build_index
    from lite_influence.curvature import CACHE_FOLDER, layer_view

    args = parse_args(argv)
    if args.scale:
        return scale(args.scale)
    if None in (args.model, args.train, args.queries, args.work):
        raise SystemExit("pass --model, --train, --queries and --work (or --scale N)")
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
    combos = [(metric, "gradient", 0.1) for metric in ("dot", "cosine")] + [
        (metric, "curvature", float(d)) for metric in ("dot", "cosine") for d in args.dampings.split(",")]
    for metric, score, damping in sorted(combos):
        name = f"{metric} {score}" + (f" {damping:g}" if score == "curvature" else "")
        result, seconds, load = timed(lambda: index.audit(args.queries, layers="groups", aggs=args.aggs, metric=metric,
                                                          score=score, damping=damping, correct_only=True,
                                                          batch_size=args.batch_size))
        steps[f"audit {name} s"], steps[f"audit {name} load"] = seconds, load
        rows[name] = {f"{row['scope']} {row['agg']}": {"ndr@30": row["ndr@30"], "auc_ndr": row["auc_ndr"]}
                                    for row in result.table}
        baselines = result.baselines
        print(f"{name}: audited in {seconds:.0f} s (load {load})", flush=True)
    results = {"index": str(folder), "n": len(index), "manifest_build": index.manifest["build"],
               "queries": str(args.queries), "rows": rows, "baselines": baselines, "steps": steps}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (args.out_dir / f"{args.name}.md").write_text(text)
    print(text)
    return results


def scale(n: int, dim: int = 256, rounds: int = 2) -> dict:
    """First use (moments computed and cached) and a fresh store (cache read), against the
    plain cosine scan of the same layer, in one run: four units of 8 x 8, Gaussian rows."""
    import tempfile

    import numpy as np

    from lite_influence.curvature import layer_view
    from lite_influence.lookup import layer_scores
    from lite_influence.store import FORMAT_VERSION, IndexStore, IndexWriter

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        writer = IndexWriter(Path(tmp) / "idx", force=True)
        writer.vector_file("layer", n, dim)[:] = rng.normal(size=(n, dim)).astype(np.float32)
        writer.write_examples([{"id": i, "text": "", "label": 0} for i in range(n)])
        manifest = {"format_version": FORMAT_VERSION, "n": n, "metric": "dot", "index_factory": "Flat",
                    "label_names": ["a"], "model": {"path": "/m", "fingerprint": "x", "task": "classification"},
                    "data": {"path": "/d"}, "build": {"projection": "pca", "proj_dim": 8, "seed": 0}, "groups": {},
                    "layers": [{"name": "layer", "dim": dim,
                                "units": [{"name": f"u{j}", "k_in": 8, "k_out": 8} for j in range(dim // 64)]}]}
        store = IndexStore(writer.commit(manifest), manifest)
        query, out = rng.normal(size=(1, dim)).astype(np.float32), {}
        for number in range(rounds):
            load = round(os.getloadavg()[0], 2)
            _, plain, _ = timed(lambda: layer_scores(store, {"layer": query}, ["layer"], "cosine"))
            _, moments, _ = timed(lambda: layer_view(store, "layer", "curvature").norms())
            _, curved, _ = timed(lambda: layer_scores(store, {"layer": query}, ["layer"], "cosine", "curvature"))
            out[f"round {number}"] = {"load": load, "plain_scan_s": plain, "moments_s": moments, "curvature_scan_s": curved,
                                      "curvature_over_plain_scan": round(curved / plain, 2)}
            print(f"N = {n:,} x {dim}, round {number} ({'computed' if number == 0 else 'cache read'}): "
                  f"{out[f'round {number}']}", flush=True)
            store = IndexStore.open(store.path)  # the next round reads the cache
    return out


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
