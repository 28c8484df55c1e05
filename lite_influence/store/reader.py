"""A built index, opened read-only: the manifest (checked once), FAISS files, the examples.

Opening reads the manifest alone; FAISS files, examples and the projection are read on first
use, and each is checked as it is read, so a damaged file is one line naming it.
"""

from __future__ import annotations

import json
import zipfile
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import UserError
from .atomic import aside, restore_swap
from .faiss_layers import approximate, normalise, search
from .lock import BuildLock
from .manifest import MANIFEST, METRICS, read_manifest
from .views import layer_view

EXAMPLE_OFFSETS = "examples.offsets.npy"  # byte offset of each row of examples.jsonl, and the end
SHARD_ROWS = "shard_rows.npy"  # a shard index's rows as row numbers of the whole build (merge puts them there)
SAVED_AUDIT = "audit.json"  # the last `audit --save` of this index (AuditResult.saved)


def is_index(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def recover(out: Path) -> None:
    """Put back an index that a kill left moved aside mid-swap, unless a build is running
    (the build finishes the swap itself)."""
    try:
        with BuildLock.try_hold(out):
            restore_swap(out)
    except (BlockingIOError, OSError):
        pass


class IndexStore:
    """A built index, opened read-only: manifest, layers (loaded on first use), examples."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._views: dict[str, object] = {}

    @classmethod
    def open(cls, path: str | Path) -> "IndexStore":
        root = Path(path)
        if not root.exists() and aside(root).is_dir():
            recover(root)
        if not root.is_dir():
            raise UserError(f"index folder '{path}' does not exist; build one with `lite-influence build`.")
        if not is_index(root):
            raise UserError(f"'{path}' is not a lite-influence index (no {MANIFEST}).")
        return cls(root, read_manifest(root))

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

    @property
    def holds(self) -> str:
        """What the FAISS files hold (``views.layer_view``)."""
        if self.manifest["format_version"] >= 2:
            return "unit+norms"
        return "raw" if self.metric == "dot" else "unit"

    @property
    def approximate(self) -> bool:
        """An ANN index (HNSW, IVF, PQ, SQ...): a lookup's candidates come from FAISS and are
        re-scored exactly (``lookup.lookup_scores``), so an example FAISS misses is missed."""
        return approximate(self.manifest["index_factory"])

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this index answers (format 2: both, from one build; an ANN index
        searches unit rows, so cosine only)."""
        return ("cosine",) if self.holds == "unit" or self.approximate else METRICS

    def check_metric(self, metric: str | None) -> str:
        """The metric to answer with: ``metric``, or the index's default (build's --metric)."""
        metric = metric or self.metric
        if metric not in METRICS:
            raise UserError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
        if metric not in self.metrics and self.approximate:
            raise UserError(f"index '{self.path}' is approximate (FAISS '{self.manifest['index_factory']}'), which "
                            "searches by cosine only; use --metric cosine, or rebuild with --index-factory Flat for dot.")
        if metric not in self.metrics:
            raise UserError(f"index '{self.path}' was built for cosine by an older lite-influence and holds unit "
                            "vectors only, so it cannot answer --metric dot; rebuild it (one build now serves both).")
        return metric

    def layer(self, layer: str):
        """The layer's stored vectors (``views``: a FAISS index, or the embeddings' token rows)."""
        if layer not in self._views:
            self._views[layer] = layer_view(self.path, self.layer_info(layer), self.n, self.holds)
        return self._views[layer]

    def faiss_index(self, layer: str):
        view = self.layer(layer)
        if view.kind != "dense":
            raise UserError(f"layer {layer} holds exact token rows, not a FAISS index.")
        return view.index

    def vectors(self, layer: str, ids=None, metric: str | None = None) -> np.ndarray:
        """Stored vectors of a dense layer as ``metric`` (default: the index's) compares them:
        unit rows for cosine, raw for dot; exact for Flat/HNSW/IVF, approximate for PQ."""
        if ids is not None:
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= self.n):
                raise UserError(f"ids must be in [0, {self.n}); got {ids.min()}..{ids.max()}")
        self.faiss_index(layer)
        return self.layer(layer).vectors(ids, self.check_metric(metric))

    def prepare_queries(self, vectors: np.ndarray, metric: str | None = None) -> np.ndarray:
        """Dense query rows as ``metric`` (default: the index's) compares them."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return normalise(vectors) if self.check_metric(metric) == "cosine" else vectors

    def search(self, layer: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's top-k by inner product with each (prepared) query row of a dense layer:
        (scores, ids), best first; the metric is the one FAISS holds (``searchable``)."""
        return search(self.faiss_index(layer), np.ascontiguousarray(queries, np.float32), min(k, self.n))

    @cached_property
    def examples(self) -> list[dict]:
        return read_examples(self.path / "examples.jsonl", self.n)

    @cached_property
    def table(self) -> "ExampleTable | list[dict]":
        """The examples by id, read one row at a time (``table[i]``); the whole list for an
        index built before the offsets file."""
        offsets = self.path / EXAMPLE_OFFSETS
        if not offsets.is_file() or not (self.path / "examples.jsonl").is_file():
            return self.examples  # which says what is missing
        return ExampleTable(self.path / "examples.jsonl", offsets, self.n)

    def losses(self) -> np.ndarray | None:
        """Each example's training loss when the index was built (None: built before v0.2)."""
        file = self.path / "losses.npy"
        if not file.is_file():
            return None
        try:
            losses = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"{file} is damaged ({exc}); rebuild the index.") from None
        if losses.shape != (self.n,):
            raise UserError(f"{file} holds {losses.shape} values for {self.n} examples; rebuild the index.")
        return np.asarray(losses, np.float64)

    def saved_audit(self) -> dict | None:
        """The audit kept by ``audit --save`` (None if there is none); a rebuild discards it."""
        file = self.path / SAVED_AUDIT
        if not file.is_file():
            return None
        try:
            saved = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{file} is damaged ({type(exc).__name__}); run the audit again with --save.") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("table"), list):
            raise UserError(f"{file} is not a saved audit; run the audit again with --save.")
        return saved

    def projection_arrays(self) -> dict[str, np.ndarray]:
        return read_projection(self.path / "projection.npz")

    def sizes(self) -> dict[str, int]:
        return {str(f.relative_to(self.path)): f.stat().st_size
                for f in sorted(self.path.rglob("*")) if f.is_file()}


class ExampleTable:
    """Rows of ``examples.jsonl`` by id, through the byte offsets the writer stored: a lookup
    reads the k rows it shows, not N."""

    def __init__(self, file: Path, offsets_file: Path, n: int):
        self.file = file
        try:
            self.offsets = np.load(offsets_file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{offsets_file} is damaged ({type(exc).__name__}); rebuild the index.") from None
        if self.offsets.shape != (n + 1,) or self.offsets[-1] != file.stat().st_size:
            raise UserError(f"{offsets_file} does not match {file.name} ({n} rows); rebuild the index.")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        with open(self.file, "rb") as handle:
            handle.seek(start)
            line = handle.read(end - start)
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            row = None
        if not isinstance(row, dict):
            raise UserError(f"{self.file} is damaged (row {i} is not a JSON object at its offset); rebuild the index.")
        return row


def read_examples(file: Path, n: int | None) -> list[dict]:
    """The examples table: one JSON object per line, ``n`` of them, the last one complete."""
    if not file.is_file():
        raise UserError(f"{file} is missing; rebuild the index.")
    rows = []
    try:
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith("\n"):
                    raise ValueError(f"line {number} is cut short")
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"line {number} is not a JSON object")
                rows.append(row)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{file} is damaged ({exc}); rebuild the index.") from None
    if n is not None and len(rows) != n:
        raise UserError(f"{file} holds {len(rows)} examples, the manifest says {n}; rebuild the index.")
    return rows


def read_projection(file: Path) -> dict[str, np.ndarray]:
    """The fitted eigenbases (pca); {} for a random projection, which is regenerated."""
    if not file.is_file():
        return {}
    try:
        with np.load(file, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"{file} is damaged or not an npz file ({type(exc).__name__}); "
                        "rebuild the index.") from None
