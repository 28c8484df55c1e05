"""Where the model side (torch) meets the store (FAISS): build, and the index users query.

This is the only module that knows both. torch and transformers are imported inside the
functions that need them, so that opening an index, ``info`` and reading vectors start fast.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .config import BuildConfig
from .data import fingerprint_file, load_examples
from .errors import UserError
from .index import FORMAT_VERSION, METRICS, IndexStore, IndexWriter

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _check(config: BuildConfig) -> None:
    from .projection import PROJECTIONS

    if config.projection not in PROJECTIONS:
        raise UserError(f"unknown projection '{config.projection}'; use one of {', '.join(PROJECTIONS)}")
    if config.metric not in METRICS:
        raise UserError(f"unknown metric '{config.metric}'; use one of {', '.join(METRICS)}")
    for name in ("proj_dim", "batch_size", "max_length", "fit_examples"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.limit is not None and config.limit < 1:
        raise UserError(f"--limit must be at least 1, got {config.limit}")


def build_index(model: str | Path, train_file: str | Path, out: str | Path,
                config: BuildConfig | None = None, *, force: bool = False, resume: bool = False,
                progress: Progress | None = None, **options) -> "InfluenceIndex":
    """Index the projected per-layer gradients of every example of ``train_file``.

    ``options`` override fields of ``config`` (``build_index(m, f, o, proj_dim=16)``).
    """
    config = replace(config or BuildConfig(), **options)
    _check(config)
    progress = progress or (lambda stage, done, total: None)
    writer = IndexWriter(out, force=force, resume=resume)
    try:
        manifest = _build(Path(model), Path(train_file), writer, config, progress)
        path = writer.commit(manifest, lambda done, total: progress("faiss", done, total))
        progress("faiss", len(manifest["layers"]), len(manifest["layers"]))
        return InfluenceIndex(IndexStore(path, manifest))
    except KeyboardInterrupt:
        raise  # the partial folder stays, for `build --resume`
    except BaseException:
        writer.abort()
        raise


def _build(model_dir: Path, train_file: Path, writer: IndexWriter, config: BuildConfig,
           progress: Progress) -> dict:
    from .gradients import layer_vectors, length_batches
    from .layers import assign_layers, discover_units, select_units
    from .models import encode, load_model, model_fingerprint

    loaded = load_model(model_dir, num_labels=config.num_labels, seed=config.seed)
    examples = load_examples(train_file, text_col=config.text_col, pair_col=config.pair_col,
                             label_col=config.label_col, label2id=loaded.label2id, limit=config.limit)
    units = select_units(discover_units(loaded.model), config.layers)
    layers = assign_layers(units, config.granularity)
    encodings = encode(loaded, examples.texts, examples.pairs, config.max_length)
    batches = length_batches([len(e["input_ids"]) for e in encodings], config.batch_size)
    identity = {"config": config.to_dict(), "model": model_fingerprint(model_dir),
                "data": fingerprint_file(train_file), "n": len(examples)}
    done = _resume_point(writer, identity)
    projectors = _projectors(loaded, writer, units, encodings, examples.labels, config, progress, done)
    dims = {name: sum(projectors[u.name].dim for u in members) for name, members in layers.items()}
    matrices = {name: writer.vector_file(name, len(examples), dims[name]) for name in layers}
    ordered = [projectors[u.name] for u in units]
    started = time.perf_counter()
    for number, batch in enumerate(batches):
        if number < done:
            continue
        vectors, _, _ = layer_vectors(loaded, ordered, layers, encodings, examples.labels, batch)
        for name, matrix in matrices.items():
            matrix[batch] = vectors[name]
        if number % 8 == 7 or number == len(batches) - 1:
            for matrix in matrices.values():
                matrix.flush()
            writer.save_progress({**identity, "batches_done": number + 1})
        progress("gradients", sum(len(b) for b in batches[: number + 1]), len(examples))
    writer.write_examples(_example_rows(examples))
    return _manifest(loaded, model_dir, train_file, examples, layers, projectors, dims, config,
                     identity, time.perf_counter() - started)


def _resume_point(writer: IndexWriter, identity: dict) -> int:
    state = writer.progress()
    if state is None:
        return 0
    if {k: state.get(k) for k in identity} != json.loads(json.dumps(identity)):
        writer.abort()
        raise UserError("the interrupted build at --out used other settings, model or data; "
                        "run the build again without --resume.")
    return int(state["batches_done"])


def _projectors(loaded, writer, units, encodings, labels, config, progress, done) -> dict:
    from .gradients import fit_covariances, length_batches
    from .projection import from_arrays, pca_fits, pca_projector, random_projector, to_arrays

    if config.projection == "random":
        return {u.name: random_projector(u, config.proj_dim, config.seed) for u in units}
    if done:  # resuming: the eigenbasis was fitted and saved before the first batch
        saved = from_arrays(units, config.proj_dim, config.seed, writer.read_projection())
        return {p.unit.name: p for p in saved}
    sample = np.random.default_rng(config.seed).permutation(len(encodings))[: config.fit_examples]
    lengths = [len(encodings[i]["input_ids"]) for i in sample]
    batches = [[int(sample[j]) for j in b] for b in length_batches(lengths, config.batch_size)]
    fitted_count = [0]

    def on_batch(size):
        fitted_count[0] += size
        progress("fit", fitted_count[0], len(sample))

    covariances = fit_covariances(loaded, units, encodings, labels, batches, pca_fits, on_batch)
    projectors = [pca_projector(u, config.proj_dim, config.seed, covariances[u.name]) for u in units]
    writer.write_projection(to_arrays(projectors))
    return {p.unit.name: p for p in projectors}


def _example_rows(examples) -> list[dict]:
    rows = []
    for i, row in enumerate(examples.rows):
        entry = {"id": i, "text": examples.texts[i]}
        if examples.pairs is not None:
            entry["pair"] = examples.pairs[i]
        entry["label"] = examples.labels[i]
        entry.update({k: v for k, v in row.items() if k not in entry and k not in examples.used_columns})
        rows.append(entry)
    return rows


def _manifest(loaded, model_dir, train_file, examples, layers, projectors, dims, config,
              identity, seconds) -> dict:
    from .layers import group_layers

    n_blocks = 1 + max((u.block for us in layers.values() for u in us if u.block is not None), default=-1)
    layer_blocks = {name: us[0].block if len({u.block for u in us}) == 1 else None
                    for name, us in layers.items()}
    return {
        "format_version": FORMAT_VERSION,
        "lite_influence_version": __version__,
        "model": {"path": str(model_dir.resolve()), "fingerprint": identity["model"],
                  "task": loaded.task, "architecture": type(loaded.model).__name__},
        "tokenizer": str(model_dir.resolve()),
        "label_names": [loaded.model.config.id2label[i] for i in range(loaded.num_labels)],
        "n": len(examples),
        "metric": config.metric,
        "index_factory": config.index_factory,
        "seed": config.seed,
        "projection": config.projection,
        "proj_dim": config.proj_dim,
        "granularity": config.granularity,
        "n_blocks": n_blocks,
        "data": {"path": str(train_file.resolve()), "fingerprint": identity["data"],
                 "columns": examples.columns},
        "layers": [
            {"name": name, "dim": dims[name], "block": layer_blocks[name],
             "units": [{"name": u.name, "kind": u.kind, "role": u.role, "params": list(u.params),
                        "in_dim": u.in_dim, "out_dim": u.out_dim,
                        "k_in": projectors[u.name].inp.k, "k_out": projectors[u.name].out.k}
                       for u in us]}
            for name, us in layers.items()
        ],
        "groups": group_layers(layer_blocks, n_blocks),
        "build": config.to_dict(),
        "build_seconds": round(seconds, 3),
    }


class InfluenceIndex:
    """A built index: its manifest, layers and vectors; the model is loaded on first query."""

    def __init__(self, store: IndexStore):
        self.store = store

    @classmethod
    def open(cls, path: str | Path) -> "InfluenceIndex":
        return cls(IndexStore.open(path))

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def manifest(self) -> dict:
        return self.store.manifest

    @property
    def layers(self) -> list[str]:
        return self.store.layers

    @property
    def groups(self) -> dict[str, list[str]]:
        return self.manifest["groups"]

    def __len__(self) -> int:
        return self.store.n

    def vectors(self, layer: str, ids=None) -> np.ndarray:
        return self.store.vectors(layer, ids)

    @property
    def examples(self) -> list[dict]:
        return self.store.examples

