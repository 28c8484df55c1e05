"""The ``lite-influence`` command line: parses flags into the command's dataclass, calls the
Python API, prints. Errors a user can fix are one red line and exit 1; anything else is a bug
and exits 2, with the traceback only under ``--debug``."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from .terminal import shown
from rich.table import Table

from .config import AuditConfig, BuildConfig, QueryConfig, QueryText, ServeConfig, TrainConfig, cli_parameters
from . import render
from . import process
from .errors import InputWarning, UserError
from .progress import reporting
from .render import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="Which training examples made my language model do this? Per-layer gradient "
         "influence in FAISS indexes, on a CPU.",
)
err = Console(stderr=True)
STATE = {"debug": False, "quiet": False}
# typer >= 0.20 runs on its own copy of click (typer._click), whose usage errors are not
# click.UsageError; both are caught so a mistyped flag is a user error, not a bug.
USAGE_ERRORS = tuple({click.UsageError, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")})


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or notes."),
):
    STATE.update(debug=debug, quiet=quiet)


def options_of(cls, param: str = "config"):
    """Decorator: the command's parameter ``param`` (annotated ``cls``) becomes one typer
    option per field of ``cls`` (config.py declares them); the command receives the filled
    dataclass. Bergson builds its CLI from dataclasses the same way."""
    names = [f.name for f in fields(cls)]

    def wrap(func):
        signature = inspect.signature(func, eval_str=True)
        params = []
        for p in signature.parameters.values():
            if p.name != param:
                params.append(p)
                continue
            params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)
                       for name, annotation, default in cli_parameters(cls)]

        @functools.wraps(func)
        def command(**kwargs):
            config = cls(**{name: kwargs.pop(name) for name in names})
            return func(**kwargs, **{param: config})

        command.__signature__ = signature.replace(parameters=params)
        return command

    return wrap


def _progress():
    """The progress callback of a command (progress.py: bars, a spinner, or plain lines in a log)."""
    return reporting(err, quiet=STATE["quiet"])


@app.command(epilog="Example: lite-influence build ./my-model train.tsv --out runs/index --projection pca --proj-dim 8")
@options_of(BuildConfig)
def build(
    model: Path = typer.Argument(..., help="Model folder (save_pretrained): config, weights, tokenizer."),
    train_file: Path = typer.Argument(..., help="Training examples: .csv, .tsv, .jsonl, or a datasets.save_to_disk folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Index folder to write (replaced atomically when the build succeeds)."),
    config: BuildConfig = None,
    force: bool = typer.Option(False, "--force", help="Replace --out even if it is not an index."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted build of the same settings from where it stopped."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Index the per-layer projected gradient of every training example."""
    from .api import build_index

    with _progress() as progress:
        index = build_index(model, train_file, out, config, force=force, resume=resume, progress=progress)
    if as_json:
        print(json.dumps(index.manifest, indent=2))
    elif not STATE["quiet"] and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 alone
        m = index.manifest
        err.print(f"[green]indexed {m['n']:,} examples[/] in {len(m['layers'])} layers "
                  f"({m['build_seconds']:.1f} s of gradients) -> {index.path}")


@app.command(epilog="Example: lite-influence train ./minilm train.tsv --out runs/model --noise 0.2 --eval-file dev.tsv --epochs 3")
@options_of(TrainConfig)
def train(
    model: Path = typer.Argument(..., help="Model folder (save_pretrained) to fine-tune."),
    train_file: Path = typer.Argument(..., help="Labelled training examples: .csv, .tsv, .jsonl, or a save_to_disk folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the fine-tuned model (written atomically)."),
    config: TrainConfig = None,
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the training history as JSON."),
):
    """Fine-tune a classifier (fully or with LoRA), optionally flipping a seeded fraction of labels first."""
    from .train import train_model

    with _progress() as progress:
        result = train_model(model, train_file, out, config, force=force, progress=progress)
    if as_json:
        print(json.dumps({"out": str(result.out), "chosen_epoch": result.chosen_epoch,
                          "n_noisy": result.n_noisy, "history": result.history}, indent=2))
        return
    table = Table("epoch", "train loss", "eval loss", "eval accuracy", title=f"fine-tuned -> {result.out}",
                  title_justify="left")
    for row in result.history:
        mark = " [green]<- kept[/]" if row.get("epoch") == result.chosen_epoch else ""
        table.add_row(str(row.get("epoch")), render.fmt(row.get("train_loss")), render.fmt(row.get("eval_loss")),
                      render.fmt(row.get("eval_accuracy")) + mark)
    console.print(table)
    if result.n_noisy and not STATE["quiet"]:
        err.print(f"{result.n_noisy} labels flipped; see train_used.* in {result.out} (column noisy)")


@app.command(epilog="Example: lite-influence info runs/index --json")
def info(
    index_dir: Path = typer.Argument(..., help="An index folder written by `build`."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest and file sizes as JSON."),
):
    """Show what an index holds: model, data, layers, dims and file sizes."""
    from .store import IndexStore

    store = IndexStore.open(index_dir)
    m, sizes = store.manifest, store.sizes()
    if as_json:
        print(json.dumps({"manifest": m, "files": sizes}, indent=2))
        return
    summary = Table(show_header=False, box=None)
    for key, value in (("model", m["model"]["path"]), ("task", m["model"]["task"]),
                       ("examples", f"{m['n']:,}"), ("labels", ", ".join(m["label_names"])),
                       ("projection", render.projection_summary(m)),
                       ("metric", f"{m['metric']} by default; answers {' and '.join(store.metrics)}"),
                       ("FAISS", m["index_factory"] + (" (approximate: a lookup ranks FAISS's candidates, re-scored exactly)"
                                                        if store.approximate else " (exact)")),
                       ("data", m["data"]["path"]), ("size", render.human(sum(sizes.values())))):
        summary.add_row(f"[bold]{key}[/]", shown(str(value)))
    console.print(summary)
    table = Table("layer", "units", "dim", "kept", "file size", title="layers",
                  caption="kept: median ratio of an example's squared gradient norm in the stored sketch to the "
                          "exact one (an eigenbasis keeps a share, at most 1; a random side keeps 1 on average)")
    for layer in m["layers"]:
        size = sum(v for f, v in sizes.items() if f == f"layers/{layer['name']}.faiss"
                   or f.startswith(f"layers/{layer['name']}.tokens/"))
        dim = str(layer["dim"]) if layer.get("kind") != "tokens" else \
            f"{layer['dim']} per token ({layer['entries'] / m['n']:.1f} tokens each)"
        kept = store.layer(layer["name"]).kept_share()
        table.add_row(layer["name"], str(len(layer["units"])), dim, "-" if kept is None else f"{kept:.2f}",
                      render.human(size))
    console.print(table)
    console.print("groups: " + "; ".join(f"{g}: {', '.join(ls)}" for g, ls in m["groups"].items()))
    for line in render.lineage(m):
        console.print(shown(line))


@app.command(epilog="Examples:\n\n  lite-influence query runs/index --text \"a gorgeous, witty film\" -k 5\n\n"
                     "  lite-influence query runs/index --file dev.tsv --layers middle --agg rank --json")
@options_of(QueryText, "asked")
@options_of(QueryConfig)
def query(
    index_dir: Path = typer.Argument(..., help="An index folder written by `build`."),
    asked: QueryText = None,
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Many queries (csv/tsv/jsonl): one result each (JSON lines with --json), or one for all with --aggregate; the predictions are explained unless --label-col names the labels to explain."),
    ids: Optional[list[int]] = typer.Option(None, "--id", help="Explain training example N from its stored vectors (no model is loaded); repeat for several."),
    id_list: Optional[str] = typer.Option(None, "--ids", help="Several training examples at once, comma-separated (--ids 17,40): as --id for each."),
    config: QueryConfig = None,
    model: Optional[Path] = typer.Option(None, "--model", help="The model folder, if it moved since the build."),
    local: bool = typer.Option(False, "--local", help="Answer in this process even when a `lite-influence serve` runs for the index."),
):
    """Which training examples pushed the model to this answer (proponents), and which fought it (opponents)."""
    text, completion, pair, label, as_json = asked.text, asked.completion, asked.pair, asked.label, asked.as_json
    ids = (ids or []) + _id_list(id_list)
    if sum(x is not None for x in (text, file, ids or None)) != 1:
        raise UserError("pass one of --text \"...\", --file QUERIES or --id N.")
    if text is not None and not (local or model is not None):
        from .client import query_server

        remote = query_server(index_dir, config, text=text, pair=pair, label=label, completion=completion)
        if remote is not None:  # a server answered: nothing heavy was imported here (no numpy either)
            return _show(remote[0], remote[1]["label_names"], as_json)
    from .api import InfluenceIndex

    if ids:
        index = InfluenceIndex.open(index_dir)
        groups = [ids] if config.aggregate or len(ids) == 1 else [[i] for i in ids]
        return _show([index.query_ids(group, config) for group in groups], index.manifest["label_names"], as_json,
                     single=len(groups) == 1)
    index = InfluenceIndex.open(index_dir, model=model)
    index.kind.check_query(pair=pair, label=label, completion=completion)
    if file is not None:
        examples = index.kind.read(file, text_col=config.text_col, pair_col=config.pair_col,
                                   label_col=config.label_col, label2id=index.label2id, queries=True)
        labels = examples.labels if config.label_col and examples.labels else [None] * len(examples)
        with _progress() as index.progress:  # the spinner while the model loads
            if config.aggregate:
                result = index.query(examples.texts, examples.pairs, labels, config, completion=examples.completions)
            else:
                return _show(index.query_each(examples.texts, examples.pairs, labels, config,
                                              completions=examples.completions), index.manifest["label_names"],
                             as_json, single=False)
    else:
        with _progress() as index.progress:
            result = index.query(text, pair, label, config, completion=completion)
    _show(result, index.manifest["label_names"], as_json)


def _id_list(text: str | None) -> list[int]:
    """``--ids 17,40,102``: the same as ``--id 17 --id 40 --id 102``."""
    try:
        return [int(part) for part in (text or "").replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(f"--ids takes training example ids separated by commas (e.g. --ids 17,40), got '{text}'") from None


def _show(results, label_names: list[str], as_json: bool, single: bool = True) -> None:
    """One result as a JSON object or tables; several (one per query) as JSON lines, or
    tables one after the other."""
    results = [results] if isinstance(results, dict) else results
    for number, result in enumerate(results):
        if as_json:
            print(json.dumps(result, indent=2 if single else None, ensure_ascii=False))
        else:  # the chance warning is about the whole set of queries: said once, above the first
            render.print_query(result if number == 0 else {**result, "warning": None}, label_names)


@app.command(epilog="Example: lite-influence serve runs/index --port 8765, then open http://127.0.0.1:8765/")
@options_of(ServeConfig)
def serve(
    index_dirs: list[Path] = typer.Argument(..., help="Index folders written by `build`, served side by side."),
    config: ServeConfig = None,
):
    """Keep the model warm and answer queries over HTTP, with a page to browse them; `query` finds it by itself."""
    from .serve import serve as run_server

    config.validate()
    run_server([str(p) for p in index_dirs], host=config.host, port=config.port, warm=config.warm, hold_gb=config.hold_gb)


@app.command(epilog="Example: lite-influence audit runs/index influence.tsv --agg rank,vote --export ranking.csv --plot curves.png")
@options_of(AuditConfig)
def audit(
    index_dir: Path = typer.Argument(..., help="An index folder written by `build`."),
    query_file: Path = typer.Argument(..., help="The influence set: clean, labelled examples (csv/tsv/jsonl)."),
    config: AuditConfig = None,
    export: Optional[Path] = typer.Option(None, "--export", help="Write the headline's full ranking (influence + loss) to this csv/tsv/jsonl."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw detection curves of every group to this PNG."),
    save: bool = typer.Option(False, "--save", help="Keep the result beside the index (INDEX/audit.json), where `serve`'s page shows it."),
    model: Optional[Path] = typer.Option(None, "--model", help="The model folder, if it moved since the build."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Rank training examples from most to least detrimental, and score the ranking with NDR."""
    from .api import InfluenceIndex

    index = InfluenceIndex.open(index_dir, model=model)
    with _progress() as progress:
        index.progress = progress  # the spinner while the model loads
        result = index.audit(query_file, config, progress=progress)
    if export:
        result.export(export, index.examples)
    if plot:
        from .plots import detection_curves

        detection_curves(result, plot)
    if save:
        from .store import write_json
        from .store.reader import SAVED_AUDIT

        write_json(index.path / SAVED_AUDIT, result.saved(index.examples))
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    render.print_audit(result)
    for path in (export, plot, save and index.path / "audit.json"):
        if path and not STATE["quiet"]:
            err.print(f"wrote {path}")


@app.command(epilog="Example: lite-influence demo --out demo-out")
def demo(
    out_dir: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for everything the demo writes."),
    n_train: int = typer.Option(400, "--n-train", help="Generated training reviews."),
    noise: float = typer.Option(0.2, "--noise", help="Fraction of training labels flipped."),
    epochs: int = typer.Option(2, "--epochs", help="Fine-tuning epochs."),
    seed: int = typer.Option(0, "--seed", help="Seed for data, noise, training and projection."),
    force: bool = typer.Option(False, "--force", help="Reuse a non-empty --out folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the audit and the lookup as JSON."),
):
    """See it work in one command: fine-tune MiniLM on reviews with 20% flipped labels, index
    every layer, find the flipped labels again (NDR), and explain one prediction."""
    from .demo import run_demo

    with _progress() as progress:
        result = run_demo(out_dir, n_train=n_train, noise=noise, epochs=epochs, seed=seed,
                          force=force, progress=progress)
    if as_json:
        print(json.dumps({"audit": result.audit.to_json(), "lookup": result.lookup,
                          "files": {k: str(v) for k, v in result.files.items()},
                          "seconds": result.seconds}, indent=2, ensure_ascii=False))
        return
    kept = next((r for r in result.train.history if r.get("epoch") == result.train.chosen_epoch), {})
    console.rule("[bold]1. fine-tuning on noisy labels")
    console.print(f"MiniLM fine-tuned on {n_train} generated reviews, {result.train.n_noisy} of their labels "
                  f"flipped; kept epoch {result.train.chosen_epoch} (held-out accuracy "
                  f"{kept.get('eval_accuracy', float('nan')):.2f}).")
    console.rule("[bold]2. audit: can influence find the flipped labels?")
    console.print("Each training example is scored by how much it hurts 100 clean queries; NDR@p is the "
                  "share of flipped labels found in the first p% of that ranking (random: p).")
    render.print_audit(result.audit)
    best = result.audit.best()
    if best:
        console.print(f"best: [bold]{best['scope']}[/] with [bold]{best['agg']}[/] "
                      f"(AUC-NDR {best['auc_ndr']:.3f}; random {result.audit.baselines['random']['auc_ndr']:.3f})")
    console.rule("[bold]3. lookup: why this prediction?")
    render.print_query(result.lookup, result.label_names)
    console.rule("[bold]written")
    for name, path in result.files.items():
        console.print(f"{name:<24} {path}")
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
                  + f"; total {sum(result.seconds.values()):.0f} s")


from . import cli_grow  # noqa: E402,F401 (registers fit, merge, add and delete on the app)


def _interrupted(argv: list[str]) -> str:
    """What Ctrl-C left behind, for the command that was running."""
    command = next((a for a in argv if not a.startswith("-")), "")
    return {"build": "nothing was replaced; the partial build is kept: rerun the same command with --resume to continue.",
            "train": "nothing was written to --out.",
            "serve": "the server stopped."}.get(command, "nothing was written.")


@contextmanager
def _warnings_as_lines():
    """An ``InputWarning`` is one yellow line on stderr, every time; other warnings as Python shows them."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", InputWarning)
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not issubclass(category, InputWarning):
                return previous(message, category, filename, lineno, file, line)
            err.print(f"[yellow]warning:[/] {shown(str(message))}", highlight=False, soft_wrap=True)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps errors onto exit codes 1 (user error), 2 (bug), 130 (Ctrl-C)."""
    process.quiet_threads()
    try:
        with _warnings_as_lines():
            code = app(args=argv, standalone_mode=False)
    except USAGE_ERRORS as exc:
        exc.show()
        sys.exit(1)
    except UserError as exc:  # escaped: paths, texts and regexes may hold [brackets]
        err.print(f"[red]error:[/] {shown(str(exc))}", highlight=False, soft_wrap=True)
        process.leave(1)
    except (KeyboardInterrupt, click.Abort, typer.Abort):
        err.print(f"[yellow]interrupted[/]: {_interrupted(argv if argv is not None else sys.argv[1:])}")
        sys.exit(130)
    except Exception as exc:
        if STATE["debug"]:
            raise
        err.print(f"[red]internal error:[/] {type(exc).__name__}: {shown(str(exc))} (rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(2)
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "") if argv is None else ""
    process.leave(code if isinstance(code, int) else 0, at_once=command in process.AT_ONCE)  # the program only

