"""A build under torchrun: each rank builds one shard, rank 0 merges them into ``--out``.

``torchrun --nproc-per-node K [--nnodes M --rdzv-endpoint HOST:PORT] -m lite_influence build
MODEL TRAIN --out OUT`` needs no flag of ours: the rank and world size come from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). The steps:

1. The projection. A fitted one (pca, mixed, hybrid) is fitted once for all: each rank
   accumulates the covariances of its share of the fit sample's batches, the sums are
   gathered (gloo, float64) and added in rank order, rank 0's projectors are sent to every
   rank, and the projection is written as a fit output to ``OUT.shards/projection`` (once per
   machine), which every shard then takes as ``--projection-from``. A random projection is
   regenerated from the seed on each rank. ``--projection-from`` given: used as it is.
2. The shards: rank r builds ``--shard r/K`` into ``OUT.shards/shard-r-of-K`` (resumable one by
   one: ``--resume`` skips a finished shard and continues an interrupted one).
3. Every rank reports how its shard went (a gather); if any failed, every rank fails with one
   line naming the rank and its error, and ``--out`` is untouched. Else rank 0 merges the
   shards into ``--out`` (``shards.merge_shards``; the index swapped into place as by any
   build), removes ``OUT.shards`` and tells the others.

The shards and the projection must be where rank 0 can read them: ``OUT`` on a folder all
machines share. Without one, build each machine's shards with ``--shard``, copy them to one
machine and run ``lite-influence merge`` (README, "More than one machine").

gloo carries only the covariances, a projection and a few status lines, so it serves GPU
machines as well as CPU ones. Collectives wait up to ``TIMEOUT``: the ranks meet after their
shards, and the slowest shard may finish hours after the fastest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from .errors import UserError
from .store.guard import PROJECTION_RECORD, check_out, target

TIMEOUT = timedelta(days=7)


@dataclass
class Cluster:
    rank: int
    world: int
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Cluster | None":
        """The torchrun group this process belongs to (None: not under torchrun, or alone)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world <= 1:
                return None
            return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        except (KeyError, ValueError):
            raise UserError("WORLD_SIZE is set but RANK is not a number; run the build under torchrun, "
                            "or unset WORLD_SIZE.") from None

    def start(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=TIMEOUT)

    def stop(self) -> None:
        """Tear the group down before the process exits: gloo's threads left running at exit
        abort the process ("terminate called without an active exception", SIGABRT) after
        its work is done, which torchrun reports as a failed rank."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        self.gather(None)

    def summed(self, covariances: dict) -> dict:
        """Each unit's covariances added over the ranks in rank order (the same float64 sum on
        every rank); a side a rank never saw (no fit batch) counts as zero."""
        total = {}
        for part in self.gather(covariances):
            for unit, sides in part.items():
                into = total.setdefault(unit, {})
                for side, value in sides.items():
                    into[side] = value if side not in into else into[side] + value
        return total


def shards_folder(out) -> Path:
    out = target(out)
    return out.parent / f"{out.name}.shards"


def build_distributed(cluster: Cluster, model, train_file, out, config, *, force=False, resume=False,
                      progress=None):
    """Steps 1-3 of the module docstring, on this rank; the merged index on every rank."""
    cluster.start()
    try:
        return _build_on_rank(cluster, model, train_file, out, config, force, resume, progress)
    finally:
        cluster.stop()


def _build_on_rank(cluster: Cluster, model, train_file, out, config, force, resume, progress):
    progress = progress if cluster.rank == 0 else None
    check_out(target(out), force, [model, train_file])  # before hours of work, not after
    folder = shards_folder(out)
    shard_out = folder / f"shard-{cluster.rank}-of-{cluster.world}"
    error = None
    try:
        source = config.projection_from
        if source is None and config.projection != "random":
            source = str(_shared_fit(cluster, model, train_file, folder / "projection", config, resume, progress))
        _build_shard(model, train_file, shard_out, replace(config, shard=f"{cluster.rank}/{cluster.world}",
                                                           projection_from=source), force, resume, progress)
    except UserError as exc:
        error = str(exc)
    except Exception as exc:  # a bug, or the machine: still one line from every rank
        error = f"{type(exc).__name__}: {exc}"
    failed = [(rank, message) for rank, message in enumerate(cluster.gather(error)) if message]
    if failed:
        rank, message = failed[0]
        raise UserError(f"rank {rank} of {cluster.world} failed: {message} (nothing was written to {out}; "
                        f"finished shards are kept in {folder}: rerun with --resume)")
    error = _merge(cluster, folder, out, force, config) if cluster.rank == 0 else None
    error = cluster.gather(error)[0]
    if error:
        raise UserError(error)
    from .api import InfluenceIndex

    return InfluenceIndex.open(out)


def _build_shard(model, train_file, shard_out: Path, config, force, resume, progress) -> None:
    from .build import build_index

    if resume and _finished(shard_out, model, train_file, config):
        return
    build_index(model, train_file, shard_out, config, force=force or resume, resume=resume, progress=progress)


def _finished(shard_out: Path, model, train_file, config) -> bool:
    """Whether ``shard_out`` already holds this very shard, built to the end."""
    from .data import fingerprint_file
    from .models import model_fingerprint
    from .store import IndexStore, is_index

    if not is_index(shard_out):
        return False
    manifest = IndexStore.open(shard_out).manifest
    return (manifest.get("build") == config.to_dict() and manifest["model"]["fingerprint"] == model_fingerprint(model)
            and manifest["data"]["fingerprint"] == fingerprint_file(train_file))


def _merge(cluster: Cluster, folder: Path, out, force: bool, config) -> str | None:
    """Rank 0: the shards into ``out``, then the shards folder removed; an error line or None."""
    from .shards import merge_shards
    from .store.atomic import remove

    paths = [folder / f"shard-{rank}-of-{cluster.world}" for rank in range(cluster.world)]
    unseen = [str(p) for p in paths if not p.is_dir()]
    if unseen:
        return (f"rank 0 cannot see {', '.join(unseen)}: under torchrun --out must be on a folder every machine "
                f"shares; else copy each machine's {folder} here and run `lite-influence merge`.")
    try:
        merge_shards(paths, out, force=force, build={"projection_from": config.projection_from})
    except UserError as exc:
        return f"merging the shards in {folder} failed: {exc}"
    remove(folder)
    return None


def _shared_fit(cluster: Cluster, model, train_file, proj: Path, config, resume: bool, progress) -> Path:
    """Step 1: the fitted projection, once for every rank, as a fit output at ``proj``."""
    from .build import prepare
    from .data import fingerprint_file
    from .fitting import fit_projectors, fit_record, read_source, write_fit
    from .models import model_fingerprint
    from .projection import to_arrays

    data = {"path": str(Path(train_file).resolve()), "fingerprint": fingerprint_file(train_file)}
    fingerprint = model_fingerprint(model)
    progress = progress or (lambda stage, done, total: None)
    prepared = None if resume and all(cluster.gather(_fitted(proj, config, fingerprint))) else \
        prepare(Path(model), Path(train_file), config, progress)
    if prepared is None:
        return proj
    projectors = fit_projectors(prepared.loaded, prepared.units, prepared.encodings, prepared.examples.labels,
                                config, progress, cluster)
    arrays = cluster.gather(to_arrays(projectors) if cluster.rank == 0 else None)[0]
    record = fit_record(config, model, fingerprint, data, prepared.units)
    if cluster.rank == 0:
        write_fit(proj, record, arrays, force=True)
    cluster.barrier()
    if cluster.rank != 0 and cluster.local_rank == 0 and not (proj / PROJECTION_RECORD).is_file():
        write_fit(proj, record, arrays, force=True)  # a machine that does not share rank 0's folder
    cluster.barrier()
    read_source(proj)
    return proj


def _fitted(proj: Path, config, fingerprint: str) -> bool:
    """Whether ``proj`` holds the projection this build would fit (a resumed build)."""
    from .fitting import fit_record, read_source

    if not (proj / PROJECTION_RECORD).is_file():
        return False
    record, _ = read_source(proj)
    return record["model"]["fingerprint"] == fingerprint and \
        record["config"] == fit_record(config, ".", fingerprint, {}, [])["config"]
