"""audit.py through the CLI and the API: any NDR level works (12.5 crashed with exit 2), the
noise flags, and the baselines' keys match the table's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import WORDS, dense_rows, run_cli
from lite_influence import build_index, ndr
from lite_influence.audit import noise_flags
from lite_influence.errors import UserError


@pytest.fixture(scope="module")
def env(bert_dir, tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("audit")
    rng = random.Random(1)
    rows = [f"{' '.join(rng.choices(WORDS, k=rng.randint(3, 8)))}\t{i % 2}\t{int(i % 4 == 0)}" for i in range(16)]
    train = root / "train.tsv"
    train.write_text("sentence\tlabel\tnoisy\n" + "\n".join(rows) + "\n")
    queries = root / "queries.tsv"
    queries.write_text("sentence\tlabel\ngood film\t1\nawful plot\t0\nvery dull story\t0\n")
    index = build_index(bert_dir, train, root / "idx", projection="random", proj_dim=2, metric="dot")
    return {"index": index, "queries": queries, "root": root}


def test_any_level_works_and_is_scored_like_ndr_at(capsys, env):
    code, out, err = run_cli(capsys, "audit", env["index"].path, env["queries"], "--levels", "12.5,30",
                             "--layers", "all", "--agg", "rank", "--json")
    assert code == 0, err
    result = json.loads(out)
    row = result["table"][0]
    noisy = noise_flags(env["index"].examples, None)
    ranking = env["index"].audit(env["queries"], layers="all", aggs="rank", levels="12.5,30").rankings[("all", "rank", "all")][0]
    assert row["ndr@12.5"] == ndr.ndr_at(ranking, noisy, 0.125) and row["ndr@30"] == ndr.ndr_at(ranking, noisy, 0.3)
    assert set(result["baselines"]["random"]) == {"ndr@12.5", "ndr@30", "auc_ndr"}
    code, out, _ = run_cli(capsys, "audit", env["index"].path, env["queries"], "--levels", "12.5", "--layers", "all")
    assert code == 0 and "NDR@12.5" in out


def test_level_key_spellings():
    assert [ndr.level_key(p) for p in (0.1, 0.125, 0.3, 1.0, 0.005)] == ["ndr@10", "ndr@12.5", "ndr@30", "ndr@100", "ndr@0.5"]


def test_noise_flags():
    examples = [{"id": 0, "noisy": "1"}, {"id": 1, "noisy": "0"}, {"id": 2, "noisy": "true"}, {"id": 3, "noisy": ""}]
    assert noise_flags(examples, None).tolist() == [True, False, True, False]
    assert noise_flags([{"id": 0, "text": "x"}], None) is None
    with pytest.raises(UserError, match="noise column 'flipped' is not in the indexed training data"):
        noise_flags([{"id": 0, "text": "x"}], "flipped")


def test_api_audit_validates_like_the_cli(env):
    with pytest.raises(UserError, match="--vote-p must be in"):
        env["index"].audit(env["queries"], vote_p=0)
    with pytest.raises(UserError, match="unknown aggregation 'best'"):
        env["index"].audit(env["queries"], aggs="best")


def test_correct_only_rows_use_the_queries_predicted_correctly(env):
    result = env["index"].audit(env["queries"], layers="all", aggs="vote", correct_only=True)
    correct = env["index"].gradients(["good film", "awful plot", "very dull story"], labels=[1, 0, 0]).correct
    rows = {row["agg"]: row for row in result.table}
    assert result.n_correct == int(correct.sum())
    if correct.any():
        assert rows["vote-c"]["queries"] == int(correct.sum())
    assert rows["vote"]["queries"] == 3


def test_baselines_training_loss_self_influence_and_fusion(bert_dir, env):
    """The stored training losses equal losses recomputed one example at a time by the model
    itself, and each baseline row is the NDR of its own ranking."""
    import torch
    import torch.nn.functional as F
    import transformers

    from lite_influence.aggregate import order

    index = env["index"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    with torch.no_grad():
        expected = [F.cross_entropy(model(**tokenizer(e["text"], return_tensors="pt")).logits,
                                    torch.tensor([int(e["label"])])).item() for e in index.examples]
    np.testing.assert_allclose(index.store.losses(), expected, rtol=1e-4, atol=1e-6)
    result = index.audit(env["queries"], layers="all", aggs="rank")
    noisy = noise_flags(index.examples, None)
    by_loss = order(index.store.losses(), higher_first=True)
    assert result.baselines["training loss"] == ndr.summarise(by_loss, noisy, result.levels)
    squares = sum((dense_rows(index, l) ** 2).sum(1) for l in index.layers)
    assert result.baselines["self-influence"] == ndr.summarise(order(squares, higher_first=True), noisy, result.levels)
    influence = result.rankings[result.headline_key][0]  # the headline: -c when any query is correct
    assert result.headline_key[2] == ("correct" if result.n_correct else "all")
    position = np.argsort(influence) + np.argsort(by_loss)  # each example's two positions
    fused = np.lexsort((np.arange(len(position)), position))
    assert result.baselines["influence + loss"] == ndr.summarise(fused, noisy, result.levels)
    assert set(json.loads(json.dumps(result.to_json()))["baselines"]) >= {"training loss", "self-influence", "influence + loss"}


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
def test_fuse_weighs_the_two_positions(weight):
    """Against a direct reference: position = (1 - w) x influence position + w x loss
    position, lowest first, ties by id; w 0 is the influence ranking, 1 the loss ranking."""
    from lite_influence.audit import fuse

    rng = np.random.default_rng(3)
    influence, loss = rng.permutation(50), rng.permutation(50)
    fused_position = [(1 - weight) * list(influence).index(i) + weight * list(loss).index(i) for i in range(50)]
    expected = sorted(range(50), key=lambda i: (fused_position[i], i))
    assert fuse(influence, loss, weight)[0].tolist() == expected
    if weight == 0:
        assert expected == influence.tolist()
    if weight == 1:
        assert expected == loss.tolist()


def test_default_audit_prints_the_headline_beside_the_baselines(capsys, env):
    """A plain `audit` leads with the default setting's answer (influence fused with the
    loss), then the influence row alone and the baselines; the comparison table only when
    asked for; --json carries the same rows, equal to the table's and the baselines'."""
    from lite_influence.config import AuditConfig

    code, out, err = run_cli(capsys, "audit", env["index"].path, env["queries"])
    assert code == 0, err
    lines = [line for line in out.splitlines() if "influence" in line or "loss" in line]
    assert "influence + loss (weight 0.5)" in lines[0]
    assert "influence (all, rank" in lines[1] and "cosine" in lines[1] and "curvature)" in out
    assert any("training loss" in line for line in lines) and any("self-influence" in line for line in lines)
    assert "comparison" not in out
    export = env["root"] / "headline.tsv"
    code, out, err = run_cli(capsys, "audit", env["index"].path, env["queries"], "--json", "--export", export)
    assert code == 0, err
    result = json.loads(out)
    head = result["headline"]
    fused = env["index"].audit(env["queries"]).rankings[("influence + loss", "baseline", "all")][0]
    assert [int(line.split("\t")[1]) for line in export.read_text().splitlines()[1:]] == fused.tolist()
    defaults = AuditConfig()
    assert (head["scope"], head["agg"], head["metric"], head["score"], head["fuse_weight"]) == (
        defaults.layers, defaults.aggs, defaults.metric, defaults.score, defaults.fuse_weight)
    assert env["index"].manifest["metric"] == "dot"  # the default is cosine whatever the build's
    assert head["subset"] == ("correct" if result["n_correct"] else "all")
    names = [row["name"] for row in head["rows"]]
    assert names[0] == "influence + loss (weight 0.5)" and names[1].startswith("influence (all, rank")
    assert {"training loss", "self-influence", "random", "perfect"} <= set(names)
    rows = {row.pop("name"): row for row in head["rows"]}
    for name in ("training loss", "self-influence"):
        assert rows[name] == result["baselines"][name]
    assert rows[names[0]] == result["baselines"]["influence + loss"]
    table_row = next(r for r in result["table"] if r["agg"] == "rank" + ("-c" if head["subset"] == "correct" else ""))
    assert all(rows[names[1]][k] == table_row[k] for k in rows[names[1]])


def test_the_full_comparison_and_the_switches(capsys, env):
    code, out, err = run_cli(capsys, "audit", env["index"].path, env["queries"], "--layers", "each,groups",
                             "--agg", "mean,rank,vote", "--no-correct-only", "--score", "gradient",
                             "--fuse-weight", "0.25", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["headline"]["subset"] == "all" and result["headline"]["score"] == "gradient"
    assert result["headline"]["agg"] == "mean" and result["headline"]["rows"][0]["name"] == "influence + loss (weight 0.25)"
    assert not any(row["agg"].endswith("-c") for row in result["table"])
    assert {row["scope"] for row in result["table"]} >= {"all", "middle", "embeddings"}
    code, out, err = run_cli(capsys, "audit", env["index"].path, env["queries"], "--layers", "each,groups")
    assert code == 0 and "comparison" in out and "headline" in out
    code, out, err = run_cli(capsys, "audit", env["index"].path, env["queries"], "--fuse-weight", "2")
    assert code == 1 and "--fuse-weight must be in [0, 1]" in err
