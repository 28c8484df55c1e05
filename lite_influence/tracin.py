"""An index over several checkpoints (TracIn-CP): built over a model trained with
``train --checkpoints K``, scored as the learning-rate-weighted sum of each checkpoint's influence.

Layout: the index at ``OUT`` is the model itself (the last checkpoint), exactly the index a
plain build of it gives, and each earlier checkpoint is a whole index of its own under it::

    OUT/manifest.json                 + "checkpoints": name, weight, lr, step, model, index of each
    OUT/checkpoints/checkpoint-1/     a plain index of MODEL/checkpoints/checkpoint-1
    OUT/checkpoints/checkpoint-2/ ...

Decisions, and why:

- Each checkpoint has its own projection, fitted on its own gradients (what a plain build of
  its folder fits): TracIn-CP sums inner products taken *within* each checkpoint, so no
  basis needs to be shared, an eigenbasis fitted on the checkpoint is the faithful one for
  its gradients, and ``--score curvature`` needs each checkpoint's own eigenbasis (EK-FAC
  per checkpoint). It costs one fitting pass per checkpoint (``--fit-examples`` rows). Every
  sub-index is then a plain index, queryable alone, equal to a plain build of its folder.
- The examples table is stored once per checkpoint (hard links where the index is staged):
  simpler than a shared table, and small next to the vectors.
- Score: per layer, ``sum_k w_k I_k(i, q) / sum_k w_k``, where ``I_k`` is the layer's influence
  at checkpoint k (the query's gradient taken with that checkpoint's model, at the label the
  model itself explains) and ``w_k`` the learning rate summed over the checkpoint's span
  (``checkpoints.py``). Divided by the weights' sum so a score keeps one checkpoint's scale;
  the rankings are those of the plain sum. With cosine each checkpoint's influence is
  normalised on its own (per-checkpoint cosine), then weighted; with ``--score curvature``
  each checkpoint divides by its own curvature. Aggregation over layers comes after the sum.
- Every example is scored exactly (no FAISS search: FAISS holds one checkpoint's rows), so a
  checkpoint index costs K gradient passes per query and K exact scans.
- The audit's baselines (training loss, self-influence) are the model's own (the top index).

Building: the model's own index is built as usual into the build's partial folder, then each
earlier checkpoint as a plain build into ``PARTIAL/checkpoints/NAME`` (each atomic and
resumable by itself); the commit stages them by hard links. A build resumed after a kill
keeps the checkpoints that were finished and resumes the one that stopped.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import checkpoints as model_checkpoints
from .errors import UserError

FOLDER = model_checkpoints.FOLDER  # OUT/checkpoints/NAME, as MODEL/checkpoints/NAME
_STORES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # store -> [(weight, store)]
_INDEXES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # index -> [InfluenceIndex]


# ---------------------------------------------------------------- building


def refuse_unsupported(config) -> None:
    """What a build over checkpoints does not do (yet): shards and a shared projection."""
    if config.shard is not None or config.projection_from:
        flag = "--shard" if config.shard is not None else "--projection-from"
        raise UserError(f"{flag} is not supported over checkpoints; build with --checkpoints last, "
                        "or build each checkpoint folder on its own.")


def build_checkpoints(chosen: list, train_file: Path, writer, config, manifest: dict, progress) -> dict:
    """Index each earlier checkpoint into the partial folder and return the model's manifest
    with the checkpoints recorded (the last entry is the model itself, index ".")."""
    from .build import build_index
    from .models import model_fingerprint
    from .store import IndexStore, is_index

    entries = []
    for number, checkpoint in enumerate(chosen[:-1], start=1):
        out = writer.partial / FOLDER / checkpoint.name
        done = is_index(out) and IndexStore.open(out).manifest["model"]["fingerprint"] == model_fingerprint(checkpoint.path)
        if not done:
            stage = f"checkpoint {number}/{len(chosen) - 1}: "
            build_index(checkpoint.path, train_file, out, config, force=True, resume=True,
                        progress=lambda name, d, t: progress(stage + name, d, t))
        entries.append(_entry(checkpoint, f"{FOLDER}/{checkpoint.name}"))
    entries.append(_entry(chosen[-1], "."))
    return {**manifest, "checkpoints": entries}


def _entry(checkpoint, index: str) -> dict:
    return {"name": checkpoint.name, "index": index, "model": checkpoint.relative, "weight": checkpoint.weight,
            "lr": checkpoint.lr, "step": checkpoint.step}


# ---------------------------------------------------------------- opening


def weighted_stores(store) -> list[tuple[float, object]]:
    """(weight, store) of each checkpoint, oldest first, the store itself last; [] for an
    index of one checkpoint. A missing checkpoint index is one line."""
    entries = store.manifest.get("checkpoints")
    if not entries:
        return []
    if store not in _STORES:
        from .store import IndexStore, is_index

        stores = []
        for entry in entries:
            folder = store.path / entry["index"]
            if entry["index"] != "." and not is_index(folder):
                raise UserError(f"checkpoint '{entry['name']}' of index '{store.path}' is missing ({folder}); "
                                "rebuild the index.")
            sub = store if entry["index"] == "." else IndexStore.open(folder)
            if sub.n != store.n:
                raise UserError(f"checkpoint '{entry['name']}' of index '{store.path}' holds {sub.n} examples, "
                                f"the index {store.n}; rebuild the index.")
            stores.append((float(entry["weight"]), sub))
        _STORES[store] = stores
    return _STORES[store]


# ---------------------------------------------------------------- queries' gradients


class CheckpointVectors:
    """A layer's query vectors at each checkpoint (arrays or token rows), oldest first."""

    def __init__(self, parts: list):
        self.parts = parts

    def subset(self, ids) -> "CheckpointVectors":
        return CheckpointVectors([p.subset(ids) if hasattr(p, "subset") else p[ids] for p in self.parts])

    def __len__(self) -> int:
        first = self.parts[-1]
        return first.n if hasattr(first, "n") else len(first)


def checkpoint_gradients(index, grads, texts, pairs, batch_size: int, max_new_tokens: int):
    """``grads`` (the model's own) with every layer's vectors at every checkpoint: each earlier
    checkpoint's gradients of the same queries at the same labels (or completions)."""
    if not index.manifest.get("checkpoints"):
        return grads
    earlier = [sub.gradients(texts, pairs, None if grads.completions is not None else [int(y) for y in grads.labels],
                             batch_size, completions=grads.completions, max_new_tokens=max_new_tokens)
               for sub in checkpoint_indexes(index)]
    vectors = {layer: CheckpointVectors([g.vectors[layer] for g in earlier] + [value])
               for layer, value in grads.vectors.items()}
    return replace(grads, vectors=vectors)


def checkpoint_indexes(index) -> list:
    """The earlier checkpoints as indexes, their models found beside the index's own model
    (so ``--model`` moves them too), opened once per index."""
    if index not in _INDEXES:
        from .api import InfluenceIndex

        model = Path(index._model_path or index.manifest["model"]["path"])
        entries = index.manifest["checkpoints"][:-1]
        _INDEXES[index] = [InfluenceIndex(sub, model / entry["model"])
                           for entry, (_, sub) in zip(entries, weighted_stores(index.store))]
    return _INDEXES[index]


# ---------------------------------------------------------------- scoring


class CombinedView:
    """A layer over every checkpoint, as lookup and audit score it: each checkpoint's own view
    (gradient or curvature) of its queries, weighted and summed (module docstring)."""

    kind = "checkpoints"

    def __init__(self, parts: list[tuple[float, object]]):
        self.parts = parts
        self.total = sum(weight for weight, _ in parts)

    def searchable(self, metric: str) -> bool:
        return False  # FAISS holds one checkpoint's rows: every example is scored exactly

    def rows(self, ids) -> CheckpointVectors:
        return CheckpointVectors([view.rows(ids) for _, view in self.parts])

    def prepare(self, queries: CheckpointVectors, metric: str) -> list:
        if not isinstance(queries, CheckpointVectors) or len(queries.parts) != len(self.parts):
            raise ValueError("a checkpoint index needs the queries' vectors at every checkpoint")
        return [view.prepare(part, metric) for (_, view), part in zip(self.parts, queries.parts)]

    def scores(self, prepared: list, metric: str) -> np.ndarray:
        total = None
        for (weight, view), queries in zip(self.parts, prepared):
            part = (weight / self.total) * np.asarray(view.scores(queries, metric), np.float64)
            total = part if total is None else total + part
        return total


def combined_view(store, layer: str, single) -> CombinedView | None:
    """The layer over every checkpoint (``single(store)``: one checkpoint's view), or None for
    an index of one checkpoint."""
    parts = weighted_stores(store)
    return CombinedView([(weight, single(sub)) for weight, sub in parts]) if parts else None
