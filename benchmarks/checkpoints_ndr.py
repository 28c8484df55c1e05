"""Several checkpoints (TracIn-CP) against the last one alone on the SST-2 noisy-label audit
(issue 15, item 2): what the K-fold cost buys.

    python benchmarks/checkpoints_ndr.py --n 2000 --work /tmp/ckpt_bench [--checkpoints 3 --epochs 2]

Protocol (the data of ``ndr_sst2.py``, whose helpers prepare it): a stratified, seeded subset
of ``train.tsv`` (``--n``), 20% of its labels flipped by ``train --noise 0.2``; the influence
set is the seeded half of GLUE dev that ``ndr_sst2.py`` uses as queries. MiniLM is fully
fine-tuned for ``--epochs`` epochs with ``--checkpoints K`` and no eval file (so the last
epoch is the model, and the K checkpoints end K equal spans of its steps). Then, in one run:

1. ``build`` with ``--checkpoints last`` (the model alone: a plain index) and with
   ``--checkpoints all`` (each checkpoint's own fitted projection, ``tracin.py``), default
   projection, ``--metric dot``; each timed, with the load average at its start;
2. ``audit`` of the influence set on groups (embeddings, early, middle, late, head, all) x
   rank, vote, mean, for dot and cosine: the last checkpoint alone, each earlier checkpoint
   alone (its sub-index) and the learning-rate-weighted sum; each timed;
3. one query's wall time (``-k 10``, defaults): the first (loading the model, or every
   checkpoint's model) and the median of 5 warm ones;
4. NDR@30 / AUC-NDR of every row, the training-loss baseline, and the time ratios (build,
   query, audit) of the sum against the last checkpoint alone.

Stages are cached in ``--work`` (model, indexes, and each build's timing beside them: a rerun
reports the timing of the run that built the index), so a rerun after a kill continues. Writes
``checkpoints_ndr.json`` and ``.md`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from curvature_ndr import timed  # noqa: E402  (value, seconds, load average at the start)
from ndr_sst2 import DATA, minilm_path, sst2_files, tiny_files, tiny_model  # noqa: E402  (the same data)

RESULTS = HERE / "results"
GROUPS = ("embeddings", "early", "middle", "late", "head", "all")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--aggs", default="rank,vote,mean")
    parser.add_argument("--metrics", default="dot,cosine")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-only", action="store_true", help="stop after training (to start it early)")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, 64 synthetic rows (smoke test)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="checkpoints_ndr")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def trained(args, files: dict) -> Path:
    from lite_influence.train import train_model

    model = args.work / "model"
    if (model / "checkpoints.json").is_file():
        return model
    log(f"training on {args.n} rows, {args.epochs} epochs, --checkpoints {args.checkpoints}")
    base = tiny_model(args.work / "tiny-base") if args.tiny else minilm_path()
    train_model(base, files["train"], model, force=True, noise=0.2, seed=args.seed, epochs=args.epochs,
                checkpoints=args.checkpoints, batch_size=args.batch_size)
    return model


def built(args, model: Path, which: str, steps: dict):
    from lite_influence import InfluenceIndex, build_index

    folder, record = args.work / f"index-{which}", args.work / f"build-{which}.json"
    if (folder / "manifest.json").is_file() and record.is_file():  # built by an earlier run: its timing
        steps.update(json.loads(record.read_text()))
        return InfluenceIndex.open(folder)
    log(f"building --checkpoints {which}")
    index, seconds, load = timed(lambda: build_index(
        model, model / "train_used.tsv", folder, force=True, metric="dot", checkpoints=which,
        batch_size=args.batch_size))
    timing = {f"build {which} s": seconds, f"build {which} load": load}
    record.write_text(json.dumps(timing))
    steps.update(timing)
    return index


def audited(index, queries: Path, args, name: str, steps: dict, rows: dict) -> dict:
    baselines = None
    for metric in args.metrics.split(","):
        result, seconds, load = timed(lambda: index.audit(queries, layers="groups", aggs=args.aggs, metric=metric,
                                                          batch_size=args.batch_size))
        steps[f"audit {name} {metric} s"], steps[f"audit {name} {metric} load"] = seconds, load
        rows[f"{name} {metric}"] = {f"{row['scope']} {row['agg']}": {"ndr@30": row["ndr@30"], "auc_ndr": row["auc_ndr"]}
                                    for row in result.table}
        baselines = result.baselines
        log(f"{name} {metric}: audited in {seconds:.0f} s (load {load})")
    return baselines


def query_times(index, queries: Path, name: str, steps: dict, rounds: int = 5) -> None:
    """One query's wall time with the library's defaults (-k 10): the first (it loads the
    model of every checkpoint), then the median of ``rounds`` warm ones on other texts."""
    from lite_influence.data import read_rows

    texts = [row["sentence"] for row in read_rows(queries)[0][: rounds + 1]]
    _, steps[f"query {name} first s"], steps[f"query {name} first load"] = timed(lambda: index.query(texts[0], k=10))
    warm = [timed(lambda: index.query(text, k=10)) for text in texts[1:]]
    steps[f"query {name} warm s"] = sorted(seconds for _, seconds, _ in warm)[len(warm) // 2]
    steps[f"query {name} warm load"] = warm[0][2]


def main(argv=None) -> dict:
    import torch

    torch.set_num_threads(1)
    from lite_influence import InfluenceIndex

    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    files = tiny_files(args.work, args.n, args.seed) if args.tiny else sst2_files(args.work, args.n, args.seed, args.data)
    model = trained(args, files)
    if args.train_only:
        return {}
    steps, rows = {}, {}
    last = built(args, model, "last", steps)
    combined = built(args, model, "all", steps)
    query_times(last, files["queries"], "last alone", steps)
    query_times(InfluenceIndex.open(combined.path), files["queries"], "lr-weighted sum", steps)
    baselines = audited(last, files["queries"], args, "last alone", steps, rows)
    for entry in combined.manifest["checkpoints"][:-1]:
        sub = InfluenceIndex.open(combined.path / entry["index"])
        audited(sub, files["queries"], args, f"{entry['name']} alone", steps, rows)
    audited(combined, files["queries"], args, "lr-weighted sum", steps, rows)
    ratios = {"build": round(steps["build all s"] / steps["build last s"], 2)}
    for kind in ("first", "warm"):
        ratios[f"query {kind}"] = round(steps[f"query lr-weighted sum {kind} s"] / steps[f"query last alone {kind} s"], 2)
    for metric in args.metrics.split(","):
        ratios[f"audit {metric}"] = round(steps[f"audit lr-weighted sum {metric} s"] / steps[f"audit last alone {metric} s"], 2)
    results = {"n": len(combined), "setup": vars(args) | {"work": str(args.work), "data": str(args.data),
                                                         "out_dir": str(args.out_dir)},
               "checkpoints": combined.manifest["checkpoints"], "rows": rows, "baselines": baselines,
               "steps": steps, "ratios": ratios, "argv": sys.argv[1:]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    (args.out_dir / f"{args.name}.md").write_text(text)
    print(text)
    return results


def markdown(results: dict) -> str:
    combos = list(results["rows"])
    keys = list(next(iter(results["rows"].values())))
    weights = ", ".join(f"{c['name']} (ends step {c['step']}, mean lr {c['lr']:.3g}, weight {c['weight']:.3g})"
                        for c in results["checkpoints"])
    lines = [f"# TracIn-CP (lr-weighted sum of checkpoints) vs the last checkpoint: NDR@30 / AUC-NDR, N = {results['n']}",
             "", f"Command: `python benchmarks/checkpoints_ndr.py {' '.join(results['argv'])}`", "",
             f"Checkpoints: {weights}.", "",
             "| group agg | " + " | ".join(combos) + " |", "|---|" + "---|" * len(combos)]
    for key in keys:
        cells = [f"{results['rows'][c][key]['ndr@30']:.3f} / {results['rows'][c][key]['auc_ndr']:.3f}" for c in combos]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for name, values in (results["baselines"] or {}).items():
        if name in ("training loss", "random"):
            lines.append(f"| baseline: {name} (last model) | " + " | ".join(
                [f"{values['ndr@30']:.3f} / {values['auc_ndr']:.3f}"] * len(combos)) + " |")
    lines += ["", "Time ratios (sum of checkpoints / last alone; queries and audits measured in this run, builds in the run that built the indexes): " + json.dumps(results["ratios"]),
              "", "Steps (seconds, load average at their start): " + json.dumps(results["steps"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
