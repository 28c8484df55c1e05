"""Tests for lite_influence.data: reading every format, column and label validation, seeded
label noise, stratified samples, fingerprints and atomic writes."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lite_influence.data import (
    Examples,
    fingerprint_file,
    flip_labels,
    label_id,
    load_examples,
    read_rows,
    stratified_sample,
    write_rows,
)
from lite_influence.errors import UserError

SST2_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "test.tsv"  # beside the checkout
L2ID = {"negative": 0, "positive": 1}


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def _raises(fn, *words):
    """Every user error must say what was wrong in one line; check the key words are there."""
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word.lower() in msg.lower(), (word, msg)
    return msg


# ---------------------------------------------------------------- read_rows: formats


def test_read_csv_keeps_strings_and_column_order(tmp_path):
    p = _write(tmp_path / "a.csv", 'label,sentence,id\n1,"hello, world",007\n0,bye,8\n')
    rows, cols = read_rows(p)
    assert cols == ["label", "sentence", "id"]
    assert rows == [{"label": "1", "sentence": "hello, world", "id": "007"},
                    {"label": "0", "sentence": "bye", "id": "8"}]


def test_read_tsv_as_glue_writes_it_quotes_are_text(tmp_path):
    """GLUE's TSV has no quoting: a field that starts with a quote is one row with its quote."""
    lines = ['" a quoted start\t1', 'he said "hi" then\t0', '"unbalanced\t1', 'plain " end"\t0'] * 10
    p = _write(tmp_path / "a.tsv", "sentence\tlabel\n" + "\n".join(lines) + "\n")
    rows, cols = read_rows(p)
    assert cols == ["sentence", "label"]
    assert len(rows) == 40  # csv's quote processing merged these 40 rows into fewer
    assert rows[0] == {"sentence": '" a quoted start', "label": "1"}
    assert rows[2] == {"sentence": '"unbalanced', "label": "1"}


def test_tsv_stray_tab_names_the_line(tmp_path):
    p = _write(tmp_path / "a.tsv", "sentence\tlabel\nok\t1\nbad\ttab\t0\n")
    _raises(lambda: read_rows(p), "line 3", "3 fields", ".csv")


def test_tsv_refuses_to_write_a_tab_or_newline(tmp_path):
    for value in ("a\tb", "a\nb", "a\rb"):
        _raises(lambda: write_rows(tmp_path / "o.tsv", [{"text": value}], ["text"]), "'text'", ".csv")
    assert list(tmp_path.iterdir()) == []


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence": ["good", "bad"], "label": [1, 0]}), tmp_path / "a.parquet")
    rows, cols = read_rows(tmp_path / "a.parquet")
    assert cols == ["sentence", "label"] and rows == [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]
    assert load_examples(tmp_path / "a.parquet", label2id=L2ID).labels == [1, 0]


def test_damaged_parquet_is_one_line(tmp_path):
    p = _write(tmp_path / "a.parquet", "not parquet at all")
    _raises(lambda: read_rows(p), "a.parquet", "not a readable Parquet")


def test_read_csv_crlf_bom_and_blank_lines(tmp_path):
    p = tmp_path / "a.csv"
    p.write_bytes("\ufefftext,label\r\nx,1\r\n\r\ny,0\r\n".encode("utf-8"))
    rows, cols = read_rows(p)
    assert cols == ["text", "label"]
    assert rows == [{"text": "x", "label": "1"}, {"text": "y", "label": "0"}]


def test_read_csv_long_field(tmp_path):
    long = "w" * 300_000  # over csv's default 128 KiB field limit
    p = _write(tmp_path / "a.csv", f"text,label\n{long},1\n")
    rows, _ = read_rows(p)
    assert rows[0]["text"] == long


def test_read_jsonl_union_of_keys(tmp_path):
    p = _write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n\n{"label": 0, "text": "b", "extra": [1, 2]}\n'
                                     '{"text": "c"}\n')
    rows, cols = read_rows(p)
    assert cols == ["text", "label", "extra"]
    assert rows == [{"text": "a", "label": 1, "extra": None},
                    {"text": "b", "label": 0, "extra": [1, 2]},
                    {"text": "c", "label": None, "extra": None}]


def test_read_json_lines_and_array(tmp_path):
    lines = _write(tmp_path / "lines.json", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    array = _write(tmp_path / "array.json", '\n [\n {"text": "a", "label": 1},\n {"text": "b", "label": 0}\n]\n')
    expected = ([{"text": "a", "label": 1}, {"text": "b", "label": 0}], ["text", "label"])
    assert read_rows(lines) == expected
    assert read_rows(array) == expected


def test_read_jsonl_unicode_line_separator_inside_string(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028 raw; it must not split the line.
    p = _write(tmp_path / "a.jsonl", json.dumps({"text": "a\u2028b", "label": 1}, ensure_ascii=False) + "\n")
    rows, _ = read_rows(p)
    assert rows[0]["text"] == "a\u2028b"


def test_read_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"sentence": ["good film", "bad film"], "label": [1, 0]})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_rows(tmp_path / "ds") == ([{"sentence": "good film", "label": 1},
                                           {"sentence": "bad film", "label": 0}], ["sentence", "label"])
    other = datasets.Dataset.from_dict({"sentence": ["meh"], "label": [0]})
    datasets.DatasetDict({"train": ds, "test": other}).save_to_disk(str(tmp_path / "dd"))
    rows, _ = read_rows(tmp_path / "dd")
    assert [r["sentence"] for r in rows] == ["good film", "bad film"]
    ex = load_examples(tmp_path / "dd", label2id=L2ID)
    assert ex.texts == ["good film", "bad film"] and ex.labels == [1, 0]


def test_dataset_dict_without_train_names_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = datasets.Dataset.from_dict({"text": ["x"], "label": [0]})
    datasets.DatasetDict({"validation": one, "test": one}).save_to_disk(str(tmp_path / "dd"))
    _raises(lambda: read_rows(tmp_path / "dd"), "train", "validation", "test")


def test_saved_dataset_without_datasets_installed(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    _raises(lambda: read_rows(tmp_path / "ds"), "pip install datasets")


# ---------------------------------------------------------------- read_rows: errors


def test_missing_path(tmp_path):
    _raises(lambda: read_rows(tmp_path / "nope.csv"), "nope.csv", "does not exist")


def test_plain_directory(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hi")
    _raises(lambda: read_rows(tmp_path / "folder"), "folder", "save_to_disk")


def test_unknown_extension_lists_supported(tmp_path):
    p = _write(tmp_path / "a.xlsx", "x")
    _raises(lambda: read_rows(p), ".parquet", ".csv", ".tsv", ".jsonl", ".json")


@pytest.mark.parametrize("name", ["a.csv", "a.jsonl"])
def test_not_utf8_names_line(tmp_path, name):
    p = tmp_path / name
    head = 'text,label\nok,1\n' if name.endswith(".csv") else '{"text": "ok"}\n{"text": "ok"}\n'
    p.write_bytes(head.encode() + "caf\u00e9,1\n".encode("latin-1"))
    _raises(lambda: read_rows(p), name, "UTF-8", "line 3")


def test_malformed_csv_line_names_line(tmp_path):
    p = _write(tmp_path / "a.csv", "text,label\nok,1\ntoo,many,fields\n")
    _raises(lambda: read_rows(p), "line 3", "a.csv", "3 fields", "header has 2")


def test_malformed_jsonl_line_names_line(tmp_path):
    p = _write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    _raises(lambda: read_rows(p), "line 3", "a.jsonl", "JSON")


def test_jsonl_line_not_an_object(tmp_path):
    p = _write(tmp_path / "a.jsonl", '{"text": "ok"}\n[1, 2]\n')
    _raises(lambda: read_rows(p), "line 2", "list", "object")


def test_json_array_item_not_an_object(tmp_path):
    p = _write(tmp_path / "a.json", '[{"text": "ok"}, "oops"]')
    _raises(lambda: read_rows(p), "item 2", "object")


def test_duplicate_header(tmp_path):
    p = _write(tmp_path / "a.csv", "text,text\na,b\n")
    _raises(lambda: read_rows(p), "repeats", "'text'")


@pytest.mark.parametrize("name,content", [("a.csv", ""), ("b.csv", "text,label\n"), ("c.tsv", "\n\n"),
                                          ("d.jsonl", "\n"), ("e.json", "[]")])
def test_empty_files(tmp_path, name, content):
    p = _write(tmp_path / name, content)
    _raises(lambda: read_rows(p), name, "is empty")


# ---------------------------------------------------------------- load_examples


def test_load_examples_autopicks_and_maps_labels(tmp_path):
    p = _write(tmp_path / "a.tsv", "id\tsentence\tlabel\n1\tgood\tpositive\n2\tbad\t0\n3\tfine\t1\n")
    ex = load_examples(p, label2id=L2ID)
    assert isinstance(ex, Examples) and len(ex) == 3
    assert ex.texts == ["good", "bad", "fine"]
    assert ex.labels == [1, 0, 1]
    assert ex.pairs is None
    assert ex.columns == ["id", "sentence", "label"]
    assert ex.rows[0] == {"id": "1", "sentence": "good", "label": "positive"}


def test_text_column_priority(tmp_path):
    p = _write(tmp_path / "a.csv", "question,prompt,labels\nq,p,1\n")
    ex = load_examples(p)
    assert ex.texts == ["p"] and ex.labels == [1]  # "prompt" comes before "question"


def test_explicit_columns_and_pairs(tmp_path):
    p = _write(tmp_path / "a.jsonl", '{"premise": "a", "hypothesis": "b", "gold": 2, "text": "ignored"}\n')
    ex = load_examples(p, text_col="premise", pair_col="hypothesis", label_col="gold")
    assert ex.texts == ["a"] and ex.pairs == ["b"] and ex.labels == [2]


def test_no_label_when_not_required(tmp_path):
    p = _write(tmp_path / "a.csv", "text\nhello\n")
    assert load_examples(p, require_label=False).labels is None
    _raises(lambda: load_examples(p), "no label column", "text", "--label-col")


def test_missing_text_column_lists_columns(tmp_path):
    p = _write(tmp_path / "train.csv", "body,label\nx,1\n")
    _raises(lambda: load_examples(p), "train.csv", "body, label", "--text-col")
    _raises(lambda: load_examples(p, text_col="txt"), "'txt'", "not found", "body, label", "--text-col")


def test_missing_label_and_pair_columns(tmp_path):
    p = _write(tmp_path / "a.csv", "text,label\nx,1\n")
    _raises(lambda: load_examples(p, label_col="gold"), "'gold'", "text, label", "--label-col")
    _raises(lambda: load_examples(p, pair_col="hyp"), "'hyp'", "text, label", "--pair-col")


@pytest.mark.parametrize("content,row", [
    ('{"text": "a", "label": 0}\n{"text": null, "label": 0}\n', 2),
    ('{"text": "a", "label": 0}\n{"text": "b", "label": 0}\n{"text": "  ", "label": 0}\n', 3),
    ('{"label": 0}\n{"text": "b", "label": 0}\n', 1),
])
def test_empty_text_names_row_and_column(tmp_path, content, row):
    p = _write(tmp_path / "a.jsonl", content)
    _raises(lambda: load_examples(p), f"row {row}", "'text'", "empty")


def test_empty_pair_names_row(tmp_path):
    p = _write(tmp_path / "a.csv", "text,pair,label\na,b,0\nc,,1\n")
    _raises(lambda: load_examples(p, pair_col="pair"), "row 2", "'pair'")


def test_non_string_text_converted(tmp_path):
    p = _write(tmp_path / "a.jsonl", '{"text": 42, "label": 0}\n{"text": 1.5, "label": 1}\n')
    assert load_examples(p).texts == ["42", "1.5"]


def test_list_text_refused(tmp_path):
    p = _write(tmp_path / "a.jsonl", '{"text": ["a", "b"], "label": 0}\n')
    _raises(lambda: load_examples(p), "row 1", "list")


def test_unknown_label_lists_model_labels(tmp_path):
    rows = "".join(f"t{i},positive\n" for i in range(6)) + "t7,neutral\n"
    p = _write(tmp_path / "a.csv", "text,label\n" + rows)
    msg = _raises(lambda: load_examples(p, label2id=L2ID), "'neutral'", "row 7", "0 (negative), 1 (positive)")
    assert "model's labels" in msg


def test_out_of_range_id_is_not_a_label(tmp_path):
    p = _write(tmp_path / "a.csv", "text,label\na,0\nb,2\n")
    _raises(lambda: load_examples(p, label2id=L2ID), "'2'", "row 2", "1 (positive)")


def test_missing_label_value(tmp_path):
    p = _write(tmp_path / "a.csv", "text,label\na,0\nb,\n")
    _raises(lambda: load_examples(p, label2id=L2ID), "row 2", "no label")


def test_labels_without_label2id_must_be_ids(tmp_path):
    p = _write(tmp_path / "a.jsonl", '{"text": "a", "label": "3"}\n{"text": "b", "label": 1.0}\n')
    assert load_examples(p).labels == [3, 1]
    bad = _write(tmp_path / "b.jsonl", '{"text": "a", "label": -1}\n')
    _raises(lambda: load_examples(bad), "label -1", "row 1", "non-negative")
    word = _write(tmp_path / "c.jsonl", '{"text": "a", "label": "pos"}\n')
    _raises(lambda: load_examples(word), "'pos'", "label2id")


@pytest.mark.parametrize("value,expected", [
    (0, 0), (1, 1), ("1", 1), (1.0, 1), ("1.0", 1), (np.int64(1), 1), ("negative", 0), ("positive", 1),
])
def test_label_id_accepts_ids_and_names(value, expected):
    assert label_id(value, L2ID) == expected


@pytest.mark.parametrize("value", [2, -1, 1.5, "1.5", "Positive", "", None, [1]])
def test_label_id_rejects(value):
    _raises(lambda: label_id(value, L2ID), "0 (negative), 1 (positive)")


def test_label_id_prefers_id_over_name():
    # "1" is a valid id, so it is that id even if some label happens to be named "1".
    assert label_id("1", {"0": 1, "1": 0}) == 1
    assert label_id("zero", {"zero": 0, "one": 1}, where=" in row 3") == 0
    _raises(lambda: label_id("two", {"zero": 0, "one": 1}, where=" in row 3"), "'two' in row 3")


def test_long_label_list_is_truncated():
    many = {f"c{i}": i for i in range(100)}
    msg = _raises(lambda: label_id("nope", many), "0 (c0)", "100 in all")
    assert "(c99)" not in msg


def test_limit_keeps_first_rows_and_skips_later_bad_rows(tmp_path):
    p = _write(tmp_path / "a.csv", "text,label\na,0\nb,1\nc,1\n,bad\n")
    ex = load_examples(p, limit=2, label2id=L2ID)
    assert ex.texts == ["a", "b"] and ex.labels == [0, 1] and len(ex.rows) == 2
    _raises(lambda: load_examples(p, limit=2, text_col="nope"), "'nope'")  # columns checked first
    _raises(lambda: load_examples(p, limit=0), "limit")


def test_examples_is_frozen(tmp_path):
    p = _write(tmp_path / "a.csv", "text,label\na,0\n")
    ex = load_examples(p)
    with pytest.raises(AttributeError):
        ex.texts = []


@pytest.mark.skipif(not SST2_TEST.exists(), reason="SST-2 data not present")
def test_real_sst2_first_100():
    ex = load_examples(SST2_TEST, label2id=L2ID, limit=100)
    assert len(ex) == 100
    assert set(ex.labels) == {0, 1}
    assert all(t.strip() for t in ex.texts)
    assert ex.columns == ["sentence", "label"]


# ---------------------------------------------------------------- flip_labels


@pytest.mark.parametrize("n,fraction,expected", [(10, 0.2, 2), (7, 0.3, 2), (1000, 0.2, 200),
                                                 (10, 0.25, 2), (50, 0.05, 2), (5, 0.0, 0), (3, 0.9, 3)])
def test_flip_exact_count_and_never_same_label(n, fraction, expected):
    y = np.arange(n) % 3
    new, noisy = flip_labels(y, fraction, 3, seed=0)
    assert new.dtype == np.int64 and noisy.dtype == bool
    assert noisy.sum() == expected
    assert np.all(new[noisy] != y[noisy])
    assert np.array_equal(new[~noisy], y[~noisy])
    assert new.min() >= 0 and new.max() < 3


def test_flip_does_not_modify_input():
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    before = y.copy()
    flip_labels(y, 0.5, 2, seed=1)
    assert np.array_equal(y, before)


def test_flip_deterministic_and_seed_dependent():
    y = [i % 4 for i in range(100)]
    a = flip_labels(y, 0.3, 4, seed=7)
    b = flip_labels(y, 0.3, 4, seed=7)
    c = flip_labels(y, 0.3, 4, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_flip_uniform_over_examples_and_other_classes():
    n, k, seeds = 20, 4, 2000
    y = np.arange(n) % k
    picks = np.zeros(n)
    targets = Counter()
    for seed in range(seeds):
        new, noisy = flip_labels(y, 0.25, k, seed=seed)
        picks += noisy
        targets.update(((new[noisy] - y[noisy]) % k).tolist())
    # Each example is picked with p = 5/20: mean 500, sd ~19.4; allow 5 sd.
    assert np.all(np.abs(picks - 500) < 100), picks
    # Offsets 1, 2, 3 each a third of 10000 flips: sd ~47; allow 5 sd.
    assert set(targets) == {1, 2, 3}
    assert all(abs(c - 10000 / 3) < 240 for c in targets.values()), targets


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan"), True])
def test_flip_rejects_bad_fraction(fraction):
    _raises(lambda: flip_labels([0, 1], fraction, 2, seed=0), "fraction", "[0, 1)")


def test_flip_rejects_bad_classes():
    _raises(lambda: flip_labels([0, 0], 0.5, 1, seed=0), "at least 2 classes")
    _raises(lambda: flip_labels([0, 2], 0.5, 2, seed=0), "0..1")


# ---------------------------------------------------------------- stratified_sample


def test_stratified_exact_proportions():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    rng = np.random.default_rng(0)
    y = y[rng.permutation(100)]
    idx = stratified_sample(y, 10, seed=3)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert np.all(np.diff(idx) > 0)
    assert Counter(y[idx].tolist()) == {0: 6, 1: 3, 2: 1}


def test_stratified_largest_remainder():
    # quotas 7 * (5, 3, 2) / 10 = 3.5, 2.1, 1.4 -> floors 3, 2, 1 (6), one more to class "a" (.5)
    y = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    idx = stratified_sample(y, 7, seed=0)
    assert Counter(np.array(y)[idx].tolist()) == {"a": 4, "b": 2, "c": 1}


@pytest.mark.parametrize("n", [0, 1, 13, 37, 50])
def test_stratified_sizes_add_up(n):
    y = np.array([0] * 17 + [1] * 22 + [2] * 11)
    idx = stratified_sample(y, n, seed=1)
    assert len(idx) == n and len(np.unique(idx)) == n
    counts = Counter(y[idx].tolist())
    for cls, total in ((0, 17), (1, 22), (2, 11)):
        quota = total * n / 50
        assert np.floor(quota) <= counts.get(cls, 0) <= np.ceil(quota)


def test_stratified_deterministic_and_seeded():
    y = np.arange(200) % 2
    assert np.array_equal(stratified_sample(y, 20, 5), stratified_sample(y, 20, 5))
    assert not np.array_equal(stratified_sample(y, 20, 5), stratified_sample(y, 20, 6))


def test_stratified_too_many():
    _raises(lambda: stratified_sample([0, 1, 1], 4, seed=0), "4", "3")


# ---------------------------------------------------------------- fingerprint_file


def test_fingerprint_file_matches_sha256(tmp_path):
    data = bytes(range(256)) * 9000  # > 2 MiB, several chunks
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    assert fingerprint_file(p) == "sha256:" + hashlib.sha256(data).hexdigest()


def test_fingerprint_directory(tmp_path):
    def make(root: Path, files: dict[str, bytes]) -> Path:
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        return root

    base = {"a.txt": b"one", "sub/b.arrow": b"two"}
    fp = fingerprint_file(make(tmp_path / "x", base))
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert fingerprint_file(make(tmp_path / "y", base)) == fp  # location does not matter
    assert fingerprint_file(make(tmp_path / "z", {"a.txt": b"one", "sub/b.arrow": b"twO"})) != fp
    assert fingerprint_file(make(tmp_path / "w", {"a.txt": b"one", "sub/c.arrow": b"two"})) != fp
    assert fingerprint_file(make(tmp_path / "v", {"a.txt": b"onet", "sub/b.arrow": b"wo"})) != fp


def test_fingerprint_missing(tmp_path):
    _raises(lambda: fingerprint_file(tmp_path / "gone"), "does not exist")


# ---------------------------------------------------------------- write_rows


ROWS = [{"text": 'say "hi"\tand, go\nnow', "label": "1", "note": "é ünï \u2028"},
        {"text": "plain", "label": "0", "note": ""}]


@pytest.mark.parametrize("name", ["out.csv", "out.jsonl"])
def test_write_read_round_trip(tmp_path, name):
    p = write_rows(tmp_path / name, ROWS, ["text", "label", "note"])
    assert Path(p) == tmp_path / name
    assert read_rows(p) == (ROWS, ["text", "label", "note"])
    assert [f.name for f in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_write_csv_stringifies_and_jsonl_keeps_types(tmp_path):
    rows = [{"text": "a", "label": 1, "score": np.float32(0.5), "extra": None, "dropped": "x"}]
    cols = ["text", "label", "score", "extra"]
    assert read_rows(write_rows(tmp_path / "a.csv", rows, cols))[0] == [
        {"text": "a", "label": "1", "score": "0.5", "extra": ""}]
    assert read_rows(write_rows(tmp_path / "a.jsonl", rows, cols))[0] == [
        {"text": "a", "label": 1, "score": 0.5, "extra": None}]


def test_write_then_load_examples(tmp_path):
    p = write_rows(tmp_path / "sub" / "train.tsv", [{"sentence": "x y", "label": 1}], ["sentence", "label"])
    ex = load_examples(p, label2id=L2ID)
    assert ex.texts == ["x y"] and ex.labels == [1]


def test_write_is_atomic_on_failure(tmp_path):
    p = write_rows(tmp_path / "a.jsonl", [{"text": "old"}], ["text"])
    before = p.read_bytes()
    with pytest.raises(TypeError):
        write_rows(p, [{"text": "new"}, {"text": object()}], ["text"])
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["a.jsonl"]


def test_write_unknown_extension(tmp_path):
    _raises(lambda: write_rows(tmp_path / "a.xlsx", ROWS, ["text"]), ".xlsx", ".csv", ".jsonl")
