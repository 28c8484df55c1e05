"""lookup.nearest, the one "search, then exact rescoring" routine: equal to a brute-force
float64 sort of every stored vector, ties by id, on flat and approximate indexes."""

from __future__ import annotations

import numpy as np
import pytest

from lite_influence.store import IndexStore, IndexWriter
from lite_influence.lookup import nearest


def write_store(tmp_path, vectors, metric="dot", factory="Flat"):
    writer = IndexWriter(tmp_path / "idx", force=True)
    matrix = writer.vector_file("layer", len(vectors), vectors.shape[1])
    matrix[:] = vectors
    writer.write_examples([{"id": i, "text": f"t{i}", "label": 0} for i in range(len(vectors))])
    manifest = {"format_version": 1, "n": len(vectors), "metric": metric, "index_factory": factory,
                "label_names": ["a"], "model": {"path": "/m", "fingerprint": "x", "task": "classification"},
                "data": {"path": "/d"}, "build": {"projection": "random", "proj_dim": 2, "seed": 0},
                "layers": [{"name": "layer", "dim": vectors.shape[1], "units": []}], "groups": {}}
    from lite_influence.store import FORMAT_VERSION

    manifest["format_version"] = FORMAT_VERSION
    return IndexStore(writer.commit(manifest), manifest)


def brute_force(vectors, query, sign, depth):
    exact = vectors.astype(np.float64) @ query.astype(np.float64)
    return np.lexsort((np.arange(len(vectors)), -sign * exact))[:depth]


def setup(tmp_path, factory, metric="dot"):
    """Stored vectors as ``metric`` compares them (unit rows for cosine) and prepared queries."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60, 6)).astype(np.float32)
    vectors[10] = vectors[3]  # identical vectors: the tie goes to the smaller id
    store = write_store(tmp_path, vectors, metric=metric, factory=factory)
    queries = rng.normal(size=(3, 6)).astype(np.float32)
    queries[0] = vectors[3]
    return store.vectors("layer"), store, store.prepare_queries(queries)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_nearest_on_a_flat_index_equals_a_full_sort(tmp_path, sign, metric):
    vectors, store, queries = setup(tmp_path, "Flat", metric)
    for depth in (1, 5, 60):
        found = nearest(store, "layer", queries, sign, depth, metric)
        for q, ids in enumerate(found):
            assert ids.tolist() == brute_force(vectors, queries[q], sign, depth).tolist()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_nearest_on_an_approximate_index_orders_its_candidates_exactly(tmp_path, sign):
    """HNSW (which holds unit rows: cosine searches it) may miss an example (rescoring cannot
    add what the search did not find), but what it returns is in exact float64 order, ties by
    id, without duplicates."""
    metric = "cosine"
    vectors, store, queries = setup(tmp_path, "HNSW8", metric)
    for q, ids in enumerate(nearest(store, "layer", queries, sign, 20, metric)):
        assert len(ids) == len(set(ids.tolist())) == 20
        exact = sign * (vectors[ids].astype(np.float64) @ queries[q].astype(np.float64))
        assert ids.tolist() == ids[np.lexsort((ids, -exact))].tolist()


def test_depth_past_the_index_is_clamped(tmp_path):
    vectors = np.eye(4, dtype=np.float32)
    store = write_store(tmp_path, vectors)
    (ids,) = nearest(store, "layer", store.prepare_queries(np.ones((1, 4))), 1.0, 10, "dot")
    assert ids.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("agg", ["vote", "rank", "mean"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_k_only_truncates_the_combined_ranking(tmp_path, agg, sign):
    """The first 5 rows of -k 40 are the rows of -k 5, for every aggregation."""
    from lite_influence.lookup import lookup

    vectors, store, queries = setup(tmp_path, "Flat")
    examples = [{"id": i, "text": f"t{i}", "label": 0} for i in range(len(vectors))]
    raw = {"layer": queries}
    few = lookup(store, examples, raw, ["layer"], sign, 5, agg)
    many = lookup(store, examples, raw, ["layer"], sign, 40, agg)
    assert [r["id"] for r in few] == [r["id"] for r in many[:5]]
    assert [r["score"] for r in few] == [r["score"] for r in many[:5]]


def test_rank_is_the_brute_force_mean_rank(tmp_path):
    from lite_influence.lookup import lookup

    vectors, store, queries = setup(tmp_path, "Flat")
    examples = [{"id": i} for i in range(len(vectors))]
    rows = lookup(store, examples, {"layer": queries}, ["layer"], 1.0, 60, "rank")
    ranks = np.zeros(len(vectors))
    for q in queries:
        ranks[brute_force(vectors, q, 1.0, len(vectors))] += np.arange(len(vectors))
    expected = np.lexsort((np.arange(len(vectors)), ranks))
    assert [r["id"] for r in rows] == expected.tolist()


def test_query_by_id_loads_no_model_and_equals_brute_force(bert_dir, train_tsv, tmp_path):
    """`query --id` ranks by the stored vectors of the example itself, in a process that
    never imports torch."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from lite_influence import build_index

    index = build_index(bert_dir, train_tsv, tmp_path / "idx", projection="random", proj_dim=2, metric="dot")
    code = ("import sys; from lite_influence.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
            "    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code, "query", str(index.path), "--id", "3", "-k", "4",
                          "--layers", "block1", "--agg", "mean", "--json"],
                         capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": ""})
    assert out.returncode == 0 and "NO-TORCH" in out.stderr, out.stderr
    result = json.loads(out.stdout)
    vectors = index.vectors("block1").astype(np.float64)
    expected = np.lexsort((np.arange(len(vectors)), -(vectors @ vectors[3])))[:4]
    assert [r["id"] for r in result["proponents"]] == expected.tolist()
    assert result["query"]["id"] == 3
    with pytest.raises(Exception, match="0..11"):
        index.query_ids([12])


def test_several_ids_give_one_result_each_unless_aggregated(bert_dir, train_tsv, tmp_path, capsys):
    """`query --id 3 --id 5` explains each example on its own (JSON lines), `--aggregate` both
    together; through the embeddings' exact token rows too, against a dense numpy expansion."""
    import json

    from conftest import dense_rows, run_cli
    from lite_influence import build_index

    index = build_index(bert_dir, train_tsv, tmp_path / "idx", projection="random", proj_dim=2, metric="dot")
    args = ["query", index.path, "--id", "3", "--id", "5", "-k", "4", "--layers", "embeddings", "--agg", "mean", "--json"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    dense = dense_rows(index, "embeddings")
    for line, i in zip(lines, (3, 5)):
        assert line["query"]["id"] == i
        expected = np.lexsort((np.arange(len(dense)), -(dense @ dense[i])))[:4]
        assert [r["id"] for r in line["proponents"]] == expected.tolist()
    code, out, err = run_cli(capsys, *args, "--aggregate")
    assert code == 0, err
    together = json.loads(out)
    expected = np.lexsort((np.arange(len(dense)), -(dense @ (dense[3] + dense[5]))))[:4]
    assert [q["id"] for q in together["queries"]] == [3, 5]
    assert [r["id"] for r in together["proponents"]] == expected.tolist()
    code, out, err = run_cli(capsys, *[a for a in args if a != "--json"])
    assert code == 0, err
    assert "training example #3" in out and "training example #5" in out


def test_dot_on_an_approximate_index_is_refused_in_one_line(tmp_path):
    """An ANN index searches unit rows: dot is refused with the fix, not answered from a
    scan that its compressed kinds (PQ, SQ) could not make exact."""
    from lite_influence.errors import UserError

    store = write_store(tmp_path, np.eye(4, dtype=np.float32), metric="cosine", factory="HNSW8")
    assert store.approximate and store.metrics == ("cosine",)
    with pytest.raises(UserError, match="approximate.*--metric cosine.*--index-factory Flat"):
        store.check_metric("dot")


@pytest.mark.parametrize("factory", ["HNSW8", "compact"])
@pytest.mark.parametrize("agg", ["vote", "rank", "mean"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_approximate_lookup_that_finds_every_example_equals_the_flat_one(tmp_path, agg, sign, factory):
    """With fewer examples than the search depth every example is a candidate, so the ANN
    path (FAISS candidates, exact rescoring) must give exactly the Flat lookup's rows."""
    from lite_influence.lookup import lookup

    examples = [{"id": i, "text": f"t{i}", "label": 0} for i in range(60)]
    results = []
    for kind in ("Flat", factory):
        _, store, queries = setup(tmp_path / kind, kind, "cosine")
        results.append(lookup(store, examples, {"layer": queries}, ["layer"], sign, 7, agg))
    assert [(r["id"], r["score"], r["per_layer"]) for r in results[1]] == \
           [(r["id"], r["score"], r["per_layer"]) for r in results[0]]


def test_approximate_lookup_ranks_its_candidates_by_exact_scores(tmp_path):
    """Past the search depth (N = 4,000 > 400 candidates) the rows come from FAISS's candidates
    and the rank sample, each with its exact float64 cosine, mean-aggregated exactly as numpy
    does on them."""
    from lite_influence.lookup import RANK_SAMPLE, candidate_depth, lookup, lookup_scores

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(4000, 8)).astype(np.float32)
    store = write_store(tmp_path, vectors, metric="cosine", factory="HNSW16")
    query = rng.normal(size=(1, 8)).astype(np.float32)
    candidates, _ = lookup_scores(store, {"layer": query}, ["layer"], "cosine", 5)
    assert candidate_depth(5, 4000) == 400 and RANK_SAMPLE <= len(candidates) <= 800 + RANK_SAMPLE
    units = vectors.astype(np.float64) / np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True)
    exact = units @ (query[0] / np.linalg.norm(query[0]))
    rows = lookup(store, [{"id": i} for i in range(4000)], {"layer": query}, ["layer"], 1.0, 5, "mean")
    pool = np.asarray(candidates)
    expected = pool[np.lexsort((pool, -exact[pool]))][:5]
    assert [r["id"] for r in rows] == expected.tolist()
    np.testing.assert_allclose([r["score"] for r in rows], exact[expected], rtol=1e-6)
    assert len(set(expected) & set(np.argsort(-exact)[:5].tolist())) >= 4  # HNSW finds the true top


def test_estimated_ranks_match_the_true_ranks_among_all_examples():
    """An approximate lookup's candidates are placed among all N (lookup.estimated_ranks):
    exactly within the searched depth, beyond it from the rank sample, checked against the
    brute-force rank of each candidate's score among every example."""
    from lite_influence.lookup import estimated_ranks, rank_sample

    rng = np.random.default_rng(3)
    n, depth = 20_000, 300
    scores = rng.normal(size=n)
    truth = np.empty(n)
    truth[np.argsort(-scores, kind="stable")] = np.arange(n)
    others = rng.choice(n, 500, replace=False)
    candidates = np.unique(np.concatenate([np.argsort(-scores)[:depth], others, rank_sample(n)]))
    ranks = estimated_ranks(scores[candidates], np.searchsorted(candidates, rank_sample(n)), n, depth)
    top = truth[candidates] < depth
    np.testing.assert_array_equal(ranks[top], truth[candidates][top])
    assert np.abs(ranks[~top] - truth[candidates][~top]).max() < 0.03 * n
    assert (ranks[~top] >= depth).all()
    within = np.argsort(np.argsort(-scores[candidates]))  # what ranking within the candidates said
    assert np.abs(within[~top] - truth[candidates][~top]).mean() > 10 * np.abs(ranks[~top] - truth[candidates][~top]).mean()
