"""Building an index: the gradient pass over a training set into a store, resuming an
interrupted build, and the manifest that records what was built.

This is where the model side (torch) meets the store (FAISS) for writing; torch and
transformers are imported inside the functions, so importing this module stays light. The
build options are recorded once, as ``manifest["build"]`` (``BuildConfig.to_dict()``); the
top-level ``metric`` and ``index_factory`` are the store's own (it writes and searches FAISS
with them), and a resumed build must match the whole record (``IndexWriter.resume_point``).
A model folder with checkpoints (``train --checkpoints K``) is indexed at each one
(``tracin.py``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from . import __version__, checkpoints
from .config import BuildConfig
from .data import fingerprint_file, with_label_ids
from .errors import InputWarning, UserError
from .fitting import fit_projectors, make_projector, shared_projectors
from .shards import SHARD_ROWS, shard_manifest
from .store import FORMAT_VERSION, IndexStore, IndexWriter, resolve_factory

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def build_index(model: str | Path, train_file: str | Path, out: str | Path,
                config: BuildConfig | None = None, *, force: bool = False, resume: bool = False,
                progress: Progress | None = None, **options) -> "InfluenceIndex":
    """Index the projected per-layer gradients of every example of ``train_file``.

    ``options`` override fields of ``config`` (``build_index(m, f, o, proj_dim=16)``). Under
    torchrun (``WORLD_SIZE`` > 1) every rank builds its shard and rank 0 merges them into
    ``out`` (``distributed``).
    """
    config = replace(config or BuildConfig(), **options).validate()
    from .distributed import Cluster, build_distributed
    from .tracin import build_checkpoints, refuse_unsupported

    chosen = checkpoints.chosen(model, config.checkpoints)  # [] but for TracIn-CP (tracin.py)
    if chosen:
        refuse_unsupported(config)
    cluster = Cluster.from_env()
    if cluster is not None and config.shard is None:
        if chosen:
            raise UserError("a build over checkpoints runs in one process; drop torchrun, or pass --checkpoints last.")
        return build_distributed(cluster, model, train_file, out, config, force=force, resume=resume,
                                 progress=progress)
    progress = progress or (lambda stage, done, total: None)
    writer = IndexWriter(out, force=force, resume=resume, protect=[model, train_file])
    try:
        manifest = _build(Path(model), Path(train_file), writer, config, progress)
        if chosen:
            manifest = build_checkpoints(chosen, Path(train_file), writer, config, manifest, progress)
        path = writer.commit(manifest, lambda done, total: progress("faiss", done, total))
        progress("faiss", len(manifest["layers"]), len(manifest["layers"]))
        from .api import InfluenceIndex

        return InfluenceIndex(IndexStore(path, manifest))
    except KeyboardInterrupt:
        writer.close()  # the partial folder stays, for `build --resume`
        raise
    except BaseException:
        writer.abort()
        raise


class Prepared(NamedTuple):
    """What the gradient pass and the fitting pass start from."""
    loaded: object
    examples: object
    units: list
    layers: dict
    encodings: list


def prepare(model_dir: Path, train_file: Path, config: BuildConfig, progress: Progress) -> Prepared:
    """The rows read and checked, the model loaded, units chosen and the texts encoded."""
    from .layers import assign_layers, discover_units, select_units
    from .models import encode, folder_task, load_model
    from .tasks import task_of

    task = folder_task(model_dir, config.task)
    examples = _read(task_of(task), train_file, config) if task else None  # before the model's seconds
    progress("model", 0, 1)
    loaded = load_model(model_dir, task=config.task, num_labels=config.num_labels, seed=config.seed)
    progress("model", 1, 1)
    if examples is None or loaded.task != task:
        examples = _read(loaded.kind, train_file, config)
    examples = with_label_ids(examples, loaded.label2id, train_file, unnamed_hint=(
        "label the rows with class ids (0, 1, ...), or fine-tune first with `lite-influence train "
        "--label-names` so that the model knows the names."))
    units = select_units(discover_units(loaded.model), config.layers)
    layers = assign_layers(units, config.granularity)
    _warn_clamped(loaded, units, layers, config)
    encodings = encode(loaded, examples.texts, examples.pairs, config.max_length,
                       completions=examples.completions, source=f" of {train_file}")
    return Prepared(loaded, examples, units, layers, encodings)


def _build(model_dir: Path, train_file: Path, writer: IndexWriter, config: BuildConfig,
           progress: Progress) -> dict:
    from .gradients import length_batches
    from .models import model_fingerprint
    from .shards import shard_batches

    loaded, examples, units, layers, encodings = prepare(model_dir, train_file, config, progress)
    batches = length_batches([len(e["input_ids"]) for e in encodings], config.batch_size)
    identity = {"config": config.to_dict(), "model": model_fingerprint(model_dir),
                "data": fingerprint_file(train_file), "n": len(examples)}
    rows, batches = shard_batches(batches, config.shard_spec, len(examples))
    done = writer.resume_point(identity)
    projectors = _projectors(loaded, writer, units, encodings, examples.labels, config, progress, done,
                             identity["model"])
    encodings = [encodings[i] for i in rows]  # this shard's (all of them without --shard)
    labels = None if examples.labels is None else [examples.labels[i] for i in rows]
    dims = {name: sum(projectors[u.name].dim for u in members) for name, members in layers.items()}
    tokens = token_layers(layers, projectors)
    counts = np.array([len(np.unique(e["input_ids"])) for e in encodings], np.int64) if tokens else None
    matrices = {name: writer.token_file(name, counts, dims[name]) if name in tokens else
                writer.vector_file(name, len(rows), dims[name]) for name in layers}
    matrices[LOSS] = writer.loss_file(len(rows))
    exact = exact_norm_layers(layers)
    matrices.update({(NORMS, name): writer.exact_norms_file(name, len(rows)) for name in exact})
    ordered = [projectors[u.name] for u in units]
    started = time.perf_counter()
    _gradient_pass(loaded, ordered, layers, encodings, labels, batches, done, matrices,
                   lambda completed: writer.save_progress({**identity, "batches_done": completed}),
                   lambda completed: progress("gradients", sum(len(b) for b in batches[:completed]), len(rows)))
    table = _example_rows(examples)
    writer.write_examples([{**table[i], "id": j} for j, i in enumerate(rows)])
    if config.shard:
        writer.write_array(SHARD_ROWS, rows)
    entries = {name: int(counts.sum()) for name in tokens}
    manifest = _manifest(loaded, model_dir, train_file, examples, layers, projectors, dims, entries, config,
                         identity, time.perf_counter() - started)
    return shard_manifest(manifest, config, len(rows)) if config.shard else manifest


def token_layers(layers: dict, projectors: dict) -> set[str]:
    """Layers stored as exact token rows: those of the embeddings unit alone when its token
    side is exact (a layer is one unit's rows or a FAISS index, never a mix)."""
    return {name for name, members in layers.items()
            if len(members) == 1 and projectors[members[0].name].tokens_exact}


LOSS = object()  # the key of the per-example loss column among the layers' matrices
NORMS = "exact norms"  # (NORMS, layer): the key of a layer's exact gradient norms among the matrices


def exact_norm_layers(layers: dict) -> list[str]:
    """Layers whose exact gradient norms the hooks compute: all but a tied embeddings'
    (``gradients.ProjectedGradients``)."""
    return [name for name, units in layers.items() if not any(u.tied for u in units)]


def _batch_values(name, vectors, losses, squares):
    if name is LOSS:
        return losses
    if isinstance(name, tuple):
        return np.sqrt(squares[name[1]])
    return vectors[name]


def _read(kind, train_file: Path, config: BuildConfig):
    """The training rows, every column and text checked, labels as written (the model's
    label2id names them once it is loaded: ``data.with_label_ids``)."""
    return kind.read(train_file, text_col=config.text_col, pair_col=config.pair_col, label_col=config.label_col,
                     completion_col=config.completion_col, limit=config.limit, raw_labels=True)


def _warn_clamped(loaded, units, layers, config: BuildConfig) -> None:
    """--proj-dim wider than the model: kept at full width, said before the long passes."""
    from .projection import clamp_note, keeps_tokens

    hidden = getattr(loaded.model.config, "hidden_size", None)
    projected = [u for u in units if not keeps_tokens(u, config.token_dim)]  # --token-dim sizes those
    layers = {name: us for name, us in layers.items() if all(u in projected for u in us)}
    note = clamp_note(projected, layers, config.proj_dim, config.exact_max, hidden if isinstance(hidden, int) else None,
                      config.proj_dim_in)
    if note:
        warnings.warn(InputWarning(note), stacklevel=2)


def _gradient_pass(loaded, projectors, layers, encodings, labels, batches, done, matrices,
                   save, report, every: float = 1.0) -> None:
    """Fill the vector matrices batch by batch from batch ``done`` on. Progress reaches the
    disk at most once a second (an fsync per batch would dominate small models), after the
    vectors it counts, and at once on Ctrl-C, so `build --resume` loses at most a second of
    work after a kill -9 and nothing after an interrupt."""
    from .gradients import gradient_pass

    completed, saved_at = done, time.perf_counter()

    def checkpoint():
        for matrix in matrices.values():
            matrix.flush()
        save(completed)

    try:
        with gradient_pass(loaded, projectors, layers, summary=False) as run:  # frozen and hooked once
            for number in range(done, len(batches)):
                vectors, losses, _, squares = run(encodings, labels, batches[number])
                for name, matrix in matrices.items():
                    matrix[batches[number]] = _batch_values(name, vectors, losses, squares)
                completed = number + 1
                if time.perf_counter() - saved_at >= every or completed == len(batches):
                    checkpoint()
                    saved_at = time.perf_counter()
                report(completed)
    except KeyboardInterrupt:
        checkpoint()
        raise


def _projectors(loaded, writer, units, encodings, labels, config, progress, done, fingerprint) -> dict:
    """One projector per unit: shared (``--projection-from``), random, saved by the build
    being resumed, or fitted now (``fitting``); a fitted one is saved before the first batch."""
    from .projection import from_arrays, to_arrays

    if config.projection_from:
        projectors = shared_projectors(config.projection_from, units, config, fingerprint)
    elif config.projection == "random":
        return {u.name: make_projector(u, config) for u in units}
    elif done:  # resuming: the eigenbasis was fitted and saved before the first batch
        projectors = from_arrays(units, config.proj_dim, config.seed, writer.read_projection(), config.projection,
                                 exact_max=config.exact_max, token_dim=config.token_dim,
                                 proj_dim_in=config.proj_dim_in)
    else:
        projectors = fit_projectors(loaded, units, encodings, labels, config, progress)
    if not done:
        writer.write_projection(to_arrays(projectors))
    return {p.unit.name: p for p in projectors}


def _example_rows(examples) -> list[dict]:
    rows = []
    for i, row in enumerate(examples.rows):
        entry = {"id": i, "text": examples.texts[i]}
        if examples.pairs is not None:
            entry["pair"] = examples.pairs[i]
        if examples.completions is not None:
            entry["completion"] = examples.completions[i]
        else:
            entry["label"] = examples.labels[i]
        if "id" in row:  # the input's own key; ours is the row number
            entry["input_id"] = row["id"]
        entry.update({k: v for k, v in row.items() if k not in entry and k not in examples.used_columns})
        rows.append(entry)
    return rows


def _manifest(loaded, model_dir, train_file, examples, layers, projectors, dims, entries, config,
              identity, seconds) -> dict:
    from .layers import count_blocks, discover_units, group_layers

    n_blocks = count_blocks(discover_units(loaded.model))
    exact = set(exact_norm_layers(layers))
    layer_blocks = {name: us[0].block if len({u.block for u in us}) == 1 else None
                    for name, us in layers.items()}
    return {
        "format_version": FORMAT_VERSION,
        "lite_influence_version": __version__,
        "model": {"path": str(model_dir.resolve()), "fingerprint": identity["model"],
                  "task": loaded.task, "architecture": type(loaded.model).__name__,
                  **({"adapter": "lora", "base": str(Path(loaded.base).resolve())} if loaded.base else {})},
        "tokenizer": str(model_dir.resolve()),
        "label_names": [loaded.model.config.id2label[i] for i in range(loaded.num_labels)],
        "n": len(examples),
        "metric": config.metric,
        "index_factory": resolve_factory(config.index_factory, len(examples)),  # auto: by N
        "n_blocks": n_blocks,
        "data": {"path": str(train_file.resolve()), "fingerprint": identity["data"],
                 "columns": examples.columns},
        "layers": [
            {"name": name, "dim": dims[name], "block": layer_blocks[name],
             **({"kind": "tokens", "entries": entries[name]} if name in entries else {}),
             **({"exact_norms": True} if name in exact else {}),
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
