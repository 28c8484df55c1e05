"""The 'influence is noise' warning, end to end: an untrained head and a model trained on
shuffled labels are at chance on rule-labelled queries; a model trained on the rule is not."""

from __future__ import annotations

import random

import pytest

from conftest import run_cli
from lite_influence import InfluenceIndex, build_index
from lite_influence.train import train_model
from test_train import FAST, rule_rows, write_tsv


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chance")
    train = rule_rows(48, seed=1)
    shuffled = [dict(r) for r in train]
    labels = [r["label"] for r in shuffled]
    random.Random(7).shuffle(labels)
    for row, label in zip(shuffled, labels):
        row["label"] = label
    return {"root": root, "train": write_tsv(root / "train.tsv", train),
            "shuffled": write_tsv(root / "shuffled.tsv", shuffled),
            "queries": write_tsv(root / "queries.tsv", rule_rows(40, seed=9))}


def _index(model, data, name):
    return build_index(model, data["train"], data["root"] / name, projection="random", proj_dim=2, metric="dot")


def test_untrained_head_warns_in_audit_and_query(bert_dir, data, capsys):
    index = _index(bert_dir, data, "untrained")
    result = index.audit(data["queries"], layers="all", aggs="rank")
    assert result.warning and "at chance" in result.warning
    code, out, err = run_cli(capsys, "query", index.path, "--file", data["queries"], "--label-col", "label", "-k", "2")
    assert code == 0, err
    assert "at chance" in out


def test_shuffled_labels_warn_and_a_learned_rule_does_not(bert_dir, data):
    shuffled = train_model(bert_dir, data["shuffled"], data["root"] / "shuffled-model", epochs=3, **FAST)
    learned = train_model(bert_dir, data["train"], data["root"] / "learned-model", epochs=5, **FAST)
    noise = _index(shuffled.out, data, "shuffled-index").audit(data["queries"], layers="all", aggs="rank")
    signal = _index(learned.out, data, "learned-index").audit(data["queries"], layers="all", aggs="rank")
    assert noise.warning and "at chance" in noise.warning
    assert signal.warning is None


def test_a_single_query_never_warns(bert_dir, data):
    index = InfluenceIndex.open(data["root"] / "untrained")
    assert index.query("good film", label=1, k=2)["warning"] is None
