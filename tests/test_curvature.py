"""``--score curvature`` (curvature.py) against independent references: a dense numpy EK-FAC
from exact per-example autograd gradients at full width, brute-force numpy on the stored
vectors otherwise, and the cache and bad inputs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import dense_rows, run_cli
from lite_influence import build_index
from lite_influence.errors import UserError
from lite_influence.store import IndexStore

QUERIES = [("the movie was not good", 1), ("awful plot really dull", 0)]


@pytest.fixture(scope="module")
def full_width(bert_dir, tmp_path_factory):
    """pca at full width (--proj-dim 64 >= every side, fitted on all 12 examples): nothing is
    dropped, so the stored basis is the whole Kronecker eigenbasis."""
    import random

    from conftest import WORDS

    rng, rows = random.Random(0), []
    for i in range(12):
        rows.append(f"{' '.join(rng.choices(WORDS, k=rng.randint(3, 10)))}\t{i % 2}")
    folder = tmp_path_factory.mktemp("curvature")
    train = folder / "train.tsv"
    train.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # --proj-dim wider than the model is the point
        index = build_index(bert_dir, train, folder / "idx", projection="pca", proj_dim=64, token_dim=64,
                            fit_examples=12, batch_size=5)
    return index, [r.split("\t")[0] for r in rows], [int(r.split("\t")[1]) for r in rows]


def exact_factors(index, texts, labels):
    """Per unit, by plain autograd on one example at a time (no padding, no library hooks):
    each example's weight gradient G (out x in [+ bias column]), its inputs x_t and output
    gradients delta_t."""
    from lite_influence.models import encode, load_model

    loaded = load_model(index.manifest["model"]["path"])
    model = loaded.model.eval()
    units = [u for layer in index.manifest["layers"] for u in layer["units"]]
    out = {u["name"]: {"G": [], "x": [], "delta": []} for u in units}
    for p in model.parameters():
        p.requires_grad_(True)
    for enc, label in zip(encode(loaded, texts, None, 128), labels):
        seen, handles = {}, []
        for u in units:
            def hook(module, inputs, output, name=u["name"]):
                output.retain_grad()
                seen[name] = (inputs[0].detach(), output)
            handles.append(model.get_submodule(u["name"]).register_forward_hook(hook))
        model.zero_grad()
        batch = {key: torch.tensor([value]) for key, value in enc.items()}
        F.cross_entropy(model(**batch).logits, torch.tensor([label]), reduction="sum").backward()
        for handle in handles:
            handle.remove()
        for u in units:
            module, (x, output) = model.get_submodule(u["name"]), seen[u["name"]]
            grad = module.weight.grad.double()
            if u["kind"] == "embedding":
                out[u["name"]]["G"].append(grad.T.numpy())
                out[u["name"]]["x"].append(x.reshape(-1).numpy())
            else:
                bias = getattr(module, "bias", None)
                x = x.reshape(-1, x.shape[-1]).double()
                if bias is not None:
                    grad = torch.cat([grad, bias.grad.double()[:, None]], 1)
                    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
                out[u["name"]]["G"].append(grad.numpy())
                out[u["name"]]["x"].append(x.numpy())
            out[u["name"]]["delta"].append(output.grad.reshape(-1, output.shape[-1]).double().numpy())
    for p in model.parameters():
        p.requires_grad_(False)
    return units, out


def ekfac_layers(index, units, train, queries):
    """Dense EK-FAC per layer: covariances A, S of the fit examples (all 12), their
    eigenvectors, Lambda = mean (Q_S^T G Q_A)^2 over the training examples, damping 0.1 x
    mean(Lambda) per unit (over the pairs of tokens training holds, for the embeddings), and
    the preconditioned vectors (w^1/2 rotated G) of training examples and queries."""
    vocab = {u["name"]: u["in_dim"] for u in units if u["kind"] == "embedding"}
    layers = {}
    for layer in index.manifest["layers"]:
        train_parts, query_parts = [], []
        for u in layer["units"]:
            t, q = train[u["name"]], queries[u["name"]]
            s = sum(d.T @ d for d in t["delta"])
            q_s = np.linalg.eigh(s)[1]
            if u["kind"] == "embedding":
                counts = np.bincount(np.concatenate(t["x"]), minlength=vocab[u["name"]])
                q_a, kept = np.eye(vocab[u["name"]]), counts > 0  # A = diag(counts): the token axes
            else:
                q_a = np.linalg.eigh(sum(x.T @ x for x in t["x"]))[1]
                kept = None
            rotated = np.stack([q_s.T @ g @ q_a for g in t["G"]])
            second = (rotated ** 2).mean(0)
            damping = 0.1 * (second[:, kept].mean() if kept is not None else second.mean())
            w = 1 / np.sqrt(second + damping)
            train_parts.append((rotated * w).reshape(len(rotated), -1))
            query_parts.append(np.stack([(q_s.T @ g @ q_a * w).ravel() for g in q["G"]]))
        layers[layer["name"]] = (np.concatenate(train_parts, 1), np.concatenate(query_parts, 1))
    return layers


def library_scores(index, metric):
    """Every layer's curvature score of each query against all 12 examples: (queries, N)."""
    scores = {}
    for text, label in QUERIES:
        result = index.query(text, label=label, k=len(index), agg="mean", metric=metric, score="curvature")
        assert result["score"] == "curvature"
        for layer in index.layers:
            row = np.zeros(len(index))
            for entry in result["proponents"]:
                row[entry["id"]] = entry["per_layer"][layer]
            scores.setdefault(layer, []).append(row)
    return {layer: np.array(rows) for layer, rows in scores.items()}


def test_curvature_at_full_width_equals_a_dense_ekfac_from_exact_gradients(full_width):
    """The library's scores (API end to end: query gradients, stored eigenbasis, cached
    Lambda, damping) equal a dense EK-FAC built independently, for dot and for cosine
    (TrackStar: the square root on both sides, then unit length), on every layer: blocks,
    the head stored whole, and the embeddings' exact token side."""
    index, texts, labels = full_width
    units, train = exact_factors(index, texts, labels)
    _, queries = exact_factors(index, [t for t, _ in QUERIES], [label for _, label in QUERIES])
    reference = ekfac_layers(index, units, train, queries)
    dot, cosine = library_scores(index, "dot"), library_scores(index, "cosine")
    for layer, (t, q) in reference.items():
        expected = q @ t.T
        np.testing.assert_allclose(dot[layer], expected, rtol=2e-3, atol=2e-4 * np.abs(expected).max(), err_msg=layer)
        unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
        np.testing.assert_allclose(cosine[layer], unit(q) @ unit(t).T, atol=2e-4, err_msg=layer)
    # and the plain score is not that: the curvature changed the numbers
    plain = index.query(QUERIES[0][0], label=QUERIES[0][1], k=len(index), agg="mean", metric="cosine")
    assert plain["score"] == "gradient"
    plain_block1 = {row["id"]: row["per_layer"]["block1"] for row in plain["proponents"]}
    assert not np.allclose([plain_block1[i] for i in range(len(index))], cosine["block1"][0], atol=1e-2)


def write_store(tmp_path, vectors, units):
    """A one-layer store of raw ``vectors`` whose manifest splits them into ``units`` (k_in, k_out)."""
    from lite_influence.store import FORMAT_VERSION, IndexWriter

    writer = IndexWriter(tmp_path / "idx", force=True)
    matrix = writer.vector_file("layer", len(vectors), vectors.shape[1])
    matrix[:] = vectors
    writer.write_examples([{"id": i, "text": f"t{i}", "label": 0} for i in range(len(vectors))])
    manifest = {"format_version": FORMAT_VERSION, "n": len(vectors), "metric": "dot", "index_factory": "Flat",
                "label_names": ["a"], "model": {"path": "/m", "fingerprint": "x", "task": "classification"},
                "data": {"path": "/d"}, "build": {"projection": "pca", "proj_dim": 2, "seed": 0},
                "layers": [{"name": "layer", "dim": vectors.shape[1],
                            "units": [{"name": f"u{j}", "k_in": a, "k_out": b} for j, (a, b) in enumerate(units)]}],
                "groups": {}}
    return IndexStore(writer.commit(manifest), manifest)


def brute_curvature(vectors, queries, parts, metric, damping=0.1):
    """numpy: w = 1 / (mean v^2 + damping x its mean over the unit), then dot or TrackStar cosine."""
    second = (vectors.astype(np.float64) ** 2).mean(0)
    w = np.concatenate([1 / (second[p] + damping * second[p].mean()) for p in parts])
    if metric == "dot":
        return vectors @ (queries * w).T
    a, b = vectors * np.sqrt(w), queries * np.sqrt(w)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def test_curvature_ranks_by_the_rare_direction_where_gradients_rank_by_the_loud_one(tmp_path):
    """Two units: one whose coordinates are large for every example (loud), one small. The
    plain score follows the loud unit; divided by each coordinate's second moment (damped per
    unit), the quiet unit counts as much, and the ranking follows it instead."""
    from lite_influence.curvature import layer_view
    from lite_influence.lookup import layer_scores, nearest

    rng = np.random.default_rng(0)
    loud, quiet = rng.normal(size=(40, 4)) * 100, rng.normal(size=(40, 4))
    quiet[:, 0] *= 0.05  # a direction few examples move: curvature gives it weight
    quiet[7, 0] = 0.5
    vectors = np.concatenate([loud, quiet], 1).astype(np.float32)
    store = write_store(tmp_path, vectors, [(2, 2), (2, 2)])
    query = np.zeros((1, 8), np.float32)
    query[0, :4] = loud[3] / np.linalg.norm(loud[3])
    query[0, 4] = 1.0
    parts = [slice(0, 4), slice(4, 8)]
    for metric in ("dot", "cosine"):
        gradient = layer_scores(store, {"layer": query}, ["layer"], metric)["layer"][:, 0]
        curvature = layer_scores(store, {"layer": query}, ["layer"], metric, "curvature")["layer"][:, 0]
        np.testing.assert_allclose(curvature, brute_curvature(vectors, query, parts, metric)[:, 0], rtol=1e-5, atol=1e-9)
        assert np.argmax(gradient) == 3 and np.argmax(curvature) == 7, metric
        prepared = layer_view(store, "layer", "curvature").prepare(query, metric)
        top = nearest(store, "layer", prepared, 1.0, 5, metric, "curvature")[0]
        assert list(top) == list(np.lexsort((np.arange(40), -curvature))[:5])
        # --damping: its own brute-force weights; very large, the loud unit wins again
        damped = layer_scores(store, {"layer": query}, ["layer"], metric, "curvature", 3.0)["layer"][:, 0]
        np.testing.assert_allclose(damped, brute_curvature(vectors, query, parts, metric, 3.0)[:, 0], rtol=1e-5, atol=1e-9)
    single = write_store(tmp_path / "single", vectors, [(2, 4)])  # one unit: a huge damping is the plain score, scaled
    for metric in ("dot", "cosine"):
        plain = layer_scores(single, {"layer": query}, ["layer"], metric)["layer"][:, 0]
        flat = layer_scores(single, {"layer": query}, ["layer"], metric, "curvature", 1e9)["layer"][:, 0]
        np.testing.assert_allclose(flat / np.abs(flat).max(), plain / np.abs(plain).max(), atol=1e-6)


def test_random_projection_curvature_is_the_stored_vectors_diagonal_second_moment(bert_dir, train_tsv, tmp_path):
    """No eigenbasis (random): the weights are still the damped inverse second moment per
    unit of the stored coordinates, checked by brute force on the stored vectors of each
    block (units split as the manifest says), for dot and cosine, queries by id."""
    index = build_index(bert_dir, train_tsv, tmp_path / "idx", projection="random", proj_dim=3, token_dim=0)
    for layer in ("block0", "head", "embeddings"):
        info = index.store.layer_info(layer)
        sizes = np.cumsum([0] + [u["k_in"] * u["k_out"] for u in info["units"]])
        parts = [slice(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        raw = dense_rows(index, layer, metric="dot")
        for metric, i in (("dot", 2), ("cosine", 2), ("dot", 5), ("cosine", 5)):
            result = index.query_ids([i], layers=layer, k=len(index), agg="mean", metric=metric, score="curvature")
            got = {row["id"]: row["per_layer"][layer] for row in result["proponents"]}
            expected = brute_curvature(raw, raw[[i]], parts, metric)[:, 0]
            np.testing.assert_allclose([got[j] for j in range(len(index))], expected, rtol=1e-4,
                                       atol=1e-6 * np.abs(expected).max())


def test_the_cache_is_written_once_reused_and_recomputed_when_stale_or_damaged(full_width, tmp_path):
    """INDEX/curvature/NAME.npz holds Lambda with N and the manifest's digest: a fresh store
    reads it (same scores), a changed manifest or a damaged file is recomputed and rewritten,
    and a read-only index still answers."""
    import shutil

    from lite_influence import curvature

    source, _, _ = full_width
    copy = tmp_path / "idx"
    shutil.copytree(source.path, copy)
    shutil.rmtree(copy / "curvature", ignore_errors=True)
    store = IndexStore.open(copy)
    first = curvature.layer_view(store, "block0", "curvature")
    cache = copy / "curvature" / "block0.npz"
    assert cache.is_file() and not (copy / "curvature" / "block1.npz").exists()  # one layer at a time
    assert len(first.norms()) == 12  # cosine's row norms join the file
    with np.load(cache) as data:
        assert int(data["n"]) == 12 and data["norms@0.1"].shape == (12,)
        np.testing.assert_allclose(data["second"], (dense_rows(store, "block0", metric="dot") ** 2).mean(0), rtol=1e-6)
    stamp = cache.stat().st_mtime_ns
    again = curvature.layer_view(IndexStore.open(copy), "block0", "curvature")
    assert cache.stat().st_mtime_ns == stamp and np.array_equal(again.weights, first.weights)
    cache.write_bytes(b"not an npz")
    np.testing.assert_allclose(curvature.layer_view(IndexStore.open(copy), "block0", "curvature").weights, first.weights)
    with np.load(cache) as data:  # rewritten whole
        assert data["second"].shape == (1088,)
        digest = str(data["manifest"])
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "note": "grown"}))
    curvature.layer_view(IndexStore.open(copy), "block0", "curvature")
    with np.load(cache) as data:
        assert str(data["manifest"]) != digest
    shutil.rmtree(copy / "curvature")
    (copy / "curvature").write_text("")  # no folder can be made there (as in a read-only index)
    view = curvature.layer_view(IndexStore.open(copy), "head", "curvature")
    assert view.norms().shape == (12,) and (copy / "curvature").is_file()


def test_bad_scores_are_one_line(full_width, capsys, tmp_path):
    """An unknown --score, and curvature on an index that keeps unit vectors only (format 1
    cosine: the second moment of its gradients is lost), are one line each, exit 1."""
    index, _, _ = full_width
    code, out, err = run_cli(capsys, "query", index.path, "--id", "0", "--score", "hessian")
    assert code == 1 and "unknown score 'hessian'; use one of gradient, curvature" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "query", index.path, "--id", "0", "--score", "curvature", "--json")
    assert code == 0 and json.loads(out)["score"] == "curvature"
    old = IndexStore(index.path, {**index.manifest, "format_version": 1, "metric": "cosine"})
    from lite_influence.lookup import layer_scores

    with pytest.raises(UserError, match="holds unit vectors only.*--score curvature.*rebuild"):
        layer_scores(old, {"block0": np.zeros((1, 1088), np.float32)}, ["block0"], "cosine", "curvature")
    with pytest.raises(UserError, match="unknown score"):
        index.audit(tmp_path / "none.tsv", score="exact")
    queries = tmp_path / "queries.tsv"
    queries.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in QUERIES))
    code, out, err = run_cli(capsys, "audit", index.path, queries, "--score", "curvature", "--damping", "2", "--json")
    audit = json.loads(out)
    assert code == 0 and audit["score"] == "curvature" and any("damping 2" in note for note in audit["notes"])
    code, out, err = run_cli(capsys, "query", index.path, "--id", "0", "--score", "curvature", "--damping", "0")
    assert code == 1 and err.strip() == "error: --damping must be positive, got 0.0"
