"""One Task per model kind, after Kronfluence's ``Task``: everything that differs between a
sequence classifier and a causal language model lives here, so the rest of the code asks
``task_of(kind)`` and never branches on the kind itself.

A task owns: reading rows (``read``, over data.py's loaders), encoding (``encode``), the
per-example loss (``losses``, *summed* by the caller so each example's gradient is its own),
what a batch's outputs say (``summary``), the query gradients with their prediction
(``query_gradients``), "predicted correctly" and the description of a query (``describe``).

Classification: one label id per example, cross-entropy of the logits. A query without a
label is explained at the model's predicted label, taken from the same forward pass whose
loss is back-propagated: ``losses`` takes label -1 as "the argmax of these logits", so a
query costs one forward and one backward pass.

Causal LM: each example is a prompt and a completion. The prompt is tokenised *with* the
tokenizer's special tokens (Llama's BOS), the completion *without*, and the two id lists are
concatenated (give a completion its leading space, " value v42"). No EOS is appended. An
empty prompt (a file with only a text column) becomes BOS, or EOS where there is no BOS, so
the completion's first token is predicted too. Too long: the completion is kept (its first
``max_length - 1`` tokens when it alone is too long) and the prompt loses tokens from its
start. ``labels`` holds the completion's ids and -100 on the prompt (and padding); the loss
is the shifted token cross-entropy summed over the completion. A completion that tokenises
to nothing is a ``UserError``. A query without a completion explains the model's greedy
continuation (``greedy_completions``: argmax decoding with the key/value cache, stopping at
``max_new_tokens`` or the first EOS, which is kept); the generated *ids* are what its
gradient is of. It counts as "predicted correctly" when the teacher-forced argmax of every
completion token is that token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError

TASKS = ("classification", "causal-lm")
PREDICTED = -1  # a classification target meaning "the model's argmax in this forward pass"


@dataclass
class QueryGradients:
    vectors: dict[str, object]  # layer -> (queries, dim) array, raw (not normalised), or TokenRows
    labels: np.ndarray  # the labels the gradients are of (-1 for a causal LM)
    predicted: np.ndarray
    losses: np.ndarray
    logits: np.ndarray
    correct: np.ndarray  # predicted correctly, as the task defines it
    completions: list[str] | None = None  # causal LM: the completion each gradient is of
    completion_sources: list[str] | None = None  # "given" or "greedy"
    tokens: np.ndarray | None = None  # causal LM: (completion tokens, teacher-forced argmax hits)


class ClassificationTask:
    name = "classification"
    target = "label"  # what a query's proponents push towards

    def read(self, path, *, text_col=None, pair_col=None, label_col=None, completion_col=None,
             label2id=None, limit=None, queries=False, raw_labels=False):
        """Rows of a data file; ``queries``: the label column may be missing (predicted);
        ``raw_labels``: labels as written, for ``data.with_label_ids`` once the model is loaded."""
        from .data import load_examples

        return load_examples(path, text_col=text_col, pair_col=pair_col, label_col=label_col,
                             label2id=label2id, limit=limit, require_label=not queries, raw_labels=raw_labels)

    def check_query(self, *, pair=None, label=None, completion=None) -> None:
        if completion is not None:
            raise UserError("--completion is for causal language model indexes; this index is a classifier's (use --label).")

    def encode(self, loaded, texts, pairs, max_length, completions=None, source=""):
        """Tokenised examples, truncated but not padded (each batch pads to its own longest)."""
        from .models import token_limit

        limit = token_limit(loaded, max_length)
        check_room(loaded.tokenizer, limit, max_length, pairs is not None)
        args = (texts, pairs) if pairs is not None else (texts,)
        encoded = loaded.tokenizer(*args, truncation=True, max_length=limit)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
        return [{k: encoded[k][i] for k in keys} for i in range(len(texts))]

    def losses(self, loaded, batch, labels):
        """Per-example cross-entropy and the logits; a label of -1 is the logits' argmax."""
        import torch

        from .models import model_inputs

        logits = loaded.model(**model_inputs(batch)).logits
        labels = torch.where(labels == PREDICTED, logits.detach().argmax(-1), labels)
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none"), logits

    def summary(self, loaded, batch, logits) -> np.ndarray:
        return logits.detach().float().numpy()

    def query_gradients(self, session, texts, pairs=None, labels=None, completions=None,
                        batch_size=16, max_new_tokens=20) -> QueryGradients:
        """One forward and one backward pass per batch; the prediction is that forward's."""
        from .data import label_id

        encodings = self.encode(session.loaded, texts, pairs, session.max_length)
        given = labels or [None] * len(texts)
        targets = [PREDICTED if value is None else label_id(value, session.label2id, where=f" of query {i + 1}")
                   for i, value in enumerate(given)]
        vectors, losses, logits = session.run(encodings, targets, batch_size)
        predicted = logits.argmax(1)
        used = np.where(np.array(targets) == PREDICTED, predicted, np.array(targets))
        return QueryGradients(vectors, used, predicted, losses, logits, used == predicted)

    def describe(self, grads, i, texts, pairs, names) -> dict:
        probabilities = np.exp(grads.logits[i] - grads.logits[i].max())
        probabilities /= probabilities.sum()
        return {"text": texts[i], "pair": pairs[i] if pairs else None,
                "label": int(grads.labels[i]), "label_name": names[grads.labels[i]],
                "loss": float(grads.losses[i]),
                "prediction": {"label": int(grads.predicted[i]), "label_name": names[grads.predicted[i]],
                               "probability": float(probabilities[grads.predicted[i]])}}


def check_room(tokenizer, limit: int, max_length: int, pair: bool) -> None:
    """Refuse a --max-length that leaves no token of text. The tokenizer adds its special
    tokens ([CLS] and [SEP]; [CLS] a [SEP] b [SEP] for a pair) to every example; with a limit
    of exactly that many, every example is those tokens alone, so every training example has
    the same gradient and every influence is a tie; below it, transformers' tokenizers do not
    truncate at all and the limit is silently ignored. The rule is on the tokenizer, not on
    the data: at least one token of text must fit (a tokenizer without special tokens, GPT-2's,
    accepts --max-length 1: each example keeps its first token)."""
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    if limit > special:
        return
    names = [t for t in (tokenizer.cls_token, tokenizer.sep_token) if t] if special else []
    which = f" ({', '.join(names)})" if names and not pair else ""
    raise UserError(f"--max-length {max_length} leaves no room for text: the tokenizer adds {special} special "
                    f"tokens{which} to every {'pair' if pair else 'example'}, so every example would be only "
                    f"those and every gradient the same; pass --max-length {special + 1} or more (default 128).")


class CausalLMTask:
    name = "causal-lm"
    target = "completion"

    def read(self, path, *, text_col=None, pair_col=None, label_col=None, completion_col=None,
             label2id=None, limit=None, queries=False, raw_labels=False):
        """Prompt + completion rows (no labels); ``queries``: a completion may be missing (greedy)."""
        from .data import load_lm_examples

        if pair_col is not None:
            raise UserError("a causal language model takes a prompt and a completion, not a text pair; "
                            "drop --pair-col and pass --completion-col.")
        return load_lm_examples(path, text_col=text_col, completion_col=completion_col,
                                label_col=label_col, limit=limit, queries=queries)

    def check_query(self, *, pair=None, label=None, completion=None) -> None:
        if pair is not None or label is not None:
            raise UserError("this index is a causal language model's: pass the prompt as --text and what it should say "
                            "as --completion (not --pair or --label).")

    def encode(self, loaded, texts, pairs, max_length, completions=None, source=""):
        """``texts`` are prompts and ``completions`` completions (text or token ids); without
        ``completions`` each text is a whole completion after an empty prompt."""
        if pairs is not None:
            raise UserError("a causal language model takes a prompt and a completion, not a text pair; "
                            "drop --pair-col and pass --completion-col.")
        if completions is None:
            texts, completions = [""] * len(texts), list(texts)
        return [causal_encoding(loaded, prompt, completion, max_length,
                                f"{'row' if source else 'example'} {i + 1}{source}")
                for i, (prompt, completion) in enumerate(zip(texts, completions))]

    def losses(self, loaded, batch, labels=None):
        """Summed shifted token cross-entropy over the label positions (default: the batch's)."""
        import torch

        from .models import model_inputs

        logits = loaded.model(**model_inputs(batch)).logits
        targets = (batch["labels"] if labels is None else labels)[:, 1:]
        shifted = logits[:, :-1].float()
        tokens = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                                   reduction="none", ignore_index=-100)
        return tokens.view(targets.shape).sum(1), logits

    def summary(self, loaded, batch, logits) -> np.ndarray:
        """(completion tokens, tokens whose teacher-forced argmax is the completion's)."""
        targets = batch["labels"][:, 1:]
        scored = targets != -100
        hits = (logits[:, :-1].detach().argmax(-1) == targets) & scored
        return np.stack([scored.sum(1).numpy(), hits.sum(1).numpy()], 1)

    def query_gradients(self, session, texts, pairs=None, labels=None, completions=None,
                        batch_size=16, max_new_tokens=20) -> QueryGradients:
        given = list(completions) if completions is not None else [None] * len(texts)
        if len(given) != len(texts):
            raise UserError(f"{len(texts)} prompts but {len(given)} completions; give one completion per prompt.")
        missing = [i for i, c in enumerate(given) if c is None]
        generated = greedy_completions(session.loaded, [texts[i] for i in missing], max_new_tokens, session.max_length)
        for i, ids in zip(missing, generated):
            given[i] = ids
        encodings = self.encode(session.loaded, texts, None, session.max_length, completions=given,
                                source="" if len(texts) == 1 else " of the queries")
        vectors, losses, tokens = session.run(encodings, None, batch_size)
        texts_used = [c if isinstance(c, str) else session.loaded.tokenizer.decode(c) for c in given]
        sources = ["greedy" if i in set(missing) else "given" for i in range(len(texts))]
        none = np.full(len(texts), -1)
        return QueryGradients(vectors, none, none, losses, np.zeros((len(texts), 0)), tokens[:, 1] == tokens[:, 0],
                              completions=texts_used, completion_sources=sources, tokens=tokens)

    def describe(self, grads, i, texts, pairs, names) -> dict:
        n, hits = (int(x) for x in grads.tokens[i])
        return {"text": texts[i], "pair": None, "completion": grads.completions[i],
                "completion_source": grads.completion_sources[i], "completion_tokens": n,
                "argmax_matches": hits, "label": None, "label_name": None,
                "loss": float(grads.losses[i]), "prediction": None}


_TASKS = {task.name: task for task in (ClassificationTask(), CausalLMTask())}


def task_of(kind: str | None):
    """The Task of a kind name (an index's manifest, a loaded model); None is classification."""
    try:
        return _TASKS[kind or "classification"]
    except KeyError:
        raise UserError(f"unknown task '{kind}'; use one of {', '.join(TASKS)}") from None


def prompt_ids(loaded, prompt: str) -> list[int]:
    """A prompt's ids, with the tokenizer's special tokens; an empty prompt is BOS (or EOS)."""
    tokenizer = loaded.tokenizer
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else []
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start] if start is not None else []
    return ids


def causal_encoding(loaded, prompt: str, completion, max_length: int, where: str = "the query") -> dict:
    """One prompt + completion as ``input_ids`` and ``labels`` (-100 on the prompt)."""
    from .models import token_limit

    if isinstance(completion, str):
        completion_ids = list(loaded.tokenizer(completion, add_special_tokens=False)["input_ids"])
    else:
        completion_ids = [int(i) for i in completion]
    if not completion_ids:
        raise UserError(f"the completion of {where} ({completion!r}) tokenises to no tokens; give a "
                        "completion with some text (or, for a query, none: the model's greedy continuation is used).")
    limit = token_limit(loaded, max_length)
    if limit < 2:  # one token has nothing before it to be predicted from
        raise UserError(f"--max-length {max_length} leaves no token to predict: a causal language model "
                        "predicts each token from the ones before it; pass --max-length 2 or more (default 128).")
    start = prompt_ids(loaded, prompt)
    completion_ids = completion_ids[: max(1, limit - (1 if start else 0))]
    start = start[len(start) - max(0, limit - len(completion_ids)):] if start else start
    if not start and len(completion_ids) < 2:
        raise UserError(f"the completion of {where} ({completion!r}) leaves no token to predict: the prompt "
                        "is empty and the tokenizer has no BOS/EOS token; give a prompt.")
    return {"input_ids": start + completion_ids, "labels": [-100] * len(start) + completion_ids}


def _next_step(model, out, ids: list[int]):
    """One more decoding step from ``out``'s key/value cache (named ``cache`` from
    transformers 5.2x, ``past_key_values`` before), or over all ``ids`` when there is none."""
    import torch

    for name in ("cache", "past_key_values"):
        state = getattr(out, name, None)
        if state is not None:
            return model(input_ids=torch.tensor([ids[-1:]]), use_cache=True, **{name: state})
    return model(input_ids=torch.tensor([ids]), use_cache=False)


def greedy_completions(loaded, prompts: list[str], max_new_tokens: int, max_length: int | None = None) -> list[list[int]]:
    """The model's greedy continuation (token ids) of each prompt; see the module docstring.
    With ``max_length``, a long prompt keeps its last tokens so prompt + continuation fit."""
    import torch

    from .models import token_limit

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    eos = loaded.tokenizer.eos_token_id
    window = token_limit(loaded, max_length if max_length is not None else 1_000_000 - 1)
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = prompt_ids(loaded, prompt)
            ids = ids[max(0, len(ids) - max(1, window - max_new_tokens)):]
            if not ids:
                raise UserError("cannot continue an empty prompt: the tokenizer has no BOS/EOS token; give a prompt.")
            out = loaded.model(input_ids=torch.tensor([ids]), use_cache=True)
            new: list[int] = []
            while True:
                token = int(out.logits[0, -1].argmax())
                new.append(token)
                if len(new) >= max_new_tokens or token == eos or len(ids) + len(new) >= window:
                    break
                out = _next_step(loaded.model, out, ids + new)
            results.append(new)
    return results
