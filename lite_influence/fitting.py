"""The projection a build uses: fitted in its own pass, or taken from elsewhere so that many
builds share one (``lite-influence fit --out PROJ`` then ``build --projection-from PROJ``).

Why a projection is shared: shards of one build, a build on another machine and ``add``
(new rows into an existing index) must project every example with the same matrices, or their
vectors live in different spaces and no merge can be exact. A random projection is
regenerated from the seed anywhere; a fitted one (pca, mixed, hybrid) is fitted once and read
back: from a fit output (``projection.json`` + ``projection.npz``) or from an index (its
manifest + ``projection.npz``). Reading checks that the source agrees with the build: the same
model (fingerprint), the same projection options (``PROJECTION_FIELDS``) and a projection for
every unit the build indexes; anything else is one line saying which option to repeat.

Under torchrun the fitting pass itself is shared: each rank accumulates the covariances of its
share of the fit sample's batches (``cluster``: ``distributed.Cluster``) and the sums are
gathered and added in rank order, so every rank holds the same float64 covariances.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import BuildConfig
from .errors import UserError
from .store import IndexStore, is_index, write_json
from .store.atomic import remove, swap_folder, write_file
from .store.guard import PROJECTION_RECORD, check_out
from .store.lock import BuildLock
from .store.reader import read_projection

PROJECTION_FIELDS = ("projection", "proj_dim", "proj_dim_in", "energy", "proj_dim_max", "token_dim", "exact_max", "seed")
# What a projection fitted before an option existed was built with (an older index or fit).
LEGACY_FIELDS = {"exact_max": 0, "token_dim": 0, "energy": 0.0, "proj_dim_max": 64}
PROJECTION_ARRAYS = "projection.npz"


def make_projector(unit, config: BuildConfig, covariances=None):
    """A unit's projector: random (no covariances) or fitted from its covariances."""
    from .projection import fitted_projector, keeps_tokens, random_projector, token_projector, unit_k

    if keeps_tokens(unit, config.token_dim):
        return token_projector(config.projection, unit, config.token_dim, config.seed, covariances)
    k = unit_k(unit, config.proj_dim, config.exact_max, config.proj_dim_in)
    return random_projector(unit, k, config.seed) if covariances is None else \
        fitted_projector(config.projection, unit, k, config.seed, covariances, config.energy, config.proj_dim_max)


def fit_projectors(loaded, units, encodings, labels, config: BuildConfig, progress, cluster=None) -> list:
    """The fitting pass over a seeded sample of the training set (all of it, whatever the
    shard: every shard draws the same sample), then one projector per unit."""
    from .gradients import fit_covariances, length_batches
    from .projection import pca_fits

    sample = np.random.default_rng(config.seed).permutation(len(encodings))[: config.fit_examples]
    lengths = [len(encodings[i]["input_ids"]) for i in sample]
    batches = [[int(sample[j]) for j in b] for b in length_batches(lengths, config.batch_size)]
    if cluster is not None:
        batches = batches[cluster.rank::cluster.world]
    fitted_count = [0]

    def on_batch(size):
        fitted_count[0] += size
        progress("fit", fitted_count[0], len(sample))

    covariances = fit_covariances(loaded, units, encodings, labels, batches, pca_fits, on_batch)
    if cluster is not None:
        covariances = cluster.summed(covariances)
    return [make_projector(u, config, covariances[u.name]) for u in units]


def read_source(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(record, arrays) of a fit output or an index: the record names the model, the
    projection options and the units it covers."""
    root = Path(path)
    if is_index(root):
        manifest = IndexStore.open(root).manifest
        record = {"model": manifest["model"], "config": {**LEGACY_FIELDS, **manifest["build"]},
                  "units": [u["name"] for layer in manifest["layers"] for u in layer["units"]]}
    elif (root / PROJECTION_RECORD).is_file():
        try:
            record = json.loads((root / PROJECTION_RECORD).read_text(encoding="utf-8"))
            record["model"]["fingerprint"], record["config"], record["units"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{root / PROJECTION_RECORD} is damaged ({type(exc).__name__}); fit it again "
                            "with `lite-influence fit`.") from None
    else:
        raise UserError(f"--projection-from '{path}' is neither a fitted projection (`lite-influence fit "
                        "--out`) nor an index; pass one of those.")
    return record, read_projection(root / PROJECTION_ARRAYS)


def check_source(path, record: dict, config: BuildConfig, fingerprint: str, units) -> None:
    """Refuse a projection that does not fit this build, naming what differs."""
    if record["model"]["fingerprint"] != fingerprint:
        raise UserError(f"--projection-from '{path}' was fitted on another model (fingerprint differs); "
                        "fit it with this model (`lite-influence fit`).")
    for name in PROJECTION_FIELDS:
        then, now = record["config"].get(name, LEGACY_FIELDS.get(name)), getattr(config, name)
        if then != now:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"--projection-from '{path}' was fitted with {flag} {then}, this build asks for "
                            f"{now}; pass the same projection options as the fit.")
    missing = [u.name for u in units if u.name not in set(record["units"])]
    if missing:
        raise UserError(f"--projection-from '{path}' holds no projection for unit {missing[0]} "
                        f"({len(missing)} missing): fit it with the same --layers as the build.")


def shared_projectors(path, units, config: BuildConfig, fingerprint: str) -> list:
    """The projectors of ``--projection-from``, checked against this build."""
    from .projection import from_arrays

    record, arrays = read_source(path)
    check_source(path, record, config, fingerprint, units)
    return from_arrays(units, config.proj_dim, config.seed, arrays, config.projection,
                       exact_max=config.exact_max, token_dim=config.token_dim, proj_dim_in=config.proj_dim_in)


def fit_record(config: BuildConfig, model_dir: Path, fingerprint: str, data: dict, units) -> dict:
    return {"kind": "lite-influence projection", "model": {"path": str(Path(model_dir).resolve()),
                                                           "fingerprint": fingerprint},
            "data": data, "config": replace(config, shard=None, projection_from=None).to_dict(),
            "units": [u.name for u in units]}


def write_fit(out: str | Path, record: dict, arrays: dict, force: bool = False, protect=()) -> Path:
    """The fit output, written beside ``out`` and swapped into place (never half a folder)."""
    from .store.writer import _save_npz

    out = Path(out)
    check_out(out, force, protect, product="the projection")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = BuildLock(out).hold()
    try:
        stage = out.parent / f".{out.name}.partial"
        remove(stage)
        stage.mkdir()
        write_file(stage / PROJECTION_ARRAYS, lambda tmp: _save_npz(tmp, arrays))
        write_json(stage / PROJECTION_RECORD, record)
        swap_folder(stage, out)
        remove(stage)
    finally:
        lock.release()
    return out


def fit_projection(model: str | Path, train_file: str | Path, out: str | Path, config: BuildConfig | None = None,
                   *, force: bool = False, progress=None, **options) -> Path:
    """``lite-influence fit``: the build's fitting pass alone, written to ``out`` for every
    shard (or later ``add``) to take with ``--projection-from``."""
    from .build import prepare
    from .data import fingerprint_file
    from .models import model_fingerprint

    config = replace(config or BuildConfig(), **options).validate()
    if config.shard or config.projection_from:
        raise UserError("fit takes neither --shard nor --projection-from: it fits the projection the shards share.")
    progress = progress or (lambda stage, done, total: None)
    check_out(Path(out), force, [model, train_file], product="the projection")
    prepared = prepare(Path(model), Path(train_file), config, progress)
    projectors = fit_projectors(prepared.loaded, prepared.units, prepared.encodings, prepared.examples.labels,
                                config, progress) if config.projection != "random" else []
    from .projection import to_arrays

    data = {"path": str(Path(train_file).resolve()), "fingerprint": fingerprint_file(train_file)}
    record = fit_record(config, model, model_fingerprint(model), data, prepared.units)
    return write_fit(out, record, to_arrays(projectors), force, [model, train_file])
