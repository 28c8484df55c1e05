"""Smoke test of benchmarks/ndr_sst2.py: the whole pipeline (train, build, audit, exact
reference, baselines, retrain, report) on a tiny random BERT with 64 synthetic examples.
It checks the pipeline and the output schema only; the benchmark itself stays out of CI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ndr_sst2.py"
STATS = ("ndr@10", "ndr@20", "ndr@30", "auc_ndr")
AGGS = ("mean", "rank", "vote", "mean-c", "rank-c", "vote-c")
SOURCES = ("random", "pca", "exact")
GROUPS = ("embeddings", "early", "middle", "late", "head", "all")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ndr_sst2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def outputs(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("ndr-out")
    results = bench.main(["--tiny", "--seeds", "0", "--modes", "full,lora", "--retrain", "--out-dir", str(out)])
    return out, results


def _stats(row):
    assert set(STATS) <= set(row), row
    for key in STATS:
        assert 0.0 <= row[key] <= 1.0, (key, row[key])


def test_outputs_exist(outputs):
    out, _ = outputs
    for name in ("ndr_sst2.json", "ndr_sst2.md", "ndr_sst2.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    text = (out / "ndr_sst2.md").read_text()
    assert "claim" in text.lower() or "Claims" in text
    assert (out / "ndr_sst2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_schema(outputs):
    out, _ = outputs
    data = json.loads((out / "ndr_sst2.json").read_text())
    assert {"setup", "runs", "claims"} <= set(data)
    assert data["setup"]["n"] == 64 and data["setup"]["wall_s"] > 0
    assert set(data["runs"]) == {"full", "lora"}
    for mode, by_seed in data["runs"].items():
        assert set(by_seed) == {"0"}
        run = by_seed["0"]
        assert run["n"] == 64 and run["n_noisy"] == round(0.2 * 64)
        scopes = set(run["layers"]) | set(GROUPS)
        assert set(run["scopes"]) == scopes
        assert {"embeddings", "head"} <= set(run["layers"])
        assert any(layer.startswith("block") for layer in run["layers"])
        for metric in ("dot", "cosine"):
            for source in SOURCES:
                rows = run["ndr"][metric][source]
                assert set(rows) == scopes, (metric, source)
                for scope in scopes:
                    assert set(rows[scope]) == set(AGGS), (metric, source, scope)
                    for agg in AGGS:
                        _stats(rows[scope][agg])
            for projection in ("random", "pca"):
                for scope in scopes:
                    for agg in AGGS:
                        assert -1.0 <= run["gap_ndr30"][metric][projection][scope][agg] <= 1.0
        baselines = run["baselines"]
        for name in ("loss", "random", "perfect"):
            _stats(baselines[name])
        assert set(baselines["self_influence"]) == scopes
        for row in baselines["self_influence"].values():
            _stats(row)
        assert run["training"]["chosen_epoch"] == 1
        retrain = run["retrain"]
        assert {"nothing", "best", "embeddings", "head", "loss", "random"} <= set(retrain["choices"])
        for choice in retrain["choices"].values():
            assert 0.0 <= choice["held_out_accuracy"] <= 1.0
        assert retrain["spearman_ndr30_vs_accuracy"] is None or -1 <= retrain["spearman_ndr30_vs_accuracy"] <= 1
    claims = data["claims"]
    assert {"a_middle_beats_embeddings", "b_rank_and_vote_beat_mean", "best_vs_loss", "gap_ndr30", "retrain"} <= set(claims)


def test_exact_path_checks(outputs):
    """The exact reference is tied to the projected path: the exact gradients projected with
    the index's random matrices give its stored vectors, they match per-example autograd, an
    identity projection audits like the exact path, and the cosine copy equals a cosine build."""
    _, results = outputs
    for by_seed in results["runs"].values():
        checks = by_seed["0"]["checks"]
        assert max(checks["hook_vs_random_index_max_rel_error"].values()) < 1e-4
        assert checks["hooks_vs_autograd_max_rel_error"] < 1e-4
        assert checks["audit_n_correct"] == checks["exact_n_correct"]
        assert checks["identity_projection_vs_exact_max_abs_ndr_diff"] < 0.02
        assert checks["cosine_copy_vs_cosine_build_max_abs_diff"] < 1e-6
        nothing = by_seed["0"]["retrain"]["choices"]
        assert math.isclose(nothing["nothing"]["held_out_accuracy"], nothing["nothing_rerun"]["held_out_accuracy"])


# ------------------------------------------------------------------ planted_backdoor.py


def test_planted_backdoor_exact_and_projected_scores_match_autograd_and_the_hooks(bert_dir):
    """The benchmark's exact reference (per-unit Gram identities from captured x_t, delta_t)
    equals autograd weight-gradient inner products, and its projected vectors equal the
    build's hook path, on a tiny BERT (the benchmark itself needs MiniLM and stays out of CI)."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("planted_backdoor", SCRIPT.parent / "planted_backdoor.py")
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)
    from lite_influence.gradients import fit_covariances, length_batches
    from lite_influence.layers import assign_layers, discover_units, select_units
    from lite_influence.models import encode, load_model
    from lite_influence.projection import pca_fits

    loaded = load_model(bert_dir)
    texts = ["good movie", "the plot was very dull", "not quite a great film", "awful actor", "nice story really"]
    labels = [1, 1, 0, 0, 1]  # the first two are also the queries, which carry the target label 1
    enc = encode(loaded, texts, None, 32)
    units = select_units(discover_units(loaded.model), "attention")
    layers = assign_layers(units, "layer")
    assert pb.exact_check(loaded, units, enc, labels, (1, 2)) < 1e-6
    covariances = fit_covariances(loaded, units, enc, labels, length_batches([len(e["input_ids"]) for e in enc], 2), pca_fits)

    class Args:
        exact_max, seed, batch_size, draws = 0, 0, 2, 1
        specs = ["hybrid:0.5:1 x pca k=2", "spectral:0.5 k=2", "tokens-exact x pca k=2", "tokens-exact x random k=2",
                 "tokens-exact x pca k=999"]

    projectors = pb.sources(units, covariances, Args)
    assert pb.hook_check(loaded, units, layers, projectors[pb.DEFAULT], enc, labels, [0, 3, 4]) < 1e-5
    assert pb.hook_check(loaded, units, layers, projectors["spectral:0.5 k=2"], enc, labels, [0, 3, 4]) < 1e-5
    scores = pb.layer_scores(loaded, units, layers, projectors, enc, labels, enc[:2], Args)
    dot, t_self, q_self = scores["exact"]["block0"]
    assert dot.shape == (2, 5) and np.allclose(q_self, t_self[:2]) and np.allclose(np.diag(dot[:, :2]), t_self[:2])
    # the tokens-exact sources score the embeddings only; with an identity hidden side they are exact
    assert set(scores["tokens-exact x pca k=2"]) == {"embeddings"}
    exact_emb, full = scores["exact"]["embeddings"], scores["tokens-exact x pca k=999"]["embeddings"]
    assert all(np.allclose(a, b) for a, b in zip(exact_emb, full))
    assert not np.allclose(scores["tokens-exact x random k=2"]["embeddings"][0], exact_emb[0])
    shares = pb.shares(scores["exact"], {"all": list(layers)}, [0, 1], "cosine")
    assert set(shares) == set(layers) | {"all"} and all(0 <= v["aggregated"] <= 1 for v in shares.values())
    assert set(pb.shares(scores["tokens-exact x pca k=2"], {"all": list(layers)}, [0, 1], "cosine")) == {"embeddings"}


def test_planted_backdoor_draws_are_distinct_seeds_and_averaged_per_source(bert_dir):
    """--draws: each source is drawn with consecutive projection seeds (a random sketch differs
    between draws, the same seed gives the same matrices) and the table's cell is the mean over
    the draws of each share, beside their spread."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("planted_backdoor", SCRIPT.parent / "planted_backdoor.py")
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)
    from lite_influence.gradients import fit_covariances, length_batches
    from lite_influence.layers import discover_units, select_units
    from lite_influence.models import encode, load_model
    from lite_influence.projection import pca_fits

    loaded = load_model(bert_dir)
    enc = encode(loaded, ["good movie", "the plot was very dull", "awful actor"], None, 32)
    units = select_units(discover_units(loaded.model), "attention")
    covariances = fit_covariances(loaded, units, enc, [1, 0, 0], length_batches([len(e["input_ids"]) for e in enc], 2), pca_fits)

    class Args:
        exact_max, seed, batch_size, draws = 0, 5, 2, 2
        specs = ["random x random k=2"]

    drawn = pb.drawn_sources(units, covariances, Args)
    assert set(drawn) == {"default @5", "default @6", "random x random k=2 @5", "random x random k=2 @6"}
    unit = units[1].name
    a, b = drawn["random x random k=2 @5"][unit], drawn["random x random k=2 @6"][unit]
    again = pb.sources(units, covariances, Args, seed=6)["random x random k=2"][unit]
    assert not np.allclose(a.inp.matrix, b.inp.matrix) and np.array_equal(b.inp.matrix, again.inp.matrix)
    means, draws = pb.draw_means({"s @5": {"block0": {"aggregated": 0.2, "per_query": 0.1}},
                                  "s @6": {"block0": {"aggregated": 0.6, "per_query": 0.3}},
                                  "exact": {"block0": {"aggregated": 1.0, "per_query": 0.5}}})
    assert means["s"]["block0"] == {"aggregated": 0.4, "per_query": 0.2} and draws["s"]["block0"]["aggregated"] == [0.2, 0.6]
    assert means["exact"]["block0"]["aggregated"] == 1.0
    assert pb.share_cell(means["s"]["block0"], draws["s"]["block0"]) == "0.40\u00b10.20 / 0.20"
    assert pb.share_cell(means["exact"]["block0"], draws["exact"]["block0"]) == "1.00 / 0.50"


def test_the_library_default_is_the_benchmarks_winning_candidate_on_dense_units():
    """The default hybrid (lite_influence.projection) builds, for a linear unit, exactly the
    matrices of the benchmarks' candidate "hybrid:0.5:1 x pca" (benchmarks/sketches.py), so
    the candidate's measured rows are the default's."""
    import sys

    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    import sketches
    from lite_influence.layers import Unit
    from lite_influence.projection import fitted_projector

    u = Unit("block.q", "linear", "attention", 0, 13, 10, True, ("block.q.weight",))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(13, 40, generator=g, dtype=torch.float64), torch.randn(10, 40, generator=g, dtype=torch.float64)
    covariances = {u.name: {"in": a @ a.T, "out": b @ b.T}}
    mine = sketches.candidate("hybrid:0.5:1 x pca k=6", [u], 3, covariances, 0)[u.name]
    library = fitted_projector("hybrid", u, 6, 3, covariances[u.name])
    assert torch.equal(mine.inp.matrix, library.inp.matrix) and torch.equal(mine.out.matrix, library.out.matrix)


# ------------------------------------------------------------------ lds.py


@pytest.fixture(scope="module")
def lds_bench():
    spec = importlib.util.spec_from_file_location("lds", SCRIPT.parent / "lds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lds_run(lds_bench, tmp_path_factory):
    """The whole LDS pipeline on a tiny random BERT (M=8 retrains of 32 rows), Kronfluence
    included when it is installed (it is not a dependency), then a rerun from the cache."""
    work, out = tmp_path_factory.mktemp("lds-work"), tmp_path_factory.mktemp("lds-out")
    first = lds_bench.main(["--tiny", "--work", str(work), "--out-dir", str(out)])
    subsets = sorted(work.rglob("subsets/s*.npz"))
    stamps = [p.stat().st_mtime_ns for p in subsets]
    second = lds_bench.main(["--tiny", "--work", str(work), "--out-dir", str(out), "--no-kronfluence"])
    return first, second, out, subsets, stamps


def test_lds_is_one_for_a_perfect_linear_predictor_and_minus_one_for_its_opposite(lds_bench):
    import numpy as np

    rng = np.random.default_rng(0)
    masks = np.stack([lds_bench.subset_mask(40, s) for s in range(12)])
    assert masks.sum(1).tolist() == [20] * 12 and len({m.tobytes() for m in masks}) == 12
    scores = rng.normal(size=(40, 5))
    actual = masks @ scores
    assert lds_bench.lds(scores, masks, actual)["lds"] == pytest.approx(1.0)
    assert lds_bench.lds(scores, masks, -actual)["lds"] == pytest.approx(-1.0)
    noisy = lds_bench.lds(scores, masks, actual + rng.normal(scale=50, size=actual.shape))
    assert -1 < noisy["lds"] < 0.9 and noisy["se_models"] > 0


def test_lds_spearman_matches_scipy_with_ties(lds_bench):
    import numpy as np
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 6))
    b = np.round(a + rng.normal(size=(20, 6)))  # ties
    assert np.allclose(lds_bench.spearman_columns(a, b), [spearmanr(a[:, j], b[:, j])[0] for j in range(6)])


def test_lds_aggregations_give_one_score_per_example_and_query(lds_bench):
    import numpy as np

    per_layer = {"a": np.array([[3.0], [1.0], [2.0], [-1.0], [0.0]]), "b": np.array([[1.0], [2.0], [3.0], [0.0], [-2.0]])}
    assert np.allclose(lds_bench.aggregated(per_layer, ["a", "b"], "sum")[:, 0], [4, 3, 5, -1, -2])
    assert np.allclose(lds_bench.aggregated(per_layer, ["a", "b"], "rank")[:, 0], [-1, -1.5, -0.5, -3.5, -3.5])
    votes = lds_bench.aggregated(per_layer, ["a", "b"], "vote")[:, 0]  # top/bottom ceil(0.2*5)=1 per side
    assert np.allclose(votes, [1, 0, 1, -1, -1])


def test_lds_pipeline_outputs_checks_and_cache(lds_run):
    import json

    first, second, out, subsets, stamps = lds_run
    data = json.loads((out / "lds.json").read_text())
    assert len(subsets) == 8 and [p.stat().st_mtime_ns for p in subsets] == stamps  # the rerun trained nothing
    assert "LDS" in (out / "lds.md").read_text()
    for method, rows in first["lds"].items():
        for aggs in rows.values():
            for value in aggs.values():
                assert -1 <= value["lds"] <= 1 and value["queries"] > 0, (method, value)
    expected = {f"{p} {s} {m}" for p in ("mixed", "pca") for s in ("gradient", "curvature") for m in ("dot", "cosine")}
    assert expected | {"exact dot", "exact cosine"} <= set(first["lds"])
    assert {"all", "kf", "head", "block0"} <= set(first["lds"]["exact dot"])
    assert set(first["lds"]["exact dot"]["all"]) == {"sum", "rank", "vote"}
    assert first["checks"]["exact_autograd_max_rel_error"] < 1e-4
    assert first["checks"]["head_lite_vs_exact_max_rel_diff"] < 1e-4
    assert second["lds"]["exact dot"] == first["lds"]["exact dot"]  # cached scores, same LDS
    assert data["setup"]["m"] == 8 and data["retrain"]["total_s"] > 0


def test_lds_kronfluence_part(lds_run):
    pytest.importorskip("kronfluence", reason="kronfluence is not installed (it is not a dependency; "
                        "pip install --no-deps kronfluence==1.0.1 einops einconv opt-einsum): its LDS part is skipped")
    first, second, *_ = lds_run
    assert first["skipped"] is None and set(first["lds"]["kronfluence ekfac"]) == {"kf"}
    assert first["checks"]["kronfluence_vs_exact_dot"] > 0  # the sign conventions agree
    assert first["times"]["kronfluence ekfac"]["total_s"] > 0
    assert second["skipped"] == "--no-kronfluence" and "kronfluence ekfac" not in second["lds"]


# ------------------------------------------------------------------ fidelity.py


def test_fidelity_scores_the_library_default_and_whole_sketches_equal_exact_gradients(bert_dir):
    """fidelity.py's Grams of a source against its autograd reference: sketches that keep every
    matrix whole (and the embeddings' whole hidden side) give exact Grams in every layer, and
    the library's default source covers every layer, the embeddings through their token side."""
    import sys

    import numpy as np

    sys.path.insert(0, str(SCRIPT.parent))
    import fidelity
    import sketches
    from lite_influence.gradients import fit_covariances, length_batches
    from lite_influence.layers import assign_layers, discover_units, select_units
    from lite_influence.models import encode, load_model
    from lite_influence.projection import pca_fits

    loaded = load_model(bert_dir)
    texts, labels = ["good movie", "the plot was very dull", "not quite a great film", "awful actor"], [1, 0, 0, 0]
    units = select_units(discover_units(loaded.model), "attention")
    layers = assign_layers(units, "layer")
    linear, rows = fidelity.exact_gradients(loaded, units, texts, labels, 32)
    exact = fidelity.exact_grams(layers, linear, rows)
    enc = encode(loaded, texts, None, 32)
    covariances = fit_covariances(loaded, units, enc, labels, length_batches([len(e["input_ids"]) for e in enc], 2), pca_fits)

    class Args:
        batch_size = 2

    whole = {**sketches.candidate("pca k=999", units, 0, covariances, 10**9),
             **sketches.candidate("tokens-exact x pca k=999", units, 0, covariances, 10**9)}
    grams, _ = fidelity.source_grams(loaded, layers, whole, enc, labels, rows, Args)
    assert set(grams) == set(layers)
    for name in layers:
        assert np.allclose(grams[name], exact[name], rtol=1e-4, atol=1e-6 * np.abs(exact[name]).max()), name
    default, dims = fidelity.source_grams(loaded, layers, sketches.candidate("default", units, 0, covariances, 1024),
                                          enc, labels, rows, Args)
    assert set(default) == set(layers) and "x" in str(dims["embeddings"])


def test_sketch_ndr_specs_name_their_projection_seed():
    """sketch_ndr.py: ``NAME@S`` is another draw of the same sketch (projection seed S, its own
    cached index); a plain NAME builds with the run's seed."""
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    import sketch_ndr

    drawn, plain = sketch_ndr.parse("mixed32-e0.8@2:mixed:4:32:192:0.8"), sketch_ndr.parse("mixed32-e0.8:mixed:4:32:192:0.8")
    assert drawn.pop("seed") == 2 and "seed" not in plain
    assert {k: v for k, v in drawn.items() if k != "name"} == {k: v for k, v in plain.items() if k != "name"}
    assert drawn["energy"] == 0.8 and drawn["proj_dim_in"] == 32 and drawn["token_dim"] == 192
