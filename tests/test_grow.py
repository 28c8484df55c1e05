"""add and delete in place: the result is the fresh build over the same rows with the same
projection (vectors, token rows, norms, losses, examples and query results), recorded in the
manifest, and a failure leaves the old index as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import dense_rows, run_cli

# batch size 1: a fresh build batches the rows differently, and only single-row batches are
# bit-identical whatever their neighbours (else equal to float32 rounding)
OPTIONS = dict(projection="pca", proj_dim=2, batch_size=1, layers="all", fit_examples=8)


def split(train_tsv, tmp_path, first):
    lines = train_tsv.read_text().splitlines()
    head, rows = lines[0], lines[1:]
    old, new = tmp_path / "old.tsv", tmp_path / "new.tsv"
    old.write_text("\n".join([head, *rows[:first]]) + "\n")
    new.write_text("\n".join([head, *rows[first:]]) + "\n")
    return old, new


def assert_same_index(a, b):
    assert len(a) == len(b)
    arrays = sorted(str(f.relative_to(a.path)) for f in a.path.rglob("*.npy"))
    assert arrays == sorted(str(f.relative_to(b.path)) for f in b.path.rglob("*.npy"))
    assert any(f.endswith(".exact_norms.npy") for f in arrays) and any(f.endswith(".norms.npy") for f in arrays)
    for name in arrays:  # norms, exact norms, token rows, losses, offsets: every array, bit for bit
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    for layer in a.layers:
        for metric in ("cosine", "dot"):
            assert np.array_equal(dense_rows(a, layer, metric=metric), dense_rows(b, layer, metric=metric)), layer
    assert np.array_equal(a.store.losses(), b.store.losses())
    assert a.examples == b.examples
    for k in ("dot", "cosine"):
        qa, qb = a.query_ids([0, len(a) - 1], metric=k, k=5), b.query_ids([0, len(b) - 1], metric=k, k=5)
        assert [r["id"] for r in qa["proponents"]] == [r["id"] for r in qb["proponents"]]
        assert [r["id"] for r in qa["opponents"]] == [r["id"] for r in qb["opponents"]]


def test_add_equals_a_fresh_build_with_the_same_projection(bert_dir, train_tsv, tmp_path, capsys):
    from lite_influence import InfluenceIndex, build_index

    old, new = split(train_tsv, tmp_path, 8)
    index = build_index(bert_dir, old, tmp_path / "idx", **OPTIONS)
    projection = index.store.projection_arrays()
    fresh = build_index(bert_dir, train_tsv, tmp_path / "fresh", projection_from=str(index.path), **OPTIONS)
    code, _, error = run_cli(capsys, "add", tmp_path / "idx", new)
    assert code == 0, error
    grown = InfluenceIndex.open(tmp_path / "idx")
    assert_same_index(grown, fresh)
    assert grown.manifest["history"][0]["op"] == "add" and grown.manifest["history"][0]["rows"] == 4
    from lite_influence.data import fingerprint_file

    assert grown.manifest["history"][0]["fingerprint"] == fingerprint_file(new)
    assert f"added 4 rows (ids from 8) from {new.resolve()}" in " ".join(run_cli(capsys, "info", tmp_path / "idx")[1].split())
    after = grown.store.projection_arrays()
    assert all(np.array_equal(projection[k], after[k]) for k in projection)  # not refitted
    assert not any(p.name.startswith(".idx") for p in tmp_path.iterdir())  # no partial or lock left


def test_delete_equals_a_fresh_build_of_the_rows_kept(bert_dir, train_tsv, tmp_path, capsys):
    from lite_influence import InfluenceIndex, build_index

    index = build_index(bert_dir, train_tsv, tmp_path / "idx", **OPTIONS)
    lines = train_tsv.read_text().splitlines()
    kept = [i for i in range(12) if i not in (2, 5)]
    (tmp_path / "kept.tsv").write_text("\n".join([lines[0], *[lines[1 + i] for i in kept]]) + "\n")
    assert run_cli(capsys, "delete", tmp_path / "idx", "--ids", "5,2")[0] == 0
    fresh = build_index(bert_dir, tmp_path / "kept.tsv", tmp_path / "fresh", projection_from=str(index.path), **OPTIONS)
    shrunk = InfluenceIndex.open(tmp_path / "idx")
    assert_same_index(shrunk, fresh)
    assert shrunk.manifest["history"][-1]["removed"] == 2
    # --where by label name; the table keeps class ids
    labels = [row["label"] for row in shrunk.examples]
    assert run_cli(capsys, "delete", tmp_path / "idx", "--where", "label=negative")[0] == 0
    left = InfluenceIndex.open(tmp_path / "idx")
    assert len(left) == labels.count(1) and all(row["label"] == 1 for row in left.examples)
    assert [row["id"] for row in left.examples] == list(range(len(left)))
    code, out, _ = run_cli(capsys, "info", tmp_path / "idx")  # what happened to it, in order
    assert code == 0
    said = [line for line in out.splitlines() if "deleted" in line]
    assert len(said) == 2 and "deleted 2 rows" in said[0] and "label=negative" in said[1]


def test_bad_deletes_are_one_line_and_change_nothing(bert_dir, train_tsv, tmp_path, capsys):
    from lite_influence import build_index

    index = build_index(bert_dir, train_tsv, tmp_path / "idx", projection="random", proj_dim=2)
    before = {f: f.read_bytes() for f in index.path.rglob("*") if f.is_file()}
    cases = [(("--ids", "40"), "rows 0..11"), (("--where", "colour=red"), "no column 'colour'"),
             (("--where", "label=maybe"), "no row has label=maybe"), ((), "pass one of"),
             (("--ids", ",".join(map(str, range(12)))), "all 12 rows")]
    for args, words in cases:
        code, _, error = run_cli(capsys, "delete", index.path, *args)
        assert code == 1 and words in error, error
    assert before == {f: f.read_bytes() for f in index.path.rglob("*") if f.is_file()}


def test_a_failed_add_leaves_the_old_index(bert_dir, train_tsv, tmp_path, capsys):
    from lite_influence import build_index

    index = build_index(bert_dir, train_tsv, tmp_path / "idx", projection="random", proj_dim=2)
    before = {f: f.read_bytes() for f in index.path.rglob("*") if f.is_file()}
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\tmaybe\n")
    code, _, error = run_cli(capsys, "add", index.path, bad)
    assert code == 1 and "maybe" in error
    assert before == {f: f.read_bytes() for f in index.path.rglob("*") if f.is_file()}
    assert not any(p.name.startswith(".idx") for p in tmp_path.iterdir())


def test_add_and_delete_resolve_auto_again_for_the_new_size(bert_dir, train_tsv, tmp_path, capsys, monkeypatch):
    """--index-factory auto is resolved by N: an add that crosses the Flat limit writes the
    IVF a fresh build of all rows would (and says so), a delete back under it writes Flat.
    (The limit is lowered to 10 rows here, and IVF's lists to 2, so a tiny model crosses it.)"""
    from lite_influence import InfluenceIndex, build_index
    from lite_influence.store import faiss_layers

    monkeypatch.setattr(faiss_layers, "AUTO_FLAT_BELOW", 10)
    monkeypatch.setattr(faiss_layers, "auto_ann", lambda n: "IVF2,Flat")
    old, new = split(train_tsv, tmp_path, 8)
    index = build_index(bert_dir, old, tmp_path / "idx", index_factory="auto", **OPTIONS)
    assert index.manifest["index_factory"] == "Flat" and not index.store.approximate
    code, _, error = run_cli(capsys, "add", tmp_path / "idx", new)
    assert code == 0, error
    assert "FAISS IVF2,Flat, from --index-factory auto" in " ".join(error.split())
    grown = InfluenceIndex.open(tmp_path / "idx")
    assert grown.manifest["index_factory"] == "IVF2,Flat" and grown.store.approximate
    assert faiss_layers._ivf(grown.store.faiss_index(grown.store.layers[-1])).nlist == 2
    code, _, error = run_cli(capsys, "delete", tmp_path / "idx", "--ids", "0,1,2")
    assert code == 0, error
    shrunk = InfluenceIndex.open(tmp_path / "idx")
    assert shrunk.manifest["index_factory"] == "Flat" and not shrunk.store.approximate and len(shrunk) == 9
