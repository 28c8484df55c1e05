"""Where the model side (torch) meets the store (FAISS): build, and the index users query.

This is the only module that knows both. torch and transformers are imported inside the
functions that need them, so that opening an index, ``info`` and reading vectors start fast.

Causal LMs (``task`` causal-lm): training rows are prompt + completion (``data.load_lm_examples``),
``examples.jsonl`` stores ``text`` (the prompt) and ``completion`` and no label, and the
manifest has no label names. A query is a prompt with a completion; without one, the model's
greedy continuation (``max_new_tokens``) is what is explained, and the result says which
(``completion``, ``completion_source``: given or greedy). A query counts as "predicted
correctly" (``QueryGradients.correct``, the audit's -c variants) when the teacher-forced argmax
of every completion token is that token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .aggregate import AGGREGATIONS, aggregate
from .config import AuditConfig, BuildConfig, QueryConfig
from .data import fingerprint_file, load_examples, load_lm_examples
from .errors import UserError
from .store import FORMAT_VERSION, METRICS, IndexStore, IndexWriter, check_factory

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
    if config.exact_max < 0:
        raise UserError(f"--exact-max must be 0 or more, got {config.exact_max}")
    if config.limit is not None and config.limit < 1:
        raise UserError(f"--limit must be at least 1, got {config.limit}")
    check_factory(config.index_factory)


def build_index(model: str | Path, train_file: str | Path, out: str | Path,
                config: BuildConfig | None = None, *, force: bool = False, resume: bool = False,
                progress: Progress | None = None, **options) -> "InfluenceIndex":
    """Index the projected per-layer gradients of every example of ``train_file``.

    ``options`` override fields of ``config`` (``build_index(m, f, o, proj_dim=16)``).
    """
    config = replace(config or BuildConfig(), **options)
    _check(config)
    progress = progress or (lambda stage, done, total: None)
    writer = IndexWriter(out, force=force, resume=resume, protect=[model, train_file])
    try:
        manifest = _build(Path(model), Path(train_file), writer, config, progress)
        path = writer.commit(manifest, lambda done, total: progress("faiss", done, total))
        progress("faiss", len(manifest["layers"]), len(manifest["layers"]))
        return InfluenceIndex(IndexStore(path, manifest))
    except KeyboardInterrupt:
        writer.close()  # the partial folder stays, for `build --resume`
        raise
    except BaseException:
        writer.abort()
        raise


def _build(model_dir: Path, train_file: Path, writer: IndexWriter, config: BuildConfig,
           progress: Progress) -> dict:
    from .gradients import length_batches
    from .layers import assign_layers, discover_units, select_units
    from .models import encode, load_model, model_fingerprint

    loaded = load_model(model_dir, task=config.task, num_labels=config.num_labels, seed=config.seed)
    if loaded.task == "causal-lm":
        if config.pair_col is not None:
            raise UserError("a causal language model takes a prompt and a completion, not a text pair; "
                            "drop --pair-col and pass --completion-col.")
        examples = load_lm_examples(train_file, text_col=config.text_col, completion_col=config.completion_col,
                                    label_col=config.label_col, limit=config.limit)
    else:
        examples = load_examples(train_file, text_col=config.text_col, pair_col=config.pair_col,
                                 label_col=config.label_col, label2id=loaded.label2id, limit=config.limit)
    units = select_units(discover_units(loaded.model), config.layers)
    layers = assign_layers(units, config.granularity)
    encodings = encode(loaded, examples.texts, examples.pairs, config.max_length,
                       completions=examples.completions, source=f" of {train_file}")
    batches = length_batches([len(e["input_ids"]) for e in encodings], config.batch_size)
    identity = {"config": config.to_dict(), "model": model_fingerprint(model_dir),
                "data": fingerprint_file(train_file), "n": len(examples)}
    done = writer.resume_point(identity)
    projectors = _projectors(loaded, writer, units, encodings, examples.labels, config, progress, done)
    dims = {name: sum(projectors[u.name].dim for u in members) for name, members in layers.items()}
    matrices = {name: writer.vector_file(name, len(examples), dims[name]) for name in layers}
    ordered = [projectors[u.name] for u in units]
    started = time.perf_counter()
    _gradient_pass(loaded, ordered, layers, encodings, examples.labels, batches, done, matrices,
                   lambda completed: writer.save_progress({**identity, "batches_done": completed}),
                   lambda completed: progress("gradients", sum(len(b) for b in batches[:completed]), len(examples)))
    writer.write_examples(_example_rows(examples))
    return _manifest(loaded, model_dir, train_file, examples, layers, projectors, dims, config,
                     identity, time.perf_counter() - started)


def _gradient_pass(loaded, projectors, layers, encodings, labels, batches, done, matrices,
                   save, report, every: float = 1.0) -> None:
    """Fill the vector matrices batch by batch from batch ``done`` on. Progress reaches the
    disk at most once a second (an fsync per batch would dominate small models), after the
    vectors it counts, and at once on Ctrl-C, so `build --resume` loses at most a second of
    work after a kill -9 and nothing after an interrupt."""
    from .gradients import layer_vectors

    completed, saved_at = done, time.perf_counter()

    def checkpoint():
        for matrix in matrices.values():
            matrix.flush()
        save(completed)

    try:
        for number in range(done, len(batches)):
            vectors, _, _ = layer_vectors(loaded, projectors, layers, encodings, labels, batches[number])
            for name, matrix in matrices.items():
                matrix[batches[number]] = vectors[name]
            completed = number + 1
            if time.perf_counter() - saved_at >= every or completed == len(batches):
                checkpoint()
                saved_at = time.perf_counter()
            report(completed)
    except KeyboardInterrupt:
        checkpoint()
        raise


def _projectors(loaded, writer, units, encodings, labels, config, progress, done) -> dict:
    from .gradients import fit_covariances, length_batches
    from .projection import from_arrays, pca_fits, pca_projector, random_projector, to_arrays, unit_k

    if config.projection == "random":
        return {u.name: random_projector(u, unit_k(u, config.proj_dim, config.exact_max), config.seed)
                for u in units}
    if done:  # resuming: the eigenbasis was fitted and saved before the first batch
        saved = from_arrays(units, config.proj_dim, config.seed, writer.read_projection(), fitted=True,
                            exact_max=config.exact_max)
        return {p.unit.name: p for p in saved}
    sample = np.random.default_rng(config.seed).permutation(len(encodings))[: config.fit_examples]
    lengths = [len(encodings[i]["input_ids"]) for i in sample]
    batches = [[int(sample[j]) for j in b] for b in length_batches(lengths, config.batch_size)]
    fitted_count = [0]

    def on_batch(size):
        fitted_count[0] += size
        progress("fit", fitted_count[0], len(sample))

    covariances = fit_covariances(loaded, units, encodings, labels, batches, pca_fits, on_batch)
    projectors = [pca_projector(u, unit_k(u, config.proj_dim, config.exact_max), config.seed,
                                covariances[u.name]) for u in units]
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


def _manifest(loaded, model_dir, train_file, examples, layers, projectors, dims, config,
              identity, seconds) -> dict:
    from .layers import count_blocks, discover_units, group_layers

    n_blocks = count_blocks(discover_units(loaded.model))
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
    """A built index: manifest, layers and stored vectors; the model is loaded on first query.

    ``model`` points at the model folder when it moved since the build; its fingerprint must
    still match the one the index was built with.
    """

    def __init__(self, store: IndexStore, model: str | Path | None = None):
        self.store = store
        self._model_path = model
        self._session = None

    @classmethod
    def open(cls, path: str | Path, model: str | Path | None = None) -> "InfluenceIndex":
        return cls(IndexStore.open(path), model)

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

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.manifest["label_names"])}

    def __len__(self) -> int:
        return self.store.n

    def vectors(self, layer: str, ids=None) -> np.ndarray:
        return self.store.vectors(layer, ids)

    @property
    def examples(self) -> list[dict]:
        return self.store.examples

    def resolve_layers(self, spec: str) -> list[str]:
        """Layer names from a comma-separated list of group and layer names, in index order."""
        chosen: set[str] = set()
        for term in [t.strip() for t in spec.split(",") if t.strip()]:
            if term in self.groups:
                chosen.update(self.groups[term])
            elif term in self.layers:
                chosen.add(term)
            else:
                raise UserError(f"unknown layer or group '{term}'; groups: {', '.join(self.groups)}; "
                                f"layers: {', '.join(self.layers)}")
        if not chosen:
            raise UserError("no layers selected; pass e.g. --layers all")
        return [layer for layer in self.layers if layer in chosen]

    # -- the model side -------------------------------------------------------------------

    def _model(self):
        """Model, projectors and layers exactly as at build time (checked by fingerprint)."""
        if self._session is None:
            self._session = _load_session(self.manifest, self.store, self._model_path)
        return self._session

    @property
    def task(self) -> str:
        return self.manifest["model"].get("task", "classification")

    def gradients(self, texts: list[str], pairs: list[str] | None = None,
                  labels: list | None = None, batch_size: int = 16, *,
                  completions: list | None = None, max_new_tokens: int = 20) -> "QueryGradients":
        """Projected per-layer gradients of queries, with the index's model and projection.

        A label of None means the model's predicted label (what "why did it say this?" asks).
        Causal LM: ``texts`` are prompts, ``completions`` their completions; a completion of
        None means the model's greedy continuation of up to ``max_new_tokens`` tokens.
        """
        from .data import label_id
        from .gradients import layer_vectors, length_batches
        from .models import encode, predict

        loaded, projectors, layers = self._model()
        build = BuildConfig.from_dict(self.manifest["build"])
        if self.task == "causal-lm":
            return self._lm_gradients(loaded, projectors, layers, build, texts, completions,
                                      batch_size, max_new_tokens)
        encodings = encode(loaded, texts, pairs, build.max_length)
        given = labels or [None] * len(texts)
        predicted = predict(loaded, encodings, batch_size)
        used = [int(predicted[i]) if value is None else label_id(value, self.label2id, where=f" of query {i + 1}")
                for i, value in enumerate(given)]
        vectors = {name: np.zeros((len(texts), self.store.layer_info(name)["dim"]), np.float32) for name in layers}
        losses = np.zeros(len(texts))
        logits = np.zeros((len(texts), len(self.label2id)))
        for batch in length_batches([len(e["input_ids"]) for e in encodings], batch_size):
            batch_vectors, batch_losses, batch_logits = layer_vectors(loaded, projectors, layers, encodings, used, batch)
            for name in layers:
                vectors[name][batch] = batch_vectors[name]
            losses[batch], logits[batch] = batch_losses, batch_logits
        return QueryGradients(vectors, np.array(used), predicted, losses, logits)

    def _lm_gradients(self, loaded, projectors, layers, build, texts, completions, batch_size,
                      max_new_tokens) -> "QueryGradients":
        from .gradients import layer_vectors, length_batches
        from .models import encode, greedy_completions

        given = list(completions) if completions is not None else [None] * len(texts)
        if len(given) != len(texts):
            raise UserError(f"{len(texts)} prompts but {len(given)} completions; give one completion per prompt.")
        missing = [i for i, c in enumerate(given) if c is None]
        generated = greedy_completions(loaded, [texts[i] for i in missing], max_new_tokens, build.max_length)
        for i, ids in zip(missing, generated):
            given[i] = ids
        encodings = encode(loaded, texts, None, build.max_length, completions=given,
                           source="" if len(texts) == 1 else " of the queries")
        vectors = {name: np.zeros((len(texts), self.store.layer_info(name)["dim"]), np.float32) for name in layers}
        losses, tokens = np.zeros(len(texts)), np.zeros((len(texts), 2), np.int64)
        for batch in length_batches([len(e["input_ids"]) for e in encodings], batch_size):
            batch_vectors, batch_losses, batch_tokens = layer_vectors(loaded, projectors, layers, encodings, None, batch)
            for name in layers:
                vectors[name][batch] = batch_vectors[name]
            losses[batch], tokens[batch] = batch_losses, batch_tokens
        texts_used = [c if isinstance(c, str) else loaded.tokenizer.decode(c) for c in given]
        sources = ["greedy" if i in set(missing) else "given" for i in range(len(texts))]
        none = np.full(len(texts), -1)
        return QueryGradients(vectors, none, none, losses, np.zeros((len(texts), 0)),
                              completions=texts_used, completion_sources=sources, tokens=tokens)

    # -- lookup ---------------------------------------------------------------------------

    def query(self, text: str | list[str], pair: str | list[str] | None = None, label=None,
              config: QueryConfig | None = None, *, completion: str | list | None = None, **options) -> dict:
        """Top-k proponents and opponents of one query (or of several, aggregated together).

        A row's ``score`` is its aggregate: votes (vote), mean rank (rank) or mean influence
        (mean: positive for proponents, negative for opponents); ``per_layer`` holds each
        layer's influence, averaged over the queries. Causal LM: ``text`` is the prompt and
        ``completion`` what to explain (None: the model's greedy continuation, reported in
        ``query["completion"]``).
        """
        config = replace(config or QueryConfig(), **options)
        if config.agg not in AGGREGATIONS:
            raise UserError(f"unknown aggregation '{config.agg}'; use one of {', '.join(AGGREGATIONS)}")
        if config.k < 1:
            raise UserError(f"-k must be at least 1, got {config.k}")
        texts = [text] if isinstance(text, str) else list(text)
        pairs = [pair] if isinstance(pair, str) else pair
        labels = label if isinstance(label, list) else [label] * len(texts)
        layers = self.resolve_layers(config.layers)
        k = min(config.k, len(self))
        if self.task == "causal-lm":
            completions = [completion] * len(texts) if not isinstance(completion, list) else completion
            grads = self.gradients(texts, batch_size=config.batch_size, completions=completions,
                                   max_new_tokens=config.max_new_tokens)
        else:
            grads = self.gradients(texts, pairs, labels, config.batch_size)
        queries = [self._describe_query(grads, i, texts, pairs) for i in range(len(texts))]
        result = {"query": queries[0], "queries": queries, "prediction": queries[0]["prediction"],
                  "agg": config.agg, "metric": self.store.metric, "layers": layers, "k": k,
                  "k_clamped": config.k > len(self)}
        for side, sign in (("proponents", 1.0), ("opponents", -1.0)):
            result[side] = self._lookup(grads.vectors, layers, sign, k, config.agg)
        return result

    def _describe_query(self, grads, i, texts, pairs) -> dict:
        if grads.completions is not None:
            n, hits = (int(x) for x in grads.tokens[i])
            return {"text": texts[i], "pair": None, "completion": grads.completions[i],
                    "completion_source": grads.completion_sources[i], "completion_tokens": n,
                    "argmax_matches": hits, "label": None, "label_name": None,
                    "loss": float(grads.losses[i]), "prediction": None}
        names = self.manifest["label_names"]
        probabilities = np.exp(grads.logits[i] - grads.logits[i].max())
        probabilities /= probabilities.sum()
        return {"text": texts[i], "pair": pairs[i] if pairs else None,
                "label": int(grads.labels[i]), "label_name": names[grads.labels[i]],
                "loss": float(grads.losses[i]),
                "prediction": {"label": int(grads.predicted[i]), "label_name": names[grads.predicted[i]],
                               "probability": float(probabilities[grads.predicted[i]])}}

    def _lookup(self, vectors: dict, layers: list[str], sign: float, k: int, agg: str) -> list[dict]:
        lists, found_in = [], {}
        for layer in layers:
            _, ids = self.store.search(layer, sign * vectors[layer], k)
            for row in ids:
                row = row[row >= 0]
                lists.append(row)
                for i in row:  # several queries may retrieve the same example in one layer
                    seen = found_in.setdefault(int(i), [])
                    seen.extend([layer] if layer not in seen else [])
        candidates = np.array(sorted(found_in), dtype=np.int64)
        exact = {layer: sign * self.store.vectors(layer, candidates) @ self.store.prepare_queries(vectors[layer]).T
                 for layer in layers}  # (candidates, queries) per layer
        if agg == "mean":
            ids, values = aggregate("mean", scores=np.concatenate([s.T for s in exact.values()]))
            ids, values = candidates[ids], sign * values  # the mean influence: < 0 for opponents
        else:
            p = min(1.0, k / len(self)) if agg == "vote" else 0.2
            ids, values = aggregate(agg, lists=lists, n=len(self), p=p)
            keep = np.isin(ids, candidates)
            ids, values = ids[keep], values[keep]
        position = {int(c): j for j, c in enumerate(candidates)}
        rows = []
        for i, value in zip(ids[:k], values[:k]):
            example = self.examples[int(i)]
            j = position[int(i)]
            rows.append({"id": int(i), "score": float(value), "label": example.get("label"),
                         "text": example.get("text"), "pair": example.get("pair"),
                         **({"completion": example["completion"]} if "completion" in example else {}),
                         "per_layer": {layer: float(sign * exact[layer][j].mean()) for layer in layers},
                         "retrieved_in": found_in[int(i)],
                         "extra": {key: v for key, v in example.items()
                                   if key not in ("id", "text", "pair", "label", "completion")}})
        return rows

    # -- audit ----------------------------------------------------------------------------

    def audit(self, queries: str | Path, config: AuditConfig | None = None,
              progress: Progress | None = None, **options) -> "AuditResult":
        """Rank every training example from most to least detrimental to the queries, per
        layer and group and aggregation, and score each ranking with NDR when noise is known."""
        from .audit import run_audit

        config = replace(config or AuditConfig(), **options)
        return run_audit(self, queries, config, progress or (lambda stage, done, total: None))


@dataclass
class QueryGradients:
    vectors: dict[str, np.ndarray]  # layer -> (queries, dim), raw (not normalised)
    labels: np.ndarray  # the labels the gradients are of
    predicted: np.ndarray
    losses: np.ndarray
    logits: np.ndarray
    completions: list[str] | None = None  # causal LM: the completion each gradient is of
    completion_sources: list[str] | None = None  # "given" or "greedy"
    tokens: np.ndarray | None = None  # causal LM: (completion tokens, teacher-forced argmax hits)

    @property
    def correct(self) -> np.ndarray:
        if self.tokens is not None:
            return self.tokens[:, 1] == self.tokens[:, 0]
        return self.labels == self.predicted


def _load_session(manifest: dict, store: IndexStore, model_path):
    from .layers import discover_units
    from .models import is_model_folder, load_model, model_fingerprint
    from .projection import from_arrays

    path = Path(model_path or manifest["model"]["path"])
    if not is_model_folder(path):
        raise UserError(f"the index's model folder '{path}' is missing (moved or deleted?); pass "
                        "--model with its new location.")
    if model_fingerprint(path) != manifest["model"]["fingerprint"]:
        raise UserError(f"the model at '{path}' is not the one this index was built with "
                        "(fingerprint mismatch); rebuild the index, or pass --model with the original model folder.")
    build = BuildConfig.from_dict({"exact_max": 0, **manifest["build"]})  # indexes before exact_max
    loaded = load_model(path, task=manifest["model"].get("task"), num_labels=build.num_labels, seed=build.seed)
    by_name = {u.name: u for u in discover_units(loaded.model)}
    layers = {}
    for layer in manifest["layers"]:
        try:
            layers[layer["name"]] = [by_name[u["name"]] for u in layer["units"]]
        except KeyError as exc:
            raise UserError(f"the model has no unit {exc}; it is not the model of this index.") from exc
    units = [u for us in layers.values() for u in us]
    projectors = from_arrays(units, build.proj_dim, build.seed, store.projection_arrays(),
                             fitted=build.projection == "pca", exact_max=build.exact_max)
    dims = {p.unit.name: p.dim for p in projectors}
    for layer in manifest["layers"]:
        if sum(dims[u["name"]] for u in layer["units"]) != layer["dim"]:
            raise UserError(f"{store.path / 'manifest.json'} says layer {layer['name']} has dim "
                            f"{layer['dim']}, its projection gives {sum(dims[u['name']] for u in layer['units'])}; "
                            "the manifest was edited or damaged: rebuild the index.")
    return loaded, projectors, layers
