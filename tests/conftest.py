"""Tiny randomly initialised models (seconds, no downloads) shared by the tests."""

from __future__ import annotations

import pytest
import torch
import transformers

# Tiny models spend their time in thread start-up, not arithmetic: one thread is faster and
# does not fight other processes on a shared 2-core machine.
torch.set_num_threads(1)

WORDS = ("good great fine nice bad awful poor dull movie film plot actor story the a is was "
         "very not quite really").split()


def tiny_config(arch: str, num_labels: int = 2):
    common = dict(vocab_size=64, num_labels=num_labels, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if arch == "bert":
        return transformers.BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=24, max_position_embeddings=64, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=16, n_layer=3, n_head=2, n_positions=64, **common)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=64, **common)
    raise ValueError(arch)


def tiny_classifier(arch: str, seed: int = 0, num_labels: int = 2):
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels))
    return model.eval()


def random_batch(batch: int = 4, length: int = 9, seed: int = 0):
    """Token ids with ragged lengths (right padding) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        n = max(2, length - 2 * row)
        ids[row, n:] = 0
        mask[row, n:] = 0
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask}, labels


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/lite-influence."""
    import os

    os.environ["LITE_INFLUENCE_CACHE"] = str(tmp_path_factory.mktemp("hash-cache"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A tiny BERT classifier with a real (word-level) tokenizer, saved like a hub folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    # transformers 5 takes the word list as `vocab` and silently ignores `vocab_file`, which
    # left a tokenizer that maps every word to [UNK] (all same-length examples identical).
    key = "vocab" if int(transformers.__version__.split(".")[0]) >= 5 else "vocab_file"
    tokenizer = transformers.BertTokenizerFast(**{key: str(vocab)})
    assert tokenizer.convert_tokens_to_ids("good") != tokenizer.unk_token_id
    model = tiny_classifier("bert")
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def train_tsv(tmp_path):
    """Twelve labelled sentences in the SST-2 format."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(12):
        words = rng.choices(WORDS, k=rng.randint(3, 10))
        rows.append(f"{' '.join(words)}\t{i % 2}")
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


def exact_unit_gradients(model, units, losses):
    """The independent reference for every projection test: per-example weight gradients by
    plain autograd (``.grad``), in the (out x in [+ bias column]) orientation the projection
    uses. ``losses``: one closure per example returning that example's loss."""
    result = {u.name: [] for u in units}
    for p in model.parameters():
        p.requires_grad_(True)
    for loss in losses:
        model.zero_grad()
        loss().backward()
        for unit in units:
            module = model.get_submodule(unit.name)
            grad = module.weight.grad
            grad = grad.T if unit.kind in ("conv1d", "embedding") else grad
            if unit.has_bias:
                grad = torch.cat([grad, module.bias.grad[:, None]], 1)
            result[unit.name].append(grad.clone())
    for p in model.parameters():
        p.requires_grad_(False)
    return {name: torch.stack(grads) for name, grads in result.items()}


def run_cli(capsys, *args):
    """(exit code, stdout, stderr) of ``lite-influence ARGS`` run in-process through main(),
    which owns the exit codes."""
    from lite_influence.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dense_rows(index, layer, vectors=None, metric=None):
    """A layer's vectors as one dense float64 matrix: the stored ones as ``metric`` (default:
    the index's) compares them (unit rows for cosine, raw for dot) or, given, raw query
    vectors; exact token rows (the embeddings) expanded to (n, vocab x k), which makes every
    brute-force numpy reference of the tests a reference for them too."""
    import numpy as np

    store = getattr(index, "store", index)
    metric = metric or store.metric
    view = store.layer(layer)
    if view.kind == "dense":
        return np.asarray(view.vectors(None, metric) if vectors is None else vectors, np.float64)
    rows = view.stored if vectors is None else vectors
    vocab = store.layer_info(layer)["units"][0]["in_dim"]
    dense = np.zeros((rows.n, vocab, rows.k))
    for i in range(rows.n):
        tokens, values = rows.row(i)
        dense[i, tokens] = values
    dense = dense.reshape(rows.n, -1)
    if vectors is None and metric == "cosine":
        norms = np.linalg.norm(dense, axis=1, keepdims=True)
        dense = dense / np.where(norms > 0, norms, 1)
    return dense


def start_server(index_path, log):
    """A real uvicorn server in a subprocess on a free port (port 0), once its state file is
    written beside the index (the CLI and the page find it there)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from lite_influence.serve import state_path

    code = f"from lite_influence.serve import serve; serve([{str(index_path)!r}], port=0)"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                        "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not state_path(index_path).exists():
        assert process.poll() is None and time.monotonic() < deadline, Path(log).read_text()
        time.sleep(0.1)
    return process
