"""The linear datamodeling score (LDS) of lite-influence against Kronfluence's EK-FAC (issue 15, item 3).

    python benchmarks/lds.py --data ../shared/data/sst2 [--n 1000 --m 50 --queries 100 --epochs 2 --work /tmp/lds_work]
    python benchmarks/lds.py --tiny            # a tiny random BERT, seconds (the smoke test)

LDS (Park et al. 2023, TRAK): draw M random subsets S_1..S_M of half the N training
examples, retrain the model on each, and measure every query's margin under each retrained
model. An attribution method predicts the margin of model S as ``sum_{i in S} tau(i, q)``;
its LDS is Spearman's rho over the M subsets between predicted and actual margins, per
query, averaged over the queries. Every method scores the same model: the one trained on all
N examples (same recipe), on the same N rows and queries.

Sign. lite-influence's score is positive for a proponent (a gradient step on i lowers q's
loss, DESIGN.md), so a positive score predicts a *higher* margin when i is in S: predicted =
+sum. Kronfluence's pairwise score is ``grad f(q)^T H^-1 grad L(i)``: upweighting i moves the
parameters by ``-eps H^-1 grad L(i)`` and f by ``-eps x score``, so with its measurement f =
-margin (as its GLUE example writes it) a positive score also predicts a higher margin:
predicted = +sum for both. The script checks it: each query's Spearman over the N training
examples between Kronfluence's scores and the exact gradient dot product must be positive on
average (``checks.kronfluence_vs_exact_dot``). For a 2-class head the loss gradient is a
positive multiple (sigmoid(-margin)) of the -margin gradient, so per query the loss and the
margin measurement give the same ranking of subsets; lite-influence uses the loss.

What is scored (per layer, per group, and aggregated):

* lite-influence ``gradient`` (dot and cosine) on the default index (``--projection mixed``)
  and on a pca index; ``curvature`` (``--score curvature``, EK-FAC from the stored
  eigenbasis, damping 0.1 x mean) on the pca index, where it is EK-FAC restricted to the kept
  directions (and on mixed, where it is a diagonal second moment in a partly random basis);
* exact gradients: full per-example gradients of the same units from hooks
  (``ndr_sst2.exact_influence``: float32 gradients, inner products summed in float64 over
  units), dot and cosine; no projection;
* Kronfluence 1.0.1 EK-FAC (its defaults: true Fisher with sampled labels, damping 1e-8;
  and the heuristic damping 0.1 x mean eigenvalue) on the attention linears and the head,
  the units lite-influence indexes minus the word embeddings (Kronfluence handles only
  nn.Linear and nn.Conv2d). Batches of ``--batch-size`` for the factors and the training
  gradients; all queries in one batch, so the pairwise scores make one pass over the
  training set (Kronfluence makes one per query batch).

A layer group's score is the sum of its layers' raw scores (for dot the group's inner
product; for cosine the sum of per-layer cosines), ``sum``; ``rank`` and ``vote`` are
lite-influence's aggregations turned into a per-example score for each query: rank = minus
the mean rank over the group's layers (rank 0 = largest score), vote = votes as a proponent
minus votes as an opponent (top ceil(0.2 N) per side, weight 0.2 N - rank). Group ``kf`` is
every layer Kronfluence sees (all but the embeddings).

Kronfluence is not a dependency of lite-influence. Install it beside it with
``pip install --no-deps kronfluence==1.0.1 einops einconv opt-einsum`` (it declares
torchvision, never imports it, and transformers breaks beside torchvision: do not install
it). Without kronfluence the script runs everything else and says so.

Caching: everything lives under ``--work`` (default /tmp/lds_work) in a folder named after
the options that change the models (N, queries, epochs, lr, max length, batch, seed; not M:
subset s is the same in every run, so a larger M adds subsets); each
retrained subset is one ``subsets/sNNN.npz`` (its mask, the queries' margins, seconds, load),
written atomically, and its model deleted; a killed run resumes and a rerun costs nothing.
The timings reported are those of the run that computed each stage (recorded with it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ndr_sst2 (data, tiny model, exact gradients)
import ndr_sst2  # noqa: E402

DATA = ndr_sst2.DATA
RESULTS = Path(__file__).resolve().parent / "results"
KRONFLUENCE_INSTALL = "pip install --no-deps kronfluence==1.0.1 einops einconv opt-einsum"
VOTE_P = 0.2
BOOTSTRAP = 200  # resamples of the M models for the LDS's standard error over models


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="training examples (SST-2 train, stratified)")
    parser.add_argument("--m", type=int, default=50, help="retrained models on random halves")
    parser.add_argument("--queries", type=int, default=100, help="GLUE-dev queries (stratified)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="data sample and training seed (every model)")
    parser.add_argument("--jobs", type=int, default=1, help="retrains in parallel (one torch thread each)")
    parser.add_argument("--data", type=Path, default=DATA, help="the SST-2 folder (train.tsv, test.tsv)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lds_work"))
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default="lds")
    parser.add_argument("--retrain-only", action="store_true", help="stop after the retrained margins")
    parser.add_argument("--no-kronfluence", action="store_true", help="skip Kronfluence even when installed")
    parser.add_argument("--exact-memory-gb", type=float, default=1.6)
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT, 64 examples, M=8 (smoke)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.m, args.queries, args.epochs, args.lr = 64, 8, 16, 1, 1e-3
    return args


def log(message: str) -> None:
    print(f"[lds {time.strftime('%H:%M:%S')}] {message}", flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed(fn):
    """(value, {wall seconds, this process's CPU seconds, load average before}). With one
    torch thread the CPU seconds are what the step costs whatever else the shared machine
    runs; the wall seconds grow with its load."""
    before = load()
    started, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, {"s": round(time.perf_counter() - started, 2), "cpu_s": round(time.process_time() - cpu, 2),
                   "load": before}


def method_time(**stages) -> dict:
    """A method's stages and their sums (wall and CPU)."""
    return {"stages": stages, "total_s": round(sum(t["s"] for t in stages.values()), 2),
            "total_cpu_s": round(sum(t["cpu_s"] for t in stages.values()), 2)}


def save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


# ====================================================================== data and retraining


def setup(args) -> dict:
    """The work folder for these options, the model, the training and query files."""
    key = dict(n=args.n, queries=args.queries, epochs=args.epochs, lr=args.lr,
               max_length=args.max_length, batch_size=args.batch_size, seed=args.seed, tiny=args.tiny)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    folder = args.work / (("tiny-" if args.tiny else "") + f"n{args.n}-e{args.epochs}-{digest}")
    (folder / "subsets").mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model = ndr_sst2.tiny_model(folder / "tiny-model")
        files = ndr_sst2.tiny_files(folder, args.n, args.seed)
        train, queries = files["train"], files["queries"]
    else:
        from lite_influence.data import read_rows, stratified_sample, write_rows

        model = ndr_sst2.minilm_path()
        rows, _ = read_rows(args.data / "train.tsv")
        keep = stratified_sample(np.array([int(r["label"]) for r in rows]), args.n, args.seed)
        train = write_rows(folder / "train.tsv", [rows[i] for i in keep], ["sentence", "label"])
        dev, _ = read_rows(args.data / "test.tsv")
        pick = stratified_sample(np.array([int(r["label"]) for r in dev]), args.queries, args.seed)
        queries = write_rows(folder / "queries.tsv", [dev[i] for i in pick], ["sentence", "label"])
    return {"folder": folder, "model": model, "train": Path(train), "queries": Path(queries), "key": key}


def subset_mask(n: int, seed: int) -> np.ndarray:
    """Subset ``seed``'s membership: a uniformly random half of the N rows."""
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(10_000 + seed).permutation(n)[: n // 2]] = True
    return mask


def margins(loaded, encodings: list[dict], labels: list[int], batch_size: int = 32) -> np.ndarray:
    """logit[label] - logit[other class] (for 2 classes: the log-odds of the label), eval mode."""
    import torch

    from lite_influence.models import collate, model_inputs

    out = np.zeros(len(encodings))
    loaded.model.eval()
    with torch.no_grad():
        for start in range(0, len(encodings), batch_size):
            batch = list(range(start, min(len(encodings), start + batch_size)))
            logits = loaded.model(**model_inputs(collate(loaded, [encodings[i] for i in batch]))).logits.double()
            y = torch.tensor([labels[i] for i in batch])
            own = logits[torch.arange(len(batch)), y]
            others = logits.clone()
            others[torch.arange(len(batch)), y] = -torch.inf
            out[batch] = (own - others.logsumexp(-1)).numpy()
    return out


def train_options(args) -> dict:
    return dict(epochs=args.epochs, lr=args.lr, max_length=args.max_length, batch_size=args.batch_size,
                seed=args.seed)


def query_set(loaded, queries: Path, max_length: int):
    from lite_influence.data import load_examples
    from lite_influence.models import encode

    examples = load_examples(queries, label2id=loaded.label2id)
    return encode(loaded, examples.texts, None, max_length), list(examples.labels)


def retrain_one(args, paths: dict, seed: int) -> Path:
    """Train on subset ``seed`` (cached): its queries' margins, then the model is deleted."""
    import torch

    torch.set_num_threads(1)
    from lite_influence.data import read_rows, write_rows
    from lite_influence.train import train_model

    target = paths["folder"] / "subsets" / f"s{seed:03d}.npz"
    if target.exists():
        return target
    rows, columns = read_rows(paths["train"])
    mask = subset_mask(len(rows), seed)
    work = paths["folder"] / f"tmp-s{seed:03d}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        subset = write_rows(work / "train.tsv", [r for r, keep in zip(rows, mask) if keep], columns)
        before = load()
        trained = train_model(paths["model"], subset, work / "model", force=True, **train_options(args))
        q_enc, q_labels = query_set(trained.loaded, paths["queries"], args.max_length)
        values = margins(trained.loaded, q_enc, q_labels)
        save_npz(target, mask=mask, margins=values, seconds=trained.seconds, load=before, after=load(),
                 train_loss=trained.history[-1]["train_loss"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def retrain_all(args, paths: dict) -> dict:
    """The M subsets' masks (M, N) and margins (M, Q), retraining what is not cached."""
    todo = [s for s in range(args.m) if not (paths["folder"] / "subsets" / f"s{s:03d}.npz").exists()]
    log(f"retrain: {args.m - len(todo)} of {args.m} subsets cached, {len(todo)} to train (jobs {args.jobs}, "
        f"load {load()})")
    started = time.perf_counter()
    if args.jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done, _ in enumerate(pool.map(retrain_one, [args] * len(todo), [paths] * len(todo), todo), 1):
                log(f"  subset {done}/{len(todo)} done, {time.perf_counter() - started:.0f} s, load {load()}")
    else:
        for done, seed in enumerate(todo, 1):
            retrain_one(args, paths, seed)
            log(f"  subset {seed} ({done}/{len(todo)}) done, {time.perf_counter() - started:.0f} s, load {load()}")
    parts = [np.load(paths["folder"] / "subsets" / f"s{s:03d}.npz") for s in range(args.m)]
    return {"masks": np.stack([p["mask"] for p in parts]), "margins": np.stack([p["margins"] for p in parts]),
            "seconds": [float(p["seconds"]) for p in parts], "loads": [float(p["load"]) for p in parts],
            "train_loss": [float(p["train_loss"]) for p in parts]}


def full_model(args, paths: dict) -> dict:
    """The model trained on all N (the one every method scores), kept in the work folder."""
    import torch

    torch.set_num_threads(1)
    from lite_influence.models import load_model
    from lite_influence.train import train_model

    folder, record = paths["folder"] / "full-model", paths["folder"] / "full-model.json"
    if not record.exists():
        trained, took = timed(lambda: train_model(paths["model"], paths["train"], folder, force=True,
                                                  **train_options(args)))
        q_enc, q_labels = query_set(trained.loaded, paths["queries"], args.max_length)
        values = margins(trained.loaded, q_enc, q_labels)
        save_json(record, {"seconds": took["s"], "cpu_s": took["cpu_s"], "load": took["load"], "margins": values.tolist(),
                           "accuracy": float((values > 0).mean()), "history": trained.history})
    info = json.loads(record.read_text())
    info["loaded"] = load_model(folder)
    info["dir"] = folder
    return info


# ====================================================================== lite-influence


def lite_scores(args, paths: dict, model_dir: Path) -> tuple[dict, dict]:
    """Per method, layer -> (N, Q) scores, and each method's wall time (build + query
    gradients + scoring every row) with its load; built indexes are reused with their
    recorded build time."""
    import torch

    torch.set_num_threads(1)
    from lite_influence import InfluenceIndex, build_index
    from lite_influence.data import load_examples
    from lite_influence.lookup import layer_scores

    queries = load_examples(paths["queries"])
    scores, times = {}, {}
    for projection in ("mixed", "pca"):
        folder = paths["folder"] / f"index-{projection}"
        record = paths["folder"] / f"index-{projection}.json"
        if not record.exists() or not (folder / "manifest.json").exists():
            _, took = timed(lambda: build_index(
                model_dir, paths["train"], folder, force=True, projection=projection, metric="dot",
                max_length=args.max_length, batch_size=args.batch_size, seed=args.seed))
            save_json(record, took)
        built = json.loads(record.read_text())
        index = InfluenceIndex.open(folder)
        grads, grad_took = timed(lambda: index.gradients(queries.texts, labels=list(queries.labels),
                                                                 batch_size=args.batch_size))
        for score in ("gradient", "curvature"):
            for metric in ("dot", "cosine"):
                name = f"{projection} {score} {metric}"
                value, score_took = timed(lambda: layer_scores(index.store, grads.vectors, index.layers,
                                                                    metric, score))
                scores[name] = value
                times[name] = method_time(build=built, query_gradients=grad_took, score=score_took)
        layers, groups = list(index.layers), dict(index.groups)
    return scores, times, layers, groups, index


def exact_scores(args, paths: dict, full: dict, index) -> tuple[dict, dict]:
    """Exact per-layer dot and cosine from full per-example gradients (cached)."""
    import torch

    torch.set_num_threads(1)
    from lite_influence.data import load_examples
    from lite_influence.layers import discover_units
    from lite_influence.models import encode

    cache = paths["folder"] / "exact.npz"
    if not cache.exists():
        loaded = full["loaded"]
        units = {u.name: u for u in discover_units(loaded.model)}
        layers = {info["name"]: [units[u["name"]] for u in info["units"]] for info in index.manifest["layers"]}
        train = load_examples(paths["train"], label2id=loaded.label2id)
        t_enc = encode(loaded, train.texts, None, args.max_length)
        q_enc, q_labels = query_set(loaded, paths["queries"], args.max_length)
        check = ndr_sst2.autograd_check(loaded, layers, t_enc, train.labels, [0, 1])
        (scores, query_sq, train_sq, _), took = timed(lambda: ndr_sst2.exact_influence(
            loaded, layers, (q_enc, q_labels), (t_enc, train.labels), args.batch_size, args.exact_memory_gb * 2**30))
        arrays = {}
        for layer in layers:
            arrays[f"dot/{layer}"] = scores[layer].T
            arrays[f"cos/{layer}"] = (scores[layer] / np.outer(ndr_sst2._safe_sqrt(query_sq[layer]),
                                                                ndr_sst2._safe_sqrt(train_sq[layer]))).T
        save_npz(cache, seconds=took["s"], cpu_s=took["cpu_s"], load=took["load"], autograd_check=check, **arrays)
    data = np.load(cache)
    out = {"exact dot": {}, "exact cosine": {}}
    for key in data.files:
        if "/" in key:
            kind, layer = key.split("/", 1)
            out["exact dot" if kind == "dot" else "exact cosine"][layer] = data[key]
    time_info = method_time(gradients_and_products={"s": float(data["seconds"]), "cpu_s": float(data["cpu_s"]),
                                                    "load": float(data["load"])})
    time_info["autograd_check_max_rel_error"] = float(data["autograd_check"])
    return out, {"exact dot": time_info, "exact cosine": time_info}


# ====================================================================== Kronfluence


def kronfluence_scores(args, paths: dict, full: dict, modules: list[str]) -> tuple[dict, dict, str | None]:
    """Kronfluence EK-FAC pairwise scores (N, Q) at its default and at its heuristic damping;
    (None, None, why) when kronfluence is not installed."""
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return {}, {}, f"kronfluence is not installed ({KRONFLUENCE_INSTALL}); its rows are skipped"
    cache = paths["folder"] / "kronfluence.npz"
    if not cache.exists():
        save_npz(cache, **_run_kronfluence(args, paths, full, modules))
    data = np.load(cache)
    scores, times = {}, {}
    for name, tag in (("kronfluence ekfac", "default"), ("kronfluence ekfac damping 0.1 mean", "heuristic")):
        scores[name] = {"kf": data[f"scores_{tag}"]}
        stage = lambda prefix: {"s": float(data[f"{prefix}_s"]), "cpu_s": float(data[f"{prefix}_cpu_s"]),
                                "load": float(data[f"{prefix}_load"])}
        times[name] = method_time(fit_all_factors=stage("factors"), compute_pairwise_scores=stage(f"score_{tag}"))
    return scores, times, None


def _run_kronfluence(args, paths: dict, full: dict, modules: list[str]) -> dict:
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    from lite_influence.data import load_examples
    from lite_influence.models import collate, encode, load_model, model_inputs

    torch.set_num_threads(1)
    loaded = load_model(full["dir"])  # a model of its own: Kronfluence wraps its modules

    class Rows(torch.utils.data.Dataset):
        def __init__(self, encodings, labels):
            self.encodings, self.labels = encodings, labels

        def __len__(self):
            return len(self.encodings)

        def __getitem__(self, i):
            return self.encodings[i], self.labels[i]

    def batch_of(items):
        return {**model_inputs(collate(loaded, [e for e, _ in items])),
                "labels": torch.tensor([y for _, y in items], dtype=torch.long)}

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"]
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):  # -margin: positive score = raises the margin
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            rows = torch.arange(len(logits))
            others = logits.clone()
            others[rows, batch["labels"]] = -torch.inf
            return -(logits[rows, batch["labels"]] - others.logsumexp(-1)).sum()

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    train = load_examples(paths["train"], label2id=loaded.label2id)
    train_set = Rows(encode(loaded, train.texts, None, args.max_length), list(train.labels))
    query_set_ = Rows(*query_set(loaded, paths["queries"], args.max_length))
    task = Classification()
    model = prepare_model(loaded.model.eval(), task)
    analyzer = Analyzer(analysis_name="lds", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=str(paths["folder"] / "kronfluence"))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=batch_of))
    torch.manual_seed(args.seed)  # the sampled labels of the true Fisher
    _, took = timed(lambda: analyzer.fit_all_factors(
        factors_name="ekfac", dataset=train_set, per_device_batch_size=args.batch_size,
        factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True))
    out = {"factors_s": took["s"], "factors_cpu_s": took["cpu_s"], "factors_load": took["load"]}
    for tag, damping in (("default", ScoreArguments().damping_factor), ("heuristic", None)):
        def pairwise():
            analyzer.compute_pairwise_scores(
                scores_name=f"pairwise_{tag}", factors_name="ekfac", query_dataset=query_set_,
                train_dataset=train_set, per_device_query_batch_size=len(query_set_),  # one pass over train
                per_device_train_batch_size=args.batch_size, score_args=ScoreArguments(damping_factor=damping),
                overwrite_output_dir=True)
            return analyzer.load_pairwise_scores(f"pairwise_{tag}")["all_modules"]
        values, took = timed(pairwise)
        out[f"scores_{tag}"] = values.double().numpy().T  # (N, Q)
        for key, value in took.items():
            out[f"score_{tag}_{key}"] = value
    return out


# ====================================================================== LDS


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of each column pair (average ranks for ties); nan where a side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    denominator = np.sqrt((ra * ra).sum(0) * (rb * rb).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(0) / denominator, np.nan)


def lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, boot: int = BOOTSTRAP) -> dict:
    """Mean over queries of Spearman(actual margin, sum over the subset of the scores), with two
    standard errors: over queries (``se``), and over the M models by bootstrap (``se_models``):
    every query is scored on the same M models, so one odd model moves all of them at once and
    the spread over queries understates the uncertainty."""
    predicted = masks.astype(np.float64) @ scores  # (M, Q)
    rhos = spearman_columns(predicted, actual)
    rhos = rhos[np.isfinite(rhos)]
    rng = np.random.default_rng(0)
    means = []
    for _ in range(boot):
        pick = rng.integers(0, len(masks), len(masks))
        means.append(np.nanmean(spearman_columns(predicted[pick], actual[pick])))
    return {"lds": float(rhos.mean()) if rhos.size else float("nan"),
            "se": float(rhos.std(ddof=1) / np.sqrt(rhos.size)) if rhos.size > 1 else float("nan"),
            "se_models": float(np.std(means, ddof=1)) if boot > 1 else float("nan"),
            "queries": int(rhos.size)}


def aggregated(per_layer: dict, members: list[str], agg: str) -> np.ndarray:
    """One (N, Q) score of a group: sum of raw scores, minus the mean rank, or net votes."""
    from lite_influence.aggregate import mean_ranks, order, votes

    parts = [per_layer[layer] for layer in members]
    if agg == "sum":
        return np.sum(parts, axis=0)
    n, q = parts[0].shape
    out = np.zeros((n, q))
    for j in range(q):
        pro = [order(p[:, j], higher_first=True) for p in parts]
        if agg == "rank":
            out[:, j] = -mean_ranks(pro, n, checked=True)
        else:
            con = [order(p[:, j], higher_first=False) for p in parts]
            out[:, j] = votes(pro, n, VOTE_P, checked=True) - votes(con, n, VOTE_P, checked=True)
    return out


def evaluate(methods: dict, layers: list[str], groups: dict, masks, actual) -> dict:
    """method -> scope -> agg -> LDS; single layers get "sum" only."""
    scopes = {**{layer: [layer] for layer in layers}, **groups, "kf": [l for l in layers if l != "embeddings"]}
    table = {}
    for method, per_layer in methods.items():
        if method.startswith("kronfluence"):  # one score over its modules: group kf
            table[method] = {"kf": {"sum": lds(per_layer["kf"], masks, actual)}}
            continue
        rows = {}
        for scope, members in scopes.items():
            members = [m for m in members if m in per_layer]
            if not members:
                continue
            aggs = ("sum",) if len(members) == 1 else ("sum", "rank", "vote")
            rows[scope] = {agg: lds(aggregated(per_layer, members, agg), masks, actual) for agg in aggs}
        table[method] = rows
    return table


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def sign_check(kf: np.ndarray, exact: dict, layers: list[str]) -> float:
    """Mean over queries of Spearman(Kronfluence, exact dot over the same units), over N."""
    from scipy.stats import spearmanr

    reference = np.sum([exact[l] for l in layers if l != "embeddings"], axis=0)
    return float(np.nanmean([spearmanr(kf[:, j], reference[:, j])[0] for j in range(kf.shape[1])]))


# ====================================================================== report


def best_lite(table: dict, times: dict, scope_filter=None) -> dict:
    """The lite-influence row with the highest LDS (over every scope, or the given one)."""
    best = None
    for method, rows in table.items():
        if method.startswith(("kronfluence", "exact")):
            continue
        for scope, aggs in rows.items():
            if scope_filter is not None and scope != scope_filter:
                continue
            for agg, value in aggs.items():
                if best is None or value["lds"] > best["lds"]:
                    best = {"method": method, "scope": scope, "agg": agg, "lds": value["lds"],
                            "seconds": times[method]["total_s"], "cpu_s": times[method]["total_cpu_s"]}
    return best


def markdown(result: dict) -> str:
    s, table = result["setup"], result["lds"]
    lines = [f"# LDS on SST-2: lite-influence vs Kronfluence EK-FAC",
             "",
             f"N = {s['n']} training rows, M = {s['m']} models on random halves, {s['queries']} queries; "
             f"{s['model_name']}, {s['epochs']} epochs, lr {s['lr']}, batch {s['batch_size']}, max length "
             f"{s['max_length']}, every weight trained, seed {s['seed']} for every model. Full model: query accuracy "
             f"{result['full_model']['accuracy']:.3f}, trained in {result['full_model']['seconds']:.0f} s. "
             f"Retraining: {result['retrain']['total_s']:.0f} s in all (median {result['retrain']['median_s']:.0f} s a "
             f"model, load {result['retrain']['load_min']:.2f}-{result['retrain']['load_max']:.2f}).",
             "",
             "LDS (mean Spearman over queries, ± its standard error over the M models, bootstrap); group score = sum of layer scores unless the "
             "column says rank or vote. `kf` = every layer but the embeddings (the units Kronfluence scores).",
             ""]
    scopes = ["embeddings", "early", "middle", "late", "head", "all", "kf"]
    header = "| method | wall / CPU s | " + " | ".join(scopes) + " | all rank | all vote | kf rank | kf vote |"
    lines += [header, "|---|---|" + "---|" * (len(scopes) + 4)]
    for method, rows in table.items():
        def cell(scope, agg="sum"):
            v = rows.get(scope, {}).get(agg)
            return "" if v is None else f"{v['lds']:.3f} ± {v['se_models']:.3f}"
        t = result["times"][method]
        lines.append(f"| {method} | {t['total_s']:.0f} / {t['total_cpu_s']:.0f} | "
                     + " | ".join(cell(sc) for sc in scopes)
                     + f" | {cell('all', 'rank')} | {cell('all', 'vote')} | {cell('kf', 'rank')} | {cell('kf', 'vote')} |")
    lines += ["", "Per layer (sum = the layer's own score):", "",
              "| method | " + " | ".join(result["layers"]) + " |", "|---|" + "---|" * len(result["layers"])]
    for method, rows in table.items():
        if method.startswith("kronfluence"):
            continue
        lines.append(f"| {method} | " + " | ".join(f"{rows[l]['sum']['lds']:.3f}" if l in rows else ""
                                               for l in result["layers"]) + " |")
    lines += ["", "Time per step (wall s / CPU s, load average before it; one torch thread):", ""]
    for method, t in result["times"].items():
        lines.append(f"- {method}: " + ", ".join(f"{k} {v['s']:.1f} / {v['cpu_s']:.1f} (load {v['load']:.1f})"
                                                 for k, v in t["stages"].items()))
    lines += ["", "Headline:", ""] + [(f"  {line}" if line.startswith(" ") else f"- {line}") for line in result["headline"]]
    if result.get("skipped"):
        lines += ["", f"Skipped: {result['skipped']}"]
    lines += ["", f"Checks: {json.dumps(result['checks'])}", "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "Notes:",
    "",
    "- Scale: N = 1,000 and 2 epochs at lr 1e-4 (every weight, no frozen blocks: `train` has no such option) so that"
    " 50 retrains of 500 rows fit in about an hour on this shared 2-core machine (66 s a model at load 3-11), and the"
    " model still learns (query accuracy 0.80); max length 64 truncates 1 of the 1,000 training phrases (66 tokens) and no query. The same seed for every model,"
    " so what differs between two models is their subset (and the batch order it brings).",
    "- Sign: positive = proponent for both tools (a higher predicted margin when i is in S); Kronfluence's measurement"
    " is -margin, so its positive score is an example whose upweighting raises the margin. `kronfluence_vs_exact_dot`"
    " (mean Spearman over the N rows, per query) > 0 confirms it.",
    "- exact = full per-example gradients of the same units from hooks (float32 gradients, float64 sums; checked"
    " against autograd, `exact_autograd_max_rel_error`), not a full-width projection (148k numbers per matrix).",
    "- Kronfluence 1.0.1: strategy ekfac, its defaults (true Fisher with sampled labels, damping 1e-8, and 0.1 x mean"
    " eigenvalue as a second row), on the 24 attention linears and the head; batches of 16, all queries in one batch."
    " lite-influence's time is a whole build (its fit pass and its gradient pass) plus the query gradients and"
    " scoring every row; both with one torch thread. CPU seconds are the fair comparison on a shared machine.",
    "- The best row is picked on the LDS it reports (optimistic); the bootstrap over the M models is the honest"
    " error bar (the spread over queries is ~4x smaller, because all queries share the same models).",
]


def headline(table: dict, times: dict) -> list[str]:
    """The best lite-influence row over everything (picked on the LDS it reports: optimistic)
    and on Kronfluence's own units (group kf), each against Kronfluence's LDS and time."""
    out = []
    for label, best in (("best lite-influence row of all (picked on this LDS)", best_lite(table, times)),
                        ("best lite-influence row on Kronfluence's units (kf)", best_lite(table, times, "kf"))):
        out.append(f"{label}: {best['method']}, {best['scope']} {best['agg']}: LDS {best['lds']:.3f} in "
                   f"{best['seconds']:.1f} s wall / {best['cpu_s']:.1f} s CPU")
        for method in (m for m in table if m.startswith("kronfluence")):
            kf, t = table[method]["kf"]["sum"]["lds"], times[method]
            out.append(f"  vs {method} (LDS {kf:.3f}, {t['total_s']:.1f} s wall / {t['total_cpu_s']:.1f} s CPU): "
                       f"LDS {best['lds'] - kf:+.3f}, time {best['seconds'] / t['total_s']:.2f}x wall, "
                       f"{best['cpu_s'] / t['total_cpu_s']:.2f}x CPU")
    for method in ("exact dot", "exact cosine"):
        if method in table:
            out.append(f"{method}: all {table[method]['all']['sum']['lds']:.3f}, kf {table[method]['kf']['sum']['lds']:.3f}"
                       f" in {times[method]['total_s']:.1f} s wall / {times[method]['total_cpu_s']:.1f} s CPU")
    return out


def main(argv=None) -> dict:
    import torch

    torch.set_num_threads(1)
    args = parse_args(argv)
    started = time.perf_counter()
    paths = setup(args)
    log(f"work folder {paths['folder']}")
    retrained = retrain_all(args, paths)
    if args.retrain_only:
        return {}
    full = full_model(args, paths)
    log(f"full model: accuracy {full['accuracy']:.3f} on the queries, trained in {full['seconds']:.0f} s")
    methods, times, layers, groups, index = lite_scores(args, paths, full["dir"])
    log("lite-influence scores done: " + ", ".join(f"{k} {v['total_s']:.0f} s" for k, v in times.items()))
    exact, exact_times = exact_scores(args, paths, full, index)
    methods.update(exact)
    times.update(exact_times)
    log(f"exact scores done, {exact_times['exact dot']['total_s']:.0f} s")
    modules = [u["name"] for info in index.manifest["layers"] if info["name"] != "embeddings" for u in info["units"]]
    kf, kf_times, skipped = (({}, {}, "--no-kronfluence") if args.no_kronfluence
                             else kronfluence_scores(args, paths, full, modules))
    if skipped:
        log(f"Kronfluence skipped: {skipped}")
    methods.update(kf)
    times.update(kf_times)
    table = evaluate(methods, layers, groups, retrained["masks"], retrained["margins"])
    checks = {"exact_autograd_max_rel_error": exact_times["exact dot"]["autograd_check_max_rel_error"],
              # the 2-class head is stored whole (770 numbers <= --exact-max), so it must equal the exact path
              "head_lite_vs_exact_max_rel_diff": relative_gap(methods["pca gradient dot"]["head"],
                                                              exact["exact dot"]["head"])}
    if kf:
        checks["kronfluence_vs_exact_dot"] = sign_check(methods["kronfluence ekfac"]["kf"], exact["exact dot"], layers)
    seconds = retrained["seconds"]
    result = {
        "setup": {**paths["key"], "m": args.m, "model_name": "tiny random BERT" if args.tiny else "all-MiniLM-L6-v2",
                  "work": str(paths["folder"]), "torch_threads": torch.get_num_threads(), "jobs": args.jobs,
                  "kronfluence_modules": modules},
        "full_model": {k: full[k] for k in ("accuracy", "seconds", "load", "history")},
        "retrain": {"total_s": float(np.sum(seconds)), "median_s": float(np.median(seconds)),
                    "load_min": float(np.min(retrained["loads"])), "load_max": float(np.max(retrained["loads"])),
                    "seconds": seconds, "loads": retrained["loads"], "train_loss": retrained["train_loss"],
                    "margin_std_over_models": float(retrained["margins"].std(0).mean())},
        "layers": layers, "groups": groups, "lds": table, "times": times, "checks": checks,
        "skipped": skipped, "headline": headline(table, times), "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_json(args.out_dir / f"{args.name}.json", result)
    (args.out_dir / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
