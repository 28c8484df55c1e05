"""The on-disk store: manifest round trip, stored vectors, search, atomic replacement, IVF."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import dense_rows
from lite_influence.api import InfluenceIndex, build_index
from lite_influence.errors import UserError
from lite_influence.store import IndexStore

LAYERS = ["embeddings", "block0", "block1", "block2", "head"]
FAISS_LAYERS = [layer for layer in LAYERS if layer != "embeddings"]  # the embeddings: exact token rows


def snapshot(folder):
    """Every file under folder, by relative path, with its bytes."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def brute_top_k(vectors, query, k):
    """Scores and ids of the k largest inner products, in float64."""
    scores = vectors.astype(np.float64) @ query.astype(np.float64)
    ids = np.argsort(-scores, kind="stable")[:k]
    return scores, ids


def assert_same_top_k(found_scores, found_ids, reference_scores, k):
    """Tie-aware: the returned ids are distinct, carry their true scores, best first, and those
    scores are the k largest (ties may be broken either way)."""
    assert len(set(found_ids.tolist())) == k and (found_ids >= 0).all()
    np.testing.assert_allclose(found_scores, reference_scores[found_ids], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(found_scores, np.sort(reference_scores)[::-1][:k], rtol=1e-5, atol=1e-6)


@pytest.fixture()
def built(bert_dir, train_tsv, tmp_path):
    return build_index(bert_dir, train_tsv, tmp_path / "index", projection="random", seed=0)


def test_manifest_and_vectors_round_trip(built):
    reopened = InfluenceIndex.open(built.path)
    assert reopened.manifest == json.loads(json.dumps(built.manifest))
    assert json.loads((built.path / "manifest.json").read_text()) == reopened.manifest
    assert reopened.layers == LAYERS and len(reopened) == 12
    assert sorted(f.name for f in (built.path / "layers").iterdir()) == sorted(
        [f"{l}.{kind}" for l in FAISS_LAYERS for kind in ("faiss", "norms.npy")] + ["embeddings.tokens"]
        + [f"{l}.exact_norms.npy" for l in LAYERS])
    assert sorted(f.name for f in (built.path / "layers" / "embeddings.tokens").iterdir()) == [
        "by_token.npy", "indptr.npy", "tokens.npy", "values.npy"]
    ids = [7, 0, 11, 3]
    for info in reopened.manifest["layers"][1:]:
        # a layer's dim is the sum of its units' k_in x k_out (block: 4 attention linears)
        assert info["dim"] == sum(u["k_in"] * u["k_out"] for u in info["units"])
        full = reopened.vectors(info["name"])
        assert full.shape == (12, info["dim"]) and full.dtype == np.float32
        part = reopened.vectors(info["name"], ids)
        assert part.shape == (4, info["dim"])
        np.testing.assert_array_equal(part, full[ids])
        np.testing.assert_array_equal(full, built.vectors(info["name"]))
        assert reopened.vectors(info["name"], []).shape == (0, info["dim"])
    assert [len(l["units"]) for l in reopened.manifest["layers"]] == [1, 4, 4, 4, 1]
    rows = [json.loads(line) for line in (built.path / "examples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(12)) and reopened.examples == rows
    with pytest.raises(UserError, match="ids must be in"):
        reopened.vectors("block0", [12])
    with pytest.raises(UserError, match="unknown layer 'block9'"):
        reopened.vectors("block9")


def test_one_build_answers_both_metrics(bert_dir, train_tsv, tmp_path):
    """Unit rows for cosine and raw rows for dot, from one build whatever its --metric (which
    only sets the default): raw rows are the training examples' own gradients, recomputed."""
    from lite_influence.session import Session

    cosine = build_index(bert_dir, train_tsv, tmp_path / "cos", projection="random", metric="cosine")
    dot = build_index(bert_dir, train_tsv, tmp_path / "dot", projection="random", metric="dot")
    rows = [line.split("\t") for line in train_tsv.read_text().splitlines()[1:]]
    grads = Session(cosine.manifest, cosine.store).gradients([r[0] for r in rows], labels=[int(r[1]) for r in rows])
    for layer in LAYERS:
        expected = dense_rows(cosine, layer, grads.vectors[layer])
        for index in (cosine, dot):
            raw, unit = dense_rows(index, layer, metric="dot"), dense_rows(index, layer, metric="cosine")
            np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(unit, expected / np.linalg.norm(expected, axis=1, keepdims=True),
                                       rtol=1e-4, atol=1e-6)
    for metric in ("dot", "cosine"):
        a, b = cosine.query("good film", k=4, metric=metric), dot.query("good film", k=4, metric=metric)
        assert [r["id"] for r in a["proponents"]] == [r["id"] for r in b["proponents"]]
        assert a["metric"] == metric
    assert cosine.query("good film", k=2)["metric"] == "cosine" and dot.query("good film", k=2)["metric"] == "dot"


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_search_equals_brute_force(bert_dir, train_tsv, tmp_path, metric):
    """FAISS holds unit rows whatever the build's --metric: its search is cosine's."""
    index = build_index(bert_dir, train_tsv, tmp_path / "index", projection="random", metric=metric)
    store = IndexStore.open(index.path)
    rng = np.random.default_rng(0)
    near = {}
    for layer in FAISS_LAYERS:
        vectors = store.vectors(layer, metric="cosine")
        queries = rng.normal(size=(3, vectors.shape[1])).astype(np.float32)
        queries[2] = near[layer] = 3 * vectors[5] + 0.01 * queries[2]  # near a stored vector
        for sign in (1.0, -1.0):  # -q: the bottom of the ranking (opponents)
            for k in (1, 5, 12, 40):
                scores, ids = store.search(layer, store.prepare_queries(sign * queries, "cosine"), k)
                assert scores.shape == ids.shape == (3, min(k, 12))
                for row, q in enumerate(sign * queries):
                    reference, _ = brute_top_k(vectors, q / np.linalg.norm(q), k)
                    assert_same_top_k(scores[row], ids[row], reference, min(k, 12))
    _, ids = store.search("block1", store.prepare_queries(near["block1"][None], "cosine"), 1)
    assert ids[0, 0] == 5  # a query near example 5 finds it first


def test_rebuild_replaces_the_index_only_with_force(bert_dir, train_tsv, tmp_path):
    out = tmp_path / "index"
    first = build_index(bert_dir, train_tsv, out, projection="random", seed=0)
    old_vectors, old_files = first.vectors("block1"), snapshot(out)
    with pytest.raises(UserError, match="already holds an index.*--force"):
        build_index(bert_dir, train_tsv, out, projection="random", seed=1, proj_dim=4)
    assert snapshot(out) == old_files and leftovers(out) == []
    second = build_index(bert_dir, train_tsv, out, projection="random", seed=1, proj_dim=4, force=True)
    assert second.path == out and InfluenceIndex.open(out).manifest["build"]["seed"] == 1
    assert InfluenceIndex.open(out).vectors("block1").shape == (12, 4 * 16)
    assert old_vectors.shape == (12, 4 * 64) and snapshot(out) != old_files
    assert leftovers(out) == []


def bad_label_file(tmp_path, train_tsv):
    bad = tmp_path / "bad.tsv"
    lines = train_tsv.read_text().splitlines()
    lines[7] = lines[7].rsplit("\t", 1)[0] + "\tneutral"
    bad.write_text("\n".join(lines) + "\n")
    return bad


@pytest.mark.parametrize("failure", ["bad label", "faiss training", "interrupted"])
def test_failed_build_leaves_previous_index_byte_identical(bert_dir, train_tsv, tmp_path, failure):
    out = tmp_path / "index"
    build_index(bert_dir, train_tsv, out, projection="random")
    before = snapshot(out)
    if failure == "bad label":
        with pytest.raises(UserError, match="neutral"):
            build_index(bert_dir, bad_label_file(tmp_path, train_tsv), out, projection="random", seed=3, force=True)
    elif failure == "faiss training":  # fails after the gradient pass, while writing FAISS files
        with pytest.raises(UserError, match="IVF64"):
            build_index(bert_dir, train_tsv, out, projection="random", seed=3, index_factory="IVF64,Flat",
                        force=True)
    else:
        def interrupt(stage, done, total):
            if stage == "gradients":
                raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            build_index(bert_dir, train_tsv, out, projection="random", seed=3, batch_size=4, progress=interrupt,
                        force=True)
    assert snapshot(out) == before
    assert InfluenceIndex.open(out).manifest["build"]["seed"] == 0
    # an interrupted build keeps its partial folder for --resume; a failed one removes it
    assert leftovers(out) == ([f".{out.name}.partial"] if failure == "interrupted" else [])


@pytest.mark.parametrize("factory", ["IVF2,Flat", "HNSW8"])
def test_approximate_factories_reconstruct_and_search(bert_dir, train_tsv, tmp_path, factory):
    flat = build_index(bert_dir, train_tsv, tmp_path / "flat", projection="random")
    other = build_index(bert_dir, train_tsv, tmp_path / "other", projection="random", index_factory=factory)
    store = IndexStore.open(other.path)
    assert store.manifest["index_factory"] == factory
    np.testing.assert_array_equal(dense_rows(store, "embeddings"), dense_rows(flat, "embeddings"))
    for layer in FAISS_LAYERS:
        vectors = store.vectors(layer)
        np.testing.assert_allclose(vectors, flat.vectors(layer), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(store.vectors(layer, [4, 2]), vectors[[4, 2]])
        # k = N must return every example: an IVF index probing one of its two lists alone
        # would pad with -1, which vote and rank cannot use
        query = -vectors[:2] + 0.01
        scores, ids = store.search(layer, store.prepare_queries(query, "cosine"), 12)
        for row in range(2):
            q = query[row] / np.linalg.norm(query[row])
            assert_same_top_k(scores[row], ids[row], vectors.astype(np.float64) @ q, 12)


def test_numpy_scan_of_a_few_queries_equals_faiss_search():
    """A lookup's one or two queries scan a flat index with numpy; many go through FAISS.
    Both must return the same top-k (random vectors: no ties)."""
    import faiss

    from lite_influence.store.faiss_layers import FEW_QUERIES, flat_vectors, _scan

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 24)).astype(np.float32)
    index = faiss.IndexFlatIP(24)
    index.add(vectors)
    queries = rng.standard_normal((FEW_QUERIES, 24)).astype(np.float32)
    scores, ids = _scan(flat_vectors(index), queries, 10)
    faiss_scores, faiss_ids = index.search(queries, 10)
    assert np.array_equal(ids, faiss_ids)
    np.testing.assert_allclose(scores, faiss_scores, rtol=1e-5)
    all_scores, all_ids = _scan(flat_vectors(index), queries[:1], 500)  # k = N: a full sort
    assert np.array_equal(all_ids[0], np.argsort(-(vectors @ queries[0]), kind="stable"))


def test_format_1_indexes_answer_what_they_hold(bert_dir, train_tsv, tmp_path):
    """Before format 2 a cosine build kept unit rows only (no dot: one line, 'rebuild') and a
    dot build raw rows (cosine normalises them)."""
    import faiss

    index = build_index(bert_dir, train_tsv, tmp_path / "new", projection="random", token_dim=0)
    raw = {layer: index.store.vectors(layer, metric="dot") for layer in index.layers}
    manifest = json.loads((index.path / "manifest.json").read_text())
    old_cosine = IndexStore(index.path, {**manifest, "format_version": 1, "metric": "cosine"})
    assert old_cosine.metrics == ("cosine",)
    with pytest.raises(UserError, match="cannot answer --metric dot.*rebuild"):
        old_cosine.check_metric("dot")
    for layer in index.layers:  # a dot build of format 1: FAISS held the raw rows
        flat = faiss.IndexFlatIP(raw[layer].shape[1])
        flat.add(raw[layer])
        faiss.write_index(flat, str(index.path / "layers" / f"{layer}.faiss"))
        (index.path / "layers" / f"{layer}.norms.npy").unlink()
    old_dot = IndexStore(index.path, {**manifest, "format_version": 1, "metric": "dot"})
    for layer in index.layers:
        np.testing.assert_array_equal(old_dot.vectors(layer), raw[layer])
        np.testing.assert_allclose(old_dot.vectors(layer, metric="cosine"),
                                   raw[layer] / np.linalg.norm(raw[layer], axis=1, keepdims=True), rtol=1e-6)


def test_examples_are_read_by_id_through_their_offsets(built):
    """A lookup reads the rows it shows by byte offset; an index without the offsets file
    (built before it) falls back to the whole table, and a damaged one is one line."""
    store = IndexStore.open(built.path)
    table = store.table
    assert type(table).__name__ == "ExampleTable" and len(table) == 12
    assert [table[i] for i in range(12)] == store.examples
    text = "".join(json.dumps({"id": i, "text": "é" * i}, ensure_ascii=False) + "\n" for i in range(12))  # multi-byte rows
    (built.path / "examples.jsonl").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="does not match examples.jsonl"):
        IndexStore.open(built.path).table
    (built.path / "examples.offsets.npy").unlink()
    assert IndexStore.open(built.path).table[11] == {"id": 11, "text": "é" * 11}


def test_auto_factory_is_flat_below_the_threshold_and_the_measured_winner_above(bert_dir, train_tsv, tmp_path, capsys):
    """`--index-factory auto` writes the resolved factory into the manifest (the build record
    keeps "auto"); a small index is Flat, so exact, and `info` says which it is."""
    from conftest import run_cli
    from lite_influence.store.faiss_layers import AUTO_FLAT_BELOW, resolve_factory

    assert AUTO_FLAT_BELOW == 100_000 and resolve_factory("auto", 99_999) == "Flat"
    assert resolve_factory("auto", 100_000) == "IVF1265,Flat"  # 4 sqrt(N) lists
    assert resolve_factory("auto", 1_000_000) == "IVF4000,Flat"
    assert resolve_factory("IVF4,Flat", 10) == "IVF4,Flat"
    index = build_index(bert_dir, train_tsv, tmp_path / "auto", projection="random", index_factory="auto")
    store = IndexStore.open(index.path)
    assert store.manifest["index_factory"] == "Flat" and store.manifest["build"]["index_factory"] == "auto"
    assert not store.approximate and store.metrics == ("cosine", "dot")
    code, out, _ = run_cli(capsys, "info", index.path)
    assert code == 0 and "Flat (exact)" in out


def test_a_lookup_on_an_approximate_index_says_so_and_refuses_dot(bert_dir, train_tsv, tmp_path, capsys):
    from conftest import run_cli

    index = build_index(bert_dir, train_tsv, tmp_path / "hnsw", projection="random", index_factory="HNSW8")
    result = index.query_ids([3], k=4)
    assert result["approximate"] == "HNSW8" and result["candidates"] == len(index)  # 12 rows: all found
    flat = build_index(bert_dir, train_tsv, tmp_path / "flat", projection="random").query_ids([3], k=4)
    assert "approximate" not in flat
    assert [r["id"] for r in result["proponents"]] == [r["id"] for r in flat["proponents"]]
    code, out, err = run_cli(capsys, "query", index.path, "--id", "3", "--metric", "dot")
    assert code == 1 and "approximate" in err and "--metric cosine" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(capsys, "info", index.path)
    assert code == 0 and "approximate" in out


def test_a_widened_ivf_probe_is_put_back_after_the_search():
    """A search deeper than the probed lists hold widens nprobe for itself only."""
    import faiss

    from lite_influence.store.faiss_layers import _ivf, search

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 8)).astype(np.float32)
    index = faiss.index_factory(8, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    _, ids = search(index, vectors[:2], 300)
    assert (ids >= 0).all() and _ivf(index).nprobe == 1


def test_an_ivf_index_is_written_probing_a_32nd_of_its_lists(tmp_path):
    """FAISS's default nprobe of 1 misses a fifth of the top 10; the store writes 1/32 of the
    lists (rounded up), and the file keeps it."""
    from lite_influence.store.faiss_layers import _ivf, make_faiss_index, read_faiss, write_faiss

    vectors = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    index = make_faiss_index(vectors, "cosine", "IVF40,Flat")
    write_faiss(index, tmp_path / "l.faiss")
    assert _ivf(read_faiss(tmp_path / "l.faiss", 8, 3000)).nprobe == 2
