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
