"""Fine-tuning a sequence classifier, so there is a model (and a noisy training set) to index.

``train_model`` is what ``lite-influence train MODEL TRAIN_FILE --out MODEL_DIR`` runs. It
flips a seeded fraction of the labels (the benchmark's ground truth for NDR), fine-tunes every
weight, or LoRA adapters on the attention query and value projections plus the head, evaluates
after every epoch and keeps the epoch with the lowest eval loss (the paper's choice).

What ``MODEL_DIR`` holds:

- the model and tokenizer (``save_pretrained``), so ``models.load_model(MODEL_DIR)`` loads it
  unchanged and gives the logits of the kept checkpoint. With LoRA this is the *merged* model
  (``merge_and_unload``), so every command that takes a model folder works on it as is;
- ``adapter/`` (LoRA only): the adapter itself (peft ``save_pretrained``), for indexing the LoRA
  A/B matrices as units later (``lite-influence build MODEL_DIR/adapter ...``); it names the
  original model folder, as an absolute path, as its base;
- ``train_used.<ext>``: the rows trained on (after ``--limit``), in input order, with the
  flipped labels, ``noisy`` (0/1) and ``label_original``; same format as the input (.csv, .tsv,
  .jsonl; a .json file is written as .jsonl, a saved dataset folder or Parquet as .jsonl). Build the index
  on this file, and ``audit`` finds the ``noisy`` column by itself;
- ``checkpoints.json`` and ``checkpoints/checkpoint-j/`` (``--checkpoints K`` > 1): the weights at
  the end of each of K equal spans of the optimiser steps and the learning rate over each, for
  TracIn-CP indexes (``checkpoints.py``);
- ``training.json``: the options, the effective learning rate and LoRA settings, the eval
  before training, per-epoch train loss, eval loss and accuracy, the chosen epoch, the number
  of noisy examples and the seconds taken.

Decisions where the design was silent:

- The learning rate defaults to 5e-5 for full fine-tuning and 1e-3 with LoRA (``lr=None``
  means "the default for the mode"); ``lora_alpha`` defaults to ``2 * lora_rank``; LoRA
  dropout is 0.05.
- AdamW with weight decay on weight matrices only (tensors of 2 or more dimensions: biases
  and norm weights are not decayed), a linear schedule with ``round(10%)`` of the steps as
  warmup, gradients clipped to norm 1.0 (as the transformers Trainer does). A model stored
  in half precision is trained and saved in float32.
- Batches: every epoch a seeded permutation, cut into chunks of 50 batches, each chunk sorted
  by length and cut into batches, then the batch order shuffled (length bucketing, as
  transformers' ``group_by_length``). The loss is the mean over the batch.
- The train loss of an epoch is the example-weighted mean of its batch losses, in train mode
  (dropout on), as training went. Eval loss is the mean cross-entropy in eval mode.
- The kept epoch is the first one with the lowest eval loss; without an eval file the last.
  The eval file is read with the same column options and is never limited.
- Label noise flips among the classes of the model's head (``num_labels``), with
  ``data.flip_labels``. A flipped label is written the way the input wrote it: an id stays an
  id, a name becomes the name of the new class.
- Training on a ``train_used`` file again keeps its ``label_original`` column (the first clean
  label), and ``noisy`` becomes "label differs from label_original"; an input ``noisy``
  column without ``label_original`` is kept and OR-ed with this run's flips.
- The model is always loaded as a sequence classifier (``task="classification"``): a causal-LM
  folder (GPT-2, Llama) gets a new classification head, as before causal LMs were indexable.
- The model's label names (``id2label``) are whatever ``load_model`` produced: the folder's
  own, or ``LABEL_0..`` for a new head. A file that names its classes ("Business") for such a
  head is refused with the ``--label-names`` to pass (the names it uses, first seen first).
- The training and eval files are read and checked (columns, texts, a label in every row)
  before the model loads, which takes seconds; their labels become ids once the model's
  ``label2id`` is known (``data.with_label_ids``).
- An input ``noisy`` flag is true as ``config.truthy`` reads it (1, 1.0, true, yes, y, t), as
  audit reads the same column.
- LoRA targets are found by module name: ``query``/``value`` (BERT, RoBERTa, ...),
  ``q_proj``/``v_proj`` (Llama, Mistral, OPT, ...), ``c_attn`` (GPT-2), ``q_lin``/``v_lin``
  (DistilBERT), ``query_key_value`` (GPT-NeoX, Falcon). The head is every child of the model
  outside its base model that has weights (``classifier``; ``pre_classifier`` too for
  DistilBERT; ``score`` for GPT-2 and Llama), trained fully through ``modules_to_save``.
- A half-written folder never appears at ``--out``: everything is written to ``.NAME.partial``
  beside it and swapped into place with the store's ``swap_folder`` (an atomic exchange where
  the kernel has one). ``--out`` is checked by the store's guard: ``--force`` replaces only a
  model folder written by ``train`` (``training.json`` beside ``config.json``), an index or an
  empty folder, never a file or someone else's folder, and ``--out`` may not be or contain the
  model, the training file or the eval file.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__, checkpoints
from .config import TrainConfig, truthy
from .data import flip_labels, label_id, label_names_in, load_examples, with_label_ids, write_rows
from .errors import UserError
from .store.atomic import remove, swap_folder, write_json
from .store.guard import check_out, target
from .models import LoadedModel, collate, encode, load_model
from .lora_modules import head_modules, lora_targets  # noqa: F401 (public here before)

Progress = Callable[[str, int, int], None]  # (stage, done, total)

FULL_LR = 5e-5
LORA_LR = 1e-3
LORA_DROPOUT = 0.05
WARMUP = 0.1
MAX_GRAD_NORM = 1.0
BUCKET_BATCHES = 50


@dataclass
class TrainResult:
    """What ``train_model`` did. ``loaded`` is the kept checkpoint in memory (eval mode; with
    LoRA the merged model), the same weights as the folder at ``out``."""

    out: Path
    chosen_epoch: int
    history: list[dict]
    n_noisy: int
    seconds: float = 0.0
    loaded: LoadedModel | None = field(default=None, repr=False, compare=False)


def train_model(model: str | Path, train_file: str | Path, out: str | Path,
                config: TrainConfig | None = None, *, force: bool = False,
                progress: Progress | None = None, **options) -> TrainResult:
    """Fine-tune the classifier in ``model`` on ``train_file`` and save it to ``out``.

    ``options`` override fields of ``config`` (``train_model(m, f, o, epochs=5, lora_rank=8)``).
    Every input is checked before anything is written; on any failure, or Ctrl-C, the partial
    folder is removed and an existing ``out`` is left as it was.
    """
    started = time.perf_counter()
    config = replace(config or TrainConfig(), **options)
    if config.eval_file is not None:
        config = replace(config, eval_file=str(config.eval_file))  # a Path, from Python: JSON-able
    _check(config)
    progress = progress or (lambda stage, done, total: None)
    out = target(Path(out))
    protect = [model, train_file] + ([config.eval_file] if config.eval_file else [])
    check_out(out, force, protect, product="the model")
    for name, path in (("training", train_file), ("eval", config.eval_file)):
        if path is not None and not Path(path).exists():
            raise UserError(f"the {name} file '{path}' does not exist; check the path.")

    names = [n.strip() for n in config.label_names.split(",")] if config.label_names else None
    if names and config.num_labels and len(names) != config.num_labels:
        raise UserError(f"--label-names gives {len(names)} names but --num-labels is {config.num_labels}; "
                        "pass one name per class.")
    columns = dict(text_col=config.text_col, pair_col=config.pair_col, label_col=config.label_col, raw_labels=True)
    train = load_examples(train_file, limit=config.limit, **columns)  # checked before the model's seconds
    evaluation = load_examples(config.eval_file, **columns) if config.eval_file is not None else None
    progress("model", 0, 1)
    loaded = load_model(model, task="classification", num_labels=config.num_labels, seed=config.seed, label_names=names)
    progress("model", 1, 1)
    if loaded.num_labels < 2:
        raise UserError(f"the model's head has {loaded.num_labels} output but a classifier needs at "
                        "least 2 classes; pass --num-labels 2 or more for a model folder without a head.")
    train = _train_labels(train, train_file, loaded)
    if evaluation is not None:
        evaluation = with_label_ids(evaluation, loaded.label2id, config.eval_file, unnamed_hint=_name_them(evaluation))
    labels, noisy_rows, used_rows, used_columns = _noisy_training_set(train, config, loaded)

    run = _Run(loaded, config)
    train_encodings = encode(loaded, train.texts, train.pairs, config.max_length)
    eval_encodings = (encode(loaded, evaluation.texts, evaluation.pairs, config.max_length)
                      if evaluation is not None else None)
    history, initial, chosen = run.fit(train_encodings, labels, eval_encodings,
                                       evaluation.labels if evaluation is not None else None, progress)

    partial = out.parent / f".{out.name}.partial"
    try:
        try:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"cannot write beside --out '{out}': {exc.strerror}; "
                            "choose a folder you can write to.") from exc
        progress("save", 0, 3)
        final = run.save(partial)
        kept = checkpoints.save(run, partial, chosen * (run.total // config.epochs))
        progress("save", 1, 3)
        write_rows(partial / _train_used_name(train_file), used_rows, used_columns)
        progress("save", 2, 3)
        seconds = time.perf_counter() - started
        report = {
            "lite_influence_version": __version__,
            "model": str(model),
            "train_file": str(train_file),
            "config": config.to_dict(),
            "effective": run.effective(),
            "label2id": final.label2id,
            "n_train": len(train),
            "n_eval": len(evaluation) if evaluation is not None else 0,
            "n_noisy": int(sum(noisy_rows)),
            "initial_eval": initial,
            "history": history,
            "chosen_epoch": chosen,
            "chosen_by": "lowest eval loss" if evaluation is not None else "last epoch",
            **({"checkpoints": kept} if kept else {}),
            "seconds": seconds,
        }
        write_json(partial / "training.json", report)
        progress("save", 3, 3)
        check_out(out, force, protect, product="the model")  # it may have appeared while we trained
        swap_folder(partial, out)
        remove(partial)  # holds the folder it replaced, if any
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return TrainResult(out=out, chosen_epoch=chosen, history=history, n_noisy=int(sum(noisy_rows)),
                       seconds=seconds, loaded=final)


# ---------------------------------------------------------------- checks


def _check(config: TrainConfig) -> None:
    """The cheap checks, before a model is loaded."""
    noise = config.noise
    if not _is_number(noise) or not 0 <= noise < 1:
        raise UserError(f"--noise must be a fraction in [0, 1), got {noise!r}; pass e.g. 0.2 to flip 20% of the labels.")
    for name in ("epochs", "batch_size", "max_length"):
        _positive_int(name, getattr(config, name))
    for name in ("lora_rank", "limit", "num_labels"):
        if getattr(config, name) is not None:
            _positive_int(name, getattr(config, name))
    for name in ("lr", "lora_alpha"):
        value = getattr(config, name)
        if value is not None and (not _is_number(value) or not 0 < value < math.inf):
            raise UserError(f"--{_flag(name)} must be a positive number, got {value!r}.")
    if config.lora_rank is not None and importlib.util.find_spec("peft") is None:
        raise UserError("--lora-rank needs the peft package; run `pip install 'lite-influence[lora]'`.")
    if config.lora_alpha is not None and config.lora_rank is None:
        raise UserError("--lora-alpha only applies to LoRA; pass --lora-rank too, or drop --lora-alpha.")
    checkpoints.check_count(config.checkpoints, config.lora_rank is not None)
    wd = config.weight_decay
    if not _is_number(wd) or not 0 <= wd < math.inf:
        raise UserError(f"--weight-decay must be a number >= 0, got {wd!r}.")


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"--{_flag(name)} must be a whole number of at least 1, got {value!r}.")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _name_them(examples) -> str:
    """How to name the classes of a new head (LABEL_0, ...) that the file calls by name."""
    names = label_names_in(examples)
    return (f"pass --label-names with one name per class in id order, e.g. --label-names {','.join(names)} "
            "(the names this file uses, in the order they first appear).")


def _train_labels(train, path, loaded: LoadedModel):
    """The training rows' labels as ids. A label the head cannot hold usually means a base
    encoder got the default 2-class head, so that case is told apart from a plain unknown
    label; names given to a head without names point at --label-names."""
    try:
        return with_label_ids(train, loaded.label2id, path, unnamed_hint=_name_them(train))
    except UserError:
        try:
            as_ids = with_label_ids(train, None, path)
        except UserError:
            as_ids = None
        if as_ids is not None and max(as_ids.labels) >= loaded.num_labels:
            k, distinct = max(as_ids.labels) + 1, len(set(as_ids.labels))
            raise UserError(
                f"{path} has {distinct} classes with ids up to {k - 1} but the model's head has "
                f"{loaded.num_labels} classes; pass --num-labels {k} when the model folder has no "
                f"classification head yet (a new head gets 2 classes), or use a model whose head has {k}."
            ) from None
        raise


# ---------------------------------------------------------------- label noise and train_used


def _noisy_training_set(train, config: TrainConfig, loaded: LoadedModel):
    """The labels to train on and the rows of ``train_used`` (flipped labels, noisy, label_original)."""
    label_col = train.used_columns[-1]
    original = np.asarray(train.labels, dtype=np.int64)
    if config.noise > 0:
        labels, flipped = flip_labels(original, config.noise, loaded.num_labels, config.seed)
    else:
        labels, flipped = original.copy(), np.zeros(original.size, dtype=bool)
    id2label = {i: name for name, i in loaded.label2id.items()}
    columns = list(train.columns)
    has_original = "label_original" in columns
    has_noisy = "noisy" in columns
    rows, noisy = [], []
    for row, new, old, was_flipped in zip(train.rows, labels, original, flipped):
        value = row[label_col]
        written = int(new) if _is_id(value) else id2label[int(new)]
        if not was_flipped:
            written = value
        if has_original:
            clean = label_id(row["label_original"], loaded.label2id, where=" in column 'label_original'")
            is_noisy = int(new) != clean
        else:
            is_noisy = bool(was_flipped) or (has_noisy and truthy(row["noisy"]))
        rows.append({**row, label_col: written, "noisy": int(is_noisy),
                     "label_original": row["label_original"] if has_original else value})
        noisy.append(is_noisy)
    columns += [c for c in ("noisy", "label_original") if c not in columns]
    return [int(y) for y in labels], noisy, rows, columns


def _is_id(value) -> bool:
    try:
        label_id(value)
        return True
    except UserError:
        return False


def _train_used_name(train_file) -> str:
    """The input's own format where it can hold every value it read; JSON lines otherwise (a
    saved dataset or Parquet may hold texts with tabs and newlines, which TSV cannot)."""
    ext = Path(train_file).suffix.lower() if Path(train_file).is_file() else ".jsonl"
    return "train_used" + {".csv": ".csv", ".tsv": ".tsv"}.get(ext, ".jsonl")


# ---------------------------------------------------------------- the training run


class _Run:
    """The model being trained (wrapped by peft for LoRA), its optimiser and the kept weights."""

    def __init__(self, loaded: LoadedModel, config: TrainConfig):
        self.loaded, self.config = loaded, config
        self.lora = config.lora_rank is not None
        self.lr = float(config.lr) if config.lr is not None else (LORA_LR if self.lora else FULL_LR)
        model = loaded.model
        if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
            model.float()
        self.targets = self.heads = None
        if self.lora:
            self.net = self._wrap_lora(model)
        else:
            for parameter in model.parameters():
                parameter.requires_grad_(True)
            self.net = model
        self.kept: dict[str, torch.Tensor] | None = None

    def _wrap_lora(self, model):
        import peft

        self.targets, self.heads = lora_targets(model), head_modules(model)
        self.alpha = float(self.config.lora_alpha) if self.config.lora_alpha is not None else 2.0 * self.config.lora_rank
        lora_config = peft.LoraConfig(
            task_type=peft.TaskType.SEQ_CLS, r=self.config.lora_rank, lora_alpha=self.alpha,
            lora_dropout=LORA_DROPOUT, target_modules=list(self.targets), modules_to_save=list(self.heads),  # peft extends them
            fan_in_fan_out=self.targets == ["c_attn"],
        )
        torch.manual_seed(self.config.seed)
        with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
            warnings.simplefilter("ignore", FutureWarning)
            return peft.get_peft_model(model, lora_config)

    def effective(self) -> dict:
        info = {"lr": self.lr, "warmup_steps": self.warmup, "total_steps": self.total,
                "max_grad_norm": MAX_GRAD_NORM, "mode": "lora" if self.lora else "full"}
        if self.lora:
            info.update(lora_alpha=self.alpha, lora_dropout=LORA_DROPOUT, target_modules=self.targets,
                        modules_to_save=self.heads)
        return info

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]

    def fit(self, encodings, labels, eval_encodings, eval_labels, progress):
        from transformers import get_linear_schedule_with_warmup

        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        lengths = [len(e["input_ids"]) for e in encodings]
        steps_per_epoch = math.ceil(len(encodings) / config.batch_size)
        self.total = steps_per_epoch * config.epochs
        self.warmup = int(round(WARMUP * self.total))
        params = self.trainable()
        groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                  {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr)
        schedule = get_linear_schedule_with_warmup(optimizer, self.warmup, self.total)
        self.recorder = checkpoints.Recorder(config.checkpoints, self.total, self._snapshot)
        targets = torch.tensor(labels, dtype=torch.long)
        initial = self.evaluate(eval_encodings, eval_labels, progress, "eval before training")
        history, best, chosen = [], math.inf, config.epochs
        torch.manual_seed(config.seed)  # dropout
        for epoch in range(1, config.epochs + 1):
            began = time.perf_counter()
            stage = f"train epoch {epoch}/{config.epochs}"
            self.net.train()
            total_loss, done = 0.0, 0
            progress(stage, 0, len(encodings))
            for batch in _epoch_batches(lengths, config.batch_size, generator):
                inputs = collate(self.loaded, [encodings[i] for i in batch])
                logits = self.net(**inputs).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), targets[batch])
                if not torch.isfinite(loss):
                    raise UserError(f"the training loss became {loss.item()} in epoch {epoch}; "
                                    f"lower --lr (now {self.lr:g}).")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in params], MAX_GRAD_NORM)
                optimizer.step()
                self.recorder.step(optimizer.param_groups[0]["lr"])  # the rate this step used
                schedule.step()
                total_loss += loss.item() * len(batch)
                done += len(batch)
                progress(stage, done, len(encodings))
            record = {"epoch": epoch, "train_loss": total_loss / done}
            scores = self.evaluate(eval_encodings, eval_labels, progress, f"eval epoch {epoch}/{config.epochs}")
            if scores is not None:
                record.update(scores)
                if scores["eval_loss"] < best:
                    best, chosen = scores["eval_loss"], epoch
                    self.kept = self._snapshot()
            record["seconds"] = time.perf_counter() - began
            history.append(record)
        if eval_encodings is not None and self.kept is None:
            raise UserError("the eval loss was never a finite number; lower --lr or check the eval file.")
        if self.kept is not None:
            self._restore(self.kept)
        self.net.eval()
        return history, initial, chosen

    def evaluate(self, encodings, labels, progress, stage) -> dict | None:
        """Mean cross-entropy and accuracy in eval mode, or None without an eval file."""
        if encodings is None:
            return None
        from .gradients import length_batches

        self.net.eval()
        targets = torch.tensor(labels, dtype=torch.long)
        loss_sum, correct, done = 0.0, 0, 0
        progress(stage, 0, len(encodings))
        with torch.no_grad():
            for batch in length_batches([len(e["input_ids"]) for e in encodings], self.config.batch_size):
                logits = self.net(**collate(self.loaded, [encodings[i] for i in batch])).logits.float()
                loss_sum += torch.nn.functional.cross_entropy(logits, targets[batch], reduction="sum").item()
                correct += int((logits.argmax(-1) == targets[batch]).sum())
                done += len(batch)
                progress(stage, done, len(encodings))
        return {"eval_loss": loss_sum / done, "eval_accuracy": correct / done}

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.trainable()}

    def _restore(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.trainable():
                p.copy_(weights[name])

    def save(self, folder: Path) -> LoadedModel:
        """The kept weights (merged, for LoRA) and tokenizer at ``folder``; the adapter under
        ``folder/adapter``. Returns the in-memory model that was saved, in eval mode."""
        model = self.net
        if self.lora:  # the base as an absolute path, so the adapter loads from any folder
            for adapter in self.net.peft_config.values():
                adapter.base_model_name_or_path = str(Path(self.loaded.path).resolve())
            self.net.save_pretrained(folder / "adapter")
            model = self.net.merge_and_unload()
        for parameter in model.parameters():  # as load_model returns it
            parameter.requires_grad_(True)
        model.eval()
        model.save_pretrained(folder)
        self.loaded.tokenizer.save_pretrained(folder)
        return LoadedModel(model, self.loaded.tokenizer, self.loaded.task, str(folder))


def _epoch_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """A seeded shuffle, length-sorted within chunks of BUCKET_BATCHES batches so padding is
    small, then the batches themselves shuffled."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
