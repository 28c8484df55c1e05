"""The command line's contract with bad input: exit 1, one line on stderr naming the problem
and the fix, no traceback, and every existing index or folder byte-identical afterwards.
Also: a build killed with SIGKILL leaves the previous index intact and resumes bit for bit,
two queries of one index at once, JSON output, clamping, and safe file loaders only.

Commands run in-process through ``lite_influence.cli.main`` (which owns the exit codes), a
few through ``python -m lite_influence``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch

from conftest import WORDS, dense_rows, run_cli as run
from lite_influence.cli import main

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def edit_manifest(index: Path, change) -> None:
    manifest = json.loads((index / "manifest.json").read_text())
    change(manifest)
    (index / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def env(bert_dir, tmp_path_factory):
    """A model, a 12-row training file, a query file and an index built through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    import random

    rng = random.Random(0)
    rows = [f"{' '.join(rng.choices(WORDS, k=rng.randint(3, 10)))}\t{i % 2}\t{int(i % 5 == 0)}" for i in range(12)]
    train = root / "train.tsv"
    train.write_text("sentence\tlabel\tnoisy\n" + "\n".join(rows) + "\n")
    queries = root / "queries.tsv"
    queries.write_text("sentence\tlabel\ngood film\t1\nawful plot\t0\n")
    index = root / "index"
    code = main_code(["-q", "build", bert_dir, train, "--out", index, "--projection", "random"])
    assert code == 0 and (index / "manifest.json").is_file()
    return {"root": root, "model": bert_dir, "train": train, "queries": queries, "index": index}


def main_code(args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exit:
        return exit.code
    return 0


@pytest.fixture()
def case(env, tmp_path):
    """A fresh copy of the index (the one a case must leave alone) and a scratch folder."""
    index = tmp_path / "index"
    shutil.copytree(env["index"], index)
    return {**env, "tmp": tmp_path, "copy": index}


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


# Each case: (name, make(case) -> (args, protected folder or None for the index copy), key words)


def _build(c, train, *extra, model=None, out=None):
    return ["build", model or c["model"], train, "--out", out or c["copy"], "--force", *extra]


def _garbage_model(c):
    folder = c["tmp"] / "garbage-model"
    write(folder / "config.json", "{this is not json")
    return folder


def _not_index(c):
    folder = c["tmp"] / "notes"
    write(folder / "keep.txt", "my notes")
    return _build(c, c["train"], out=folder), folder


BUILD_CASES = [
    ("missing train file", lambda c: (_build(c, c["tmp"] / "nope.tsv"), None), ["nope.tsv", "does not exist"]),
    ("non-UTF-8 train file", lambda c: (_build(c, write(c["tmp"] / "latin1.tsv", b"sentence\tlabel\ncaf\xe9 film\t1\n")), None),
     ["latin1.tsv", "not UTF-8", "line 2"]),
    ("missing text column", lambda c: (_build(c, write(c["tmp"] / "t.tsv", "review\tlabel\ngood\t1\n")), None),
     ["no text column", "review, label", "--text-col"]),
    ("missing label column", lambda c: (_build(c, write(c["tmp"] / "t.tsv", "sentence\tstars\ngood\t1\n")), None),
     ["no label column", "sentence, stars", "--label-col"]),
    ("header only", lambda c: (_build(c, write(c["tmp"] / "t.tsv", "sentence\tlabel\n")), None), ["t.tsv", "empty"]),
    ("unknown label", lambda c: (_build(c, write(c["tmp"] / "t.tsv", "sentence\tlabel\ngood\t1\nbad\tneutral\n")), None),
     ["'neutral'", "row 2", "not one of the model's labels", "negative", "positive"]),
    ("empty model folder", lambda c: (_build(c, c["train"], model=(c["tmp"] / "empty-model")), None), ["empty-model", "no config.json"]),
    ("garbage config.json", lambda c: (_build(c, c["train"], model=_garbage_model(c)), None),
     ["could not load a model", "garbage-model"]),
    ("unknown layer selector", lambda c: (_build(c, c["train"], "--layers", "bogus"), None),
     ["'bogus'", "attention", "mlp", "all", "middle", "block0..block2", "regex"]),
    ("out is not an index", _not_index, ["not a lite-influence index", "--force"]),
    ("out is a file", lambda c: (_build(c, c["train"], "--force", out=write(c["tmp"] / "notes.txt", "x")), None),
     ["notes.txt", "is a file", "folder"]),
    ("unknown projection", lambda c: (_build(c, c["train"], "--projection", "sparse"), None), ["'sparse'", "random", "pca"]),
    ("unknown metric", lambda c: (_build(c, c["train"], "--metric", "l2"), None), ["'l2'", "cosine", "dot"]),
    ("unparsable index factory", lambda c: (_build(c, c["train"], "--index-factory", "IVF,Flat"), None),
     ["--index-factory", "'IVF,Flat'", "Flat"]),
    ("index factory unfit for the data", lambda c: (["-q", *_build(c, c["train"], "--projection", "random", "--index-factory", "IVF64,Flat")], None),
     ["IVF64,Flat", "Flat"]),
    ("proj dim zero", lambda c: (_build(c, c["train"], "--proj-dim", "0"), None), ["--proj-dim", "at least 1"]),
    # [CLS] and [SEP] alone: every example would have the same gradient
    ("max length of the special tokens", lambda c: (_build(c, c["train"], "--max-length", "2"), None),
     ["--max-length 2", "no room for text", "2 special tokens", "[CLS], [SEP]", "--max-length 3"]),
    # below them the tokenizer would not truncate at all
    ("max length below the special tokens", lambda c: (_build(c, c["train"], "--max-length", "1"), None),
     ["--max-length 1", "no room for text", "--max-length 3"]),
]


def _query(c, *extra, index=None):
    return ["query", index or c["copy"], *extra]


def _damaged(c, damage):
    damage(c["copy"] / "layers" / "block1.faiss", c["copy"])
    return _query(c, "--text", "good film"), None


def _tokens_damaged(c, damage):
    damage(c["copy"] / "layers" / "embeddings.tokens" / "values.npy")
    return _query(c, "--text", "good film"), None


def _moved_model(c):
    edit_manifest(c["copy"], lambda m: m["model"].update(path=str(c["tmp"] / "moved-away")))
    return _query(c, "--text", "good film"), None


def _changed_model(c):
    changed = c["tmp"] / "changed-model"
    shutil.copytree(c["model"], changed)
    weights = safetensors.torch.load_file(changed / "model.safetensors")
    name = next(n for n in weights if n.endswith("classifier.weight"))
    weights[name] = weights[name] * 2
    safetensors.torch.save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    edit_manifest(c["copy"], lambda m: m["model"].update(path=str(changed)))
    return _query(c, "--text", "good film"), None


QUERY_CASES = [
    ("index folder missing", lambda c: (_query(c, "--text", "x", index=c["tmp"] / "no-index"), None), ["no-index", "does not exist", "build"]),
    ("folder is not an index", lambda c: (_query(c, "--text", "x", index=c["tmp"]), None), ["not a lite-influence index", "manifest.json"]),
    ("newer format version", lambda c: (edit_manifest(c["copy"], lambda m: m.update(format_version=999)) or _query(c, "--text", "x"), None),
     ["format 999", "upgrade"]),
    ("faiss file deleted", lambda c: _damaged(c, lambda f, _: f.unlink()), ["block1.faiss", "missing", "rebuild"]),
    ("faiss file truncated", lambda c: _damaged(c, lambda f, _: f.write_bytes(f.read_bytes()[:100])), ["block1.faiss", "damaged", "rebuild"]),
    ("faiss file of the wrong dim", lambda c: _damaged(c, lambda f, i: shutil.copy(i / "layers" / "head.faiss", f)),
     ["block1.faiss", "dim 34", "dim 256", "rebuild"]),
    ("token rows deleted", lambda c: _tokens_damaged(c, lambda f: f.unlink()), ["values.npy", "missing or damaged", "rebuild"]),
    ("token rows truncated", lambda c: _tokens_damaged(c, lambda f: f.write_bytes(f.read_bytes()[:200])),
     ["values.npy", "damaged", "rebuild"]),
    ("token postings damaged", lambda c: (np.save(c["copy"] / "layers" / "embeddings.tokens" / "by_token.npy",
                                                   np.load(c["copy"] / "layers" / "embeddings.tokens" / "by_token.npy")[::-1].copy())
                                           or _query(c, "--text", "good film"), None), ["by_token.npy", "damaged", "rebuild"]),
    ("token rows of another shape", lambda c: _tokens_damaged(c, lambda f: np.save(f, np.zeros((3, 16), np.float32))),
     ["embeddings.tokens", "do not match the manifest", "rebuild"]),
    ("manifest not JSON", lambda c: (write(c["copy"] / "manifest.json", "{") and _query(c, "--text", "x"), None),
     ["manifest.json", "damaged", "rebuild"]),
    ("examples table deleted", lambda c: ((c["copy"] / "examples.jsonl").unlink() or _query(c, "--text", "x"), None),
     ["examples.jsonl", "missing", "rebuild"]),
    ("examples offsets damaged", lambda c: (write(c["copy"] / "examples.offsets.npy", "x") and _query(c, "--text", "x"), None),
     ["examples.offsets.npy", "damaged", "rebuild"]),
    ("unknown layer", lambda c: (_query(c, "--text", "x", "--layers", "block9"), None), ["'block9'", "middle", "block2"]),
    ("unknown aggregation", lambda c: (_query(c, "--text", "x", "--agg", "median"), None), ["'median'", "mean", "rank", "vote"]),
    ("unknown metric", lambda c: (_query(c, "--text", "x", "--metric", "euclid"), None), ["'euclid'", "cosine", "dot"]),
    ("k zero", lambda c: (_query(c, "--text", "x", "-k", "0"), None), ["-k", "at least 1"]),
    ("unknown label", lambda c: (_query(c, "--text", "x", "--label", "neutral"), None), ["'neutral'", "negative", "positive"]),
    ("neither text nor file", lambda c: (_query(c), None), ["--text", "--file"]),
    ("both text and file", lambda c: (_query(c, "--text", "x", "--file", c["queries"]), None), ["--text", "--file"]),
    ("model folder moved", _moved_model, ["moved-away", "missing", "--model"]),
    ("model weights changed", _changed_model, ["changed-model", "fingerprint mismatch", "rebuild"]),
    ("markup in the input", lambda c: (_query(c, "--text", "x", "--layers", "[/bold]"), None), ["'[/bold]'"]),
]


def _audit(c, *extra):
    return ["-q", "audit", c["copy"], *extra]


AUDIT_CASES = [
    ("query file without text column", lambda c: (_audit(c, write(c["tmp"] / "q.tsv", "review\tlabel\ngood\t1\n")), None),
     ["no text column", "review, label"]),
    ("noise column absent", lambda c: (_audit(c, c["queries"], "--noise-col", "flipped"), None),
     ["'flipped'", "label, noisy, text"]),
    ("unknown aggregation", lambda c: (_audit(c, c["queries"], "--agg", "rank,median"), None), ["'median'", "mean", "rank", "vote"]),
    ("unknown metric", lambda c: (_audit(c, c["queries"], "--metric", "l2"), None), ["'l2'", "cosine", "dot"]),
]


def _nan_faiss(c):
    """A layer file of the right dim and size whose vectors are NaN."""
    import faiss
    import numpy as np

    manifest = json.loads((c["copy"] / "manifest.json").read_text())
    layer = next(l for l in manifest["layers"] if l["name"] == "block1")
    index = faiss.IndexFlatIP(layer["dim"])
    index.add(np.full((manifest["n"], layer["dim"]), np.nan, np.float32))
    faiss.write_index(index, str(c["copy"] / "layers" / "block1.faiss"))
    return _query(c, "--text", "x"), None


def _train(c, train, *extra, out=None):
    return ["-q", "train", c["model"], train, "--out", out or c["copy"], "--epochs", "1", *extra]


def _three_classes(c):
    return _train(c, write(c["tmp"] / "t.tsv", "sentence\tlabel\ngood\t0\nbad\t1\nfine\t2\n"),
                  out=c["tmp"] / "model-out"), None


MORE_CASES = [
    ("build", "duplicate ids", lambda c: (_build(c, write(c["tmp"] / "t.tsv", "id\tsentence\tlabel\na\tgood\t1\nb\tbad\t0\na\tfine\t1\n")), None),
     ["'a'", "rows 1 and 3", "unique"]),
    ("build", "read-only --out", lambda c: (_build(c, c["train"], out=Path("/proc/lite-influence-index")), None),
     ["cannot write", "/proc/lite-influence-index"]),
    ("build", "batch size zero", lambda c: (_build(c, c["train"], "--batch-size", "0"), None), ["--batch-size", "at least 1"]),
    ("query", "NaN in a FAISS file", _nan_faiss, ["block1.faiss", "NaN", "rebuild"]),
    ("query", "manifest edited by hand: unknown metric", lambda c: (edit_manifest(c["copy"], lambda m: m.update(metric="l2"))
                                                                   or _query(c, "--text", "x"), None),
     ["manifest.json", "metric", "'l2'"]),
    ("query", "manifest edited by hand: layer dim", lambda c: (edit_manifest(c["copy"], lambda m: m["layers"][1].update(dim=7))
                                                              or _query(c, "--text", "x"), None),
     ["manifest.json", "block0", "dim 7", "rebuild"]),
    ("info", "index folder missing", lambda c: (["info", c["tmp"] / "no-index"], None), ["no-index", "does not exist"]),
    ("info", "folder is not an index", lambda c: (["info", c["tmp"]], None), ["not a lite-influence index"]),
    ("train", "noise outside [0, 1)", lambda c: (_train(c, c["train"], "--noise", "1.5", out=c["tmp"] / "m"), None),
     ["--noise", "1.5"]),
    ("train", "more classes than the head", _three_classes, ["3 classes", "2 classes", "--num-labels"]),
    ("train", "eval file with an unseen label", lambda c: (_train(c, c["train"], "--eval-file",
                                                                 write(c["tmp"] / "e.tsv", "sentence\tlabel\ngood\tneutral\n"),
                                                                 out=c["tmp"] / "m"), None), ["'neutral'", "e.tsv"]),
    ("train", "--out exists", lambda c: (_train(c, c["train"]), None), ["already holds", "--force"]),
    ("train", "max length of the special tokens", lambda c: (_train(c, c["train"], "--max-length", "2", out=c["tmp"] / "m"), None),
     ["--max-length 2", "no room for text", "--max-length 3"]),
]


@pytest.mark.parametrize("make, words", [pytest.param(m, w, id=f"{cmd}: {n}") for cmd, cases in
                                         (("build", BUILD_CASES), ("query", QUERY_CASES), ("audit", AUDIT_CASES))
                                         for n, m, w in cases] +
                         [pytest.param(m, w, id=f"{cmd}: {n}") for cmd, n, m, w in MORE_CASES])
def test_bad_input_is_one_line_exit_1_and_changes_nothing(capsys, case, make, words):
    args, protected = make(case)
    protected = protected or case["copy"]
    before = snapshot(protected)
    code, out, err = run(capsys, *args)
    lines = err.splitlines()  # not stripped: a stray blank line breaks the contract too
    assert code == 1, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in err + out
    assert snapshot(protected) == before
    assert not [p for p in protected.parent.iterdir() if p.name.startswith(f".{protected.name}.")]


def test_force_never_replaces_a_folder_that_is_not_an_index(capsys, case):
    """Issue 10.3: --force replaces an index, a `train` model folder or an empty folder only."""
    args, folder = _not_index(case)
    code, _, err = run(capsys, "-q", *args, "--projection", "random", "--force")
    assert code == 1 and "not a lite-influence index" in err, err
    assert (folder / "keep.txt").read_text() == "my notes" and not (folder / "manifest.json").exists()


def test_moved_model_is_found_with_the_model_flag(capsys, case):
    _moved_model(case)
    moved = case["tmp"] / "model-new-home"
    shutil.copytree(case["model"], moved)
    code, out, err = run(capsys, "query", case["copy"], "--text", "good film", "--model", moved, "--json")
    assert code == 0, err
    assert len(json.loads(out)["proponents"]) == 10


def test_k_larger_than_the_index_is_clamped_with_a_note(capsys, env):
    code, out, err = run(capsys, "query", env["index"], "--text", "good film", "-k", "50")
    assert code == 0, err
    assert "note" in out and "showing all 12" in out
    code, out, err = run(capsys, "query", env["index"], "--text", "good film", "-k", "50", "--json")
    result = json.loads(out)
    assert result["k"] == 12 and result["k_clamped"] is True
    assert sorted(r["id"] for r in result["proponents"]) == list(range(12))


def test_info_json(capsys, env):
    code, out, err = run(capsys, "info", env["index"], "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["manifest"] == json.loads((env["index"] / "manifest.json").read_text())
    assert set(info["files"]) == {str(f.relative_to(env["index"])) for f in env["index"].rglob("*") if f.is_file()}
    assert all(size == (env["index"] / name).stat().st_size for name, size in info["files"].items())


def test_query_json_shape(capsys, env):
    code, out, err = run(capsys, "query", env["index"], "--text", "[b]good[/b] film", "-k", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"query", "prediction", "agg", "layers", "proponents", "opponents"} <= set(result)
    assert result["query"]["text"] == "[b]good[/b] film" and result["agg"] == "vote"
    assert result["layers"] == ["embeddings", "block0", "block1", "block2", "head"]
    for side in ("proponents", "opponents"):
        assert len(result[side]) == 3
        for row in result[side]:
            assert {"id", "score", "label", "text", "per_layer"} <= set(row)
            assert set(row["per_layer"]) == set(result["layers"])
            assert row["extra"]["noisy"] in ("0", "1")


def test_tables_print_texts_with_brackets_verbatim(capsys, env):
    code, out, err = run(capsys, "query", env["index"], "--text", "[/x] good [bold]film", "-k", "2")
    assert code == 0, err
    assert "[/x] good [bold]film" in out


def test_audit_prints_and_exports(capsys, env, tmp_path):
    export = tmp_path / "ranking.csv"
    code, out, err = run(capsys, "-q", "audit", env["index"], env["queries"], "--export", export, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 12 and result["n_noisy"] == 3 and result["table"]
    lines = export.read_text().splitlines()
    assert lines[0] == "rank,id,score,label,noisy,text" and len(lines) == 13


def test_usage_errors_exit_1_not_2(capsys, env):
    code, out, err = run(capsys, "query", env["index"], "--text", "x", "--bogus-flag")
    assert code == 1 and "No such option" in err and "internal error" not in err
    code, out, err = run(capsys, "query")
    assert code == 1 and "internal error" not in err


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "lite_influence", *map(str, args)]


def test_exit_code_and_one_line_from_a_real_process(env, tmp_path):
    done = subprocess.run(cli("query", tmp_path / "missing", "--text", "x"), capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: index folder '{tmp_path / 'missing'}' does not exist; "
                                                "build one with `lite-influence build`."]


def test_two_queries_of_one_index_at_once(env):
    before = snapshot(env["index"])
    procs = [subprocess.Popen(cli("-q", "query", env["index"], "--text", text, "-k", "3", "--json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for text in ("good film", "awful plot")]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert len(json.loads(out)["proponents"]) == 3
    assert [json.loads(out)["query"]["text"] for out, _ in results] == ["good film", "awful plot"]
    assert snapshot(env["index"]) == before


def test_over_long_text_is_truncated_not_refused(capsys, tmp_path, env):
    long_text = " ".join(WORDS * 20_000)  # about 1 MB, far past --max-length
    train = write(tmp_path / "long.tsv", f"sentence\tlabel\n{long_text}\t1\ngood film\t0\n")
    code, _, err = run(capsys, "-q", "build", env["model"], train, "--out", tmp_path / "idx", "--projection", "random")
    assert code == 0, err
    stored = [json.loads(line) for line in (tmp_path / "idx" / "examples.jsonl").read_text().splitlines()]
    assert stored[0]["text"] == long_text


def test_kill_9_mid_build_keeps_the_old_index_and_resume_matches(env, tmp_path):
    """SIGKILL a real build process once it has saved progress: the index already at --out is
    untouched; `build --resume` then finishes, equal bit for bit to an uninterrupted build."""
    import numpy as np
    import time

    from lite_influence import InfluenceIndex

    rows = [f"{' '.join(WORDS[i % 7:i % 7 + 4 + i % 5])} {i}\t{i % 2}" for i in range(3000)]
    train = write(tmp_path / "big.tsv", "sentence\tlabel\n" + "\n".join(rows) + "\n")
    args = ["-q", "build", env["model"], train, "--batch-size", "1", "--projection", "random"]
    out = tmp_path / "index"
    shutil.copytree(env["index"], out)
    before = snapshot(out)
    proc = subprocess.Popen(cli(*args, "--out", out, "--force"), cwd=REPO, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    progress = tmp_path / ".index.partial" / "progress.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["batches_done"] >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the build ended before it could be killed: {proc.stderr.read()}"
    proc.kill()
    proc.wait()
    assert snapshot(out) == before
    done = json.loads(progress.read_text())["batches_done"]
    assert 20 <= done < 3000
    resumed = subprocess.run(cli(*args, "--out", out, "--force", "--resume"), cwd=REPO, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    reference = subprocess.run(cli(*args, "--out", tmp_path / "reference"), cwd=REPO, capture_output=True,
                               text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert reference.returncode == 0, reference.stderr
    a, b = InfluenceIndex.open(out), InfluenceIndex.open(tmp_path / "reference")
    assert a.layers == b.layers and len(a) == 3000
    for layer in a.layers:
        assert np.array_equal(dense_rows(a, layer), dense_rows(b, layer)), layer


def test_user_files_are_read_with_safe_loaders_only():
    """No pickle: numpy loads refuse objects, torch.load (if ever used) takes weights only."""
    import re

    for path in (REPO / "lite_influence").rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"\bpickle\b|allow_pickle=True|torch\.load\(", source), path
        for call in re.findall(r"np\.load\([^)]*\)", source):
            assert "allow_pickle=False" in call, (path, call)


@pytest.mark.parametrize("args, words", [
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--num-labels", "0"], "--num-labels must be at least 1"),
    (["--num-labels", "1"], "at least 2"),
])
def test_build_options_that_would_change_the_result_are_refused(capsys, bert_dir, train_tsv, tmp_path, args, words):
    from conftest import run_cli

    code, out, err = run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / "idx", *args)
    assert code == 1 and words in err and "\n" not in err.strip()
    assert not (tmp_path / "idx").exists()


def test_query_refuses_blank_text_a_pair_on_a_single_text_index_and_zero_batch(capsys, bert_dir, train_tsv, tmp_path):
    from conftest import run_cli
    from lite_influence import build_index

    index = build_index(bert_dir, train_tsv, tmp_path / "idx", projection="random", proj_dim=2)
    for args, words in ((["--text", "   "], "blank"), (["--text", "good", "--pair", "bad"], "single texts"),
                        (["--text", "good", "--batch-size", "0"], "--batch-size must be at least 1")):
        code, out, err = run_cli(capsys, "query", index.path, *args)
        assert code == 1 and words in err, (args, err)


def test_demo_out_file_is_one_line(capsys, tmp_path):
    from conftest import run_cli

    target = tmp_path / "a.txt"
    target.write_text("keep")
    code, out, err = run_cli(capsys, "demo", "--out", target)
    assert code == 1 and "is a file" in err and target.read_text() == "keep"
