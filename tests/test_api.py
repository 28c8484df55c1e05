"""The Python API end to end on the tiny BERT: determinism, granularity, lookup and audit
against brute-force numpy over the stored vectors, and resuming an interrupted build."""

from __future__ import annotations

import csv
import math
import random
import shutil

import numpy as np
import pytest
import torch
import transformers

from conftest import WORDS, dense_rows, tiny_config
from lite_influence import ndr
from lite_influence.api import InfluenceIndex, build_index
from lite_influence.data import flip_labels
from lite_influence.errors import UserError

BLOCKS = ["block0", "block1", "block2"]
LAYERS = ["embeddings", *BLOCKS, "head"]


# ---------------------------------------------------------------- references


def prepared(index, vectors):
    """Query vectors as the metric compares them (unit rows for cosine), float64."""
    v = np.asarray(vectors, dtype=np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True) if index.manifest["metric"] == "cosine" else v


def scores(index, layer, query_vectors):
    """Influence of every training example on every query: (queries, N), float64."""
    return prepared(index, dense_rows(index, layer, query_vectors)) @ dense_rows(index, layer).T


def ranked(values, higher_first):
    """Ids by value, ties to the smaller id."""
    v = np.asarray(values, dtype=np.float64)
    return np.lexsort((np.arange(v.size), -v if higher_first else v))


def assert_no_near_ties(index, layer, query_vectors):
    """Precondition of an exact ranking comparison: the training examples' scores for each
    query are further apart than 10x the float32 rounding the index computes them with."""
    exact = scores(index, layer, query_vectors)
    rounded = (prepared(index, dense_rows(index, layer, query_vectors)).astype(np.float32)
               @ dense_rows(index, layer).astype(np.float32).T)
    gap = np.diff(np.sort(exact, axis=1), axis=1).min()
    assert gap > 10 * np.abs(rounded - exact).max(), (layer, gap)


def write_tsv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sentences(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def spread_dir(bert_dir, tmp_path_factory):
    """conftest's tiny BERT re-initialised with larger weights (initializer_range 0.5), with
    bert_dir's tokenizer. At the default 0.02 the network barely depends on its input, every
    gradient points the same way (cosine > 0.99) and 40 examples' scores crowd within float32
    rounding of each other, so no exact ranking comparison could be meaningful."""
    folder = tmp_path_factory.mktemp("spread-bert")
    config = tiny_config("bert")
    config.initializer_range = 0.5
    config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bert_dir / name, folder / name)
    return folder


# ---------------------------------------------------------------- build


def test_tokenizer_of_the_fixture_is_word_level(bert_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    ids = tokenizer("good movie not bad")["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(set(ids)) == 6


@pytest.mark.parametrize("projection", ["random", "pca"])
def test_build_is_deterministic_and_seeded(bert_dir, train_tsv, tmp_path, projection):
    options = dict(projection=projection, batch_size=5, fit_examples=6)
    a = build_index(bert_dir, train_tsv, tmp_path / "a", seed=0, **options)
    b = build_index(bert_dir, train_tsv, tmp_path / "b", seed=0, **options)
    c = build_index(bert_dir, train_tsv, tmp_path / "c", seed=1, **options)
    assert a.layers == b.layers == c.layers == LAYERS
    for layer in LAYERS:
        assert np.array_equal(dense_rows(a, layer), dense_rows(b, layer)), layer
    # random: every matrix comes from (seed, unit name); pca: the seed picks the fitting sample.
    # The 2-class head (16 x 2 + bias: one side narrower than proj_dim) is stored exactly, and
    # so are the embeddings (exact token rows, hidden 16 < --token-dim 64): pca keeps them in
    # the whole eigenbasis of its fitting sample (a rotation), so their inner products agree.
    for layer in BLOCKS:
        assert not np.allclose(dense_rows(a, layer), dense_rows(c, layer)), layer
    for layer in ("head", "embeddings"):
        gram_a, gram_c = (dense_rows(x, layer, metric="dot") @ dense_rows(x, layer, metric="dot").T for x in (a, c))
        np.testing.assert_allclose(gram_a, gram_c, rtol=1e-4, atol=1e-6 * np.abs(gram_a).max())
        assert np.array_equal(dense_rows(a, layer), dense_rows(c, layer)) == (projection == "random")
    assert a.manifest["layers"][-1]["dim"] == 17 * 2
    if projection == "pca":
        assert (a.path / "projection.npz").read_bytes() == (b.path / "projection.npz").read_bytes()


@pytest.mark.parametrize("projection", ["random", "pca"])
def test_unit_granularity_concatenates_to_layer_granularity(bert_dir, train_tsv, tmp_path, projection):
    by_layer = build_index(bert_dir, train_tsv, tmp_path / "layer", projection=projection, metric="dot")
    by_unit = build_index(bert_dir, train_tsv, tmp_path / "unit", projection=projection, metric="dot",
                          granularity="unit")
    units = {info["name"]: [u["name"] for u in info["units"]] for info in by_layer.manifest["layers"]}
    expected = ["embeddings", *[u for b in BLOCKS for u in units[b]], "head.classifier"]
    assert by_unit.layers == expected
    assert all(len(info["units"]) == 1 for info in by_unit.manifest["layers"])
    assert by_unit.groups["early"] == units["block0"] and by_unit.groups["head"] == ["head.classifier"]
    for block in BLOCKS:
        joined = np.concatenate([by_unit.vectors(u) for u in units[block]], axis=1)
        np.testing.assert_allclose(by_layer.vectors(block), joined, rtol=1e-6, atol=0)
    np.testing.assert_allclose(by_layer.vectors("head"), by_unit.vectors("head.classifier"), rtol=1e-6, atol=0)
    # a layer's inner product is the sum of its units' inner products
    v = by_layer.vectors("block1").astype(np.float64)
    parts = sum(by_unit.vectors(u).astype(np.float64) @ by_unit.vectors(u).astype(np.float64).T
                for u in units["block1"])
    np.testing.assert_allclose(v @ v.T, parts, rtol=1e-6)


def test_groups_are_thirds_of_the_model_not_of_the_selection(bert_dir, train_tsv, tmp_path):
    """A 6-block model indexed on its middle blocks only: those are still 'middle'."""
    folder = tmp_path / "bert6"
    config = tiny_config("bert")
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bert_dir / name, folder / name)
    index = build_index(folder, train_tsv, tmp_path / "index", projection="random", layers="middle")
    assert index.layers == ["block2", "block3"]
    assert index.manifest["n_blocks"] == 6
    assert index.groups == {"middle": ["block2", "block3"], "all": ["block2", "block3"]}


# ---------------------------------------------------------------- query


@pytest.fixture()
def index(bert_dir, train_tsv, tmp_path):
    return build_index(bert_dir, train_tsv, tmp_path / "index", projection="random")


QUERY = "the film was very good"


def assert_rows_match(rows, reference, k, sign):
    """rows' ids carry their true influence in per_layer, and are the k strongest (tie-aware)."""
    ids = np.array([r["id"] for r in rows])
    assert len(set(ids.tolist())) == k
    best = np.sort(sign * reference)[::-1][:k]
    np.testing.assert_allclose(sign * reference[ids], best, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", LAYERS)
def test_query_mean_signs_equal_brute_force(index, layer):
    k = 4
    result = index.query(QUERY, layers=layer, agg="mean", k=k)
    q = index.gradients([QUERY]).vectors[layer]
    reference = scores(index, layer, q)[0]  # (N,)
    for side, sign in (("proponents", 1.0), ("opponents", -1.0)):
        rows = result[side]
        assert_rows_match(rows, reference, k, sign)
        for row in rows:  # score is the mean influence: + for proponents, - for opponents
            np.testing.assert_allclose(row["score"], reference[row["id"]], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(row["per_layer"][layer], reference[row["id"]], rtol=1e-5, atol=1e-6)
            assert row["retrieved_in"] == [layer]
        got = [row["score"] for row in rows]
        assert got == sorted(got, reverse=sign > 0)  # strongest first
    assert all(r["score"] > 0 for r in result["proponents"][:1]) and result["opponents"][0]["score"] < 0


def reference_lookup(index, layers, query_vectors, sign, k, agg, p=0.2):
    """Per (layer, query) full rankings by brute force, then the mean rank over all of them,
    or votes of each list's first ceil(p N) (weight p N - rank); ties to the smaller id. The
    per-layer top-k lists (``retrieved_in``) come back too."""
    n = len(index)
    full = [ranked(sign * row, higher_first=True) for layer in layers
            for row in scores(index, layer, query_vectors[layer])]
    if agg == "rank":
        total = np.zeros(n)
        for ids in full:
            total[ids] += np.arange(n)
        values = total / len(full)
        order = ranked(values, higher_first=False)
    else:
        depth = math.ceil(p * n)
        values = np.zeros(n)
        for ids in full:
            values[ids[:depth]] += p * n - np.arange(depth)
        order = ranked(values, higher_first=True)
    return order[:k], values[order[:k]], [ids[:k] for ids in full]


@pytest.mark.parametrize("agg", ["rank", "vote"])
@pytest.mark.parametrize("texts", [[QUERY], [QUERY, "awful plot and a dull actor", "nice story"]])
def test_query_rank_and_vote_equal_brute_force(spread_dir, train_tsv, tmp_path, agg, texts):
    index = build_index(spread_dir, train_tsv, tmp_path / "index", projection="random")
    k, layers = 4, BLOCKS + ["embeddings"]
    grads = index.gradients(texts)
    for layer in layers:
        assert_no_near_ties(index, layer, grads.vectors[layer])
    result = index.query(texts if len(texts) > 1 else texts[0], layers=",".join(layers), agg=agg, k=k)
    assert result["layers"] == [l for l in LAYERS if l in layers]
    for side, sign in (("proponents", 1.0), ("opponents", -1.0)):
        ids, values, lists = reference_lookup(index, result["layers"], grads.vectors, sign, k, agg)
        assert [r["id"] for r in result[side]] == ids.tolist()
        np.testing.assert_allclose([r["score"] for r in result[side]], values)
        for row in result[side]:
            found = [l for l, lst in zip([l for l in result["layers"] for _ in texts], lists) if row["id"] in lst]
            assert row["retrieved_in"] == list(dict.fromkeys(found))  # each layer once
            for layer in result["layers"]:
                expected = scores(index, layer, grads.vectors[layer])[:, row["id"]].mean()
                np.testing.assert_allclose(row["per_layer"][layer], expected, rtol=1e-5, atol=1e-9)


def test_query_clamps_k_and_checks_arguments(index):
    result = index.query(QUERY, k=50, agg="rank")
    assert result["k"] == 12 and result["k_clamped"] and len(result["proponents"]) == 12
    assert sorted(r["id"] for r in result["opponents"]) == list(range(12))
    for options, words in (({"agg": "median"}, "unknown aggregation 'median'"), ({"k": 0}, "-k must be"),
                           ({"layers": "block9"}, "unknown layer or group 'block9'")):
        with pytest.raises(UserError, match=words):
            index.query(QUERY, **options)
    with pytest.raises(UserError, match="not one of the model's labels"):
        index.query(QUERY, label="neutral")


def test_query_label_defaults_to_the_prediction(bert_dir, index):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    with torch.no_grad():
        logits = model(**tokenizer(QUERY, return_tensors="pt")).logits[0]
    predicted = int(logits.argmax())
    result = index.query(QUERY, k=2)
    assert result["prediction"]["label"] == predicted == result["query"]["label"]
    np.testing.assert_allclose(result["prediction"]["probability"], float(logits.softmax(-1)[predicted]), rtol=1e-5)
    other = index.query(QUERY, label=index.manifest["label_names"][1 - predicted], k=2)
    assert other["query"]["label"] == 1 - predicted


# ---------------------------------------------------------------- audit


@pytest.fixture()
def noisy_index(spread_dir, tmp_path):
    """40 rows labelled by a word rule, 20% of labels flipped (noisy=1)."""
    texts = sentences(40, seed=1)
    clean = np.array([int(any(w in t.split() for w in ("good", "great", "fine", "nice"))) for t in texts])
    labels, noisy = flip_labels(clean, 0.2, 2, seed=0)
    path = write_tsv(tmp_path / "train.tsv", ["sentence", "label", "noisy"],
                     [(t, int(l), int(z)) for t, l, z in zip(texts, labels, noisy)])
    index = build_index(spread_dir, path, tmp_path / "index", projection="random")
    return index, noisy


@pytest.fixture()
def influence_set(spread_dir, tmp_path):
    """Six queries, labelled so that the model predicts exactly the first three correctly."""
    texts = sentences(6, seed=2)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(spread_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spread_dir)
    with torch.no_grad():
        predicted = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    labels = [p if i < 3 else 1 - p for i, p in enumerate(predicted)]
    path = write_tsv(tmp_path / "influence.tsv", ["sentence", "label"], zip(texts, labels))
    return path, texts, labels, np.arange(6) < 3


def reference_audit(index, layers, q_vectors, queries, agg, p=0.2):
    """Brute force from full score matrices: per layer and query, ascending scores (most
    detrimental first); vote: bottom ceil(pN) with weight pN - r, summed; rank: mean of the
    full ranks; mean: mean of the negated scores."""
    n = len(index)
    depth, pn = math.ceil(round(p * n, 9)), p * n
    total, lists = np.zeros(n), 0
    for layer in layers:
        for row in scores(index, layer, q_vectors[layer])[queries]:
            order = ranked(row, higher_first=False)
            if agg == "vote":
                total[order[:depth]] += pn - np.arange(depth)
            elif agg == "rank":
                rank = np.empty(n)
                rank[order] = np.arange(n)
                total += rank
            else:
                total += -row
            lists += 1
    values = total if agg == "vote" else total / lists
    return ranked(values, higher_first=agg != "rank"), values


def test_audit_equals_brute_force(noisy_index, influence_set, tmp_path):
    index, noisy = noisy_index
    path, texts, labels, correct = influence_set
    result = index.audit(path, aggs="mean,rank,vote", correct_only=True, layers="each,groups", score="gradient")
    grads = index.gradients(texts, labels=labels)
    assert np.array_equal(grads.correct, correct) and result.n_correct == 3 and result.n_queries == 6
    for layer in LAYERS:
        assert_no_near_ties(index, layer, grads.vectors[layer])
    assert np.array_equal(result.noisy, noisy)
    levels = (0.1, 0.2, 0.3)
    rows = {(r["scope"], r["agg"]): r for r in result.table}
    scopes = {**{l: [l] for l in LAYERS}, **index.groups}
    assert {s for s, _ in rows} == set(scopes)
    for scope, layers in scopes.items():
        for agg in ("mean", "rank", "vote"):
            for subset, queries in (("all", np.ones(6, bool)), ("correct", correct)):
                ids, values = reference_audit(index, layers, grads.vectors, queries, agg)
                got_ids, got_values = result.rankings[(scope, agg, subset)]
                assert got_ids.tolist() == ids.tolist(), (scope, agg, subset)
                np.testing.assert_allclose(got_values, values[ids], rtol=1e-5, atol=1e-6 * np.abs(values).max())
                row = rows[(scope, agg + ("-c" if subset == "correct" else ""))]
                assert row["queries"] == int(queries.sum()) and row["layers"] == layers
                expected = ndr.summarise(ids, noisy, levels)
                for key, value in expected.items():
                    assert row[key] == pytest.approx(value), (scope, agg, subset, key)
    m = int(noisy.sum())
    assert result.baselines["perfect"]["auc_ndr"] == 1.0
    assert result.baselines["random"]["auc_ndr"] == pytest.approx(ndr.random_auc_ndr(40, m))

    out = result.export(tmp_path / "ranking.tsv", index.examples, scope="all", agg="mean", subset="all")
    with open(out, newline="") as handle:
        exported = list(csv.DictReader(handle, delimiter="\t"))
    assert len(exported) == 40
    ids, _ = reference_audit(index, LAYERS, grads.vectors, np.ones(6, bool), "mean")
    assert [int(r["id"]) for r in exported] == ids.tolist()  # all layers, first aggregation
    assert [int(r["rank"]) for r in exported] == list(range(40))
    assert [int(r["noisy"]) for r in exported] == noisy[ids].astype(int).tolist()
    assert [r["text"] for r in exported] == [index.examples[i]["text"] for i in ids]


def test_audit_checks_its_arguments(noisy_index, influence_set, tmp_path):
    index, _ = noisy_index
    path = influence_set[0]
    with pytest.raises(UserError, match="noise column 'flipped'.*columns: label, noisy, text"):
        index.audit(path, noise_col="flipped")
    with pytest.raises(UserError, match="unknown aggregation 'median'"):
        index.audit(path, aggs="rank,median")
    no_text = write_tsv(tmp_path / "q.tsv", ["review", "label"], [("good film", 1)])
    with pytest.raises(UserError, match="no text column.*review, label"):
        index.audit(no_text)


# ---------------------------------------------------------------- resume


def interrupt_after(examples):
    def progress(stage, done, total):
        if stage == "gradients" and done == examples:
            raise KeyboardInterrupt
    return progress


@pytest.mark.parametrize("batch_size, stop_after, saved", [(4, 4, 4), (1, 9, 9)])
def test_resumed_build_equals_uninterrupted(bert_dir, train_tsv, tmp_path, batch_size, stop_after, saved):
    """Interrupted after the first batch of four or after nine one-example batches
    (progress.json is written after every batch): the build resumes after the last saved
    batch, with the eigenbasis read back from the partial folder, not refitted, and the
    vectors equal an uninterrupted build's bit for bit."""
    options = dict(projection="pca", batch_size=batch_size, seed=2, limit=10, fit_examples=6)
    reference = build_index(bert_dir, train_tsv, tmp_path / "reference", **options)
    out = tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        build_index(bert_dir, train_tsv, out, progress=interrupt_after(stop_after), **options)
    assert not out.exists() and (tmp_path / ".index.partial").is_dir()
    stages = []
    resumed = build_index(bert_dir, train_tsv, out, resume=True,
                          progress=lambda stage, done, total: stages.append((stage, done)), **options)
    gradient_steps = [done for stage, done in stages if stage == "gradients"]
    assert gradient_steps == list(range(saved + batch_size, 11, batch_size)) + ([10] if batch_size == 4 else [])
    assert any(stage == "fit" for stage, _ in stages) == (saved == 0)
    for layer in LAYERS:
        assert np.array_equal(dense_rows(resumed, layer), dense_rows(reference, layer)), layer
    assert not (tmp_path / ".index.partial").exists()


def test_resume_with_other_settings_is_refused(bert_dir, train_tsv, tmp_path):
    out = tmp_path / "index"
    options = dict(projection="random", batch_size=1, limit=9)
    with pytest.raises(KeyboardInterrupt):
        build_index(bert_dir, train_tsv, out, progress=interrupt_after(9), **options)
    with pytest.raises(UserError, match="other settings"):
        build_index(bert_dir, train_tsv, out, seed=5, resume=True, **options)
    assert not out.exists() and (tmp_path / ".index.partial" / "progress.json").is_file()  # kept: issue 10.4


def test_query_file_gives_one_result_per_query_unless_aggregated(bert_dir, train_tsv, tmp_path, capsys):
    """`query --file` answers each query as `query` would alone (JSON lines with --json), from
    one batched gradient pass; --aggregate keeps one ranking for all of them together."""
    import json

    from conftest import run_cli

    index = build_index(bert_dir, train_tsv, tmp_path / "index", projection="random", proj_dim=4)
    texts = ["good movie", "awful plot very dull", "the actor is fine"]
    queries = write_tsv(tmp_path / "q.tsv", ["text"], [[t] for t in texts])
    each = index.query_each(texts, k=3, agg="rank")
    for text, result in zip(texts, each):
        alone = index.query(text, k=3, agg="rank")
        assert [r["id"] for r in result["proponents"]] == [r["id"] for r in alone["proponents"]]
        assert [r["id"] for r in result["opponents"]] == [r["id"] for r in alone["opponents"]]
        assert result["query"]["text"] == text
    code, out, err = run_cli(capsys, "query", index.path, "--file", queries, "--json", "-k", "3", "--agg", "rank")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["query"]["text"] for line in lines] == texts
    assert [[r["id"] for r in line["proponents"]] for line in lines] == [[r["id"] for r in e["proponents"]] for e in each]
    code, out, err = run_cli(capsys, "query", index.path, "--file", queries, "--json", "-k", "3", "--agg", "rank",
                             "--aggregate")
    assert code == 0, err
    together = json.loads(out)
    assert len(together["queries"]) == 3
    assert [r["id"] for r in together["proponents"]] == [r["id"] for r in index.query(texts, k=3, agg="rank")["proponents"]]


def test_query_file_explains_its_labels_only_when_asked(bert_dir, train_tsv, tmp_path, capsys):
    """A query file with a label column: the predictions are explained unless --label-col
    names the labels, and each result says which label it explains and where it came from."""
    import json

    from conftest import run_cli

    index = build_index(bert_dir, train_tsv, tmp_path / "index", projection="random", proj_dim=4)
    texts = ["good movie", "awful plot very dull"]
    predicted = [index.query(t, k=1)["prediction"]["label"] for t in texts]
    queries = write_tsv(tmp_path / "q.tsv", ["text", "label"], [[t, 1 - p] for t, p in zip(texts, predicted)])
    code, out, err = run_cli(capsys, "query", index.path, "--file", queries, "--json", "-k", "2")
    assert code == 0, err
    lines = [json.loads(line)["query"] for line in out.splitlines()]
    assert [q["label"] for q in lines] == predicted and {q["label_source"] for q in lines} == {"prediction"}
    code, out, err = run_cli(capsys, "query", index.path, "--file", queries, "--json", "-k", "2", "--label-col", "label")
    assert code == 0, err
    lines = [json.loads(line)["query"] for line in out.splitlines()]
    assert [q["label"] for q in lines] == [1 - p for p in predicted] and {q["label_source"] for q in lines} == {"given"}
    code, out, err = run_cli(capsys, "query", index.path, "--text", texts[0], "-k", "2")
    assert code == 0, err
    assert "(the prediction)" in out


def test_query_table_wraps_whole_texts_on_an_80_column_terminal(bert_dir, train_tsv, tmp_path, capsys, monkeypatch):
    from conftest import run_cli

    monkeypatch.setenv("COLUMNS", "80")
    long_text = " ".join(WORDS)  # 21 words, longer than a row of 80 columns
    rows = [[long_text, 1]] + [line.split("\t") for line in train_tsv.read_text().splitlines()[1:]]
    data = write_tsv(tmp_path / "long.tsv", ["sentence", "label"], rows)
    index = build_index(bert_dir, data, tmp_path / "index", projection="random", proj_dim=4)
    code, out, err = run_cli(capsys, "query", index.path, "--id", "0", "-k", "3")
    assert code == 0, err
    table = out.split("proponents")[1].split("opponents")[0]  # example 0 heads its own proponents
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in table and WORDS[-1] in table and WORDS[-2] in table  # wrapped, not cut
