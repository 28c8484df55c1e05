"""The console entry point: ``lite-influence query INDEX --text ...`` answered by a running server
before typer, rich, numpy or torch load; everything else goes to the full CLI (cli.py).

Why: importing the typer app alone (typer, click, rich and what cli.py pulls in) cost 0.4 s of a
0.79 s query answered by a server (benchmarks/results/cold_query.md), against a goal of 0.5 s.
This module imports only the standard library, config.py (dataclasses) and client.py (urllib).

It reads the command line with the options as config.py declares them (``QueryConfig`` and
``QueryText``: flag, short flag, type), so no option is declared twice. It answers only what it
understands completely: the ``query`` command, one index, ``--text``, and options of those two
dataclasses. Anything else (another command, ``--file``, ``--id``, ``--local``, ``--help``, an
unknown flag, a value of the wrong type), or no live server for
the index (no state file, a stale one, a dead pid, a server that no longer serves it), falls
back to the full CLI, which then says what is wrong in its own words or answers locally. A
value that ``QueryConfig.validate`` refuses reaches the server, which refuses it with the same
line (exit 1).
"""

from __future__ import annotations

import json
import sys
import typing
from dataclasses import fields


def main() -> None:
    code = answer(sys.argv[1:])
    if code is None:
        from .cli import main as full_cli

        full_cli()
        return
    sys.stdout.flush()
    sys.exit(code)


def flags(*classes) -> dict[str, tuple[type, str, object]]:
    """Every flag of the dataclasses: '--name' (and its short form) -> (class, field, type);
    a bool's '--no-name' too, as typer makes it."""
    from .config import flag_of

    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
            names = [flag_of(f)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
            for name in names:
                out[name] = (cls, f.name, kind)
            if kind is bool:
                out["--no-" + flag_of(f)[2:]] = (cls, f.name, "off")
    return out


def parse(argv: list[str]):
    """(index folder, QueryText, QueryConfig) of ``query INDEX --text ... [options]``, or None
    when the line holds anything this parser does not fully understand."""
    from .config import QueryConfig, QueryText

    if len(argv) < 2 or argv[0] != "query":
        return None
    known, values, positional = flags(QueryText, QueryConfig), {QueryText: {}, QueryConfig: {}}, []
    words = list(argv[1:])
    while words:
        word = words.pop(0)
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        name, _, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        if name not in known:
            return None
        cls, field_name, kind = known[name]
        if kind in (bool, "off"):
            if inline:
                return None
            values[cls][field_name] = kind is bool
            continue
        if not inline and not words:
            return None
        raw = inline or words.pop(0)
        try:
            values[cls][field_name] = kind(raw)
        except (TypeError, ValueError):
            return None
    if len(positional) != 1 or values[QueryText].get("text") is None:
        return None
    return positional[0], QueryText(**values[QueryText]), QueryConfig(**values[QueryConfig])


def answer(argv: list[str]) -> int | None:
    """Exit code of a query a live server answered (0, or 1 for a request it refused, said in
    one line on stderr), or None: the full CLI must handle this command line."""
    from .errors import UserError

    parsed = parse(argv)
    if parsed is None:
        return None
    index, asked, config = parsed  # not validated here (that imports the store): the server checks
    from .client import query_server  # the request with the same code, and its 4xx is that line

    try:
        remote = query_server(index, config, text=asked.text, pair=asked.pair, label=asked.label,
                              completion=asked.completion)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError:
        return None  # the server failed: answer locally instead
    if remote is None:
        return None
    result, entry = remote
    if asked.as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        from . import render

        render.print_query(result, entry["label_names"])
    return 0
