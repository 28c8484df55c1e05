"""Writing an index: into ``.NAME.partial`` beside ``--out``, resumable, swapped in at the end.

The partial folder holds what a resumed build needs and nothing else::

    .NAME.partial/
      progress.json        build identity (options, model, data) and batches done
      vectors/LAYER.npy    one float32 (n x dim) matrix per layer, memory-mapped, preallocated
      vectors/LAYER.{indptr,tokens,values}.npy   the embeddings' token rows (``token_file``)
      examples.jsonl       the examples table
      projection.npz       the fitted eigenbases (pca)
      checkpoints/NAME/    an earlier checkpoint's whole index (TracIn-CP, ``tracin.py``)
      index/               staged by ``commit``: the finished index, swapped into --out

Why this shape: ``commit`` never deletes or moves a source of the build before the new index
is in place. It stages ``index/`` from the sources (FAISS files written, the rest, token rows
included, hard-linked),
swaps it with ``--out`` (``atomic.swap_folder``), and only then removes the partial folder,
by renaming it away first. A kill at any step leaves either the old index at ``--out`` and a
complete partial (``--resume`` redoes the commit: the same index as an uninterrupted build),
or the new index at ``--out``.

Nothing here touches an existing partial folder until the build really starts over it
(``resume_point``), and a failed build removes only a partial folder it created itself.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import UserError
from .atomic import remove, restore_swap, swap_folder, write_file, write_json
from .faiss_layers import make_faiss_index, row_norms, write_faiss
from .guard import check_out, target
from .lock import BuildLock
from .manifest import MANIFEST, problem
from .reader import EXAMPLE_OFFSETS, SHARD_ROWS, read_projection
from .token_rows import by_token
from .views import BY_TOKEN, EXACT_NORMS, TOKEN_FILES, tokens_folder

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


LOSSES = "losses.npy"  # per-example training loss, beside examples.jsonl


class IndexWriter:
    """Writes a new index beside ``out`` and swaps it into place on ``commit``.

    ``protect``: paths the build reads (model, data); an ``out`` equal to or containing one is
    refused. ``force``: replace an index (or a `train` model folder) at ``out`` and discard an
    interrupted build; ``resume``: continue the interrupted build if its identity matches.
    """

    def __init__(self, out: str | Path, force: bool = False, resume: bool = False, protect=()):
        self.given, self.out = Path(out), target(out)
        self.force, self.resume, self.protect = force, resume, list(protect)
        self.partial = self.out.parent / f".{self.out.name}.partial"
        check_out(self.out, force, self.protect)  # before anything is written
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write beside --out '{out}': {exc.strerror}") from exc
        self._lock = BuildLock(self.out).hold()
        self._created = self._keep = False
        self._done = None
        try:
            restore_swap(self.out)
            check_out(self.out, force, self.protect)
            if self.partial.exists() and not (resume or force):
                raise UserError(f"an interrupted build of '{out}' is kept in {self.partial}; continue it "
                                "with the same command and --resume, or discard it with --force.")
        except BaseException:
            self._lock.release()
            raise

    # -- starting or resuming -----------------------------------------------------------

    def progress(self) -> dict | None:
        file = self.partial / "progress.json"
        try:
            return json.loads(file.read_text()) if file.is_file() else None
        except ValueError:
            return None  # written atomically: unreadable only if edited by hand; start over

    def resume_point(self, identity: dict) -> int:
        """Batches already done: those of the interrupted build when resuming one with the
        same identity, else 0, after clearing the partial folder (the build starts over it).
        A mismatch is refused and the interrupted build kept."""
        state = self.progress() if self.resume else None
        if state is None:
            self._start_over()
            return 0
        differs = _differences(state, json.loads(json.dumps(identity)))
        if differs:
            raise UserError(f"the interrupted build in {self.partial} used other settings, model or data "
                            f"({differs}); resume it with the same options as the first run and --resume, "
                            "or discard it with --force (without --resume).")
        self._done = int(state["batches_done"])
        return self._done

    def _start_over(self) -> None:
        with self._disk():
            remove(self.partial)
            (self.partial / "vectors").mkdir(parents=True)
        self._created, self._done = True, 0

    def _started(self) -> None:
        if self._done is None:  # a caller that writes without asking where to resume
            self._start_over()

    # -- the build's files ----------------------------------------------------------------

    def save_progress(self, state: dict) -> None:
        with self._disk():
            write_json(self.partial / "progress.json", state)

    def loss_file(self, n: int) -> np.memmap:
        """Each example's training loss at build time (n float32), the audit's loss baseline;
        filled batch by batch with the vectors and reopened on resume like them."""
        self._started()
        file = self.partial / LOSSES
        if file.is_file():
            try:
                losses = np.load(file, mmap_mode="r+", allow_pickle=False)
                if losses.shape == (n,):
                    return losses
            except (ValueError, OSError):
                pass
        with self._disk():
            return np.lib.format.open_memmap(file, mode="w+", dtype=np.float32, shape=(n,))

    def exact_norms_file(self, layer: str, n: int) -> np.memmap:
        """Each example's exact gradient norm in the layer (n float32, ``NAME.exact_norms.npy``):
        what cosine divides by and self-influence is, which no sketch keeps."""
        self._started()
        return self._build_array(self.partial / "vectors" / f"{layer}.{EXACT_NORMS}", np.float32, (n,),
                                 f"the exact gradient norms of layer {layer}")

    def vector_file(self, layer: str, n: int, dim: int) -> np.memmap:
        """The layer's (n x dim) float32 matrix on disk, created (with its space reserved, so a
        full disk shows now rather than as a crash mid-build) or reopened for resuming."""
        self._started()
        return self._build_array(self.partial / "vectors" / f"{layer}.npy", np.float32, (n, dim),
                                 f"the vectors of layer {layer}", reserve=True)

    def token_file(self, layer: str, counts: np.ndarray, dim: int) -> "TokenRowsFile":
        """The embeddings' token rows (``token_rows``) on disk: example i owns ``counts[i]``
        entries (its distinct tokens, known before the pass), so the files are preallocated
        and filled batch by batch like a vector matrix, and reopened on resume."""
        self._started()
        indptr = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        nnz = int(indptr[-1])
        files = {"indptr": (np.int64, (len(indptr),)), "tokens": (np.int64, (nnz,)), "values": (np.float32, (nnz, dim))}
        arrays = {name: self._build_array(self.partial / "vectors" / f"{layer}.{name}.npy", dtype, shape,
                                          f"the token rows of layer {layer}")
                  for name, (dtype, shape) in files.items()}
        if not np.array_equal(arrays["indptr"], indptr):
            arrays["indptr"][:] = indptr
        return TokenRowsFile(arrays["indptr"], arrays["tokens"], arrays["values"])

    def _build_array(self, file: Path, dtype, shape: tuple, what: str, reserve: bool = False) -> np.memmap:
        """A memory-mapped array the gradient pass fills: reopened when resuming (it must then
        be there, whole), else created; ``reserve``: its disk space taken now."""
        if file.is_file():
            try:
                array = np.load(file, mmap_mode="r+", allow_pickle=False)
                if array.shape == shape and array.dtype == dtype:
                    return array
            except (ValueError, OSError):
                pass
        if self._done:
            raise UserError(f"{what} of the interrupted build in {self.partial} are "
                            "missing or damaged; discard it with --force (without --resume).")
        with self._disk():
            array = np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=shape)
            if reserve:
                with open(file, "rb+") as handle:
                    os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        return array

    def write_examples(self, rows: list[dict]) -> None:
        """The examples table, and the byte offset of each row (``EXAMPLE_OFFSETS``), so a
        query reads the rows it shows by id instead of parsing the whole table."""
        offsets = [0]

        def fill(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                for row in rows:
                    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                    handle.write(line)
                    offsets.append(offsets[-1] + len(line))
        self._started()
        with self._disk():
            write_file(self.partial / "examples.jsonl", fill)
            write_file(self.partial / EXAMPLE_OFFSETS, lambda tmp: _save_npy(tmp, np.asarray(offsets, np.int64)))

    def write_projection(self, arrays: dict[str, np.ndarray]) -> None:
        self._started()
        if arrays:
            with self._disk():
                write_file(self.partial / "projection.npz", lambda tmp: _save_npz(tmp, arrays))

    def read_projection(self) -> dict[str, np.ndarray]:
        return read_projection(self.partial / "projection.npz")

    def write_array(self, name: str, array: np.ndarray) -> None:
        """Another array of the index (a shard's row numbers), staged with it."""
        self._started()
        with self._disk():
            write_file(self.partial / name, lambda tmp: _save_npy(tmp, np.asarray(array)))

    # -- finishing ------------------------------------------------------------------------

    def commit(self, manifest: dict, on_layer=None) -> Path:
        """Stage the index from the partial folder's sources, swap it into place, then remove
        the partial folder. Every step can be killed and redone by ``--resume``."""
        issue = problem(json.loads(json.dumps(manifest)))
        if issue:
            raise ValueError(f"the manifest to write is invalid: {issue}")
        with self._disk():
            return self.install(self._stage(manifest, on_layer))

    def fresh_stage(self) -> Path:
        """An empty ``index/`` in the partial folder, for a caller that stages the index itself
        (``combine``: rows gathered from other indexes), then ``install``s it."""
        self._started()
        stage = self.partial / "index"
        remove(stage)
        (stage / "layers").mkdir(parents=True)
        return stage

    def install(self, stage: Path) -> Path:
        """Swap a staged index into place, then remove the partial folder and release the lock."""
        with self._disk():
            swap_folder(stage, self.out)
            remove(self.partial)  # holds the old index now (or nothing); ours to delete
        self.close()
        return self.given

    def _stage(self, manifest: dict, on_layer) -> Path:
        stage = self.partial / "index"
        remove(stage)  # a stage a kill left, or the old index a previous swap put there
        (stage / "layers").mkdir(parents=True)
        for name in ("examples.jsonl", EXAMPLE_OFFSETS, "projection.npz", LOSSES, SHARD_ROWS):
            if (self.partial / name).is_file():
                _link(self.partial / name, stage / name)
        for entry in manifest.get("checkpoints", []):  # TracIn-CP: each earlier checkpoint's own index
            if entry["index"] != ".":
                shutil.copytree(self.partial / entry["index"], stage / entry["index"], copy_function=_link,
                                ignore=shutil.ignore_patterns(".*"))
        for number, layer in enumerate(manifest["layers"]):
            if on_layer:
                on_layer(number, len(manifest["layers"]))
            if layer.get("exact_norms"):
                _link(self.partial / "vectors" / f"{layer['name']}.{EXACT_NORMS}",
                      stage / "layers" / f"{layer['name']}.{EXACT_NORMS}")
            if layer.get("kind") == "tokens":
                folder = tokens_folder(stage, layer["name"])
                folder.mkdir()
                for name in TOKEN_FILES:
                    _link(self.partial / "vectors" / f"{layer['name']}.{name}.npy", folder / f"{name}.npy")
                order = by_token(np.load(folder / "tokens.npy", mmap_mode="r", allow_pickle=False))
                write_file(folder / BY_TOKEN, lambda tmp: _save_npy(tmp, order))  # the posting lists, once
                continue
            vectors = np.load(self.partial / "vectors" / f"{layer['name']}.npy", mmap_mode="r",
                              allow_pickle=False)
            # unit rows in FAISS (cosine, and what any ANN index searches) and the norms beside
            # them (dot = unit row x norm): one build answers both metrics (views.DenseLayer)
            norms = row_norms(vectors)
            write_file(stage / "layers" / f"{layer['name']}.norms.npy", lambda tmp: _save_npy(tmp, norms))
            index = make_faiss_index(vectors, "cosine", manifest["index_factory"])
            write_faiss(index, stage / "layers" / f"{layer['name']}.faiss")
        write_json(stage / MANIFEST, manifest)
        return stage

    def close(self) -> None:
        """Release the lock; the partial folder stays (an interrupted build, for --resume)."""
        self._lock.release()

    def abort(self) -> None:
        """After a failure: remove the partial folder if this run created it (an interrupted
        build from before is never deleted, nor one a full disk stopped), release the lock."""
        if self._created and not self._keep:
            shutil.rmtree(self.partial, ignore_errors=True)
        self.close()

    @contextmanager
    def _disk(self):
        """A full disk (or quota) is the user's to fix: one line, and the work so far is kept."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in DISK_ERRORS:
                raise
            self._keep = True
            raise UserError(f"no space left to write the index beside '{self.given}' ({exc.strerror}); "
                            "free some space, then run the same build with --resume.") from None


class TokenRowsFile:
    """A build's token rows being filled: ``file[batch] = rows`` (a ``TokenRows`` of the
    batch's examples, in batch order) writes each example's entries at its own offsets."""

    def __init__(self, indptr, tokens, values):
        self.indptr, self.tokens, self.values = indptr, tokens, values

    def __setitem__(self, batch, rows) -> None:
        for j, i in enumerate(batch):
            start, end = int(self.indptr[i]), int(self.indptr[i + 1])
            tokens, values = rows.row(j)
            if len(tokens) != end - start:
                raise RuntimeError(f"example {i} has {len(tokens)} distinct tokens in the pass, {end - start} counted")
            self.tokens[start:end], self.values[start:end] = tokens, values

    def flush(self) -> None:
        for array in (self.indptr, self.tokens, self.values):
            array.flush()


def _differences(state: dict, identity: dict) -> str:
    """Which parts of the identity differ, in words: 'batch_size 1 then, 4 now', 'the model'."""
    words = []
    for key, now in identity.items():
        then = state.get(key)
        if then == now:
            continue
        if key == "config" and isinstance(then, dict):
            words += [f"{name} {then.get(name)!r} then, {value!r} now"
                      for name, value in now.items() if then.get(name) != value]
        else:
            words.append({"model": "the model", "data": "the data", "n": "the number of examples"}.get(key, key))
    return "; ".join(words)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would add ".npy" to the temporary name
        np.save(handle, array, allow_pickle=False)


def _save_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _link(source: Path, destination: Path) -> None:
    """A hard link (no copy of a large examples table); a copy where links are not allowed."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
