"""One dataclass per command, and the only place an option is declared.

A field is an option: its type and default are the dataclass's, its help text, flag name
(default ``--field-name``) and short flag live in its metadata (``option``). The CLI builds
its typer parameters from these fields (``cli_parameters``), the Python API takes the same
names as keywords, ``validate()`` holds the checks both share (so a Python user gets the
CLI's one-line errors), and the manifest records ``to_dict()``. Groups of options that
several commands share (``Columns``, ``ModelOptions``) are base dataclasses, so their fields
stay flat (``config.text_col``) and are declared once. No torch, faiss or typer at import.
"""

from __future__ import annotations

import re
import typing
from dataclasses import asdict, dataclass, field, fields

from .errors import UserError

TRUE_WORDS = frozenset({"1", "1.0", "true", "yes", "y", "t"})


def truthy(value) -> bool:
    """Whether a flag read from a file or a flag column means "true" (1, true, yes, y, t)."""
    return str(value).strip().lower() in TRUE_WORDS


def option(default, help: str, flag: str | None = None, short: str | None = None):
    """A field that is a command-line option (``flag`` defaults to ``--field-name``)."""
    return field(default=default, metadata={"help": help, "flag": flag, "short": short})


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _at_least(config, names: tuple[str, ...], low: int, optional: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if (value is not None or not optional) and value < low:
            flag = flag_of(next(f for f in fields(config) if f.name == name))
            raise UserError(f"{flag} must be {'at least 1' if low == 1 else f'{low} or more'}, got {value}")


class Options:
    """What every command's dataclass shares: a plain dict for manifests and JSON, and back
    (unknown keys, e.g. from a newer version, are ignored), and a ``validate`` hook."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self):
        """Raise ``UserError`` for a value no command accepts; returns self."""
        return self


@dataclass
class Columns(Options):
    """Where a data file keeps its texts and labels (build, audit and train read files)."""

    text_col: str | None = option(None, "Column holding the text (default: text, sentence, prompt, content or question).")
    pair_col: str | None = option(None, "Column holding the second text of a pair (NLI, QA), if any.")
    label_col: str | None = option(None, "Column holding the label: an id (0, 1) or a name the model knows (default: label).")


@dataclass
class ModelOptions(Options):
    """How a model folder is read and fed (build and train)."""

    max_length: int = option(128, "Tokens per example; longer texts are truncated.")
    num_labels: int | None = option(None, "Classes of a newly initialised head, when the model folder has none (default 2).")


# (output-side dims, input-side dims) of a projection when --proj-dim is not given: mixed at
# 64 x 4 (benchmarks/results/projection_candidates_asymmetric.md, planted_backdoor.md)
PROJECTION_SIZES = {"mixed": (4, 32)}


@dataclass
class BuildConfig(ModelOptions, Columns):
    """Options of ``lite-influence build``."""

    layers: str = option("attention", "Which units to index: attention (embeddings, attention linears, head), mlp, all, a group (early, middle, late, embeddings, head), a layer (block3) or a regex over module names; comma-separated.")
    granularity: str = option("layer", "One index per transformer block ('layer') or per weight matrix ('unit').")
    projection: str = option("mixed", "mixed: a seeded random input side and the eigenbasis output side (finds planted rare causes about as a 16x16 random projection does, at the fidelity of the eigenbasis; README, Projection); pca: fitted Kronecker eigenbasis on both sides (best average fidelity and exact EK-FAC for --score curvature, but it drops rare causes); hybrid: input side half eigenbasis, half an unbiased sketch of the rest; random: seeded Gaussian (needs no fitting pass).")
    proj_dim: int | None = option(None, "Dims kept per side of each weight matrix (a unit stores k_in x k_out numbers); default: the projection's own size, for mixed 32 input dims x at least 4 output dims (widened by --energy: 4-64 per matrix, MiniLM's attention blocks 900-4,400 dims), 8 x 8 for the others (256 per BERT attention block).")
    proj_dim_in: int | None = option(None, "Dims kept on each weight matrix's input (activation) side when it differs from --proj-dim, which then sizes the output (gradient) side (mixed: 32 unless --proj-dim is given).")
    energy: float = option(0.8, "mixed: each weight matrix's output side keeps the fewest eigen directions that hold this share of the fit sample's output-gradient energy (at least --proj-dim, at most --proj-dim-max), so every layer's sketch keeps a like share of its gradients (MiniLM: 4-64 dims per matrix, most in the early blocks; README, Projection); 0 keeps exactly --proj-dim.")
    proj_dim_max: int = option(64, "mixed with --energy: the most output-side dims a weight matrix may keep.")
    token_dim: int = option(192, "Word embeddings: their token side is kept exactly (sparse rows: each example keeps this many numbers per distinct token, so a rare token is never mixed with others); 0 projects them like any unit (--proj-dim per side).")
    exact_max: int = option(1024, "A weight matrix with one side no wider than --proj-dim and at most this many numbers is stored exactly, not projected (a 2-class head of a 384-wide model: 770 numbers); 0 projects everything.")
    fit_examples: int = option(256, "Training examples used to fit the pca eigenbasis (one extra forward/backward pass over them).")
    metric: str = option("cosine", "The metric queries and audits use unless they pass --metric: cosine (normalised gradients, best for lookup) or dot (raw TracIn inner products, the paper's score); every index answers both, and approximate (non-Flat) FAISS indexes search by cosine.")
    index_factory: str = option("Flat", "FAISS index factory string: Flat (exact), HNSW32, IVF256,Flat, PQ32, ...; auto: Flat below 100,000 examples, IVF with 4 sqrt(N) lists from there; compact: 4-bit IVF-PQ codes in RAM (~10x smaller than Flat) with the float rows kept on disk, memory-mapped, to re-score its candidates exactly (measured: README, Nearest-neighbour indexes). Any but Flat is approximate: a lookup ranks FAISS's candidates, re-scored exactly, and answers cosine only; add and delete resolve auto again for the new N.")
    batch_size: int = option(16, "Examples per forward/backward pass.")
    seed: int = option(0, "Seed for the random projection, the fitting sample and a newly initialised head.")
    limit: int | None = option(None, "Index only the first N rows of the training file.")
    task: str | None = option(None, "classification or causal-lm (default: detected from the model's architecture, e.g. GPT2LMHeadModel, LlamaForCausalLM).")
    completion_col: str | None = option(None, "Causal LM: column holding the completion, whose tokens alone carry the loss (default: completion, response, answer, output or target); --text-col is then the prompt. Without one, each text is a whole completion.")
    shard: str | None = option(None, "Build shard i of n (e.g. 0/4): batches i, i+n, ... of the single build's length-sorted batches, into a shard index that `lite-influence merge` joins; under torchrun the rank and world size say it instead.")
    checkpoints: str = option("all", "A model trained with `train --checkpoints K`: which checkpoints to index for TracIn-CP (query and audit sum each checkpoint's influence, weighted by its learning rate): all, last (the model alone: a plain index), or checkpoint numbers, comma-separated (1,3; K is the model itself, always included). A model without checkpoints is indexed as itself.")
    projection_from: str | None = option(None, "Take the fitted projection from this folder (`lite-influence fit --out`, or an index) instead of fitting one: every shard of a build shares it.")

    @property
    def shard_spec(self) -> tuple[int, int] | None:
        """``shard`` as (i, n), checked: 0 <= i < n."""
        if self.shard is None:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", self.shard)
        if not match or not int(match[1]) < int(match[2]):
            raise UserError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got '{self.shard}'")
        return int(match[1]), int(match[2])

    def validate(self):
        from .store import METRICS, check_factory
        from .projection import PROJECTIONS

        if self.projection not in PROJECTIONS:
            raise UserError(f"unknown projection '{self.projection}'; use one of {', '.join(PROJECTIONS)}")
        if self.metric not in METRICS:
            raise UserError(f"unknown metric '{self.metric}'; use one of {', '.join(METRICS)}")
        if self.proj_dim is None:  # the projection's own size (recorded resolved in the manifest)
            self.proj_dim, default_in = PROJECTION_SIZES.get(self.projection, (8, None))
            self.proj_dim_in = default_in if self.proj_dim_in is None else self.proj_dim_in
        _at_least(self, ("proj_dim", "batch_size", "max_length", "fit_examples"), 1)
        _at_least(self, ("exact_max", "seed", "token_dim"), 0)
        _at_least(self, ("proj_dim_max",), 1)
        if not 0 <= self.energy <= 1:
            raise UserError(f"--energy must be a share between 0 and 1 (e.g. 0.8; 0 turns it off), got {self.energy}")
        if self.projection != "mixed":
            self.energy = 0.0  # it sizes mixed's output side only; recorded as what the index used
        _at_least(self, ("limit", "num_labels", "proj_dim_in"), 1, optional=True)
        if self.num_labels == 1:
            raise UserError("--num-labels must be at least 2: a classifier with one class learns nothing.")
        check_factory(self.index_factory)
        self.shard_spec
        from .checkpoints import check_choice

        check_choice(self.checkpoints)
        return self


def _check_metric(metric: str | None) -> None:
    from .store import METRICS

    if metric is not None and metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")


AGGREGATIONS = ("mean", "rank", "vote")  # aggregate.py's names; kept here so config stays light
SCORES = ("gradient", "curvature")  # curvature.py's; kept here for the same reason


def check_score(score: str) -> str:
    if score not in SCORES:
        raise UserError(f"unknown score '{score}'; use one of {', '.join(SCORES)}")
    return score


@dataclass
class Scoring(Options):
    """How query and audit compare gradients beyond the metric (curvature.py)."""

    score: str = option("gradient", "gradient (plain gradient similarity: TracIn, the paper's score) or curvature (influence functions: divided by EK-FAC's damped curvature in the stored eigenbasis, from the stored vectors; README, Curvature).")
    damping: float = option(0.1, "--score curvature: lambda = this x the mean curvature of each weight matrix (Kronfluence's heuristic: 0.1); larger moves towards the gradient score.")

    def check_scoring(self) -> None:
        check_score(self.score)
        if not self.damping > 0:
            raise UserError(f"--damping must be positive, got {self.damping}")


@dataclass
class QueryConfig(Scoring, Columns):
    """Options of ``lite-influence query``. The columns are those of ``--file``; a file's labels
    are explained only when ``--label-col`` names their column, else the model's predictions
    (what "why did it say this?" asks)."""

    k: int = option(10, "How many proponents and opponents to show.", flag="--k", short="-k")
    layers: str = option("all", "Layers to search: a group (embeddings, early, middle, late, head, all) or layer names, comma-separated.")
    agg: str = option("vote", "How the layers' lists are combined: vote (weighted by rank), rank (mean rank) or mean (mean exact score).")
    vote_p: float = option(0.2, "Vote: each layer's list votes for its top p fraction of the training set (as in audit); -k only truncates the combined ranking.")
    batch_size: int = option(16, "Queries per forward/backward pass (with --file).")
    metric: str | None = option(None, "cosine (normalised gradients, best for lookup) or dot (raw TracIn inner products); default: the index's (build --metric). One build answers both.")
    aggregate: bool = option(False, "With --file or several --id: one ranking for all the queries together instead of one result per query.")
    max_new_tokens: int = option(20, "Causal LM without --completion: explain the model's greedy continuation of up to this many tokens (it stops at end-of-text).")

    def validate(self):
        self.check_scoring()
        if self.agg not in AGGREGATIONS:
            raise UserError(f"unknown aggregation '{self.agg}'; use one of {', '.join(AGGREGATIONS)}")
        if self.k < 1:
            raise UserError(f"-k must be at least 1, got {self.k}")
        _check_metric(self.metric)
        if not 0 < self.vote_p <= 1:
            raise UserError(f"--vote-p must be a fraction in (0, 1], got {self.vote_p}")
        _at_least(self, ("batch_size", "max_new_tokens"), 1)
        return self


@dataclass
class QueryText(Options):
    """What one ``lite-influence query --text`` asks, apart from its ``QueryConfig``: declared
    here so that cli_fast.py can read it (and ask a running server) before typer loads."""

    text: str | None = option(None, "The test example to explain (for a causal LM: the prompt).", short="-t")
    completion: str | None = option(None, "Causal LM: the completion of --text to explain; default: the model's greedy continuation (printed).")
    pair: str | None = option(None, "Second text of a pair, if the model takes pairs.")
    label: str | None = option(None, "Label to explain (id or name); default: the model's prediction.", short="-l")
    as_json: bool = option(False, "Print one JSON object instead of tables.", flag="--json")


@dataclass
class AuditConfig(Scoring, Columns):
    """Options of ``lite-influence audit`` (the columns are the query file's)."""

    # the defaults are the headline setting chosen on SST-2 seed 0 (benchmarks/audit_default.py;
    # README, Auditing); --layers each,groups --agg mean,rank,vote prints the full comparison
    layers: str = option("all", "What to score: 'each' (every layer alone), 'groups' (embeddings, early, middle, late, head, all), or layer/group names; comma-separated. The headline is 'all' (else the first).")
    aggs: str = option("rank", "Aggregations to compare, comma-separated: mean, rank, vote; the headline is the first.", flag="--agg")
    correct_only: bool = option(True, "Also report the -c variants (only queries the model predicts correctly) and make the headline theirs; --no-correct-only: all queries.")
    score: str = option("curvature", "gradient (plain gradient similarity: TracIn, the paper's score) or curvature (the audit default: divided by EK-FAC's damped curvature in the stored eigenbasis, from the stored vectors; README, Curvature).")
    fuse_weight: float = option(0.5, "Weight of the training-loss ranking in the 'influence + loss' rank fusion, the headline's answer (position = (1 - w) x influence position + w x loss position); 0: influence alone.")
    vote_p: float = option(0.2, "Vote: each (layer, query) list votes for its bottom p fraction of training examples.")
    levels: str = option("10,20,30", "NDR levels in percent of the training set, comma-separated.")
    metric: str | None = option("cosine", "cosine (the audit default) or dot: how influence compares gradients; one build answers both.")
    noise_col: str | None = option(None, "Column of the indexed training data flagging known-mislabeled examples (1/true); default: 'noisy' when present.")
    batch_size: int = option(16, "Queries per forward/backward pass.")

    @property
    def level_fractions(self) -> tuple[float, ...]:
        """``levels`` as fractions of the training set (10 -> 0.1)."""
        try:
            levels = tuple(float(x) / 100 for x in self.levels.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--levels must be percentages like 10,20,30, got '{self.levels}'") from None
        if not levels or any(not 0 < p <= 1 for p in levels):
            raise UserError(f"--levels must be percentages in (0, 100], got '{self.levels}'")
        return levels

    @property
    def agg_list(self) -> list[str]:
        aggs = [a.strip() for a in self.aggs.split(",") if a.strip()]
        unknown = [a for a in aggs if a not in AGGREGATIONS]
        if unknown or not aggs:
            raise UserError(f"unknown aggregation '{','.join(unknown) or self.aggs}'; use {', '.join(AGGREGATIONS)}")
        return aggs

    def validate(self):
        self.level_fractions, self.agg_list
        _check_metric(self.metric)
        self.check_scoring()
        if not 0 < self.vote_p <= 1:
            raise UserError(f"--vote-p must be in (0, 1], got {self.vote_p}")
        if not 0 <= self.fuse_weight <= 1:
            raise UserError(f"--fuse-weight must be in [0, 1], got {self.fuse_weight}")
        _at_least(self, ("batch_size",), 1)
        return self


@dataclass
class TrainConfig(ModelOptions, Columns):
    """Options of ``lite-influence train`` (fine-tuning a sequence classifier to index).
    Its checks live in train.py (``_check``), which owns training."""

    noise: float = option(0.0, "Fraction of training labels to flip (seeded) before training, for noise-detection benchmarks; flipped rows get noisy=1 in train_used.")
    seed: int = option(0, "Seed for the label noise, shuffling, dropout, a newly initialised head and the LoRA matrices.")
    epochs: int = option(3, "Passes over the training data.")
    lr: float | None = option(None, "Peak learning rate of AdamW (linear schedule, 10% warmup); default 5e-5, or 1e-3 with --lora-rank.")
    batch_size: int = option(16, "Examples per optimiser step (the loss is their mean).")
    eval_file: str | None = option(None, "Labelled held-out file evaluated after every epoch; the epoch with the lowest eval loss is kept (without it, the last epoch).")
    lora_rank: int | None = option(None, "Train LoRA adapters of this rank on the attention query and value projections (plus the classification head) instead of every weight.")
    lora_alpha: float | None = option(None, "LoRA scaling alpha (default 2 x --lora-rank).")
    weight_decay: float = option(0.01, "AdamW weight decay, applied to weight matrices (not to biases or norms).")
    label_names: str | None = option(None, "Names of the classes, comma-separated in id order (e.g. negative,positive): shown in every table and accepted as labels.")
    limit: int | None = option(None, "Train on only the first N rows of the training file.")
    checkpoints: int = option(1, "Keep K checkpoints for TracIn-CP: the weights at the end of each of K equal spans of the optimiser steps (the last is the model itself) under checkpoints/, with the learning rate over each span (checkpoints.json); `build` then indexes them all.")


def help_of(cls, name: str) -> str:
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def cli_parameters(cls) -> list[tuple[str, object, object]]:
    """(name, annotation, typer.Option) per field of ``cls``: what cli.py turns into a
    command's signature. typer is imported here, lazily, so the API never needs it."""
    import typer

    hints = typing.get_type_hints(cls)
    result = []
    for f in fields(cls):
        names = [flag_of(f)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        if f.default is True:  # a flag that is on by default needs its off switch
            names[0] = f"{names[0]}/--no-{names[0][2:]}"
        annotation = hints[f.name]
        args = typing.get_args(annotation)
        if type(None) in args:  # typer wants Optional[X], not X | None
            annotation = typing.Optional[next(a for a in args if a is not type(None))]
        result.append((f.name, annotation, typer.Option(f.default, *names, help=f.metadata["help"])))
    return result


@dataclass
class ServeConfig(Options):
    """Options of ``lite-influence serve``."""

    host: str = option("127.0.0.1", "Address to listen on; the default answers this machine only (0.0.0.0 exposes the indexes and their texts to the network).")
    port: int = option(8765, "Port to listen on (0: any free port; the state file beside each index records the one chosen).")
    warm: bool = option(True, "Load each index's model with a warm-up query before answering, so the first real query is fast.")
    hold_gb: float = option(4.0, "Gigabytes of stored vectors kept in memory as aligned float32 rows (read at full speed, not from the memory-mapped index), layer by layer as they fit, over all served indexes; 0: none.")

    def validate(self):
        if not self.hold_gb >= 0:
            raise UserError(f"--hold-gb must be 0 or more gigabytes, got {self.hold_gb}")
        return self
