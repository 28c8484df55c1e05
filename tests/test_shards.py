"""Sharded builds: fit once, build shards with --projection-from, merge; the merged index must
be the single build, file for file (the projection is shared, so bit for bit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

OPTIONS = dict(projection="pca", proj_dim=2, batch_size=3, layers="all", fit_examples=8)


def same_files(a, b):
    """Every file of two indexes equal byte for byte (the manifest apart: paths and seconds)."""
    files = sorted(str(f.relative_to(a)) for f in a.rglob("*") if f.is_file())
    assert files == sorted(str(f.relative_to(b)) for f in b.rglob("*") if f.is_file())
    different = [f for f in files if f != "manifest.json" and (a / f).read_bytes() != (b / f).read_bytes()]
    assert not different, different
    return files


def comparable(manifest):
    drop = ("build_seconds", "merged_from", "history")
    return {**{k: v for k, v in manifest.items() if k not in drop},
            "build": {k: v for k, v in manifest["build"].items() if k not in ("projection_from", "shard")}}


def test_fit_shards_and_merge_give_the_single_build(bert_dir, train_tsv, tmp_path):
    from lite_influence import build_index
    from lite_influence.fitting import fit_projection
    from lite_influence.shards import merge_shards

    single = build_index(bert_dir, train_tsv, tmp_path / "single", **OPTIONS)
    proj = fit_projection(bert_dir, train_tsv, tmp_path / "proj", **OPTIONS)
    shards = [build_index(bert_dir, train_tsv, tmp_path / f"shard{i}", shard=f"{i}/3", projection_from=str(proj),
                          **OPTIONS) for i in (2, 0, 1)]
    assert sorted(s.manifest["shard"]["index"] for s in shards) == [0, 1, 2]
    assert sum(len(s) for s in shards) == len(single) == 12
    merged = merge_shards([s.path for s in shards], tmp_path / "merged")
    files = same_files(single.path, merged)
    assert "layers/embeddings.tokens/values.npy" in files and "losses.npy" in files
    assert any(f.endswith(".norms.npy") for f in files)
    manifest = json.loads((merged / "manifest.json").read_text())
    assert comparable(manifest) == comparable(single.manifest)
    # the independent check: each shard's rows are the single build's rows at its row numbers
    for shard in shards:
        rows = np.load(shard.path / "shard_rows.npy")
        for layer in single.layers:
            if single.store.layer(layer).kind == "dense":
                assert np.array_equal(shard.vectors(layer), single.vectors(layer, rows))
        assert np.array_equal(shard.store.losses(), single.store.losses()[rows])
        assert [r["text"] for r in shard.examples] == [single.examples[i]["text"] for i in rows]


def test_merge_refuses_shards_that_do_not_make_one_build(bert_dir, train_tsv, tmp_path, capsys):
    from lite_influence import build_index

    proj = tmp_path / "proj"
    assert run_cli(capsys, "fit", bert_dir, train_tsv, "--out", proj, "--projection", "pca", "--proj-dim", "2")[0] == 0
    common = ("--projection", "pca", "--proj-dim", "2", "--projection-from", proj)
    for i in (0, 1):
        assert run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / f"s{i}", "--shard", f"{i}/2",
                       "--batch-size", "4", *common)[0] == 0
    code, _, error = run_cli(capsys, "merge", tmp_path / "s0", "--out", tmp_path / "m")
    assert code == 1 and "shards 1 of 2 are missing" in error
    code, _, error = run_cli(capsys, "merge", tmp_path / "s0", tmp_path / "s0", "--out", tmp_path / "m")
    assert code == 1 and "given twice" in error
    build_index(bert_dir, train_tsv, tmp_path / "other", shard="1/2", batch_size=4, projection="pca", proj_dim=2,
                projection_from=str(proj), seed=0, max_length=32)
    code, _, error = run_cli(capsys, "merge", tmp_path / "s0", tmp_path / "other", "--out", tmp_path / "m")
    assert code == 1 and "the build options" in error
    assert not (tmp_path / "m").exists()
    code, _, error = run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / "x", "--projection", "pca", "--proj-dim", "4",
                             "--projection-from", proj)
    assert code == 1 and "--proj-dim 2" in error and not (tmp_path / "x").exists()
    assert run_cli(capsys, "merge", tmp_path / "s1", tmp_path / "s0", "--out", tmp_path / "m")[0] == 0
    shard_info = " ".join(run_cli(capsys, "info", tmp_path / "s1")[1].split())
    assert "shard 1 of 2" in shard_info and "lite-influence merge" in shard_info
    assert "merged from 2 shards" in " ".join(run_cli(capsys, "info", tmp_path / "m")[1].split())


def test_a_shard_with_no_batch_is_refused(bert_dir, train_tsv, tmp_path, capsys):
    code, _, error = run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / "s", "--shard", "4/5",
                             "--batch-size", "4", "--projection", "random")
    assert code == 1 and "only 3 batches" in error
    code, _, error = run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / "s", "--shard", "2/2")
    assert code == 1 and "--shard must be i/n" in error


def test_an_interrupted_shard_resumes_alone(bert_dir, train_tsv, tmp_path):
    """A shard stopped mid-pass continues with --resume (its own partial folder), and ends as
    the shard an uninterrupted run gives; the other shard is not touched."""
    from lite_influence import build_index

    options = dict(projection="random", proj_dim=2, batch_size=2, shard="1/2")
    other = build_index(bert_dir, train_tsv, tmp_path / "s0", **{**options, "shard": "0/2"})
    before = (other.path / "manifest.json").stat().st_mtime_ns
    whole = build_index(bert_dir, train_tsv, tmp_path / "whole", **options)

    def stop(stage, done, total):
        if stage == "gradients" and done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(bert_dir, train_tsv, tmp_path / "s1", progress=stop, **options)
    assert (tmp_path / ".s1.partial").is_dir() and not (tmp_path / "s1").exists()
    passes = []
    build_index(bert_dir, train_tsv, tmp_path / "s1", resume=True, **options,
                progress=lambda stage, done, total: passes.append(done) if stage == "gradients" else None)
    assert passes and min(passes) > 2  # it went on from where it stopped
    same_files(whole.path, tmp_path / "s1")
    assert (other.path / "manifest.json").stat().st_mtime_ns == before


def test_a_shared_projection_must_have_been_fitted_with_the_same_energy(bert_dir, train_tsv, tmp_path, capsys):
    """--energy sizes mixed's output sides, so shards must share it: a fit with another share is
    refused in one line naming it, and a fit written before the option existed counts as
    --energy 0 (what it was: fixed widths)."""
    proj = tmp_path / "proj"
    options = ("--projection", "mixed", "--proj-dim", "2", "--proj-dim-in", "3")
    assert run_cli(capsys, "fit", bert_dir, train_tsv, "--out", proj, *options, "--energy", "0.5")[0] == 0
    code, _, error = run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / "x", *options,
                             "--projection-from", proj)
    assert code == 1 and "--energy 0.5" in error and not (tmp_path / "x").exists()
    assert run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / "ok", *options, "--energy", "0.5",
                   "--projection-from", proj)[0] == 0
    old = tmp_path / "old"
    assert run_cli(capsys, "fit", bert_dir, train_tsv, "--out", old, *options, "--energy", "0")[0] == 0
    record = json.loads((old / "projection.json").read_text())
    del record["config"]["energy"], record["config"]["proj_dim_max"]
    (old / "projection.json").write_text(json.dumps(record))
    assert run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / "y", *options, "--energy", "0",
                   "--projection-from", old)[0] == 0
    code, _, error = run_cli(capsys, "build", bert_dir, train_tsv, "--out", tmp_path / "z", *options,
                             "--projection-from", old)
    assert code == 1 and "--energy 0.0" in error


def test_a_streamed_flat_file_is_faiss_s_own_file_for_the_same_rows(tmp_path):
    """A merge writes a Flat layer block by block (``write_flat_rows``): the file must be the
    bytes FAISS's own ``write_index`` gives for the same rows, and FAISS must read it back."""
    import faiss

    from lite_influence.store.faiss_layers import flat_header, read_faiss, write_flat_rows

    rows = np.random.default_rng(0).standard_normal((37, 5)).astype(np.float32)
    index = faiss.IndexFlatIP(5)
    index.add(rows)
    faiss.write_index(index, str(tmp_path / "faiss.faiss"))
    write_flat_rows(tmp_path / "streamed.faiss", flat_header(5, 37), [rows[:10], rows[10:11], rows[11:]])
    assert (tmp_path / "streamed.faiss").read_bytes() == (tmp_path / "faiss.faiss").read_bytes()
    back = read_faiss(tmp_path / "streamed.faiss", 5, 37)
    assert np.array_equal(back.reconstruct_n(0, 37), rows)


def test_a_merge_streamed_in_blocks_of_a_few_rows_is_still_the_single_build(bert_dir, train_tsv, tmp_path, monkeypatch):
    """Blocks far smaller than a layer (rows of every shard in each, in row order) give the
    same files as one block and as the single build."""
    from lite_influence import build_index
    from lite_influence.fitting import fit_projection
    from lite_influence.shards import merge_shards
    from lite_influence.store import combine

    monkeypatch.setattr(combine, "BLOCK_BYTES", 20)  # a row or two per block
    single = build_index(bert_dir, train_tsv, tmp_path / "single", **OPTIONS)
    proj = fit_projection(bert_dir, train_tsv, tmp_path / "proj", **OPTIONS)
    shards = [build_index(bert_dir, train_tsv, tmp_path / f"shard{i}", shard=f"{i}/2", projection_from=str(proj),
                          **OPTIONS) for i in (0, 1)]
    merged = merge_shards([s.path for s in shards], tmp_path / "merged")
    assert any(f.endswith(".faiss") for f in same_files(single.path, merged))


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (kills the merge at its N-th rename or unlink)")
@pytest.mark.parametrize("calls", ["rename,renameat,renameat2", "unlink,unlinkat,rmdir"])
def test_a_merge_killed_at_every_rename_and_unlink_leaves_the_old_or_the_new_index(bert_dir, train_tsv, tmp_path, calls):
    """``merge --force`` over an existing index, killed (SIGKILL, from strace) at each of its
    renames or unlinks in turn: ``--out`` is always a whole index equal to the single build (the
    old one and the new one are), and a merge run again after each kill gives that index."""
    from lite_influence import build_index
    from lite_influence.fitting import fit_projection
    from lite_influence.shards import merge_shards

    single = build_index(bert_dir, train_tsv, tmp_path / "single", **OPTIONS)
    proj = fit_projection(bert_dir, train_tsv, tmp_path / "proj", **OPTIONS)
    shards = [build_index(bert_dir, train_tsv, tmp_path / f"shard{i}", shard=f"{i}/2", projection_from=str(proj),
                          **OPTIONS).path for i in (0, 1)]
    out = tmp_path / "merged"
    merge_shards(shards, out)
    command = [sys.executable, "-m", "lite_influence", "merge", *map(str, shards), "--out", str(out), "--force"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for n in range(1, 200):
        killed = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={calls}",
                                 "-e", f"inject={calls}:signal=SIGKILL:when={n}", *command],
                                capture_output=True, text=True, env=env, timeout=300)
        same_files(single.path, out)  # after every kill: a whole index, the old or the new
        if killed.returncode == 0:  # past the last such call: the merge ran to its end
            break
        assert killed.returncode in (-9, 137), (n, killed.returncode, killed.stderr[-500:])
        again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0, (n, again.stderr[-500:])
        same_files(single.path, out)
    assert n > 1, "the merge made no such call: the kill matrix tested nothing"
