"""How results look on a terminal: the query's tables, the audit's table, sizes.

Apart from cli.py so that the command line stays about parsing and calling the API; every
user string goes through ``terminal.shown`` (control characters visible, no rich markup).
"""

from __future__ import annotations

from rich.console import Console
from .config import truthy
from .terminal import shown
from rich.table import Table

console = Console()


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def label_name(label, names: list[str]) -> str:
    """A stored label as the model names it (an id out of range, or a causal LM's, as it is)."""
    return names[label] if isinstance(label, int) and 0 <= label < len(names) else str(label)


def print_query(result: dict, names: list[str]) -> None:
    q = result["query"]
    pred = q["prediction"]
    lm = "completion_source" in q  # a completion is explained, not a label
    if "id" in q:  # training examples explained from their stored vectors
        shown_ids = ", ".join(f"#{x['id']}" for x in result["queries"])
        console.print(f"[bold]training example {shown_ids}[/]: {shown(q['text'])}"
                      + (f" [dim](label {shown(label_name(q['label'], names))})[/]" if q.get("label") is not None else ""))
    elif lm and len(result["queries"]) == 1:
        console.print(f"[bold]prompt[/]: {shown(q['text'])}")
        console.print(f"[bold]completion[/] ({q['completion_source']}, {q['completion_tokens']} tokens): "
                      f"{shown(q['completion'])}")
        console.print(f"loss {q['loss']:.3f} (summed over the completion's tokens); the model's argmax gives "
                      f"{q['argmax_matches']}/{q['completion_tokens']} of them")
    elif lm:
        greedy = sum(x["argmax_matches"] == x["completion_tokens"] for x in result["queries"])
        console.print(f"[bold]{len(result['queries'])} queries[/], {greedy} whose completion is the model's argmax")
    elif len(result["queries"]) == 1:
        console.print(f"[bold]query[/]: {shown(q['text'])}" + (f"  [dim]|[/] {shown(q['pair'])}" if q["pair"] else ""))
        source = {"given": "the label asked for", "prediction": "the prediction"}.get(q.get("label_source"), "")
        console.print(f"prediction: [bold]{pred['label_name']}[/] (p={pred['probability']:.2f}); "
                      f"explaining label [bold]{q['label_name']}[/]" + (f" ({source})" if source else "")
                      + f", loss {q['loss']:.3f}")
    else:
        correct = sum(x["prediction"]["label"] == x["label"] for x in result["queries"])
        console.print(f"[bold]{len(result['queries'])} queries[/], {correct} predicted as labelled")
    if result.get("warning"):
        console.print(f"[yellow]warning[/]: {shown(result['warning'])}")
    if result["k_clamped"]:
        console.print(f"[yellow]note[/]: -k is larger than the index; showing all {result['k']} examples.")
    score = {"vote": "votes", "rank": "mean rank", "mean": "mean score"}[result["agg"]]
    target = "completion" if lm else "label"
    curved = ", curvature" if result.get("score") == "curvature" else ""
    for side, colour, blurb in (("proponents", "green", f"pushed towards this {target}"),
                                ("opponents", "red", "pushed against it")):
        table = Table(title=f"[{colour}]{side}[/]: {blurb} ({result['agg']} over {len(result['layers'])} layers, {result['metric']}{curved})",
                      expand=True, title_justify="left")
        table.add_column("id", justify="right", no_wrap=True)
        table.add_column(score, justify="right", no_wrap=True)
        columns = ("prompt", "completion") if lm else ("label", "text")
        # texts wrap (an 80-column terminal still shows whole sentences); the layers whose own
        # top k holds the row are counted here and named in --json (retrieved_in)
        table.add_column(columns[0], overflow="fold", ratio=1 if lm else None, max_width=None if lm else 12)
        table.add_column(columns[1], ratio=3 if lm else 1, overflow="fold")
        table.add_column("in top k", no_wrap=True, justify="right")
        for row in result[side]:
            name = label_name(row["label"], names)
            flag = " [yellow](noisy)[/]" if truthy(row["extra"].get("noisy", "")) else ""
            cells = ((shown(str(row["text"])), shown(str(row.get("completion"))) + flag) if lm
                     else (shown(name) + flag, shown(str(row["text"]))))
            table.add_row(str(row["id"]), f"{row['score']:.3g}", *cells, f"{len(row['retrieved_in'])}/{len(result['layers'])}")
        console.print(table)


def print_audit(result) -> None:
    """The headline (the default setting's answer beside the baselines it must beat), then the
    comparison table when the audit scored more than one scope or aggregation."""
    from .ndr import level_key

    levels = [level_key(p) for p in result.levels]
    has_ndr = result.noisy is not None
    title = (f"{result.n:,} training examples, {result.n_queries} queries ({result.n_correct} predicted correctly)"
             + (f", {int(result.noisy.sum())} known noisy" if has_ndr else "")
             + (", curvature" if getattr(result, "score", "gradient") == "curvature" else ""))
    headline = result.headline_rows()
    if headline:
        table = Table("headline", *[c.upper() for c in levels], "AUC-NDR", title=title, title_justify="left")
        for number, (name, values) in enumerate(headline):
            style = "bold" if number == 0 else "dim" if name in ("random", "perfect") else ""
            table.add_row(*[f"[{style}]{cell}[/]" if style else cell
                            for cell in [name, *(f"{values[c]:.3f}" for c in levels + ["auc_ndr"])]])
        console.print(table)
        title = "comparison"
    if headline and len({(row["scope"], row["agg"].removesuffix("-c")) for row in result.table}) == 1:
        _notes(result)
        return
    table = Table("scope", "agg", *([c.upper() for c in levels] + ["AUC-NDR"] if has_ndr else ["top 5 most detrimental"]),
                  title=title, title_justify="left")
    best = {c: max((r[c] for r in result.table), default=None) for c in levels + ["auc_ndr"]} if has_ndr else {}
    for row in result.table:
        if has_ndr:
            cells = [f"[bold green]{row[c]:.3f}[/]" if row[c] == best[c] else f"{row[c]:.3f}" for c in levels + ["auc_ndr"]]
        else:
            cells = [", ".join(str(i) for i in result.rankings[(row["scope"], row["agg"].removesuffix("-c"),
                                                                 "correct" if row["agg"].endswith("-c") else "all")][0][:5])]
        table.add_row(row["scope"], row["agg"], *cells)
    for name, values in ([] if headline else result.baselines.items()):  # the headline has them
        table.add_row(f"[dim]{name}[/]", "", *[f"[dim]{values[c]:.3f}[/]" for c in levels + ["auc_ndr"]])
    console.print(table)
    _notes(result)


def _notes(result) -> None:
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}")


def human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def lineage(manifest: dict) -> list[str]:
    """How an index came to be beyond one build, a line each: the shard it is, the shards it
    was merged from, and every add and delete since (``info``)."""
    lines = []
    if "shard" in manifest:
        shard = manifest["shard"]
        lines.append(f"shard {shard['index']} of {shard['count']} ({manifest['n']:,} of {shard['rows']:,} rows); "
                     "join the shards with `lite-influence merge`")
    if manifest.get("merged_from"):
        lines.append(f"merged from {len(manifest['merged_from'])} shards")
    for entry in manifest.get("history", []):
        if entry.get("op") == "add":
            lines.append(f"{entry.get('at', '')}: added {entry['rows']:,} rows (ids from {entry['first_id']:,}) "
                         f"from {entry['file']}")
        elif entry.get("op") == "delete":
            lines.append(f"{entry.get('at', '')}: deleted {entry['removed']:,} rows ({entry['selector']})")
    return lines


def projection_summary(manifest: dict) -> str:
    """The projection as built: its kind and the widths its projected matrices kept (mixed's
    output widths vary by matrix under --energy, so a range, with the share that set them)."""
    build = manifest["build"]
    projected = [u for layer in manifest["layers"] if layer.get("kind") != "tokens" for u in layer["units"]
                 if (u.get("k_in"), u.get("k_out")) != (u.get("in_dim"), u.get("out_dim"))]
    if not projected or "k_out" not in projected[0]:
        side = build["proj_dim"] if build.get("proj_dim_in") in (None, build["proj_dim"]) else None
        return f"{build['projection']}, " + (f"{side} per side" if side else
                                             f"{build['proj_dim_in']} in x {build['proj_dim']} out")
    ins, outs = sorted({u["k_in"] for u in projected}), sorted({u["k_out"] for u in projected})
    width = lambda ks: f"{ks[0]}" if len(ks) == 1 else f"{ks[0]}-{ks[-1]}"  # noqa: E731
    energy = build.get("energy") or 0
    note = f" (output sides hold {energy:.0%} of their gradient energy)" if energy and len(outs) > 1 else ""
    if ins == outs and len(ins) == 1:
        return f"{build['projection']}, {ins[0]} per side"
    return f"{build['projection']}, {width(ins)} in x {width(outs)} out{note}"
