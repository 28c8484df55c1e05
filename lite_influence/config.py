"""One dataclass per command: what the CLI flags map onto and what the manifest records.

Each field's ``help`` metadata is the flag's help text, so the CLI, the Python API and the
manifest never disagree about an option's name, default or meaning. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def option(default, help: str, flag: str | None = None, short: str | None = None):
    return field(default=default, metadata={"help": help, "flag": flag, "short": short})


class Options:
    """What every command's dataclass shares: a plain dict for manifests and JSON, and back
    (unknown keys, e.g. from a newer version, are ignored)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class BuildConfig(Options):
    """Options of ``lite-influence build``."""

    text_col: str | None = option(None, "Column holding the text (default: text, sentence, prompt, content or question).")
    pair_col: str | None = option(None, "Column holding the second text of a pair (NLI, QA), if any.")
    label_col: str | None = option(None, "Column holding the label: an id (0, 1) or a name the model knows (default: label).")
    layers: str = option("attention", "Which units to index: attention (embeddings, attention linears, head), mlp, all, a group (early, middle, late, embeddings, head), a layer (block3) or a regex over module names; comma-separated.")
    granularity: str = option("layer", "One index per transformer block ('layer') or per weight matrix ('unit').")
    projection: str = option("pca", "pca: fitted Kronecker eigenbasis (keeps far more per dim); random: seeded Gaussian (needs no fitting pass).")
    proj_dim: int = option(8, "Dims kept per side of each weight matrix; a unit stores proj_dim^2 numbers (a BERT block of 4 attention matrices: 4 x 64 = 256).")
    exact_max: int = option(1024, "A weight matrix with one side no wider than --proj-dim and at most this many numbers is stored exactly, not projected (a 2-class head of a 384-wide model: 770 numbers); 0 projects everything.")
    fit_examples: int = option(256, "Training examples used to fit the pca eigenbasis (one extra forward/backward pass over them).")
    metric: str = option("cosine", "cosine: normalise vectors (best for lookup); dot: raw TracIn inner products (the paper's score).")
    index_factory: str = option("Flat", "FAISS index factory string: Flat (exact), HNSW32, IVF256,Flat, PQ32, ...")
    batch_size: int = option(16, "Examples per forward/backward pass.")
    max_length: int = option(128, "Tokens per example; longer texts are truncated.")
    seed: int = option(0, "Seed for the random projection, the fitting sample and a newly initialised head.")
    limit: int | None = option(None, "Index only the first N rows of the training file.")
    num_labels: int | None = option(None, "Classes of a newly initialised head, when the model folder has none (default 2).")
    task: str | None = option(None, "classification or causal-lm (default: detected from the model's architecture, e.g. GPT2LMHeadModel, LlamaForCausalLM).")
    completion_col: str | None = option(None, "Causal LM: column holding the completion, whose tokens alone carry the loss (default: completion, response, answer, output or target); --text-col is then the prompt. Without one, each text is a whole completion.")


@dataclass
class QueryConfig(Options):
    """Options of ``lite-influence query``."""

    k: int = option(10, "How many proponents and opponents to show.", short="-k")
    layers: str = option("all", "Layers to search: a group (embeddings, early, middle, late, head, all) or layer names, comma-separated.")
    agg: str = option("vote", "How the layers' lists are combined: vote (weighted by rank), rank (mean rank) or mean (mean exact score).")
    batch_size: int = option(16, "Queries per forward/backward pass (with --file).")
    max_new_tokens: int = option(20, "Causal LM without --completion: explain the model's greedy continuation of up to this many tokens (it stops at end-of-text).")


@dataclass
class AuditConfig(Options):
    """Options of ``lite-influence audit``."""

    layers: str = option("each,groups", "What to score: 'each' (every layer alone), 'groups' (embeddings, early, middle, late, head, all), or layer/group names; comma-separated.")
    aggs: str = option("mean,rank,vote", "Aggregations to compare, comma-separated: mean, rank, vote.")
    correct_only: bool = option(False, "Also report the -c variants: only queries the model predicts correctly.")
    vote_p: float = option(0.2, "Vote: each (layer, query) list votes for its bottom p fraction of training examples.")
    levels: str = option("10,20,30", "NDR levels in percent of the training set, comma-separated.")
    noise_col: str | None = option(None, "Column of the indexed training data flagging known-mislabeled examples (1/true); default: 'noisy' when present.")
    text_col: str | None = option(None, "Text column of the query file (default: as in build).")
    pair_col: str | None = option(None, "Pair column of the query file, if any.")
    label_col: str | None = option(None, "Label column of the query file (default: label).")
    batch_size: int = option(16, "Queries per forward/backward pass.")


def help_of(cls, name: str) -> str:
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


@dataclass
class TrainConfig(Options):
    """Options of ``lite-influence train`` (fine-tuning a sequence classifier to index)."""

    text_col: str | None = option(None, "Column holding the text (default: text, sentence, prompt, content or question).")
    pair_col: str | None = option(None, "Column holding the second text of a pair (NLI, QA), if any.")
    label_col: str | None = option(None, "Column holding the label: an id (0, 1) or a name the model knows (default: label).")
    noise: float = option(0.0, "Fraction of training labels to flip (seeded) before training, for noise-detection benchmarks; flipped rows get noisy=1 in train_used.")
    seed: int = option(0, "Seed for the label noise, shuffling, dropout, a newly initialised head and the LoRA matrices.")
    epochs: int = option(3, "Passes over the training data.")
    lr: float | None = option(None, "Peak learning rate of AdamW (linear schedule, 10% warmup); default 5e-5, or 1e-3 with --lora-rank.")
    batch_size: int = option(16, "Examples per optimiser step (the loss is their mean).")
    max_length: int = option(128, "Tokens per example; longer texts are truncated.")
    eval_file: str | None = option(None, "Labelled held-out file evaluated after every epoch; the epoch with the lowest eval loss is kept (without it, the last epoch).")
    lora_rank: int | None = option(None, "Train LoRA adapters of this rank on the attention query and value projections (plus the classification head) instead of every weight.")
    lora_alpha: float | None = option(None, "LoRA scaling alpha (default 2 x --lora-rank).")
    weight_decay: float = option(0.01, "AdamW weight decay, applied to weight matrices (not to biases or norms).")
    num_labels: int | None = option(None, "Classes of a newly initialised head, when the model folder has none (default 2).")
    label_names: str | None = option(None, "Names of the classes, comma-separated in id order (e.g. negative,positive): shown in every table and accepted as labels.")
    limit: int | None = option(None, "Train on only the first N rows of the training file.")

