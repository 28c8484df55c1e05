"""Issue 10, "Nothing lost, ever": kills at every step of a commit and of the folder swap,
what --out and --force may replace, interrupted builds that failed commands must keep, one
build per --out, and a damaged index or a full disk as one line.

The kill matrix runs the store alone (no torch) in a child process that ``os._exit``s at the
N-th ``crash_point``; the parent then checks what a user would see (``--out`` opens, as the
old or the new index) and resumes, which must give exactly the uninterrupted index."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import dense_rows
from lite_influence.api import InfluenceIndex, build_index
from lite_influence.errors import UserError
from lite_influence.store import IndexStore, IndexWriter, atomic
from lite_influence.store.lock import BuildLock

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"a": 3, "b": 5, "c": 2}
N, BATCHES = 7, 3

# The child: write a whole build through the writer, as build_index does, and commit it. With
# a kill point, os._exit at that step; with "names", print the steps. No torch involved.
CHILD = r"""
import json, os, sys
import numpy as np
from lite_influence.store import IndexWriter, atomic

out, mode, seed, exchange = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
layers, manifest = json.loads(sys.argv[5]), json.loads(sys.argv[6])
atomic._exchange_supported = exchange
rng = np.random.default_rng(seed)
writer = IndexWriter(out, force=True)
identity = {"config": {"seed": seed}, "n": 7}
writer.resume_point(identity)
for name, dim in layers.items():
    matrix = writer.vector_file(name, 7, dim)
    matrix[:] = rng.standard_normal((7, dim)).astype(np.float32)
    matrix.flush()
writer.save_progress({**identity, "batches_done": 3})
writer.write_examples([{"id": i, "text": f"example {i} of {seed}", "label": i % 2} for i in range(7)])
writer.write_projection({"unit.in": rng.standard_normal((4, 2)).astype(np.float32)})
names = []
def hook(name):
    names.append(name)
    if mode not in ("names", "none") and len(names) == int(mode):
        os._exit(137)
atomic._crash_hook = hook
writer.commit(manifest)
if mode == "names":
    print(json.dumps(names))
"""


def manifest(seed: int) -> dict:
    return {"format_version": 1, "n": N, "metric": "dot", "index_factory": "Flat", "label_names": ["neg", "pos"],
            "model": {"path": "/m", "fingerprint": "f"}, "data": {"path": "/d"},
            "build": {"seed": seed, "projection": "pca", "proj_dim": 2},
            "layers": [{"name": n, "dim": d, "units": [{"name": n}]} for n, d in LAYERS.items()],
            "groups": {"all": list(LAYERS)}}


def child(out: Path, mode: str, seed: int, exchange: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CHILD, str(out), mode, str(seed), "1" if exchange else "0",
                           json.dumps(LAYERS), json.dumps(manifest(seed))],
                          capture_output=True, text=True, env=env, timeout=120)


def contents(path: Path) -> dict:
    store = IndexStore.open(path)
    return {"seed": store.manifest["build"]["seed"], "examples": store.examples,
            "projection": {k: v.tolist() for k, v in store.projection_arrays().items()},
            **{layer: store.vectors(layer).tolist() for layer in store.layers}}


def resume(out: Path, seed: int) -> None:
    """What `build --resume` does with the store once the gradient pass is complete."""
    writer = IndexWriter(out, force=True, resume=True)
    done = writer.resume_point({"config": {"seed": seed}, "n": N})
    if done == 0:  # killed after the partial folder was renamed away: nothing to resume
        writer.close()
        assert child(out, "none", seed, True).returncode == 0  # the build runs again from 0
        return "ran again"
    assert done == BATCHES
    for name, dim in LAYERS.items():
        writer.vector_file(name, N, dim)  # reopened, never recreated
    writer.commit(manifest(seed))
    return "resumed"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    result = {}
    for seed in (0, 1):
        assert child(folder / f"ref{seed}", "none", seed, True).returncode == 0
        result[seed] = contents(folder / f"ref{seed}")
    for exchange in (True, False):  # over an existing index: every step of commit and swap
        names = child(folder / "ref1", "names", 1, exchange)
        assert names.returncode == 0, names.stderr
        result[f"steps {exchange}"] = json.loads(names.stdout)
    return result


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "move-aside"])
def test_kill_at_every_step_of_commit_and_swap(tmp_path, references, exchange, monkeypatch):
    """Old index (seed 0) at --out, new build (seed 1) killed at step N of its commit: --out
    opens at once as the old or the new index, and --resume ends with the new one exactly."""
    monkeypatch.setattr(atomic, "_exchange_supported", exchange)
    steps = references[f"steps {exchange}"]
    assert len(steps) >= 10 and any("exchanged" in s or "renamed into place" in s for s in steps)
    matrix = []
    for number in range(1, len(steps) + 2):
        out = tmp_path / f"kill{number}" / "index"
        assert child(out, "none", 0, exchange).returncode == 0
        killed = child(out, str(number), 1, exchange)
        finished = killed.returncode == 0
        assert killed.returncode == (0 if number > len(steps) else 137), killed.stderr
        seen = contents(out)  # opens at once: restores a folder moved aside mid-swap
        assert seen in (references[0], references[1]), number
        after = "new" if seen == references[1] else "old"
        how = "not needed" if finished else resume(out, 1)
        assert contents(out) == references[1], number
        assert [p.name for p in out.parent.iterdir()] == ["index"], number
        matrix.append((steps[number - 1] if number <= len(steps) else "(no kill)", after, how))
    print(f"\nkill matrix ({'exchange' if exchange else 'move aside'}): step -> --out after the kill, --resume")
    for step, after, how in matrix:
        print(f"  {step:40s} -> {after} index at --out; --resume {how}: identical to uninterrupted")


def test_vectors_missing_after_a_kill_is_refused_not_zero(tmp_path, references):
    """Today's bug: progress.json saying 'all batches done' with the vectors gone made the next
    --resume write an all-zero index with exit 0. Now the missing matrix is refused."""
    out = tmp_path / "index"
    assert child(out, "1", 1, True).returncode == 137  # killed at the first step of commit
    for file in (tmp_path / ".index.partial" / "vectors").iterdir():
        file.unlink()
    writer = IndexWriter(out, force=True, resume=True)
    assert writer.resume_point({"config": {"seed": 1}, "n": N}) == BATCHES
    with pytest.raises(UserError, match="missing or damaged.*--force"):
        writer.vector_file("a", N, LAYERS["a"])
    writer.close()
    assert not out.exists()


# ---------------------------------------------------------------- end to end, with a model


def build_cli(args: list, kill_at: str = "") -> subprocess.CompletedProcess:
    """`lite-influence build ARGS` in a child process, killed at the first crash point named ``kill_at``."""
    code = ("import os, sys\nfrom lite_influence.store import atomic\n"
            "def hook(name):\n    if name == sys.argv[1]:\n        os._exit(137)\n"
            "atomic._crash_hook = hook\nfrom lite_influence.cli import main\nmain(sys.argv[2:])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, kill_at, "-q", "build", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_killed_build_resumes_to_the_uninterrupted_index(bert_dir, train_tsv, tmp_path):
    """Through the CLI: a build killed as its commit starts (all batches saved), and one killed
    right after the swap, before the partial folder is removed, both resume with exit 0 to
    vectors equal bit for bit to an uninterrupted build's (today: all zero after such a kill)."""
    options = ["--projection", "pca", "--batch-size", "4", "--fit-examples", "6", "--seed", "3"]
    reference = build_index(bert_dir, train_tsv, tmp_path / "reference", projection="pca", batch_size=4,
                            fit_examples=6, seed=3)
    for step in ("block0.faiss written, not renamed", "renamed into place"):
        out = tmp_path / step.split()[0] / "index"
        killed = build_cli([bert_dir, train_tsv, "--out", out, *options], kill_at=step)
        assert killed.returncode == 137, killed.stderr
        resumed = build_cli([bert_dir, train_tsv, "--out", out, "--force", "--resume", *options])
        assert resumed.returncode == 0, resumed.stderr
        index = InfluenceIndex.open(out)
        for layer in reference.layers:
            assert np.array_equal(dense_rows(index, layer), dense_rows(reference, layer)), (step, layer)
            assert np.abs(dense_rows(index, layer)).sum() > 0
        assert index.examples == reference.examples


# ---------------------------------------------------------------- what --out and --force replace


def test_symlink_out_keeps_working_across_builds(bert_dir, train_tsv, tmp_path):
    real = tmp_path / "versions" / "v1"
    real.mkdir(parents=True)
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    first = build_index(bert_dir, train_tsv, link, projection="random", seed=0)
    assert first.path == link and IndexStore.open(link).manifest["build"]["seed"] == 0
    build_index(bert_dir, train_tsv, link, projection="random", seed=1, force=True)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert IndexStore.open(link).manifest["build"]["seed"] == 1 and IndexStore.open(real).manifest["build"]["seed"] == 1


@pytest.mark.parametrize("where", ["model folder", "data folder", "above the data"])
def test_out_that_is_or_contains_what_the_build_reads_is_refused(bert_dir, train_tsv, tmp_path, where):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(bert_dir, model)
    out = {"model folder": model, "data folder": train_tsv.parent, "above the data": tmp_path.parent}[where]
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match="is or contains"):
        build_index(model, train_tsv, out, projection="random", force=True)
    assert sorted(p.name for p in out.iterdir()) == before and train_tsv.is_file()


def test_force_replaces_a_train_model_folder_and_an_empty_folder(bert_dir, train_tsv, tmp_path):
    trained = tmp_path / "old-model"
    trained.mkdir()
    (trained / "config.json").write_text("{}")
    (trained / "training.json").write_text("{}")
    with pytest.raises(UserError, match="model folder written by `train`.*--force"):
        build_index(bert_dir, train_tsv, trained, projection="random")
    build_index(bert_dir, train_tsv, trained, projection="random", force=True)
    assert not (trained / "training.json").exists() and IndexStore.open(trained).n == 12
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_index(bert_dir, train_tsv, empty, projection="random").path == empty


# ---------------------------------------------------------------- interrupted builds are kept


def interrupted(bert_dir, train_tsv, out, **options):
    def stop(stage, done, total):
        if stage == "gradients" and done >= 4:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        build_index(bert_dir, train_tsv, out, progress=stop, **options)
    partial = out.parent / f".{out.name}.partial"
    return partial, {str(f.relative_to(partial)): f.read_bytes() for f in partial.rglob("*") if f.is_file()}


def test_failed_or_mistyped_commands_keep_the_interrupted_build(bert_dir, train_tsv, tmp_path):
    out = tmp_path / "index"
    options = dict(projection="random", batch_size=2)
    partial, saved = interrupted(bert_dir, train_tsv, out, **options)
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood film\tneutral\n")
    with pytest.raises(UserError, match="neutral"):
        build_index(bert_dir, bad, out, resume=True, **options)
    with pytest.raises(UserError, match=r"batch_size 2 then, 4 now.*same options.*--resume.*--force"):
        build_index(bert_dir, train_tsv, out, resume=True, projection="random", batch_size=4)
    with pytest.raises(UserError, match="interrupted build.*--resume.*--force"):
        build_index(bert_dir, train_tsv, out, **options)
    now = {str(f.relative_to(partial)): f.read_bytes() for f in partial.rglob("*") if f.is_file()}
    assert now == saved and not out.exists()
    resumed = build_index(bert_dir, train_tsv, out, resume=True, **options)
    reference = build_index(bert_dir, train_tsv, tmp_path / "reference", **options)
    for layer in reference.layers:
        assert np.array_equal(dense_rows(resumed, layer), dense_rows(reference, layer))
    assert not partial.exists()


def test_a_second_build_stops_at_once_while_queries_keep_working(bert_dir, train_tsv, tmp_path):
    out = tmp_path / "index"
    build_index(bert_dir, train_tsv, out, projection="random")
    other = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                              "from lite_influence.store.lock import BuildLock\n"
                              "BuildLock(Path(sys.argv[1])).hold(); print('held', flush=True); time.sleep(60)", str(out)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"another build \\(pid {other.pid}\\) is writing {out}"):
            build_index(bert_dir, train_tsv, out, projection="random", seed=4, force=True)
        index = InfluenceIndex.open(out)
        assert index.manifest["build"]["seed"] == 0 and index.store.search("block1", index.vectors("block1")[:1], 3)[1][0, 0] >= 0
    finally:
        other.kill()
        other.wait()
    build_index(bert_dir, train_tsv, out, projection="random", seed=4, force=True)  # the kernel dropped the lock
    assert IndexStore.open(out).manifest["build"]["seed"] == 4


def test_full_disk_is_one_line_and_the_build_resumes(bert_dir, train_tsv, tmp_path, monkeypatch):
    out = tmp_path / "index"
    options = dict(projection="random", batch_size=2)

    def full(name):  # the disk fills up as the examples table is written, after the gradients
        if name == "examples.jsonl written, not renamed":
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic, "_crash_hook", full)
    with pytest.raises(UserError, match="no space left.*free some space.*--resume"):
        build_index(bert_dir, train_tsv, out, progress=lambda *a: None, **options)
    monkeypatch.setattr(atomic, "_crash_hook", None)
    assert (tmp_path / ".index.partial" / "progress.json").is_file()
    resumed = build_index(bert_dir, train_tsv, out, resume=True, **options)
    reference = build_index(bert_dir, train_tsv, tmp_path / "reference", **options)
    assert np.array_equal(resumed.vectors("block0"), reference.vectors("block0"))


# ---------------------------------------------------------------- a damaged index: one line


def _edit(key, value):
    def change(m):
        m[key] = value
    return change


MANIFEST_DAMAGE = {
    "format version a string": _edit("format_version", "1"),
    "format version zero": _edit("format_version", 0),
    "n a string": _edit("n", "12"),
    "label names not a list": _edit("label_names", "negative"),
    "model not an object": _edit("model", "bert"),
    "layers not a list": _edit("layers", {"block0": 1}),
    "duplicated layer": lambda m: m["layers"].append(dict(m["layers"][0])),
    "layer dim a float": lambda m: m["layers"][0].update(dim=4.5),
    "group names unknown layer": lambda m: m["groups"].update(middle=["block9"]),
    "not an object": lambda m: m.clear() or m.update(x=[1]),
}


@pytest.fixture(scope="module")
def small_index(bert_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    data = folder / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"good film {i}\t{i % 2}\n" for i in range(6)))
    return build_index(bert_dir, data, folder / "index", projection="pca", fit_examples=4).path


def damaged_copy(small_index, tmp_path):
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(small_index, copy)
    return copy


@pytest.mark.parametrize("damage", MANIFEST_DAMAGE)
def test_manifest_is_checked_once_at_open(small_index, tmp_path, capsys, damage):
    from conftest import run_cli

    copy = damaged_copy(small_index, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    MANIFEST_DAMAGE[damage](manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "info", copy)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "manifest.json" in err and "rebuild the index" in err


@pytest.mark.parametrize("damage", ["truncated", "malformed line", "too few rows"])
def test_damaged_examples_table_is_one_line(small_index, tmp_path, damage):
    copy = damaged_copy(small_index, tmp_path)
    file = copy / "examples.jsonl"
    text = file.read_text()
    file.write_text({"truncated": text[:-7], "malformed line": text.replace("{", "[", 1),
                     "too few rows": "".join(text.splitlines(True)[:-1])}[damage])
    with pytest.raises(UserError, match=r"examples\.jsonl.*rebuild the index"):
        IndexStore.open(copy).examples


@pytest.mark.parametrize("damage", ["truncated", "not npz"])
def test_damaged_projection_is_one_line(small_index, tmp_path, damage):
    copy = damaged_copy(small_index, tmp_path)
    file = copy / "projection.npz"
    assert zipfile.is_zipfile(file)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2] if damage == "truncated" else b"hello")
    with pytest.raises(UserError, match=r"projection\.npz.*rebuild the index"):
        IndexStore.open(copy).projection_arrays()


def test_store_imports_no_torch():
    code = "import lite_influence.store, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_lock_file_is_removed_on_release_and_a_stale_one_is_taken(tmp_path):
    out = tmp_path / "index"
    lock = BuildLock(out).hold()
    assert (tmp_path / ".index.lock").read_text() == str(os.getpid())
    with pytest.raises(UserError, match="another build"):
        BuildLock(out).hold()
    lock.release()
    assert not (tmp_path / ".index.lock").exists()
    (tmp_path / ".index.lock").write_text("99999")  # left by a killed build: not locked
    BuildLock(out).hold().release()
