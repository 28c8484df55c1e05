"""The commands that split, join, grow and shrink indexes: ``fit``, ``merge``, ``add`` and
``delete``, registered on the app of ``cli`` (a part of the command line, kept apart so each
file stays short): they parse, call the Python API (``fitting``, ``shards``, ``grow``), print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli import STATE, _progress, app, err, options_of
from .config import BuildConfig


def _said(text: str, manifest: dict | None = None, as_json: bool = False) -> None:
    if as_json and manifest is not None:
        print(json.dumps(manifest, indent=2))
    elif not STATE["quiet"]:
        err.print(f"[green]{text}[/]")


@app.command(epilog="Example: lite-influence fit ./my-model train.tsv --out runs/proj, then every shard: "
                    "lite-influence build ./my-model train.tsv --shard 0/4 --projection-from runs/proj --out runs/shard0")
@options_of(BuildConfig)
def fit(
    model: Path = typer.Argument(..., help="Model folder (save_pretrained): config, weights, tokenizer."),
    train_file: Path = typer.Argument(..., help="Training examples (the fit sample is drawn from them, as a build draws it)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the fitted projection (projection.json, projection.npz)."),
    config: BuildConfig = None,
    force: bool = typer.Option(False, "--force", help="Replace a projection already at --out."),
):
    """Fit the projection once, for shards (or builds on other machines) to share with --projection-from."""
    from .fitting import fit_projection

    with _progress() as progress:
        path = fit_projection(model, train_file, out, config, force=force, progress=progress)
    _said(f"fitted the {config.projection} projection -> {path}")


@app.command(epilog="Example: lite-influence merge runs/shard0 runs/shard1 runs/shard2 runs/shard3 --out runs/index")
def merge(
    shard_dirs: list[Path] = typer.Argument(..., help="Every shard index of one build (built with --shard i/n)."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder to write (replaced atomically)."),
    force: bool = typer.Option(False, "--force", help="Replace an index already at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Join the shards of one build into one index, the same as a single build of all rows."""
    from .shards import merge_shards
    from .store import IndexStore

    manifest = IndexStore.open(merge_shards(shard_dirs, out, force=force)).manifest
    _said(f"merged {len(shard_dirs)} shards: {manifest['n']:,} examples -> {out}", manifest, as_json)


@app.command(epilog="Example: lite-influence add runs/index new_rows.tsv")
def add(
    index_dir: Path = typer.Argument(..., help="An index folder written by `build`."),
    rows_file: Path = typer.Argument(..., help="Rows to append, in the columns of the indexed data (csv/tsv/jsonl)."),
    model: Optional[Path] = typer.Option(None, "--model", help="The model folder, if it moved since the build."),
    as_json: bool = typer.Option(False, "--json", help="Print the new manifest as JSON."),
):
    """Append rows to an index in place, projected with the index's own projection."""
    from .grow import add_rows

    with _progress() as progress:
        manifest = add_rows(index_dir, rows_file, model=model, progress=progress)
    added = manifest["history"][-1]["rows"]
    _said(f"added {added:,} rows (ids {manifest['n'] - added}..{manifest['n'] - 1}) -> {index_dir} "
          f"(FAISS {manifest['index_factory']}, from --index-factory {manifest['build']['index_factory']})", manifest, as_json)


@app.command(epilog="Examples:\n\n  lite-influence delete runs/index --ids 3,7,12\n\n"
                    "  lite-influence delete runs/index --where noisy=1")
def delete(
    index_dir: Path = typer.Argument(..., help="An index folder written by `build`."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Row ids to remove, comma-separated (e.g. 3,7,12)."),
    where: Optional[str] = typer.Option(None, "--where", help="Remove the rows whose column has this value: column=value (e.g. label=negative)."),
    as_json: bool = typer.Option(False, "--json", help="Print the new manifest as JSON."),
):
    """Remove rows from an index in place; the rows after them move up (ids are row numbers)."""
    from .grow import delete_rows

    manifest = delete_rows(index_dir, ids=ids, where=where)
    _said(f"deleted {manifest['history'][-1]['removed']:,} rows; {manifest['n']:,} remain -> {index_dir}",
          manifest, as_json)
