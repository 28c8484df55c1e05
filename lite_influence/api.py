"""The public facade: ``build_index`` and ``InfluenceIndex``, what ``from lite_influence
import ...`` gives. Each idea behind it has its own module: building (build.py), the model
side of an open index (session.py), search and exact rescoring (lookup.py), the dataset
audit (audit.py), each model kind's reading, loss and prediction (tasks.py). This module only
wires them together; torch and transformers are imported by those modules when needed.

Causal LMs (``task`` causal-lm): ``examples.jsonl`` stores ``text`` (the prompt) and
``completion`` and no label; a query is a prompt with a completion, or the model's greedy
continuation (``max_new_tokens``) when none is given, and the result says which
(``completion``, ``completion_source``: given or greedy).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .build import Progress, build_index  # noqa: F401 (public)
from .config import AuditConfig, QueryConfig
from .errors import UserError
from .store import IndexStore
from .tasks import QueryGradients, task_of  # noqa: F401 (public)


class InfluenceIndex:
    """A built index: manifest, layers and stored vectors; the model is loaded on first query.

    ``model`` points at the model folder when it moved since the build; its fingerprint must
    still match the one the index was built with.
    """

    def __init__(self, store: IndexStore, model: str | Path | None = None):
        self.store = store
        self._model_path = model
        self._session = None
        self.progress: Progress | None = None  # hears stage "model" around the model's loading (the CLI's spinner)

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

    @property
    def task(self) -> str:
        return self.manifest["model"].get("task", "classification")

    @property
    def kind(self):
        """The index's Task (tasks.py): how its rows are read and its queries described."""
        return task_of(self.task)

    def session(self):
        """Model, projectors and layers exactly as at build time (checked by fingerprint)."""
        if self._session is None:
            from .session import Session

            report = self.progress or (lambda stage, done, total: None)
            report("model", 0, 1)
            self._session = Session(self.manifest, self.store, self._model_path)
            report("model", 1, 1)
        return self._session

    def gradients(self, texts: list[str], pairs: list[str] | None = None,
                  labels: list | None = None, batch_size: int = 16, *,
                  completions: list | None = None, max_new_tokens: int = 20) -> QueryGradients:
        """Projected per-layer gradients of queries, with the index's model and projection.

        A label of None means the model's predicted label (what "why did it say this?" asks),
        taken from the same forward pass as the gradient. Causal LM: ``texts`` are prompts,
        ``completions`` their completions; a completion of None means the model's greedy
        continuation of up to ``max_new_tokens`` tokens.
        """
        from .tracin import checkpoint_gradients

        grads = self.session().gradients(texts, pairs, labels, batch_size, completions=completions,
                                         max_new_tokens=max_new_tokens)
        return checkpoint_gradients(self, grads, texts, pairs, batch_size, max_new_tokens)

    def query(self, text: str | list[str], pair: str | list[str] | None = None, label=None,
              config: QueryConfig | None = None, *, completion: str | list | None = None, **options) -> dict:
        """Top-k proponents and opponents of one query (or of several, aggregated together;
        ``query_each`` answers each on its own).

        A row's ``score`` is its aggregate: votes (vote), mean rank (rank) or mean influence
        (mean: positive for proponents, negative for opponents); ``per_layer`` holds each
        layer's influence, averaged over the queries. Causal LM: ``text`` is the prompt and
        ``completion`` what to explain (None: the model's greedy continuation, reported in
        ``query["completion"]``).
        """
        config = replace(config or QueryConfig(), **options).validate()
        queries, vectors, layers, warning = self._explained(text, pair, label, completion, config)
        return self._answer(queries, vectors, layers, config, warning)

    def query_each(self, texts: list[str], pairs: list[str] | None = None, labels: list | None = None,
                   config: QueryConfig | None = None, *, completions: list | None = None, **options) -> list[dict]:
        """One result per query, as ``query`` gives for it alone; the gradients of all of them
        come from one batched pass. The chance warning is about the whole set of queries."""
        config = replace(config or QueryConfig(), **options).validate()
        queries, vectors, layers, warning = self._explained(list(texts), pairs, labels or [None] * len(texts),
                                                            completions, config)
        return [self._answer([q], _one_query(vectors, i), layers, config, warning) for i, q in enumerate(queries)]

    def _explained(self, text, pair, label, completion, config: QueryConfig):
        """The queries described, their vectors, the layers asked for and the chance warning."""
        from .audit import chance_warning

        texts = [text] if isinstance(text, str) else list(text)
        pairs = [pair] if isinstance(pair, str) else pair
        labels = label if isinstance(label, list) else [label] * len(texts)
        completions = completion if isinstance(completion, list) else [completion] * len(texts)
        _check_texts(texts, pairs, self.manifest["build"])
        layers = self.resolve_layers(config.layers)
        grads = self.gradients(texts, pairs, labels, config.batch_size, completions=completions,
                               max_new_tokens=config.max_new_tokens)
        names = self.manifest["label_names"]
        queries = [self.kind.describe(grads, i, texts, pairs, names) for i in range(len(texts))]
        for query, given in zip(queries, labels):
            if query.get("label") is not None:  # which label is explained, and where it came from
                query["label_source"] = "given" if given is not None else "prediction"
        return queries, grads.vectors, layers, chance_warning(grads, [value is not None for value in labels])

    def query_ids(self, ids: list[int], config: QueryConfig | None = None, **options) -> dict:
        """Proponents and opponents of training examples, from their stored vectors: no model
        is loaded, so it answers at once. Each example's own vector is its query (with cosine it
        heads its own proponents); the rows are those of ``query``, aggregated over the ids."""
        config = replace(config or QueryConfig(), **options).validate()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if not ids or bad:
            raise UserError(f"--id must name training examples 0..{len(self) - 1}; got {bad or 'none'}.")
        layers = self.resolve_layers(config.layers)
        from .curvature import layer_view

        vectors = {layer: layer_view(self.store, layer).rows(ids) for layer in layers}  # every checkpoint's
        losses = self.store.losses()
        rows = {i: self.store.table[i] for i in ids}
        queries = [{"id": i, "text": rows[i].get("text"), "pair": rows[i].get("pair"),
                    "label": rows[i].get("label"), "prediction": None,
                    "loss": None if losses is None else float(losses[i])} for i in ids]
        return self._answer(queries, vectors, layers, config, None)

    def _answer(self, queries: list[dict], vectors: dict, layers: list[str], config: QueryConfig,
                warning: str | None) -> dict:
        """The result of ``query`` and ``query_ids``: the queries described, then the top-k
        proponents and opponents of their vectors over ``layers``."""
        from .lookup import answer_sides

        k = min(config.k, len(self))
        metric = self.store.check_metric(config.metric)
        result = {"query": queries[0], "queries": queries, "prediction": queries[0]["prediction"],
                  "agg": config.agg, "metric": metric, "score": config.score,
                  **({"damping": config.damping} if config.score == "curvature" else {}), "layers": layers, "k": k,
                  "k_clamped": config.k > len(self), "warning": warning}
        candidates, sides = answer_sides(self.store, vectors, layers, metric, k, config.agg, config.vote_p,
                                         config.score, config.damping)
        if candidates is not None:  # an ANN index: say what was ranked (lookup.py)
            result.update(approximate=self.store.manifest["index_factory"], candidates=len(candidates))
        return {**result, **sides}

    def audit(self, queries: str | Path, config: AuditConfig | None = None,
              progress: Progress | None = None, **options):
        """Rank every training example from most to least detrimental to the queries, per
        layer and group and aggregation, and score each ranking with NDR when noise is known
        (an ``audit.AuditResult``)."""
        from .audit import run_audit

        config = replace(config or AuditConfig(), **options).validate()
        return run_audit(self, queries, config, progress or (lambda stage, done, total: None))


def _one_query(vectors: dict, i: int) -> dict:
    """Query i's vectors of every layer (a row, or its token rows)."""
    return {layer: v.subset([i]) if hasattr(v, "subset") else v[i : i + 1] for layer, v in vectors.items()}


def _check_texts(texts: list, pairs, build: dict) -> None:
    """What the build refused, the query refuses too: a blank text has no gradient worth
    explaining, and a pair given to a single-text index would be silently ignored."""
    for number, text in enumerate(texts, start=1):
        if not isinstance(text, str) or not text.strip():
            where = "the query text" if len(texts) == 1 else f"query {number}'s text"
            raise UserError(f"{where} is blank; give a text to explain (build refuses blank texts too).")
    if pairs is not None and any(p is not None for p in pairs) and build.get("pair_col") is None:
        raise UserError("this index was built on single texts (no --pair-col): drop --pair, or rebuild with --pair-col.")
