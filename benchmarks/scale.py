"""The store at N = 10k, 100k and 1M (issue 11 items 2 and 5): open and `info` time, warm
lookup latency against a numpy flat scan of the same data measured in the same process, the
query process's memory, and the disk size against N x layers x dim x 4 bytes.

The indexes hold synthetic vectors of MiniLM's real layer dims (all-MiniLM-L6-v2, the default
build: the embeddings' exact token rows, 64 numbers per distinct token; blocks 0-5, 4
attention matrices x 8 x 8 = 256; the 2-class head kept exactly, 770), written by the store's
own ``IndexWriter`` (vector files, token rows, examples table, losses, commit), as a build
writes them. Dense rows are Gaussian (a Flat scan's cost depends on N and the dims only);
token rows hold 1 + Poisson(9) distinct tokens per example drawn from a Zipf(1.1) law over
BERT's 30,522-token vocabulary (SST-2's phrases: ~10 tokens; frequent tokens have long
posting lists, as in real text). The lookup is ``InfluenceIndex.query_ids`` (the product's
path, minus the model's query gradient: the stored vectors of one example as the query, all
8 layers, k = 10), in a fresh process per N (open, first query, warm median, then RSS);
the scan is the bare numpy alternative (one float32 product per dense layer over an aligned
in-memory copy of the same unit rows, the token rows' posting lists, a top-10 partial sort
per side; the copies are made after RSS is read, and need N x dims x 4 bytes of RAM).

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--work /tmp/li-scale] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
VOCAB, TOKEN_DIM = 30_522, 64
DENSE = {**{f"block{b}": 1024 for b in range(6)}, "head": 770}  # MiniLM, default build (mixed: 4 x 64 x 4
# attention matrices a block; --block-dim 256 for the 8 x 8 projections, scale.md's first rounds)
CHUNK = 65_536


def _zipf_tokens(rng, size: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    return rng.choice(VOCAB, size=size, p=weights / weights.sum())


def _token_rows(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, tokens): each example's distinct tokens, increasing (as the build stores them)."""
    drawn = 1 + rng.poisson(9, size=n)
    example = np.repeat(np.arange(n), drawn)
    tokens = _zipf_tokens(rng, example.size)
    order = np.lexsort((tokens, example))
    example, tokens = example[order], tokens[order]
    keep = np.ones(example.size, bool)
    keep[1:] = (example[1:] != example[:-1]) | (tokens[1:] != tokens[:-1])
    return np.bincount(example[keep], minlength=n), tokens[keep]


def manifest(n: int, entries: int) -> dict:
    layers = [{"name": "embeddings", "dim": TOKEN_DIM, "kind": "tokens", "entries": entries, "block": None,
               "units": [{"name": "embeddings.word_embeddings"}]}]
    layers += [{"name": name, "dim": dim, "block": None if name == "head" else int(name[5:]),
                "units": [{"name": f"{name}.unit"}]} for name, dim in DENSE.items()]
    names = [layer["name"] for layer in layers]
    return {"format_version": 2, "n": n, "metric": "cosine", "index_factory": "Flat",
            "label_names": ["negative", "positive"], "model": {"path": "/synthetic", "fingerprint": "synthetic",
                                                               "task": "classification"},
            "data": {"path": "/synthetic", "fingerprint": "synthetic"},
            "build": {"projection": "pca", "proj_dim": 8, "seed": 0}, "layers": layers,
            "groups": {"embeddings": ["embeddings"], "early": names[1:3], "middle": names[3:5],
                       "late": names[5:7], "head": ["head"], "all": names}}


def write_index(out: Path, n: int, seed: int = 0) -> float:
    """A synthetic index of N examples through ``IndexWriter``; returns seconds taken."""
    from lite_influence.store import IndexWriter

    start, rng = time.perf_counter(), np.random.default_rng(seed)
    writer = IndexWriter(out, force=True)
    writer.resume_point({})
    counts, tokens = _token_rows(rng, n)
    rows = writer.token_file("embeddings", counts, TOKEN_DIM)
    rows.tokens[:] = tokens
    for s in range(0, len(tokens), CHUNK):
        rows.values[s:s + CHUNK] = rng.standard_normal((len(tokens[s:s + CHUNK]), TOKEN_DIM), np.float32)
    rows.flush()
    for name, dim in DENSE.items():
        matrix = writer.vector_file(name, n, dim)
        for s in range(0, n, CHUNK):
            matrix[s:s + CHUNK] = rng.standard_normal((len(matrix[s:s + CHUNK]), dim), np.float32)
        matrix.flush()
        del matrix
    writer.loss_file(n)[:] = rng.exponential(0.5, n).astype(np.float32)
    labels = rng.integers(0, 2, n)
    writer.write_examples([{"id": i, "text": f"synthetic example {i}", "label": int(labels[i])} for i in range(n)])
    writer.commit(manifest(n, int(len(tokens))))
    return time.perf_counter() - start


PROBE = r"""
import json, resource, statistics, sys, time
sys.path[:0] = [sys.argv[2], sys.argv[3]]
start = time.perf_counter()
from lite_influence import InfluenceIndex
index = InfluenceIndex.open(sys.argv[1])
opened = time.perf_counter() - start
def timed(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)
out = {"open_s": opened}
t = time.perf_counter(); index.query_ids([7], k=10); out["first_query_s"] = time.perf_counter() - t
for agg in ("vote", "mean"):
    out[f"query_{agg}_s"] = timed(lambda: index.query_ids([7], k=10, agg=agg))
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
    out[key + "_mb"] = int(status[key].split()[0]) / 1024  # before the scan's copies
import numpy as np
layers = index.layers
vectors = {l: index.store.layer(l).prepare(index.store.layer(l).rows([7]), "cosine") for l in layers}
vectors = {l: v if hasattr(v, "row") else v[0] for l, v in vectors.items()}
dense = {l: np.array(index.store.layer(l).vectors(None, "cosine")) for l in layers if index.store.layer(l).kind == "dense"}
def scan():  # aligned in-memory copies: the FAISS file's rows sit at byte 45, which BLAS skips
    for l in layers:
        s = dense[l] @ vectors[l] if l in dense else index.store.layer(l).stored.scores(*vectors[l].row(0))
        for side in (s, -s):
            top = np.argpartition(-side, 10)[:10]
            top[np.argsort(-side[top])]
out["scan_s"] = timed(scan)
print(json.dumps(out))
"""


def probe(path: Path) -> dict:
    """Open, query and scan in a fresh process (RSS is that process's), 1 thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(path), str(ROOT), str(HERE)], capture_output=True,
                          text=True, env=env, timeout=3600)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def info_seconds(path: Path) -> tuple[float, float]:
    """`lite-influence info --json` as a user runs it (a new process) and in-process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lite_influence", "info", str(path), "--json"], check=True,
                   capture_output=True, env=env)
    cli = time.perf_counter() - start
    from lite_influence.store import IndexStore

    start = time.perf_counter()
    store = IndexStore.open(path)
    store.sizes()
    return cli, time.perf_counter() - start


def measure(work: Path, n: int, keep: bool) -> dict:
    path = work / f"n{n}"
    write_s = write_index(path, n) if not (path / "manifest.json").is_file() else None
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    tokens = sum(f.stat().st_size for f in (path / "layers" / "embeddings.tokens").iterdir())
    bound = n * (TOKEN_DIM + sum(DENSE.values())) * 4
    cli_s, info_s = info_seconds(path)
    row = {"n": n, "write_s": write_s, "disk_bytes": disk, "token_rows_bytes": tokens, "bound_bytes": bound,
           "dense_bytes": disk - tokens, "dense_bound_bytes": n * sum(DENSE.values()) * 4,
           "info_cli_s": cli_s, "info_s": info_s, **probe(path), "load": os.getloadavg()}
    if not keep:
        shutil.rmtree(path)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| N | open (ms) | info in-process / CLI (ms) | first query (ms) | warm query vote / mean (ms) | numpy scan (ms) | vote / scan | mean / scan | RSS (MB: total, anon, file) | disk (GB) | disk / bound | dense layers / bound | token rows (GB) | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {1e3 * r['open_s']:.0f} | {1e3 * r['info_s']:.0f} / {1e3 * r['info_cli_s']:.0f} | "
                     f"{1e3 * r['first_query_s']:.0f} | {1e3 * r['query_vote_s']:.0f} / {1e3 * r['query_mean_s']:.0f} | "
                     f"{1e3 * r['scan_s']:.0f} | {r['query_vote_s'] / r['scan_s']:.2f} | {r['query_mean_s'] / r['scan_s']:.2f} | "
                     f"{r['VmRSS_mb']:.0f}, {r['RssAnon_mb']:.0f}, {r['RssFile_mb']:.0f} | {r['disk_bytes'] / 1e9:.2f} | "
                     f"{r['disk_bytes'] / r['bound_bytes']:.3f} | {r['dense_bytes'] / r['dense_bound_bytes']:.3f} | "
                     f"{r['token_rows_bytes'] / 1e9:.2f} | {r['load'][0]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/li-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic indexes (reruns reuse them)")
    parser.add_argument("--block-dim", type=int, default=1024, help="dims per attention block (1,024: mixed; 256: pca 8 x 8)")
    parser.add_argument("--name", default="scale", help="results/NAME.json and NAME.md")
    args = parser.parse_args()
    DENSE.update({name: args.block_dim for name in DENSE if name != "head"})
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows.append(measure(args.work, n, args.keep))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"rows": rows, "block_dim": args.block_dim}, indent=2))


if __name__ == "__main__":
    main()
