"""The dataset audit: every training example ranked from most to least detrimental to an
influence set of clean, labelled queries, per layer, per group and per aggregation, with the
Noise Detection Rate of each ranking when some labels are known to be wrong.

An example is detrimental to a query when its influence is negative (an opponent: a step on
it raises the query's loss). Each (layer, query) pair ranks the training set by influence,
most negative first. How the lists are obtained, per aggregation:

* ``vote``: a FAISS search of depth ceil(p N) with -phi, the nearest opponents; exact, as
  only that prefix of each list votes;
* ``rank`` and ``mean``: full scores against every stored vector (exact for a Flat index,
  from reconstructed vectors otherwise), so ranks are never truncated.

Lists are pre-aggregated per layer (each layer sees the same queries), so every group's
ranking is a cheap combination of its layers' sums. This module drives the index through its
public methods and imports neither torch nor faiss itself; its nearest opponents come from
``lookup.nearest``, the routine behind ``query`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ndr
from .aggregate import mean_ranks, order, vote_depth, votes
from .config import truthy
from .data import write_rows
from .errors import UserError
from .chance import check_chance
from .curvature import layer_view
from .lookup import nearest


@dataclass
class AuditResult:
    """``table``: one row per (scope, aggregation, query subset) with NDR figures;
    ``rankings``: the full ranking (ids, most detrimental first) and scores of each row."""

    n: int
    n_queries: int
    n_correct: int
    noisy: np.ndarray | None
    levels: tuple[float, ...]
    table: list[dict] = field(default_factory=list)
    rankings: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    cancellation: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warning: str | None = None  # the model is at chance on the queries (chance.py)
    metric: str = "cosine"  # what the influence rows compared
    score: str = "gradient"  # and how (curvature.py)
    headline: dict = field(default_factory=dict)  # correct_only and fuse_weight: which rows the headline shows (headline_rows())

    @property
    def ranking(self) -> np.ndarray:
        """The headline's influence ranking: all layers (else the first scope), the first
        aggregation, the correctly predicted queries with --correct-only (else all)."""
        return self.rankings[self.headline_key][0]

    @property
    def headline_key(self) -> tuple[str, str, str]:
        scope, agg = self.table[0]["scope"], self.table[0]["agg"].removesuffix("-c")
        scope = "all" if ("all", agg, "all") in self.rankings else scope
        subset = "correct" if self.headline.get("correct_only") and (scope, agg, "correct") in self.rankings else "all"
        return scope, agg, subset

    def headline_rows(self) -> list[tuple[str, dict]]:
        """The default's answer first (influence fused with the loss when --fuse-weight > 0,
        the setting chosen on SST-2: README, Auditing), then the influence row alone and the
        baselines it must beat: (name, NDR figures) each; empty without known noise."""
        if self.noisy is None or not self.table:
            return []
        scope, agg, subset = self.headline_key
        row = next(r for r in self.table if r["scope"] == scope and r["agg"] == agg + ("-c" if subset == "correct" else ""))
        keys = [ndr.level_key(p) for p in self.levels] + ["auc_ndr"]
        influence = (f"influence ({scope}, {row['agg']}, {self.metric}, {self.score})", {k: row[k] for k in keys})
        rows = [influence]
        if "influence + loss" in self.baselines:
            rows.insert(0, (f"influence + loss (weight {self.headline.get('fuse_weight', 0.5):g})",
                            self.baselines["influence + loss"]))
        return rows + [(name, self.baselines[name]) for name in ("training loss", "self-influence", "random", "perfect")
                       if name in self.baselines]

    def best(self) -> dict | None:
        scored = [row for row in self.table if "auc_ndr" in row]
        return max(scored, key=lambda row: row["auc_ndr"]) if scored else None

    def to_json(self) -> dict:
        return {"n": self.n, "n_queries": self.n_queries, "n_correct": self.n_correct,
                "n_noisy": None if self.noisy is None else int(self.noisy.sum()),
                "levels": list(self.levels), "table": self.table, "baselines": self.baselines,
                "cancellation": self.cancellation, "notes": self.notes,
                "warning": self.warning, "score": self.score,
                "headline": self.headline_json()}

    def headline_json(self) -> dict:
        """The headline's setting and rows (the default's answer first) for --json."""
        if not self.table:
            return {}
        scope, agg, subset = self.headline_key
        return {"scope": scope, "agg": agg, "subset": subset, "metric": self.metric, "score": self.score,
                "fuse_weight": self.headline.get("fuse_weight"),
                "rows": [{"name": name, **values} for name, values in self.headline_rows()]}

    def saved(self, examples: list[dict], top: int = 200, points: int = 200) -> dict:
        """What ``audit --save`` keeps beside the index for the server's page: the table and
        baselines (``to_json``), the headline ranking's first ``top`` rows with their noise
        flags, and each group's detection curve at ``points`` points (first aggregation)."""
        out = {**self.to_json(), "metric": self.metric}
        agg = self.table[0]["agg"].removesuffix("-c") if self.table else None
        ids = self.ranking if self.table else np.zeros(0, int)
        out["ranking"] = {"agg": agg, "rows": [
            {"rank": r, "id": int(i), "label": examples[int(i)].get("label"), "text": examples[int(i)].get("text"),
             "noisy": None if self.noisy is None else bool(self.noisy[int(i)])} for r, i in enumerate(ids[:top])]}
        if self.noisy is not None and agg:
            at = np.unique(np.linspace(0, self.n - 1, min(points, self.n)).round().astype(int))
            out["curves"] = {"x": ((at + 1) / self.n).tolist(), "groups": {
                row["scope"]: ndr.detection_curve(self.rankings[(row["scope"], agg, "all")][0], self.noisy)[at].tolist()
                for row in self.table if row["kind"] == "group" and row["agg"] == agg}}
        return out

    def export(self, path: str | Path, examples: list[dict], scope: str | None = None,
               agg: str | None = None, subset: str | None = None) -> Path:
        """The full ranking as a table: id, score, rank, text, label, noise flag. Without a
        scope, aggregation or subset: the headline's answer (influence + loss when the loss
        is known, else the headline influence ranking); otherwise that row (default all
        layers, the first aggregation, all queries)."""
        if scope is None and agg is None and subset is None:
            fused = ("influence + loss", "baseline", "all")
            scope, agg, subset = fused if fused in self.rankings else self.headline_key
        scope, agg, subset = scope or "all", agg or self.table[0]["agg"], subset or "all"
        if (scope, agg, subset) not in self.rankings:
            raise UserError(f"no ranking for scope '{scope}' and aggregation '{agg}' in this audit.")
        ids, scores = self.rankings[(scope, agg, subset)]
        rows = [{"rank": r, "id": int(i), "score": float(s), "label": examples[i].get("label"),
                 "noisy": None if self.noisy is None else int(self.noisy[i]), "text": examples[i].get("text")}
                for r, (i, s) in enumerate(zip(ids, scores))]
        return write_rows(path, rows, ["rank", "id", "score", "label", "noisy", "text"])


def noise_flags(examples: list[dict], column: str | None) -> np.ndarray | None:
    """The known-noisy flags of the indexed examples; None when unknown (no NDR then)."""
    name = column or "noisy"
    if examples and name not in examples[0]:
        if column is None:
            return None
        present = sorted({k for k in examples[0] if k != "id"})
        raise UserError(f"noise column '{column}' is not in the indexed training data; columns: "
                        f"{', '.join(present)}. Rebuild the index from a file with that column.")
    return np.array([truthy(e.get(name)) for e in examples])


def scopes(index, spec: str) -> dict[str, tuple[str, list[str]]]:
    """scope name -> (kind, layers): 'each' is every layer alone, 'groups' every group."""
    result: dict[str, tuple[str, list[str]]] = {}
    for term in [t.strip() for t in spec.split(",") if t.strip()]:
        if term == "each":
            result.update({layer: ("layer", [layer]) for layer in index.layers})
        elif term == "groups":
            result.update({g: ("group", layers) for g, layers in index.groups.items()})
        elif term in index.groups:
            result[term] = ("group", index.groups[term])
        else:
            result.update({layer: ("layer", [layer]) for layer in index.resolve_layers(term)})
    if not result:
        raise UserError("nothing to audit; pass e.g. --layers each,groups")
    return result


def chance_warning(grads, given=None) -> str | None:
    """One line when the model does no better than the majority class on the labelled queries
    (``given``: which queries had a label; default all); None for causal LMs and otherwise."""
    if grads.completions is not None:
        return None
    mask = np.ones(len(grads.labels), bool) if given is None else np.asarray(given, bool)
    check = check_chance(grads.labels[mask], grads.predicted[mask])
    return check.warning() if check is not None else None


def run_audit(index, queries, config, progress) -> AuditResult:
    """The whole audit (module docstring); ``config`` is a validated ``AuditConfig``."""
    levels, aggs = config.level_fractions, config.agg_list
    targets = scopes(index, config.layers)
    noisy = noise_flags(index.examples, config.noise_col)
    if noisy is not None and not noisy.any():
        noisy = None
    examples = index.kind.read(queries, text_col=config.text_col, pair_col=config.pair_col,
                               label_col=config.label_col, label2id=index.label2id)
    progress("queries", 0, len(examples))
    grads = index.gradients(examples.texts, examples.pairs, examples.labels, config.batch_size,
                            completions=examples.completions)
    progress("queries", len(examples), len(examples))
    subsets = {"all": np.ones(len(examples), bool)}
    if config.correct_only:
        subsets["correct"] = grads.correct
    layers = sorted({l for _, ls in targets.values() for l in ls}, key=index.layers.index)
    metric = index.store.check_metric(config.metric)
    per_layer, cancellation = {}, {}
    for number, layer in enumerate(layers):
        per_layer[layer], cancellation[layer] = _layer_sums(index, layer, grads.vectors[layer], subsets, aggs,
                                                            config.vote_p, metric, (config.score, config.damping))
        progress("layers", number + 1, len(layers))
    result = AuditResult(len(index), len(examples), int(grads.correct.sum()), noisy, levels,
                         cancellation=cancellation, metric=metric, score=config.score,
                         headline={"correct_only": config.correct_only, "fuse_weight": config.fuse_weight})
    if config.score == "curvature":
        result.notes.append(f"score: curvature (damping {config.damping:g} x the mean curvature per weight matrix)")
    result.warning = chance_warning(grads)
    if result.warning:
        result.notes.insert(0, result.warning)
    for subset, mask in subsets.items():
        if not mask.any():
            result.notes.append(f"no query in subset '{subset}'; its rows are left out")
            continue
        for scope, (kind, members) in targets.items():
            for agg in aggs:
                ids, scores = _combine(agg, [per_layer[l][subset][agg] for l in members], int(mask.sum()))
                result.rankings[(scope, agg, subset)] = (ids, scores)
                row = {"scope": scope, "kind": kind, "agg": agg + ("-c" if subset == "correct" else ""),
                       "layers": members, "queries": int(mask.sum())}
                if noisy is not None:
                    row.update(ndr.summarise(ids, noisy, levels))
                result.table.append(row)
    if noisy is not None:
        m, n, key = int(noisy.sum()), len(index), ndr.level_key
        result.baselines = {
            "random": {**{key(p): ndr.random_ndr_at(n, m, p) for p in levels}, "auc_ndr": ndr.random_auc_ndr(n, m)},
            "perfect": {**{key(p): ndr.perfect_ndr_at(n, m, p) for p in levels}, "auc_ndr": 1.0},
        }
        for name, (ids, values) in baseline_rankings(index, result).items():
            result.rankings[(name, "baseline", "all")] = (ids, values)
            result.baselines[name] = ndr.summarise(ids, noisy, levels)
        if "training loss" not in result.baselines:
            result.notes.append("this index holds no training losses (built by an older version): rebuild it "
                                "for the training-loss baseline")
    else:
        result.notes.append("no noise column in the indexed data: rankings only, no NDR")
    return result


def baseline_rankings(index, result: AuditResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What influence must beat, ranked like it (most suspicious first): the training loss at
    build time (high first; mislabeled examples are the ones a model fits worst), the
    self-influence of all layers (squared gradient norm, high first: exact where the build
    stored exact norms; not for an old cosine index, which stores unit vectors only), and the rank fusion of the headline influence ranking
    with the loss (mean of the two positions, ties by id): the honest question is whether
    influence adds anything to the loss."""
    out = {}
    losses = index.store.losses()
    if losses is not None:
        out["training loss"] = _ranked(losses)
    if index.store.holds != "unit":  # the norms are known (exact even for an ANN index)
        squares = sum(_self_influence(index.store.layer(layer)) for layer in index.layers)
        out["self-influence"] = _ranked(squares)
    if losses is not None and result.table:
        out["influence + loss"] = fuse(result.ranking, out["training loss"][0], result.headline.get("fuse_weight", 0.5))
    return out


def fuse(influence: np.ndarray, loss: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Rank fusion of two rankings (ids, most suspicious first): each example's position
    ``(1 - weight) x`` its influence position ``+ weight x`` its loss position, lowest first,
    ties by id; returns (ids, -fused position). Positions, not scores, so neither side's scale
    decides: weight 0 is the influence ranking, 1 the loss ranking."""
    position = np.empty(len(influence))
    position[influence] = (1.0 - weight) * np.arange(len(influence))
    position[loss] += weight * np.arange(len(loss))
    return _ranked(-position)


def _self_influence(view) -> np.ndarray:
    """The exact squared gradient norm where the build stored it, else the sketch's."""
    exact = view.exact.values()
    return view.squared_norms("dot") if exact is None else exact ** 2


def _ranked(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = order(values, higher_first=True)
    return ids, values[ids]


def _layer_sums(index, layer, vectors, subsets, aggs, vote_p, metric, scoring=("gradient", 0.1)):
    """Per query subset and aggregation, this layer's lists combined over queries, in a form
    that adds up over layers: mean score sum, mean-rank sum, vote sum. ``scoring``: (score,
    damping), as curvature.layer_view takes them."""
    view = layer_view(index.store, layer, *scoring)
    queries = view.prepare(vectors, metric)
    need_full = "mean" in aggs or "rank" in aggs
    full = view.scores(queries, metric).T if need_full else None  # (Q, N)
    if "vote" in aggs:
        neighbours = nearest(index.store, layer, queries, -1.0, vote_depth(len(index), vote_p), metric, *scoring)
    sums = {}
    for subset, mask in subsets.items():
        rows = np.flatnonzero(mask)
        sums[subset] = {}
        if not rows.size:
            continue
        if "mean" in aggs:
            sums[subset]["mean"] = (-full[rows].astype(np.float64)).mean(0)
        if "rank" in aggs:
            lists = [order(full[q], higher_first=False) for q in rows]
            # rank sums are whole numbers, exact in float64: tied examples stay tied
            sums[subset]["rank"] = np.rint(mean_ranks(lists, len(index)) * len(lists))
        if "vote" in aggs:
            # an ANN search may return fewer than ceil(pN) (HNSW does): they vote, the rest gets none
            sums[subset]["vote"] = votes([neighbours[q] for q in rows], len(index), vote_p,
                                         partial=index.store.approximate)
    cancel = ndr.cancellation_ratio(full) if full is not None and len(full) else float("nan")
    return sums, cancel


def _combine(agg: str, parts: list[np.ndarray], lists_per_layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Layers of one scope, most detrimental first: the mean of per-layer means for mean
    (each layer has the same queries, so this is the mean over all lists), the mean rank from
    exact rank sums for rank (ties stay ties, broken by id), the sum of votes for vote."""
    stacked = np.stack(parts)
    if agg == "mean":
        values = stacked.mean(0)
    else:
        values = stacked.sum(0) / (len(parts) * lists_per_layer if agg == "rank" else 1)
    ids = order(values, higher_first=agg != "rank")
    return ids, values[ids]
