"""Several checkpoints (TracIn-CP, issue 15 item 2): ``train --checkpoints K`` keeps them with
their learning rates, ``build`` indexes each, and ``query``/``audit`` score the lr-weighted
sum of each checkpoint's influence. The references are independent: the schedule's rates from
its formula, and the scores from exact per-example autograd gradients of each checkpoint's
model (full-width random projection: the stored vectors are the exact gradients)."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
import transformers

from conftest import WORDS, dense_rows, exact_unit_gradients, run_cli
from lite_influence import InfluenceIndex, build_index
from lite_influence.train import train_model

LR, EPOCHS, BATCH = 3e-2, 3, 4  # 12 rows: 3 steps an epoch, 9 in all, one of warmup
EXACT = dict(projection="random", proj_dim=64, token_dim=16, batch_size=BATCH)  # every side kept whole


@pytest.fixture(scope="module")
def trained(bert_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    rng = random.Random(1)
    rows = [f"{' '.join(rng.choices(WORDS, k=rng.randint(3, 9)))}\t{i % 2}" for i in range(12)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    result = train_model(bert_dir, folder / "train.tsv", folder / "model", checkpoints=3, epochs=EPOCHS,
                         batch_size=BATCH, lr=LR, noise=0.25)
    return result.out


def expected_rates(total: int, warmup: int) -> list[float]:
    """transformers' linear schedule with warmup, from its formula: the rate of each step."""
    return [LR * t / warmup if t < warmup else LR * max(0.0, (total - t) / (total - warmup)) for t in range(total)]


def test_train_keeps_k_checkpoints_with_the_mean_rate_of_their_spans(trained, bert_dir):
    manifest = json.loads((trained / "checkpoints.json").read_text())
    entries = manifest["checkpoints"]
    assert [e["name"] for e in entries] == ["checkpoint-1", "checkpoint-2", "final"]
    assert [(e["first_step"], e["step"]) for e in entries] == [(1, 3), (4, 6), (7, 9)]
    rates = expected_rates(9, 1)
    for entry in entries:
        span = rates[entry["first_step"] - 1 : entry["step"]]
        assert entry["lr"] == pytest.approx(np.mean(span)) and entry["weight"] == pytest.approx(sum(span))
    models = [transformers.AutoModelForSequenceClassification.from_pretrained(trained / e["path"]) for e in entries]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(bert_dir)
    weights = [m.classifier.weight.detach() for m in [base, *models]]
    assert all(not torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1:])
    assert transformers.AutoTokenizer.from_pretrained(trained / entries[0]["path"])("good")["input_ids"]
    assert json.loads((trained / "training.json").read_text())["checkpoints"] == entries


def test_one_checkpoint_writes_none(bert_dir, trained, tmp_path):
    out = train_model(bert_dir, trained / "train_used.tsv", tmp_path / "m", epochs=1, batch_size=BATCH).out
    assert not (out / "checkpoints.json").exists() and not (out / "checkpoints").exists()


@pytest.fixture(scope="module")
def combined(trained, tmp_path_factory):
    return build_index(trained, trained / "train_used.tsv", tmp_path_factory.mktemp("idx") / "all",
                       batch_size=BATCH, fit_examples=6)


def test_each_checkpoint_stores_what_a_plain_build_of_its_folder_does(trained, combined, tmp_path):
    entries = combined.manifest["checkpoints"]
    assert [e["index"] for e in entries] == ["checkpoints/checkpoint-1", "checkpoints/checkpoint-2", "."]
    for entry in entries:
        plain = build_index(trained / entry["model"], trained / "train_used.tsv", tmp_path / entry["name"],
                            batch_size=BATCH, fit_examples=6, checkpoints="last")
        stored = InfluenceIndex.open(combined.path / entry["index"])
        assert stored.layers == plain.layers and stored.examples == plain.examples
        for layer in plain.layers:
            assert np.array_equal(dense_rows(stored, layer), dense_rows(plain, layer)), (entry["name"], layer)
        assert "checkpoints" not in plain.manifest
    first = dense_rows(InfluenceIndex.open(combined.path / entries[0]["index"]), "block1")
    assert not np.allclose(first, dense_rows(combined, "block1"))  # the checkpoints differ


def exact_gradients(folder, texts, labels, layer_units):
    """(examples, dim) exact gradients of each layer's units, by autograd on the folder's model."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    units = [u for us in layer_units.values() for u in us]

    def loss(text, label):
        return lambda: torch.nn.functional.cross_entropy(model(**tokenizer(text, return_tensors="pt")).logits,
                                                         torch.tensor([label]))
    grads = exact_unit_gradients(model, units, [loss(t, y) for t, y in zip(texts, labels)])
    return {name: torch.cat([grads[u.name].reshape(len(texts), -1) for u in us], 1).double().numpy()
            for name, us in layer_units.items()}


@pytest.fixture(scope="module")
def exact_case(trained, tmp_path_factory):
    index = build_index(trained, trained / "train_used.tsv", tmp_path_factory.mktemp("exact") / "idx", **EXACT)
    layers = ["embeddings", "block1", "head"]
    units = {name: index.session().layers[name] for name in layers}
    texts, labels = [e["text"] for e in index.examples], [e["label"] for e in index.examples]
    per_checkpoint = [(e["weight"], exact_gradients(trained / e["model"], texts, labels, units))
                      for e in index.manifest["checkpoints"]]
    return index, layers, per_checkpoint


def reference(per_checkpoint, layer, metric):
    """sum_k w_k I_k / sum_k w_k, I_k the (queries x N) dot or cosine of exact gradients."""
    total = sum(w for w, _ in per_checkpoint)
    out = 0
    for weight, grads in per_checkpoint:
        g = grads[layer]
        scores = g @ g.T
        if metric == "cosine":
            norms = np.linalg.norm(g, axis=1)
            scores = scores / np.outer(norms, norms)
        out = out + weight / total * scores
    return out


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_a_query_scores_the_lr_weighted_sum_of_exact_influences(exact_case, metric):
    index, layers, per_checkpoint = exact_case
    row = index.examples[5]
    result = index.query(row["text"], label=row["label"], layers=",".join(layers), agg="mean", metric=metric, k=12)
    assert len(result["proponents"]) == 12
    for layer in layers:
        expected = reference(per_checkpoint, layer, metric)[5]
        got = np.array([r["per_layer"][layer] for r in sorted(result["proponents"], key=lambda r: r["id"])])
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())
    by_id = index.query_ids([5], layers=",".join(layers), agg="mean", metric=metric, k=12)["proponents"]
    for layer in layers:  # a training row as the query: its stored vectors at every checkpoint
        expected = reference(per_checkpoint, layer, metric)[5]
        got = np.array([r["per_layer"][layer] for r in sorted(by_id, key=lambda r: r["id"])])
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6 * np.abs(expected).max())


def test_the_audit_ranks_by_the_weighted_sum_before_aggregating_layers(exact_case, trained):
    index, layers, per_checkpoint = exact_case
    result = index.audit(trained / "train_used.tsv", layers="block1,head", aggs="mean,rank", metric="dot",
                         score="gradient", correct_only=False)
    sums = {layer: reference(per_checkpoint, layer, "dot") for layer in ("block1", "head")}
    for layer in ("block1", "head"):
        ids, values = result.rankings[(layer, "mean", "all")]
        expected = -sums[layer].mean(0)
        np.testing.assert_allclose(values, expected[ids], rtol=2e-4, atol=1e-9)
        assert np.all(np.diff(expected[ids]) <= 1e-9 * np.abs(expected).max())
    ranks = np.mean([np.argsort(np.argsort(sums["block1"][q], kind="stable"), kind="stable")
                     for q in range(12)], 0)  # each query's list, most negative first: rank 0
    ids, values = result.rankings[("block1", "rank", "all")]
    np.testing.assert_allclose(values, ranks[ids], atol=1e-9)


def test_an_index_of_the_last_checkpoint_is_todays_index(trained, combined, tmp_path):
    last = build_index(trained, trained / "train_used.tsv", tmp_path / "last", batch_size=BATCH, fit_examples=6,
                       checkpoints="last")
    assert "checkpoints" not in last.manifest and not (last.path / "checkpoints").exists()
    for layer in last.layers:
        assert np.array_equal(dense_rows(last, layer), dense_rows(combined, layer))
    some = build_index(trained, trained / "train_used.tsv", tmp_path / "some", batch_size=BATCH, fit_examples=6,
                       checkpoints="1,3")
    assert [e["name"] for e in some.manifest["checkpoints"]] == ["checkpoint-1", "final"]
    assert [e["index"] for e in some.manifest["checkpoints"]] == ["checkpoints/checkpoint-1", "."]
    assert sorted(p.name for p in (some.path / "checkpoints").iterdir()) == ["checkpoint-1"]


def test_a_build_interrupted_in_a_checkpoint_resumes_to_the_uninterrupted_index(trained, combined, tmp_path):
    out = tmp_path / "idx"

    def stop(stage, done, total):
        if stage == "checkpoint 2/2: gradients" and done >= 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build_index(trained, trained / "train_used.tsv", out, batch_size=BATCH, fit_examples=6, progress=stop)
    partial = out.parent / f".{out.name}.partial"
    first = partial / "checkpoints" / "checkpoint-1" / "manifest.json"
    assert not out.exists() and first.is_file()
    inode = first.stat().st_ino
    stages = []
    resumed = build_index(trained, trained / "train_used.tsv", out, batch_size=BATCH, fit_examples=6, resume=True,
                          progress=lambda stage, done, total: stages.append(stage))
    assert (out / "checkpoints" / "checkpoint-1" / "manifest.json").stat().st_ino == inode  # kept, not rebuilt
    assert not any(s.startswith("checkpoint 1/2") for s in stages) and not partial.exists()
    for entry in combined.manifest["checkpoints"]:
        a, b = (InfluenceIndex.open(root / entry["index"]) for root in (resumed.path, combined.path))
        for layer in a.layers:
            assert np.array_equal(dense_rows(a, layer), dense_rows(b, layer)), (entry["name"], layer)


def test_bad_checkpoint_inputs_are_one_line(trained, bert_dir, combined, tmp_path, capsys):
    train = trained / "train_used.tsv"
    for value in ("0", "-2"):
        code, _, err = run_cli(capsys, "-q", "train", bert_dir, train, "--out", tmp_path / "m", "--checkpoints", value)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "--checkpoints must be a whole number" in err, err
    for value in ("x", "1.5"):  # not a number: typer's usage error, as for every integer option
        code, _, err = run_cli(capsys, "-q", "train", bert_dir, train, "--out", tmp_path / "m", "--checkpoints", value)
        assert code == 1 and "Invalid value for '--checkpoints'" in err, err
    code, _, err = run_cli(capsys, "-q", "train", bert_dir, train, "--out", tmp_path / "m", "--checkpoints", "50",
                           "--epochs", "1", "--batch-size", "4")
    assert code == 1 and "more than the 3 optimiser step(s)" in err and not (tmp_path / "m").exists()
    for value in ("5", "x", "0", "all,1"):
        code, _, err = run_cli(capsys, "-q", "build", trained, train, "--out", tmp_path / "i", "--checkpoints", value)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "checkpoints" in err, (value, err)
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    shutil.rmtree(broken / "checkpoints" / "checkpoint-1")
    code, _, err = run_cli(capsys, "-q", "build", broken, broken / "train_used.tsv", "--out", tmp_path / "i")
    assert code == 1 and "checkpoint 'checkpoint-1'" in err and "missing" in err and not (tmp_path / "i").exists()
    index = tmp_path / "index"
    shutil.copytree(combined.path, index)
    shutil.rmtree(index / "checkpoints" / "checkpoint-2")
    code, _, err = run_cli(capsys, "-q", "query", index, "--local", "--text", "good movie")
    assert code == 1 and "checkpoint 'checkpoint-2'" in err and "rebuild" in err
    assert len(err.strip().splitlines()) == 1


def test_a_damaged_checkpoints_entry_is_refused_at_open(combined, tmp_path):
    from lite_influence.errors import UserError

    index = tmp_path / "index"
    shutil.copytree(combined.path, index)
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["checkpoints"][0]["weight"] = -1
    (index / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="checkpoints\\[0\\].*positive weight"):
        InfluenceIndex.open(index)
    assert math.isfinite(combined.manifest["checkpoints"][0]["weight"])


def test_the_server_answers_a_checkpoint_index_as_the_python_api(combined):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from lite_influence.serve import Served, create_app

    with TestClient(create_app(Served([combined.path]))) as client:
        response = client.post("/api/query", json={"index": combined.path.name, "text": "good movie", "k": 5,
                                                   "agg": "mean", "metric": "dot"})
    assert response.status_code == 200, response.text
    expected = InfluenceIndex.open(combined.path).query("good movie", k=5, agg="mean", metric="dot")
    got = response.json()
    assert [r["id"] for r in got["proponents"]] == [r["id"] for r in expected["proponents"]]
    np.testing.assert_allclose([r["score"] for r in got["proponents"]], [r["score"] for r in expected["proponents"]],
                               rtol=1e-6)


def test_the_benchmark_runs_end_to_end_on_a_tiny_model(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoints_ndr.py"
    spec = importlib.util.spec_from_file_location("checkpoints_ndr", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--tiny", "--n", "64", "--epochs", "1", "--work", str(tmp_path / "work"),
                          "--out-dir", str(tmp_path / "out"), "--batch-size", "8"])
    assert [c["name"] for c in results["checkpoints"]] == ["checkpoint-1", "checkpoint-2", "final"]
    assert set(results["rows"]) == {f"{name} {metric}" for metric in ("dot", "cosine") for name in
                                    ("last alone", "checkpoint-1 alone", "checkpoint-2 alone", "lr-weighted sum")}
    assert all(0 <= cell["ndr@30"] <= 1 for row in results["rows"].values() for cell in row.values())
    assert results["ratios"]["build"] > 0 and (tmp_path / "out" / "checkpoints_ndr.md").is_file()


def test_a_build_killed_in_a_checkpoints_commit_resumes_to_the_uninterrupted_index(trained, combined, tmp_path):
    """kill -9 as the first staged index is renamed into place: checkpoint-1's own commit,
    inside the build's partial folder (the kill points of a commit: test_crash_safety.py)."""
    import test_crash_safety as crash

    out = tmp_path / "idx"
    options = [trained, trained / "train_used.tsv", "--out", out, "--batch-size", str(BATCH), "--fit-examples", "6"]
    assert crash.build_cli(options, kill_at="renamed into place").returncode == 137
    partial = out.parent / f".{out.name}.partial"
    assert not out.exists() and (partial / "checkpoints" / "checkpoint-1" / "manifest.json").is_file()
    assert not (partial / "checkpoints" / "checkpoint-2").exists()
    resumed = crash.build_cli([*options, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    for entry in combined.manifest["checkpoints"]:
        a, b = (InfluenceIndex.open(root / entry["index"]) for root in (out, combined.path))
        for layer in a.layers:
            assert np.array_equal(dense_rows(a, layer), dense_rows(b, layer)), (entry["name"], layer)
