"""Loading a model and tokenizer from a folder, and the loss whose gradient we index.

The loss is *summed* over the examples of a batch, so that each example's output gradient is
its own (with a mean, every example's gradient would be scaled by the batch size). The model
is put in eval mode by the caller (``gradients.frozen``) so dropout does not make an
example's vector depend on chance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

TASKS = ("classification",)
_WEIGHT_FILES = ("*.safetensors", "*.bin", "config.json")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    task: str
    path: str

    @property
    def label2id(self) -> dict[str, int]:
        return {name: int(i) for i, name in self.model.config.id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.model.config.id2label)


def model_fingerprint(path: str | Path) -> str:
    """sha256 of the config and weight files: whether a model is the one an index was built on."""
    root = Path(path)
    files = sorted({f for pattern in _WEIGHT_FILES for f in root.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def detect_task(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    return "classification"


def load_model(path: str | Path, task: str | None = None, num_labels: int | None = None,
               seed: int = 0, label_names: list[str] | None = None) -> LoadedModel:
    """Model and tokenizer from a folder (no hub). A base encoder without a classification
    head gets a new head of ``num_labels`` (default 2), initialised from ``seed`` so that the
    build and every later query see the same head."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"model folder '{path}' has no config.json; pass a folder written by "
                        "save_pretrained (for the demo model: lite-influence demo).")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        task = task or detect_task(config)
        if task not in TASKS:
            raise UserError(f"task '{task}' is not supported yet; supported: {', '.join(TASKS)}")
        kwargs = {"num_labels": num_labels} if num_labels else {}
        if label_names:  # names for the classes (shown in tables, accepted as labels)
            kwargs = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                      "label2id": {name: i for i, name in enumerate(label_names)}}
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except UserError:
        raise
    except Exception as exc:  # transformers raises many kinds; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load a model from '{path}': {first}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model, tokenizer, task, str(folder))


def token_limit(loaded: LoadedModel, max_length: int) -> int:
    """--max-length, but never past what the model has position embeddings for (a longer
    input would crash the forward pass instead of being truncated)."""
    limits = [max_length, getattr(loaded.tokenizer, "model_max_length", None),
              getattr(loaded.model.config, "max_position_embeddings", None),
              getattr(loaded.model.config, "n_positions", None)]
    return min(int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000)


def encode(loaded: LoadedModel, texts: list[str], pairs: list[str] | None,
           max_length: int) -> list[dict[str, list[int]]]:
    """Tokenised examples, truncated but not padded (each batch pads to its own longest)."""
    args = (texts, pairs) if pairs is not None else (texts,)
    encoded = loaded.tokenizer(*args, truncation=True, max_length=token_limit(loaded, max_length))
    keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
    return [{k: encoded[k][i] for k in keys} for i in range(len(texts))]


def collate(loaded: LoadedModel, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad a batch into model inputs with an attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"attention_mask": torch.zeros((len(examples), width), dtype=torch.long)}
    for key in examples[0]:
        fill = (loaded.tokenizer.pad_token_id or 0) if key == "input_ids" else 0
        batch[key] = torch.full((len(examples), width), fill, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        batch["attention_mask"][row, :n] = 1
        for key, values in example.items():
            batch[key][row, :n] = torch.tensor(values)
    return batch


def example_losses(loaded: LoadedModel, batch: dict[str, torch.Tensor], labels: torch.Tensor):
    """Per-example losses (to be summed for backward) and the logits."""
    logits = loaded.model(**batch).logits
    losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return losses, logits


def predict(loaded: LoadedModel, encodings: list[dict], batch_size: int = 32) -> "np.ndarray":
    """The model's predicted label of each example (no gradients)."""
    import numpy as np

    predictions = []
    with torch.no_grad():
        for start in range(0, len(encodings), batch_size):
            batch = collate(loaded, encodings[start : start + batch_size])
            predictions.append(loaded.model(**batch).logits.argmax(-1).numpy())
    return np.concatenate(predictions)
