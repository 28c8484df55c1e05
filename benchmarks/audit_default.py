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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/auditdef"))
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--data", type=Path, default=ndr_sst2.DATA, help="the SST-2 folder (train.tsv, test.tsv)")
    parser.add_argument("--prepare", default=None, help="only train and build these N:seed runs, comma-separated")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.prepare:
        for item in args.prepare.split(","):
            n, seed = (int(x) for x in item.split(":"))
            prepare(args.work, n, seed, args.data)
        return {}
    raise SystemExit("not yet")


if __name__ == "__main__":
    main()
