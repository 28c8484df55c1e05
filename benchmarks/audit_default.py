"""Choosing ``lite-influence audit``'s headline setting by evidence (issue 15, item 4).

    python benchmarks/audit_default.py --work /tmp/auditdef            # select on s0, report held-out
    python benchmarks/audit_default.py --work /tmp/auditdef --prepare 2000:0,2000:1   # train + build only

The SST-2 protocol of ``benchmarks/ndr_sst2.py`` (its data split, training options and work
layout, so its ``--resume`` caches are shared both ways): MiniLM fine-tuned in full on a
stratified subset of N rows with 20% of the labels flipped, the epoch with the lowest
held-out loss kept, indexed once with the library's default build (mixed projection,
``--energy 0.8``; every index answers dot and cosine). Work folder ``WORK/n{N}/full-s{seed}``
holds ``model/`` and ``index-default/``.

1. Selection, on seed 0 at N = 2,000 only: a small grid of audit settings (scope x
   aggregation x metric x score x query subset x optional rank fusion with the training loss
   at a weight), each scored by NDR@30; the best is the candidate default.
2. Report, on data the choice never saw: that one setting against the training-loss ranking
   (and self-influence) on seed 1 at N = 2,000 and on N = 4,500 (seeds 0 and 1).

Writes ``audit_default.json`` (settings and figures, no per-example arrays) and
``audit_default.md`` to ``--out-dir``, with the load average of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ndr_sst2  # noqa: E402  the protocol: data split, training options, stage caching

RESULTS = HERE / "results"
LEVELS = (0.1, 0.2, 0.3)
SCOPES = ("embeddings", "early", "middle", "late", "head", "all")
AGGS = ("mean", "rank", "vote")
SUBSETS = ("all", "correct")
METRICS = ("dot", "cosine")
SCORES = ("gradient", "curvature")
WEIGHTS = (0.0, 0.25, 0.5, 0.75)  # of the training loss in the rank fusion; 0: influence alone
SELECT = (2000, 0)  # the one run the choice is made on
HELD_OUT = ((2000, 1), (4500, 0), (4500, 1))
PRIOR = {"scope": "all", "agg": "rank", "subset": "correct", "metric": "cosine", "score": "curvature", "weight": 0.5}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] load {os.getloadavg()[0]:.2f} {message}", flush=True)


def prepare(work: Path, n: int, seed: int, data: Path = ndr_sst2.DATA, epochs: int = 3,
            batch_size: int = 16) -> dict:
    """Train (ndr_sst2's options, full fine-tuning) and build the default index for one
    (N, seed), each stage cached in the run folder (``ndr_sst2.Stages``): a rerun costs
    nothing, a killed one continues."""
    import lite_influence
    from lite_influence.train import train_model

    root = work / f"n{n}"
    folder = root / f"full-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    files = ndr_sst2.sst2_files(root, n, seed, data)
    stages = ndr_sst2.Stages(folder, True, ndr_sst2.Clock())
    model_dir = folder / "model"
    training = stages.load("train")
    if training is None:
        started = time.perf_counter()
        log(f"n{n} s{seed}: training")
        trained = train_model(ndr_sst2.minilm_path(), files["train"], model_dir, force=True, noise=0.2, seed=seed,
                              epochs=epochs, eval_file=str(files["val"]), max_length=128, batch_size=batch_size)
        chosen = trained.history[trained.chosen_epoch - 1]
        training = {"chosen_epoch": trained.chosen_epoch, "eval_accuracy": chosen.get("eval_accuracy"),
                    "n_noisy": trained.n_noisy, "seconds": round(time.perf_counter() - started, 1)}
        stages.save("train", training)
        log(f"n{n} s{seed}: trained in {training['seconds']:.0f} s, held-out accuracy {training['eval_accuracy']}")
    index_dir = folder / "index-default"
    if not (stages.load("index-default") and (index_dir / "manifest.json").exists()):
        started = time.perf_counter()
        lite_influence.build_index(model_dir, model_dir / "train_used.tsv", index_dir, force=True, seed=seed,
                                   max_length=128, batch_size=batch_size)
        stages.save("index-default", round(time.perf_counter() - started, 1))
        log(f"n{n} s{seed}: built the default index in {time.perf_counter() - started:.0f} s")
    return {"index": index_dir, "queries": files["queries"], "training": training}




def key(setting: dict) -> str:
    """One setting as a short string: scope/agg(-c)/metric/score/+loss weight."""
    agg = setting["agg"] + ("-c" if setting["subset"] == "correct" else "")
    fused = f"/+loss {setting['weight']:g}" if setting["weight"] else ""
    return f"{setting['scope']}/{agg}/{setting['metric']}/{setting['score']}{fused}"


def grid_scores(run: dict, folder: Path, batch_size: int = 16) -> dict:
    """NDR figures of every grid setting on one run: four audits (metric x score), each over
    every group, aggregation and query subset; the fusion weights are applied to their
    rankings. Cached per audit (``stage-grid-METRIC-SCORE.pkl``); also the baselines."""
    from lite_influence import InfluenceIndex, ndr
    from lite_influence.audit import fuse

    index = InfluenceIndex.open(run["index"])
    stages = ndr_sst2.Stages(folder, True, ndr_sst2.Clock())
    out, baselines, steps = {}, None, []
    for metric in METRICS:
        for score in SCORES:
            name = f"grid-{metric}-{score}"
            cached = stages.load(name)
            if cached is None:
                load, started = os.getloadavg()[0], time.perf_counter()
                result = index.audit(run["queries"], layers="groups", aggs=",".join(AGGS), correct_only=True,
                                     metric=metric, score=score, batch_size=batch_size)
                loss = result.rankings[("training loss", "baseline", "all")][0]
                stats = {}
                for scope in SCOPES:
                    for agg in AGGS:
                        for subset in SUBSETS:
                            ids = result.rankings[(scope, agg, subset)][0]
                            for weight in WEIGHTS:
                                setting = {"scope": scope, "agg": agg, "subset": subset, "metric": metric,
                                           "score": score, "weight": weight}
                                ranked = fuse(ids, loss, weight)[0] if weight else ids
                                stats[key(setting)] = {**setting, **ndr.summarise(ranked, result.noisy, LEVELS)}
                cached = {"stats": stats, "baselines": {k: v for k, v in result.baselines.items()},
                          "n_correct": result.n_correct, "n_queries": result.n_queries, "n": result.n,
                          "n_noisy": int(result.noisy.sum()), "seconds": round(time.perf_counter() - started, 1),
                          "load": round(load, 2), "load_after": round(os.getloadavg()[0], 2)}
                stages.save(name, cached)
                log(f"{folder.parent.name} {folder.name}: audit {metric}/{score} in {cached['seconds']:.0f} s")
            out.update(cached["stats"])
            baselines = cached["baselines"]
            steps.append({"audit": f"{metric}/{score}", "seconds": cached["seconds"], "load": cached["load"],
                          "load_after": cached["load_after"]})
            meta = {k: cached[k] for k in ("n", "n_noisy", "n_queries", "n_correct")}
    return {"stats": out, "baselines": baselines, "steps": steps, **meta}


def library_default(run: dict, folder: Path) -> dict:
    """A plain ``index.audit(queries)`` (AuditConfig's defaults): its headline rows, to check
    that the library's default is the setting this benchmark chose. Cached per run."""
    from lite_influence import InfluenceIndex

    stages = ndr_sst2.Stages(folder, True, ndr_sst2.Clock())
    cached = stages.load("library-default")
    if cached is None:
        result = InfluenceIndex.open(run["index"]).audit(run["queries"])
        cached = {"setting": {k: v for k, v in result.headline_json().items() if k != "rows"},
                  "rows": {name: values for name, values in result.headline_rows()}}
        stages.save("library-default", cached)
    return cached


def _library_check(grid: dict, chosen: str) -> dict:
    """Whether the library's plain audit leads with the chosen setting's figures."""
    library = grid.get("library_default")
    if library is None:
        return {}
    first_name, first = next(iter(library["rows"].items()))
    ours = grid["stats"][chosen]
    return {"setting": library["setting"], "first_row": first_name, "ndr@30": first["ndr@30"],
            "matches_chosen": all(first[k] == ours[k] for k in first)}


def rank_key(stats: dict):
    """Best first: NDR@30, then AUC-NDR (NDR@30 ties often: it counts examples)."""
    return (-stats["ndr@30"], -stats["auc_ndr"])


def versus_loss(grid: dict, setting_key: str) -> dict:
    """One setting on one run beside the baselines: NDR@30, AUC-NDR, the gap to the loss."""
    row, base = grid["stats"][setting_key], grid["baselines"]
    loss, self_inf = base["training loss"], base.get("self-influence", {})
    return {"ndr@30": row["ndr@30"], "auc_ndr": row["auc_ndr"], "loss_ndr@30": loss["ndr@30"],
            "loss_auc_ndr": loss["auc_ndr"], "self_ndr@30": self_inf.get("ndr@30"),
            "random_ndr@30": base["random"]["ndr@30"], "gap_ndr@30": row["ndr@30"] - loss["ndr@30"],
            "gap_auc_ndr": row["auc_ndr"] - loss["auc_ndr"]}


def evaluate(grids: dict) -> dict:
    """Select on SELECT, report the choice (and the runner-up settings, the prior, the best
    influence-only setting and each held-out run's own best, for scale) on HELD_OUT."""
    select = grids[SELECT]
    ranked = sorted(select["stats"], key=lambda k: rank_key(select["stats"][k]))
    chosen = ranked[0]
    pure = next(k for k in ranked if select["stats"][k]["weight"] == 0)
    prior = key(PRIOR)
    watched = {"chosen": chosen, "best influence alone": pure, "prior (earlier attempt)": prior}
    for number, k in enumerate(ranked[1:5], start=2):
        watched[f"#{number} on the selection run"] = k
    report = {}
    for (n, seed), grid in grids.items():
        name = f"n{n} s{seed}"
        # the grid's own fusion against the audit's "influence + loss" row (the last audit,
        # cosine/curvature, fused its headline: all layers, first aggregation mean, -c, 0.5)
        mine = grid["stats"][key({"scope": "all", "agg": "mean", "subset": "correct", "metric": "cosine",
                                  "score": "curvature", "weight": 0.5})]
        if any(mine[k] != v for k, v in grid["baselines"]["influence + loss"].items()):
            raise SystemExit(f"{name}: the grid's fusion differs from the audit's influence + loss row")
        best_here = min(grid["stats"], key=lambda k: rank_key(grid["stats"][k]))
        report[name] = {"held_out": (n, seed) != SELECT, "n": grid["n"], "n_noisy": grid["n_noisy"],
                        "n_queries": grid["n_queries"], "n_correct": grid["n_correct"],
                        "settings": {label: {"setting": k, **versus_loss(grid, k)} for label, k in watched.items()},
                        "own_best": {"setting": best_here, **versus_loss(grid, best_here)},
                        "library_default": _library_check(grid, chosen),
                        "steps": grid["steps"]}
    return {"chosen": select["stats"][chosen] | {"key": chosen}, "grid_size": len(ranked), "runs": report}


def markdown(results: dict) -> str:
    chosen = results["chosen"]
    lines = ["# The audit default, chosen on one seed, reported on others", "",
             f"Grid of {results['grid_size']} settings (scope x aggregation x query subset x metric x score x "
             f"loss-fusion weight {', '.join(f'{w:g}' for w in WEIGHTS)}), scored by NDR@30 on "
             f"n{SELECT[0]} s{SELECT[1]} only (ties by AUC-NDR). Chosen: **{chosen['key']}** "
             f"(NDR@30 {chosen['ndr@30']:.3f} there).", "",
             "| run | held out | setting | NDR@30 | AUC-NDR | loss NDR@30 | loss AUC | self-inf. NDR@30 | gap NDR@30 | gap AUC |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        for label, row in [*run["settings"].items(), ("own best (oracle)", run["own_best"])]:
            lines.append(f"| {name} | {'yes' if run['held_out'] else 'no (selection)'} | {label}: {row['setting']} | "
                         f"{row['ndr@30']:.3f} | {row['auc_ndr']:.3f} | {row['loss_ndr@30']:.3f} | "
                         f"{row['loss_auc_ndr']:.3f} | {_f(row['self_ndr@30'])} | {row['gap_ndr@30']:+.3f} | "
                         f"{row['gap_auc_ndr']:+.3f} |")
    lines += ["", "Goal: the chosen setting beats the training loss by >= 0.02 NDR@30 on every held-out run.", ""]
    for name, run in results["runs"].items():
        gap = run["settings"]["chosen"]["gap_ndr@30"]
        lines.append(f"- {name}{' (held out)' if run['held_out'] else ' (selection)'}: gap {gap:+.3f} "
                     f"{'met' if gap >= 0.02 else 'not met'}; {run['n']:,} examples, {run['n_noisy']} flipped, "
                     f"{run['n_queries']} queries ({run['n_correct']} correct)")
    for name, run in results["runs"].items():
        check = run.get("library_default") or {}
        if check:
            lines.append(f"- {name}: a plain `index.audit(queries)` leads with '{check['first_row']}' "
                         f"(NDR@30 {check['ndr@30']:.3f}): {'the chosen setting' if check['matches_chosen'] else 'NOT the chosen setting'}")
    lines += ["", "Load average (1 min) of every audit (2 shared cores; wall times indicative only):", ""]
    for name, run in results["runs"].items():
        lines.append(f"- {name}: " + "; ".join(f"{s['audit']} {s['seconds']:.0f} s, load {s['load']:.2f}"
                                               f"->{s['load_after']:.2f}" for s in run["steps"]))
    setup = results["setup"]
    lines += ["", f"Load average at start {setup['load_start']}, at end {setup['load_end']}. "
              f"Command: `python benchmarks/audit_default.py {' '.join(setup['argv'])}`."]
    return "\n".join(lines) + "\n"


def _f(x) -> str:
    return "" if x is None else f"{x:.3f}"


def write(results: dict, out_dir: Path) -> None:
    """JSON and markdown, each written to a temporary name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(results, indent=1)), ("md", markdown(results))):
        path = out_dir / f"audit_default.{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/auditdef"))
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--data", type=Path, default=ndr_sst2.DATA, help="the SST-2 folder (train.tsv, test.tsv)")
    parser.add_argument("--prepare", default=None, help="only train and build these N:seed runs, comma-separated")
    parser.add_argument("--runs", default=None,
                        help="N:seed runs to report, comma-separated (default: the selection run and all held out)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    pairs = lambda text: [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    if args.prepare:
        for n, seed in pairs(args.prepare):
            prepare(args.work, n, seed, args.data)
        return {}
    setup = {"load_start": [round(x, 2) for x in os.getloadavg()], "argv": sys.argv[1:] if argv is None else argv}
    runs = pairs(args.runs) if args.runs else [SELECT, *HELD_OUT]
    if SELECT not in runs:
        raise SystemExit(f"--runs must include the selection run {SELECT[0]}:{SELECT[1]}")
    grids = {}
    for n, seed in runs:
        run = prepare(args.work, n, seed, args.data)
        grids[(n, seed)] = grid_scores(run, args.work / f"n{n}" / f"full-s{seed}")
        grids[(n, seed)]["library_default"] = library_default(run, args.work / f"n{n}" / f"full-s{seed}")
    results = evaluate(grids)
    setup["load_end"] = [round(x, 2) for x in os.getloadavg()]
    results["setup"] = setup
    write(results, args.out_dir)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
