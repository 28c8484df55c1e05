"""Loading a model and tokenizer from a folder, and the loss whose gradient we index.

The loss is *summed* over the examples of a batch, so that each example's output gradient is
its own (with a mean, every example's gradient would be scaled by the batch size). The model
is put in eval mode by the caller (``gradients.frozen``) so dropout does not make an
example's vector depend on chance.

Task kinds (``TASKS``), detected from the config's ``architectures`` unless given:

* ``classification``: ``AutoModelForSequenceClassification``; one label id per example, the
  loss is the cross-entropy of the logits.
* ``causal-lm`` (an architecture ending in ``ForCausalLM`` or ``LMHeadModel``):
  ``AutoModelForCausalLM``; each example is a prompt and a completion.

How each kind reads, encodes, scores and predicts is its Task's (tasks.py); the functions
below that take a ``LoadedModel`` ask ``loaded.kind`` and are kept for callers that predate it.

LoRA (``peft``): a folder holding ``adapter_config.json`` is an adapter. Its base model is
``base_model_name_or_path`` as written (absolute, or relative to the current folder), else
relative to the adapter folder; the base is loaded for the task (``task_type`` CAUSAL_LM or
SEQ_CLS, else detected from the base's config), wrapped with ``PeftModel.from_pretrained``,
and the tokenizer is read from the adapter folder when it has one, else from the base.
``model_fingerprint`` of an adapter folder covers the adapter's files and the base model's
fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .tasks import TASKS, causal_encoding, greedy_completions, prompt_ids, task_of  # noqa: F401 (re-exported)

_WEIGHT_FILES = ("*.safetensors", "*.bin", "config.json", "adapter_config.json")
# What turns text into ids: another vocabulary or normaliser gives other inputs, so other
# influences, with the very same weights.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "*.model", "chat_template.*")
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "classification"}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    task: str
    path: str
    base: str | None = None  # the base model folder, when ``path`` is a LoRA adapter

    @property
    def kind(self):
        """The Task of this model (tasks.py)."""
        return task_of(self.task)

    @property
    def label2id(self) -> dict[str, int]:
        if self.task == "causal-lm":
            return {}
        return {name: int(i) for i, name in self.model.config.id2label.items()}

    @property
    def num_labels(self) -> int:
        return 0 if self.task == "causal-lm" else len(self.model.config.id2label)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_model_folder(path: str | Path) -> bool:
    """A folder ``load_model`` can read: a saved model (config.json) or a peft adapter."""
    return (Path(path) / "config.json").is_file() or is_adapter(path)


def _adapter_config(folder: Path) -> dict:
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / ADAPTER_CONFIG} is not readable JSON ({exc}); save the adapter again.") from exc


def adapter_base(folder: str | Path) -> Path:
    """The base model folder of the adapter at ``folder`` (see the module docstring)."""
    folder = Path(folder)
    name = _adapter_config(folder).get("base_model_name_or_path")
    if not name:
        raise UserError(f"the adapter at '{folder}' names no base model (base_model_name_or_path in "
                        f"{ADAPTER_CONFIG} is empty); set it to the base model's folder.")
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [given, folder / given]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    looked = ", ".join(f"'{c.resolve()}'" for c in dict.fromkeys(candidates))
    raise UserError(f"the base model '{name}' of the LoRA adapter at '{folder}' was not found (looked in "
                    f"{looked}); put the base model there or set base_model_name_or_path in "
                    f"{folder / ADAPTER_CONFIG} to its folder.")


def model_fingerprint(path: str | Path) -> str:
    """Whether a model is the one an index was built on: its weights, config and tokenizer
    files (``fingerprint.py``: each file's digest cached, so a second query hashes nothing).
    For a LoRA adapter folder: its own files and the base's fingerprint. Prefixed ``v2:``;
    indexes from before the tokenizer was covered hold a plain ``sha256:`` one, checked with
    ``legacy_fingerprint``."""
    from .fingerprint import fingerprint_files

    root = Path(path)
    files = sorted({f for pattern in _WEIGHT_FILES + _TOKENIZER_FILES for f in root.glob(pattern) if f.is_file()})
    value = fingerprint_files(root, files)
    if is_adapter(root):
        value += "+base:" + model_fingerprint(adapter_base(root))
    return "v2:" + value


def fingerprint_matches(path: str | Path, recorded: str) -> bool:
    """``recorded`` (from a manifest) against the model at ``path``, in the recorded scheme."""
    if recorded.startswith("v2:"):
        return model_fingerprint(path) == recorded
    return legacy_fingerprint(path) == recorded


def legacy_fingerprint(path: str | Path) -> str:
    """The fingerprint of indexes built before v2: config and weight files only."""
    root = Path(path)
    files = sorted({f for pattern in _WEIGHT_FILES for f in root.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    if is_adapter(root):
        digest.update(b"base\0" + legacy_fingerprint(adapter_base(root)).encode())
    return "sha256:" + digest.hexdigest()


def detect_task(config) -> str:
    """The task of a transformers config (or of a config.json read as a dict)."""
    architectures = (config.get("architectures") if isinstance(config, dict)
                     else getattr(config, "architectures", None)) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    return "classification"


def folder_task(path: str | Path, task: str | None = None) -> str | None:
    """The task ``load_model(path, task)`` gives, from the folder's JSON files alone (no
    weights, no transformers), so a command can read and check its data file before the
    seconds a model takes to load; None when the folder cannot tell (``load_model`` then
    says what is wrong with it)."""
    if task is not None:
        return task if task in TASKS else None
    folder = Path(path)
    try:
        if is_adapter(folder):
            given = _PEFT_TASKS.get(_adapter_config(folder).get("task_type") or "")
            if given:
                return given
            folder = adapter_base(folder)
        return detect_task(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError, UserError):
        return None


def load_model(path: str | Path, task: str | None = None, num_labels: int | None = None,
               seed: int = 0, label_names: list[str] | None = None) -> LoadedModel:
    """Model and tokenizer from a folder (no hub). A base encoder without a classification
    head gets a new head of ``num_labels`` (default 2), initialised from ``seed`` so that the
    build and every later query see the same head. ``task`` overrides the detected task; a
    folder with ``adapter_config.json`` is a LoRA adapter on its base model (module docstring)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder = Path(path)
    if not is_model_folder(folder):
        raise UserError(f"model folder '{path}' has no config.json (nor {ADAPTER_CONFIG}); pass a folder "
                        "written by save_pretrained (for the demo model: lite-influence demo).")
    adapter = _adapter_config(folder) if is_adapter(folder) else None
    base = adapter_base(folder) if adapter is not None else folder
    if task is not None and task not in TASKS:
        raise UserError(f"unknown task '{task}'; use one of {', '.join(TASKS)}")
    try:
        config = transformers.AutoConfig.from_pretrained(base)
        task = task or (_PEFT_TASKS.get(adapter.get("task_type") or "") if adapter else None) or detect_task(config)
        torch.manual_seed(seed)
        if task == "causal-lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(base)
        else:
            kwargs = {"num_labels": num_labels} if num_labels else {}
            if label_names:  # names for the classes (shown in tables, accepted as labels)
                kwargs = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                          "label2id": {name: i for i, name in enumerate(label_names)}}
            model = transformers.AutoModelForSequenceClassification.from_pretrained(base, **kwargs)
        has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder if has_tokenizer else base)
        if adapter is not None:
            import peft

            with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
                warnings.simplefilter("ignore", FutureWarning)
                model = peft.PeftModel.from_pretrained(model, folder)
    except UserError:
        raise
    except ImportError as exc:
        raise UserError(f"'{path}' is a LoRA adapter and reading it needs the peft package ({exc}); "
                        "run `pip install 'lite-influence[lora]'`.") from exc
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load a model from '{path}': {first}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model, tokenizer, task, str(folder), str(base) if adapter is not None else None)


def token_limit(loaded: LoadedModel, max_length: int) -> int:
    """--max-length, but never past what the model has position embeddings for (a longer
    input would crash the forward pass instead of being truncated)."""
    limits = [max_length, getattr(loaded.tokenizer, "model_max_length", None),
              getattr(loaded.model.config, "max_position_embeddings", None),
              getattr(loaded.model.config, "n_positions", None)]
    return min(int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000)


def encode(loaded: LoadedModel, texts: list[str], pairs: list[str] | None,
           max_length: int, completions: list | None = None, source: str = "") -> list[dict[str, list[int]]]:
    """Tokenised examples, truncated but not padded, as the model's task encodes them.
    ``source`` (" of train.tsv") locates an example in error messages."""
    return loaded.kind.encode(loaded, texts, pairs, max_length, completions=completions, source=source)


def collate(loaded: LoadedModel, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch into model inputs with an attention mask. Causal-LM ``labels`` are
    padded with -100; they are not a model input (``model_inputs`` drops them)."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"attention_mask": torch.zeros((len(examples), width), dtype=torch.long)}
    for key in examples[0]:
        fill = (loaded.tokenizer.pad_token_id or 0) if key == "input_ids" else (-100 if key == "labels" else 0)
        batch[key] = torch.full((len(examples), width), fill, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["attention_mask"][row, :n] = 1
        for key, values in example.items():
            batch[key][row, :n] = torch.tensor(values)
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without ``labels``: a model given labels would compute its own mean loss."""
    return {k: v for k, v in batch.items() if k != "labels"}


def example_losses(loaded: LoadedModel, batch: dict[str, torch.Tensor], labels: torch.Tensor | None = None):
    """Per-example losses (to be summed for backward) and the logits (the task's loss)."""
    return loaded.kind.losses(loaded, batch, labels)


def output_summary(loaded: LoadedModel, batch: dict[str, torch.Tensor], logits: torch.Tensor):
    """What a batch's outputs say per example, small enough to keep (the task's summary)."""
    return loaded.kind.summary(loaded, batch, logits)


def predict(loaded: LoadedModel, encodings: list[dict], batch_size: int = 32) -> "np.ndarray":
    """The model's predicted label of each example (no gradients)."""
    import numpy as np

    predictions = []
    with torch.no_grad():
        for start in range(0, len(encodings), batch_size):
            batch = collate(loaded, encodings[start : start + batch_size])
            predictions.append(loaded.model(**batch).logits.argmax(-1).numpy())
    return np.concatenate(predictions)
