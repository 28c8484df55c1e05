"""Planted facts: does influence on a causal LM find the training examples that taught a fact?

A tiny GPT-2 (random init from a config; its LM head is tied to the word embeddings, so the
tied-embedding path is exercised) with a word-level tokenizer built here is trained with a
plain torch loop on generated facts "key k17 ->" / " value v42", each stated by three
training examples (three prompt templates). A few facts are *contradicted*: two more
examples state them with one distinct wrong value. The model is trained until it has
memorised every uncontradicted fact (for a contradicted one it says the majority value).

Then ``lite_influence.build_index`` indexes the training set (task causal-lm, detected;
``--text-col prompt --completion-col completion``; defaults otherwise: pca, k=8, the
``attention`` selector = embeddings + attention linears; GPT-2 has no separate head unit), once
with ``--metric cosine`` and once with ``--metric dot``. Each fact is queried with a held-out
prompt template ("query key k17 ->") and its true completion " value v42":

* proponents: recall@1 = the top proponent states the fact (same key and true value);
  recall@10 = the share of the fact's true statements (3) among the top 10. Per layer and
  aggregated over all layers with vote and rank (exactly what ``InfluenceIndex.query`` does).
* opponents, contradicted facts only: recall@2 = the share of its 2 wrong-value examples
  among the top-2 opponents, recall@10 the share among the top 10, and the share of
  wrong-value examples whose exact (float64) influence is negative.

Speed on the same tiny model: the gradient pass of the build (examples/s), the query
gradients (examples/s, with the greedy-free given completion) and an end-to-end ``query``
call, and the ratio of ``layer_vectors`` (what a build runs per batch) to a plain training
step (forward + mean loss over completion tokens + backward + SGD step) on the same batches,
timed round-robin as in ``build_speed.py``.

    python benchmarks/planted_facts.py          # ~1-3 minutes, one torch thread
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing

import lite_influence
from build_speed import time_round_robin  # benchmarks/ is on sys.path when run as a script
from lite_influence.data import write_rows
from lite_influence.gradients import layer_vectors
from lite_influence.lookup import lookup
from lite_influence.models import LoadedModel, collate, encode, model_inputs

RESULTS = Path(__file__).resolve().parent / "results"
FULL = 10**6  # proj_dim above every side: identity projections, the exact gradients
TEMPLATES = ("key {k} ->", "the key {k} ->", "recall key {k} ->")
QUERY_TEMPLATE = "query key {k} ->"
SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>"]


# ------------------------------------------------------------------ data, tokenizer, model


def make_facts(n_facts: int, n_contradicted: int, seed: int):
    """Training rows (3 true statements per fact, 2 wrong ones per contradicted fact) and facts.
    Every value token is used by one fact only (true values, then the wrong ones), so a
    training example that states another fact is never a legitimate proponent of this one."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(n_facts + n_contradicted)
    contradicted = set(rng.choice(n_facts, n_contradicted, replace=False).tolist())
    spare = iter(values[n_facts:].tolist())
    facts, rows = [], []
    for k in range(n_facts):
        fact = {"key": f"k{k}", "value": f"v{values[k]}", "contradicted": k in contradicted, "wrong": None}
        for template in TEMPLATES:
            rows.append({"prompt": template.format(k=fact["key"]), "completion": f" value {fact['value']}",
                         "key": fact["key"], "kind": "true"})
        if fact["contradicted"]:
            fact["wrong"] = f"v{next(spare)}"
            for template in TEMPLATES[:2]:
                rows.append({"prompt": template.format(k=fact["key"]), "completion": f" value {fact['wrong']}",
                             "key": fact["key"], "kind": "wrong"})
        facts.append(fact)
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], facts


def word_tokenizer(n_facts: int, n_values: int):
    words = SPECIAL + ["key", "the", "recall", "query", "->", "value"]
    words += [f"k{i}" for i in range(n_facts)] + [f"v{i}" for i in range(n_values)]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                pad_token="[PAD]", unk_token="[UNK]")


def make_model(vocab: int, args, seed: int):
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=args.hidden, n_layer=args.blocks, n_head=4,
                                     n_positions=32, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config)


def batch_loss(loaded, model, encodings, batch, reduction="mean"):
    """Mean (training) or summed token cross-entropy over completion tokens."""
    inputs = collate(loaded, [encodings[i] for i in batch])
    logits = model(**model_inputs(inputs)).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction=reduction)


def greedy_value(loaded, model, prompts) -> list[str]:
    """The value token the model puts after "value" (teacher-forced), for each prompt."""
    encodings = encode(loaded, prompts, None, 32, completions=[" value v0"] * len(prompts))
    inputs = collate(loaded, encodings)
    with torch.no_grad():
        logits = model(**model_inputs(inputs)).logits
    lengths = inputs["attention_mask"].sum(1)
    ids = logits[torch.arange(len(prompts)), lengths - 2].argmax(-1)
    return loaded.tokenizer.convert_ids_to_tokens(ids.tolist())


def train(loaded, rows, facts, args) -> dict:
    """Plain AdamW loop until every uncontradicted fact is memorised (or --max-epochs)."""
    model = loaded.model
    encodings = encode(loaded, [r["prompt"] for r in rows], None, 32, completions=[r["completion"] for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    started, history = time.perf_counter(), []
    plain = [f for f in facts if not f["contradicted"]]
    for epoch in range(1, args.max_epochs + 1):
        order = torch.randperm(len(rows), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), args.train_batch):
            batch = order[start : start + args.train_batch]
            loss = batch_loss(loaded, model, encodings, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if epoch % 10 == 0 or epoch == args.max_epochs:
            model.eval()
            said = greedy_value(loaded, model, [TEMPLATES[0].format(k=f["key"]) for f in plain])
            memorised = float(np.mean([s == f["value"] for s, f in zip(said, plain)]))
            history.append({"epoch": epoch, "train_loss": total / len(rows), "memorised": memorised})
            model.train()
            if memorised == 1.0 and epoch >= args.min_epochs:
                break
    model.eval()
    said_train = greedy_value(loaded, model, [TEMPLATES[0].format(k=f["key"]) for f in facts])
    said_query = greedy_value(loaded, model, [QUERY_TEMPLATE.format(k=f["key"]) for f in facts])
    return {"epochs": history[-1]["epoch"], "seconds": round(time.perf_counter() - started, 1),
            "final_train_loss": history[-1]["train_loss"], "history": history,
            "true_value_said_train_prompt": float(np.mean([s == f["value"] for s, f in zip(said_train, facts)])),
            "true_value_said_query_prompt": float(np.mean([s == f["value"] for s, f in zip(said_query, facts)])),
            "contradicted_majority_said": float(np.mean([s == f["value"] for s, f in zip(said_train, facts)
                                                         if f["contradicted"]]))}


# ------------------------------------------------------------------ evaluation


def evaluate(index, rows, facts, grads) -> dict:
    """Recall of true statements among proponents and of wrong ones among opponents, per
    layer and aggregated (vote, rank), one query per fact."""
    true_ids = {f["key"]: {i for i, r in enumerate(rows) if r["key"] == f["key"] and r["kind"] == "true"} for f in facts}
    wrong_ids = {f["key"]: {i for i, r in enumerate(rows) if r["key"] == f["key"] and r["kind"] == "wrong"} for f in facts}
    scopes = {layer: ([layer], "vote") for layer in index.layers}
    scopes.update({"all (vote)": (index.layers, "vote"), "all (rank)": (index.layers, "rank")})
    k = min(10, len(index))
    out = {}
    for scope, (layers, agg) in scopes.items():
        r1, r10, o_m, o10, negative = [], [], [], [], []
        for q, fact in enumerate(facts):
            vectors = {layer: grads.vectors[layer][q : q + 1] for layer in layers}
            top = [row["id"] for row in lookup(index.store, index.examples, vectors, layers, 1.0, k, agg)]
            truth = true_ids[fact["key"]]
            r1.append(top[0] in truth)
            r10.append(len(truth & set(top[:10])) / len(truth))
            if fact["contradicted"]:
                wrong = wrong_ids[fact["key"]]
                bottom = [row["id"] for row in lookup(index.store, index.examples, vectors, layers, -1.0, k, agg)]
                o_m.append(len(wrong & set(bottom[: len(wrong)])) / len(wrong))
                o10.append(len(wrong & set(bottom[:10])) / len(wrong))
                ids = np.array(sorted(wrong))
                score = sum(index.vectors(layer, ids).astype(np.float64)
                            @ index.store.prepare_queries(vectors[layer])[0].astype(np.float64) for layer in layers)
                negative.append(float(np.mean(score < 0)))
        out[scope] = {"recall@1": float(np.mean(r1)), "recall@10": float(np.mean(r10)),
                      "opp_recall@2": float(np.mean(o_m)), "opp_recall@10": float(np.mean(o10)),
                      "wrong_negative": float(np.mean(negative))}
    return out


def speed(index, model_dir, rows, facts, args) -> dict:
    """Projected-gradient batches vs plain training steps (same batches), query speed."""
    session = index.session()
    loaded, projectors, layers = session.loaded, session.projectors, session.layers
    encodings = encode(loaded, [r["prompt"] for r in rows], None, 32, completions=[r["completion"] for r in rows])
    batches = [list(range(s, s + args.batch_size)) for s in range(0, len(rows) - args.batch_size + 1, args.batch_size)]
    trainee = copy.deepcopy(loaded.model).eval()
    for p in trainee.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(trainee.parameters(), lr=1e-4)

    def train_step(batch):
        optimizer.zero_grad(set_to_none=True)
        batch_loss(loaded, trainee, encodings, batch).backward()
        optimizer.step()

    variants = {"lite_influence layer_vectors": lambda b: layer_vectors(loaded, projectors, layers, encodings, None, b),
                "training step": train_step}
    times = time_round_robin(variants, batches, 2, args.reps)
    median = {name: statistics.median(t) for name, t in times.items()}
    prompts = [QUERY_TEMPLATE.format(k=f["key"]) for f in facts]
    completions = [f" value {f['value']}" for f in facts]
    start = time.perf_counter()
    index.gradients(prompts, completions=completions)
    gradient_s = time.perf_counter() - start
    one = []
    for prompt, completion in list(zip(prompts, completions))[:10]:
        start = time.perf_counter()
        index.query(prompt, completion=completion, k=10)
        one.append(time.perf_counter() - start)
    return {"batch_size": args.batch_size, "median_s_per_batch": median,
            "examples_per_s": {n: args.batch_size / t for n, t in median.items()},
            "ratio_layer_vectors_to_train_step": median["training step"] / median["lite_influence layer_vectors"],
            "query_gradients_examples_per_s": len(prompts) / gradient_s,
            "query_call_median_s": statistics.median(one)}


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=48)
    parser.add_argument("--contradicted", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--min-epochs", type=int, default=40)
    parser.add_argument("--max-epochs", type=int, default=400)
    parser.add_argument("--proj-dim", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="build batch size, and of the speed comparison")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a shared 2-core machine 2 threads ran this tiny model 70x slower than 1")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    started, load_start = time.perf_counter(), os.getloadavg()

    rows, facts = make_facts(args.facts, args.contradicted, args.seed)
    tokenizer = word_tokenizer(args.facts, args.facts + args.contradicted)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded = LoadedModel(make_model(len(tokenizer), args, args.seed), tokenizer, "causal-lm", str(tmp / "model"))
        training = train(loaded, rows, facts, args)
        loaded.model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        data = write_rows(tmp / "train.tsv", rows, ["prompt", "completion", "key", "kind"])
        prompts = [QUERY_TEMPLATE.format(k=f["key"]) for f in facts]
        completions = [f" value {f['value']}" for f in facts]
        results, builds, dims = {}, {}, {}
        projections = (f"pca k={args.proj_dim} (default)", f"random k={args.proj_dim}", "exact (full width)")
        for projection in projections:
            kind, proj_dim = projection.split()[0], (FULL if projection.startswith("exact") else args.proj_dim)
            for metric in ("cosine", "dot"):
                start = time.perf_counter()
                index = lite_influence.build_index(
                    tmp / "model", data, tmp / f"{kind}-{metric}", metric=metric, text_col="prompt",
                    completion_col="completion", projection="random" if kind == "exact" else kind,
                    proj_dim=proj_dim, batch_size=args.batch_size, seed=args.seed)
                wall = time.perf_counter() - start
                builds[f"{projection}, {metric}"] = {
                    "wall_s": round(wall, 2), "gradient_pass_s": index.manifest["build_seconds"],
                    "examples_per_s": round(len(rows) / wall, 1),
                    "gradient_pass_examples_per_s": round(len(rows) / index.manifest["build_seconds"], 1)}
                grads = index.gradients(prompts, completions=completions)
                results.setdefault(projection, {})[metric] = evaluate(index, rows, facts, grads)
                if metric == "cosine":
                    dims[projection] = {layer["name"]: layer["dim"] for layer in index.manifest["layers"]}
                    if kind == "pca":
                        default = index
        assert default.manifest["model"]["task"] == "causal-lm"
        timing = speed(default, tmp / "model", rows, facts, args)
        layers = default.layers

    summary = {
        "setup": {"model": f"GPT-2 from config (n_embd {args.hidden}, {args.blocks} blocks, tied LM head), "
                           f"word-level vocabulary of {len(tokenizer)}",
                  "facts": args.facts, "contradicted": args.contradicted, "train_examples": len(rows),
                  "statements_per_fact": len(TEMPLATES), "wrong_statements_per_contradicted_fact": 2,
                  "query_template": QUERY_TEMPLATE, "train_templates": TEMPLATES,
                  "index": "selector attention (embeddings + attention linears; the LM head is the tied embeddings)",
                  "layer_dims": dims,
                  "torch_threads": torch.get_num_threads()},
        "training": training, "results": results, "build": builds, "speed": timing,
        "proj_dim": args.proj_dim,
        "total_wall_s": round(time.perf_counter() - started, 1),
        "load_average_start_end": [load_start, os.getloadavg()],
    }
    text = report(summary, layers)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "planted_facts.json").write_text(json.dumps(summary, indent=2))
    (args.out / "planted_facts.md").write_text(text)


def report(s: dict, layers: list[str]) -> str:
    t, setup = s["training"], s["setup"]
    lines = [f"# Planted facts ({setup['model']})", "",
             f"{setup['facts']} facts 'key kX -> value vY' (every value token belongs to one fact), each stated by "
             f"{setup['statements_per_fact']} training examples (prompt templates "
             f"{', '.join(repr(x) for x in setup['train_templates'])}); {setup['contradicted']} facts contradicted by "
             f"2 more examples with one distinct wrong value: {setup['train_examples']} examples. Trained "
             f"{t['epochs']} epochs ({t['seconds']} s, final mean completion loss {t['final_train_loss']:.4f}): the true "
             f"value is the argmax for {t['true_value_said_train_prompt']:.0%} of facts after a training prompt and "
             f"{t['true_value_said_query_prompt']:.0%} after the held-out query prompt '{setup['query_template']}' "
             f"(contradicted facts: majority value for {t['contradicted_majority_said']:.0%}).",
             f"Index: `build_index` defaults (task causal-lm detected, {setup['index']}), cosine and dot. "
             "One query per fact: the held-out prompt and the true completion.", "",
             "recall@1: the top proponent states the fact; recall@10: share of the fact's 3 true statements among "
             "the top 10 proponents; opp@2 / opp@10: share of a contradicted fact's 2 wrong-value examples among its "
             "top 2 / top 10 opponents; neg: share of wrong-value examples whose influence (exact float64 inner "
             "product of the stored vectors, summed over the scope's layers) is negative. A single layer ranks by "
             "its own score; 'all' aggregates every layer's top-10 list (vote, rank), as `query` does."]
    for projection, by_metric in s["results"].items():
        lines += ["", f"## {projection}", "", "| scope | metric | recall@1 | recall@10 | opp@2 | opp@10 | neg |",
                  "|---|---|---|---|---|---|---|"]
        for scope in layers + ["all (vote)", "all (rank)"]:
            for metric in ("cosine", "dot"):
                r = by_metric[metric][scope]
                lines.append(f"| {scope} | {metric} | {r['recall@1']:.3f} | {r['recall@10']:.3f} | "
                             f"{r['opp_recall@2']:.3f} | {r['opp_recall@10']:.3f} | {r['wrong_negative']:.3f} |")
    sp = s["speed"]
    eps = sp["examples_per_s"]
    default = next(v for k, v in s["build"].items() if k.startswith("pca") and k.endswith("cosine"))
    lines += ["", "## Speed", "",
              f"{setup['torch_threads']} torch thread(s), batch {sp['batch_size']}, medians of round-robin timings "
              "on the same batches:", "",
              "| what | examples/s |", "|---|---|",
              f"| projected gradients, pca k={s['proj_dim']} (`layer_vectors`, what a build runs per batch) | "
              f"{eps['lite_influence layer_vectors']:.0f} |",
              f"| plain training step (forward + mean completion loss + backward + SGD step) | {eps['training step']:.0f} |",
              f"| `build_index` end to end (model load, pca fitting, gradients, FAISS, files) | {default['examples_per_s']} |",
              f"| `build_index` gradient pass alone | {default['gradient_pass_examples_per_s']} |",
              f"| query gradients (`InfluenceIndex.gradients`, given completions) | {sp['query_gradients_examples_per_s']:.0f} |",
              "", f"Ratio projected gradients / training step: {sp['ratio_layer_vectors_to_train_step']:.2f}x "
              f"(build issue goal on MiniLM: >= 1.5x). One `query` call (gradient + {len(layers)} layer searches + "
              f"vote): {sp['query_call_median_s'] * 1000:.1f} ms median.",
              "", f"Total wall time: {s['total_wall_s']:.0f} s. Load average at start "
              f"{'/'.join(f'{x:.1f}' for x in s['load_average_start_end'][0])}, at end "
              f"{'/'.join(f'{x:.1f}' for x in s['load_average_start_end'][1])} on {os.cpu_count()} cores."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
