"""The ``lite-influence`` command line: parses flags into the command's dataclass, calls the
Python API, prints. Errors a user can fix are one red line and exit 1; anything else is a bug
and exits 2, with the traceback only under ``--debug``."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .config import BuildConfig, help_of
from .errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="Which training examples made my language model do this? Per-layer gradient "
         "influence in FAISS indexes, on a CPU.",
)
out = Console()
err = Console(stderr=True)
STATE = {"debug": False, "quiet": False}


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or notes."),
):
    STATE.update(debug=debug, quiet=quiet)


def _opt(cls, name: str, *flags: str):
    default = cls.__dataclass_fields__[name].default
    flag = "--" + name.replace("_", "-")
    return typer.Option(default, flag, *flags, help=help_of(cls, name))


@contextmanager
def _progress():
    """A progress callback ``(stage, done, total)`` drawn as rich bars with examples/s."""
    if STATE["quiet"]:
        yield lambda stage, done, total: None
        return
    labels = {"fit": "fitting eigenbasis", "gradients": "projected gradients", "faiss": "writing FAISS"}
    columns = (TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        tasks = {}

        def update(stage, done, total):
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels.get(stage, stage), total=total, rate="")
            task = bar.tasks[tasks[stage]]
            rate = done / task.elapsed if task.elapsed else 0
            bar.update(tasks[stage], completed=done, total=total,
                       rate=f"{rate:,.1f} ex/s" if stage != "faiss" else "")

        yield update


@app.command(epilog="Example: lite-influence build ./my-model train.tsv --out runs/index --projection pca --proj-dim 8")
def build(
    model: Path = typer.Argument(..., help="Model folder (save_pretrained): config, weights, tokenizer."),
    train_file: Path = typer.Argument(..., help="Training examples: .csv, .tsv, .jsonl, or a datasets.save_to_disk folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder to write (replaced atomically when the build succeeds)."),
    text_col: Optional[str] = _opt(BuildConfig, "text_col"),
    pair_col: Optional[str] = _opt(BuildConfig, "pair_col"),
    label_col: Optional[str] = _opt(BuildConfig, "label_col"),
    layers: str = _opt(BuildConfig, "layers"),
    granularity: str = _opt(BuildConfig, "granularity"),
    projection: str = _opt(BuildConfig, "projection"),
    proj_dim: int = _opt(BuildConfig, "proj_dim"),
    fit_examples: int = _opt(BuildConfig, "fit_examples"),
    metric: str = _opt(BuildConfig, "metric"),
    index_factory: str = _opt(BuildConfig, "index_factory"),
    batch_size: int = _opt(BuildConfig, "batch_size"),
    max_length: int = _opt(BuildConfig, "max_length"),
    seed: int = _opt(BuildConfig, "seed"),
    limit: Optional[int] = _opt(BuildConfig, "limit"),
    num_labels: Optional[int] = _opt(BuildConfig, "num_labels"),
    force: bool = typer.Option(False, "--force", help="Replace --out even if it is not an index."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted build of the same settings from where it stopped."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Index the per-layer projected gradient of every training example."""
    from .api import build_index

    config = BuildConfig(text_col=text_col, pair_col=pair_col, label_col=label_col, layers=layers,
                         granularity=granularity, projection=projection, proj_dim=proj_dim,
                         fit_examples=fit_examples, metric=metric, index_factory=index_factory,
                         batch_size=batch_size, max_length=max_length, seed=seed, limit=limit,
                         num_labels=num_labels)
    with _progress() as progress:
        index = build_index(model, train_file, out, config, force=force, resume=resume, progress=progress)
    if as_json:
        print(json.dumps(index.manifest, indent=2))
    elif not STATE["quiet"]:
        m = index.manifest
        err.print(f"[green]indexed {m['n']:,} examples[/] in {len(m['layers'])} layers "
                  f"({m['build_seconds']:.1f} s of gradients) -> {index.path}")


@app.command(epilog="Example: lite-influence info runs/index --json")
def info(
    index_dir: Path = typer.Argument(..., help="An index folder written by `build`."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and file sizes as JSON."),
):
    """Show what an index holds: model, data, layers, dims and file sizes."""
    from .index import IndexStore

    store = IndexStore.open(index_dir)
    m, sizes = store.manifest, store.sizes()
    if as_json:
        print(json.dumps({"manifest": m, "files": sizes}, indent=2))
        return
    summary = Table(show_header=False, box=None)
    for key, value in (("model", m["model"]["path"]), ("task", m["model"]["task"]),
                       ("examples", f"{m['n']:,}"), ("labels", ", ".join(m["label_names"])),
                       ("projection", f"{m['projection']}, {m['proj_dim']} per side"),
                       ("metric", m["metric"]), ("FAISS", m["index_factory"]),
                       ("data", m["data"]["path"]), ("size", _human(sum(sizes.values())))):
        summary.add_row(f"[bold]{key}[/]", str(value))
    out.print(summary)
    table = Table("layer", "units", "dim", "file size", title="layers")
    for layer in m["layers"]:
        size = sizes.get(f"layers/{layer['name']}.faiss", 0)
        table.add_row(layer["name"], str(len(layer["units"])), str(layer["dim"]), _human(size))
    out.print(table)
    out.print("groups: " + "; ".join(f"{g}: {', '.join(ls)}" for g, ls in m["groups"].items()))


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps errors onto exit codes 1 (user error), 2 (bug), 130 (Ctrl-C)."""
    try:
        code = app(args=argv, standalone_mode=False)
    except click.UsageError as exc:
        exc.show()
        sys.exit(1)
    except UserError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (KeyboardInterrupt, click.Abort):
        err.print("[yellow]interrupted[/]: nothing was replaced; an interrupted build can continue with --resume.")
        sys.exit(130)
    except Exception as exc:
        if STATE["debug"]:
            raise
        err.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
