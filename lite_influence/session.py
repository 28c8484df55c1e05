"""An index's model side at query time: the model, projectors and layers exactly as they
were at build time, and the projected gradients of queries.

It exists apart from the store so that opening an index, ``info`` and reading vectors never
touch torch: a session is made only when a query needs gradients. Loading verifies the
model against the index's fingerprint and every layer's dim against its projection, so a
moved, retrained or edited model is one clear error instead of silently wrong influences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import BuildConfig
from .errors import UserError
from .store.token_rows import TokenRows
from .tasks import QueryGradients, task_of


class Session:
    """``loaded`` (models.LoadedModel), ``projectors`` (build order), ``layers`` (name ->
    units) and ``task`` of an index; ``gradients`` gives the projected query vectors."""

    def __init__(self, manifest: dict, store, model_path: str | Path | None = None):
        from .models import load_model

        self.manifest = manifest
        # indexes from before exact_max and token_dim were built without them
        self.build = BuildConfig.from_dict({"exact_max": 0, "token_dim": 0, **manifest["build"]})
        self.task = task_of(manifest["model"].get("task"))
        path = _verified_model_path(manifest, model_path)
        self.loaded = load_model(path, task=self.task.name, num_labels=self.build.num_labels, seed=self.build.seed)
        self.layers = _layers(manifest, self.loaded.model)
        self.projectors = _projectors(manifest, store, self.layers, self.build)
        self.label2id = {name: i for i, name in enumerate(manifest["label_names"])}

    @property
    def max_length(self) -> int:
        return self.build.max_length

    def gradients(self, texts, pairs=None, labels=None, batch_size: int = 16, *,
                  completions=None, max_new_tokens: int = 20) -> QueryGradients:
        """Projected per-layer gradients of queries (see ``InfluenceIndex.gradients``)."""
        return self.task.query_gradients(self, texts, pairs, labels, completions, batch_size, max_new_tokens)

    def run(self, encodings: list[dict], targets, batch_size: int):
        """Vectors (layer -> (n, dim)), losses and output summaries of encoded examples, in
        length batches: one forward and one backward pass per batch."""
        from .gradients import layer_vectors, length_batches

        n = len(encodings)
        unit_dims = {p.unit.name: p.dim for p in self.projectors}
        dims = {name: sum(unit_dims[u.name] for u in units) for name, units in self.layers.items()}
        vectors = {name: np.zeros((n, dim), np.float32) for name, dim in dims.items()}
        token_rows = {}  # layer -> per example (tokens, values), for exact token rows
        losses, summaries = np.zeros(n), None
        for batch in length_batches([len(e["input_ids"]) for e in encodings], batch_size):
            batch_vectors, batch_losses, batch_summary, _ = layer_vectors(
                self.loaded, self.projectors, self.layers, encodings, targets, batch, norms=False)
            for name in self.layers:
                if isinstance(batch_vectors[name], np.ndarray):
                    vectors[name][batch] = batch_vectors[name]
                else:
                    rows = token_rows.setdefault(name, [None] * n)
                    for j, i in enumerate(batch):
                        rows[i] = batch_vectors[name].row(j)
            if summaries is None:
                kind = np.float64 if batch_summary.dtype.kind == "f" else np.int64  # as before the split
                summaries = np.zeros((n, batch_summary.shape[1]), kind)
            losses[batch], summaries[batch] = batch_losses, batch_summary
        for name, rows in token_rows.items():
            vectors[name] = TokenRows.from_lists(rows, dims[name])
        return vectors, losses, summaries


def _verified_model_path(manifest: dict, model_path) -> Path:
    from .models import fingerprint_matches, is_model_folder

    path = Path(model_path or manifest["model"]["path"])
    if not is_model_folder(path):
        raise UserError(f"the index's model folder '{path}' is missing (moved or deleted?); pass "
                        "--model with its new location.")
    if not fingerprint_matches(path, manifest["model"]["fingerprint"]):
        raise UserError(f"the model at '{path}' is not the one this index was built with "
                        "(fingerprint mismatch); rebuild the index, or pass --model with the original model folder.")
    return path


def _layers(manifest: dict, model) -> dict:
    from .layers import discover_units

    by_name = {u.name: u for u in discover_units(model)}
    try:
        return {layer["name"]: [by_name[u["name"]] for u in layer["units"]] for layer in manifest["layers"]}
    except KeyError as exc:
        raise UserError(f"the model has no unit {exc}; it is not the model of this index.") from exc


def _projectors(manifest: dict, store, layers: dict, build: BuildConfig) -> list:
    from .projection import from_arrays

    units = [u for us in layers.values() for u in us]
    projectors = from_arrays(units, build.proj_dim, build.seed, store.projection_arrays(), build.projection,
                             exact_max=build.exact_max, token_dim=build.token_dim, proj_dim_in=build.proj_dim_in)
    dims = {p.unit.name: p.dim for p in projectors}
    for layer in manifest["layers"]:
        dim = sum(dims[u["name"]] for u in layer["units"])
        if dim != layer["dim"]:
            raise UserError(f"{store.path / 'manifest.json'} says layer {layer['name']} has dim "
                            f"{layer['dim']}, its projection gives {dim}; "
                            "the manifest was edited or damaged: rebuild the index.")
    return projectors
