"""A build under torchrun (2 processes, gloo on CPU) leaves one index, the single build's; a
failed rank fails the build with one line and writes nothing; --resume redoes only the
shard that did not finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from test_shards import same_files

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ("--projection", "pca", "--proj-dim", "2", "--batch-size", "3", "--fit-examples", "8", "--layers", "all")


def torchrun(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lite_influence", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                               start_new_session=True)  # its own process group: a hang kills the workers too
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_torchrun_leaves_the_single_build(bert_dir, train_tsv, tmp_path):
    from lite_influence import build_index

    done = torchrun("build", bert_dir, train_tsv, "--out", tmp_path / "idx", *OPTIONS, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "idx.shards").exists()  # the shards are merged and gone
    assert done.stderr.count("indexed 12 examples") == 1  # rank 0 says it, once
    options = dict(projection="pca", proj_dim=2, batch_size=3, fit_examples=8, layers="all")
    # the projection the ranks fitted together, used by one process: the same index, bit for bit
    shared = build_index(bert_dir, train_tsv, tmp_path / "shared", projection_from=str(tmp_path / "idx"), **options)
    same_files(shared.path, tmp_path / "idx")
    alone = build_index(bert_dir, train_tsv, tmp_path / "alone", **options)  # fitted alone: sums in another order
    for layer in alone.layers:
        if alone.store.layer(layer).kind == "dense":
            assert abs(alone.vectors(layer) - shared.vectors(layer)).max() < 1e-4


def test_a_failed_rank_fails_the_build_and_resume_finishes_it(bert_dir, train_tsv, tmp_path):
    blocker = tmp_path / "idx.shards" / "shard-1-of-2"
    blocker.mkdir(parents=True)
    (blocker / "notes.txt").write_text("not an index")
    failed = torchrun("build", bert_dir, train_tsv, "--out", tmp_path / "idx", *OPTIONS, cwd=tmp_path)
    assert failed.returncode != 0
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert lines and all("rank 1 of 2 failed" in line and "not a lite-influence index" in line for line in lines)
    assert not (tmp_path / "idx").exists()
    assert (tmp_path / "idx.shards" / "shard-0-of-2" / "manifest.json").is_file()  # rank 0's shard is kept
    (blocker / "notes.txt").unlink()
    resumed = torchrun("build", bert_dir, train_tsv, "--out", tmp_path / "idx", *OPTIONS, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "projected gradients" not in resumed.stderr and "fit" not in resumed.stderr.lower().split("indexed")[0]
    done = torchrun("build", bert_dir, train_tsv, "--out", tmp_path / "again", *OPTIONS, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    same_files(tmp_path / "idx", tmp_path / "again")
