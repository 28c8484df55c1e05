"""The on-disk store: manifest, one FAISS index per layer, the examples table. No torch here.

Layout (DESIGN.md)::

    INDEX_DIR/
      manifest.json        format version, model fingerprint, layers and dims, build config...
      layers/NAME.faiss    one FAISS index per layer; ids are row numbers of examples.jsonl
      examples.jsonl       id, text, pair, label and every other input column
      projection.npz       fitted eigenbases and eigenvalues (pca projection only)

A build writes into ``.NAME.partial`` beside the target, one memory-mapped float32 matrix per
layer, with ``progress.json`` after every batch, so that a killed build can resume. Only when
everything is written is the folder renamed into place: a failed, interrupted or killed
build never leaves a half index where a good one was.

Both metrics are served by inner-product FAISS indexes; for ``cosine`` the store normalises
vectors on the way in and queries on the way out, so callers never think about it.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METRICS = ("cosine", "dot")
FEW_QUERIES = 4  # up to this many queries a flat index is scanned with numpy, beyond it FAISS batches


def faiss_module():
    """faiss, with the BLAS threshold that faiss 1.15 raised set back (5-7x faster batches)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 20
    return faiss


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit rows; all-zero rows stay zero (an example the model fits exactly has no gradient)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1)).astype(np.float32)


def write_json(path: Path, data) -> None:
    """Write to a temporary name, then rename: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def is_index(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class IndexStore:
    """A built index, opened read-only: manifest, FAISS files (loaded on first use), examples."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._faiss: dict[str, object] = {}

    @classmethod
    def open(cls, path: str | Path) -> "IndexStore":
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"index folder '{path}' does not exist; build one with `lite-influence build`.")
        if not is_index(root):
            raise UserError(f"'{path}' is not a lite-influence index (no {MANIFEST}).")
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
            version = int(manifest["format_version"])
            _check_manifest(manifest)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{root / MANIFEST} is damaged ({exc}); rebuild the index.") from exc
        if version > FORMAT_VERSION:
            raise UserError(f"index '{path}' has format {version}, newer than this lite-influence "
                            f"reads ({FORMAT_VERSION}); upgrade lite-influence.")
        return cls(root, manifest)

    @property
    def layers(self) -> list[str]:
        return [layer["name"] for layer in self.manifest["layers"]]

    @property
    def n(self) -> int:
        return int(self.manifest["n"])

    @property
    def metric(self) -> str:
        return self.manifest["metric"]

    def layer_info(self, layer: str) -> dict:
        for info in self.manifest["layers"]:
            if info["name"] == layer:
                return info
        raise UserError(f"unknown layer '{layer}'; this index has: {', '.join(self.layers)}")

    def faiss_index(self, layer: str):
        if layer not in self._faiss:
            self._faiss[layer] = self._read_faiss(layer)
        return self._faiss[layer]

    def _read_faiss(self, layer: str):
        faiss = faiss_module()
        info = self.layer_info(layer)
        file = self.path / "layers" / f"{layer}.faiss"
        if not file.is_file():
            raise UserError(f"index file {file} is missing; rebuild the index.")
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as exc:
            raise UserError(f"index file {file} is damaged (FAISS cannot read it); rebuild the index.") from exc
        if index.d != info["dim"] or index.ntotal != self.n:
            raise UserError(f"index file {file} holds {index.ntotal} vectors of dim {index.d}, the "
                            f"manifest says {self.n} of dim {info['dim']}; rebuild the index.")
        if isinstance(index, faiss.IndexFlat) and not np.isfinite(faiss.rev_swig_ptr(
                index.get_xb(), index.ntotal * index.d)).all():
            raise UserError(f"index file {file} holds NaN or infinite values; rebuild the index.")
        return index

    def vectors(self, layer: str, ids=None) -> np.ndarray:
        """Stored vectors (normalised for cosine), exact for Flat/HNSW/IVF, approximate for PQ."""
        index = self.faiss_index(layer)
        ids = np.arange(self.n) if ids is None else np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            raise UserError(f"ids must be in [0, {self.n}); got {ids.min()}..{ids.max()}")
        _make_reconstructable(index)
        if ids.size == self.n and np.array_equal(ids, np.arange(self.n)):
            return index.reconstruct_n(0, self.n)
        return index.reconstruct_batch(ids) if ids.size else np.zeros((0, index.d), np.float32)

    def prepare_queries(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return normalise(vectors) if self.metric == "cosine" else vectors

    def search(self, layer: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product with each query row: (scores, ids), best first.

        An IVF index pads with id -1 when the lists it probes hold fewer than k vectors; vote
        and rank need full lists, so the probe is widened until every row has k ids."""
        index = self.faiss_index(layer)
        queries, k = self.prepare_queries(queries), min(k, self.n)
        if len(queries) <= FEW_QUERIES and isinstance(index, faiss_module().IndexFlat):
            return _scan(_flat_vectors(index), queries, k)
        scores, ids = index.search(queries, k)
        ivf = _ivf(index)
        while ivf is not None and (ids < 0).any() and ivf.nprobe < ivf.nlist:
            ivf.nprobe = min(ivf.nlist, 2 * ivf.nprobe)
            scores, ids = index.search(queries, k)
        return scores, ids

    @cached_property
    def examples(self) -> list[dict]:
        file = self.path / "examples.jsonl"
        if not file.is_file():
            raise UserError(f"{file} is missing; rebuild the index.")
        with open(file, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    def projection_arrays(self) -> dict[str, np.ndarray]:
        file = self.path / "projection.npz"
        if not file.is_file():
            return {}
        with np.load(file, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def sizes(self) -> dict[str, int]:
        return {str(f.relative_to(self.path)): f.stat().st_size
                for f in sorted(self.path.rglob("*")) if f.is_file()}


def _ivf(index):
    """The IVF part of an index (None for Flat, HNSW, PQ...)."""
    try:
        return faiss_module().extract_index_ivf(index)
    except RuntimeError:
        return None


def _check_manifest(manifest: dict) -> None:
    """The fields a query trusts, checked once, so a hand-edited manifest fails with its name
    rather than deep inside a search."""
    if manifest["metric"] not in METRICS:
        raise ValueError(f"metric {manifest['metric']!r} is not one of {', '.join(METRICS)}")
    if int(manifest["n"]) < 1:
        raise ValueError(f"n is {manifest['n']}")
    for layer in manifest["layers"]:
        if not isinstance(layer["name"], str) or int(layer["dim"]) < 1:
            raise ValueError(f"layer entry {layer!r}")
    manifest["label_names"], manifest["model"]["fingerprint"], manifest["build"]


def _flat_vectors(index) -> np.ndarray:
    """The vectors of a flat index, as a numpy view of FAISS's own memory (no copy)."""
    faiss = faiss_module()
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def _scan(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product for a few queries: one matrix product and a partial sort.
    For a lookup's one or two queries this is 2-3x faster than FAISS's flat search
    (benchmarks/query_latency.py), and ties go to the smaller id."""
    scores = queries @ vectors.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (len(queries), 1))
    ids = np.empty_like(top)
    for row in range(len(queries)):
        candidates = top[row]
        ids[row] = candidates[np.lexsort((candidates, -scores[row, candidates]))]
    return np.take_along_axis(scores, ids, 1), ids.astype(np.int64)


def _make_reconstructable(index) -> None:
    """IVF indexes reconstruct only through a direct map; build it on first use."""
    ivf = _ivf(index)
    if ivf is not None and ivf.direct_map.type == faiss_module().DirectMap.NoMap:
        ivf.make_direct_map()


class IndexWriter:
    """Writes a new index beside ``out`` and renames it into place on ``commit``."""

    def __init__(self, out: str | Path, force: bool = False, resume: bool = False):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():  # --force replaces folders only
            raise UserError(f"--out '{out}' is a file, not a folder; choose a folder for the index.")
        if self.out.exists() and not is_index(self.out):
            if any(self.out.iterdir()) and not force:
                raise UserError(f"--out '{out}' exists and is not a lite-influence index; "
                                "choose another folder or pass --force to replace it.")
        self.partial = self.out.parent / f".{self.out.name}.partial"
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        try:
            (self.partial / "vectors").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write beside --out '{out}': {exc.strerror}") from exc

    def progress(self) -> dict | None:
        file = self.partial / "progress.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def save_progress(self, state: dict) -> None:
        write_json(self.partial / "progress.json", state)

    def vector_file(self, layer: str, n: int, dim: int) -> np.memmap:
        """The layer's (n x dim) float32 matrix on disk, created or reopened for resuming."""
        file = self.partial / "vectors" / f"{layer}.npy"
        if file.is_file():
            matrix = np.load(file, mmap_mode="r+", allow_pickle=False)
            if matrix.shape == (n, dim):
                return matrix
        return np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=(n, dim))

    def write_examples(self, rows: list[dict]) -> None:
        tmp = self.partial / "examples.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, self.partial / "examples.jsonl")

    def write_projection(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays:
            with open(self.partial / "projection.npz.tmp", "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(self.partial / "projection.npz.tmp", self.partial / "projection.npz")

    def read_projection(self) -> dict[str, np.ndarray]:
        return IndexStore(self.partial, {}).projection_arrays()

    def commit(self, manifest: dict, on_layer=None) -> Path:
        """FAISS files from the vector matrices, the manifest, then the rename into place."""
        (self.partial / "layers").mkdir(exist_ok=True)
        for number, layer in enumerate(manifest["layers"]):
            if on_layer:
                on_layer(number, len(manifest["layers"]))
            vectors = np.load(self.partial / "vectors" / f"{layer['name']}.npy", mmap_mode="r", allow_pickle=False)
            index = make_faiss_index(np.asarray(vectors), manifest["metric"], manifest["index_factory"])
            faiss_module().write_index(index, str(self.partial / "layers" / f"{layer['name']}.faiss"))
        shutil.rmtree(self.partial / "vectors")
        (self.partial / "progress.json").unlink(missing_ok=True)
        write_json(self.partial / MANIFEST, manifest)
        _swap_into_place(self.partial, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def check_factory(factory: str) -> None:
    """Refuse a factory string FAISS cannot parse before the slow gradient pass, not after.
    (Whether it suits the data, e.g. PQ's dim or IVF's training size, shows only at the end.)"""
    faiss = faiss_module()
    try:
        faiss.index_factory(5040, factory, faiss.METRIC_INNER_PRODUCT)  # 5040: divisible by 1..10
    except RuntimeError as exc:
        if "could not parse" in str(exc):
            raise UserError(f"--index-factory '{factory}' is not a FAISS index factory string; "
                            "use e.g. Flat, HNSW32, IVF256,Flat or PQ32.") from None


def make_faiss_index(vectors: np.ndarray, metric: str, factory: str):
    """An inner-product index of the given factory string, trained if it needs training."""
    faiss = faiss_module()
    data = normalise(vectors) if metric == "cosine" else np.ascontiguousarray(vectors, np.float32)
    if not np.isfinite(data).all():
        raise UserError("some gradients are NaN or infinite (model weights or inputs overflow); "
                        "check the model, or lower --max-length.")
    try:
        index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(data)
        index.add(data)
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "FAISS error"
        raise UserError(f"FAISS index '{factory}' failed on {data.shape[0]} vectors of dim "
                        f"{data.shape[1]}: {message}; try --index-factory Flat.") from exc
    return index


def _swap_into_place(partial: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an index already there is moved aside first
    and restored if the rename fails."""
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(partial, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
