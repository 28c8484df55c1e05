"""The manifest's one schema, checked once when an index is opened.

Everything that reads an index afterwards (search, ``info``, the query session, the audit)
trusts these fields, so a hand-edited or damaged manifest fails here, with the file's name and
"rebuild the index", instead of as a KeyError or TypeError deep inside a query (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

FORMAT_VERSION = 2  # 2: a layer may be of kind "tokens" (the embeddings' exact token side)
LAYER_KINDS = ("dense", "tokens")
MANIFEST = "manifest.json"
METRICS = ("cosine", "dot")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# field -> (check, what it must be); nested dicts by dotted path
SCHEMA = {
    "format_version": (_positive_int, "a positive integer"),
    "n": (_positive_int, "a positive integer"),
    "metric": (lambda v: v in METRICS, f"one of {', '.join(METRICS)}"),
    "index_factory": (lambda v: isinstance(v, str), "a string"),
    "label_names": (_strings, "a list of strings"),
    "model": (lambda v: isinstance(v, dict), "an object"),
    "model.path": (lambda v: isinstance(v, str), "a string"),
    "model.fingerprint": (lambda v: isinstance(v, str), "a string"),
    "data": (lambda v: isinstance(v, dict), "an object"),
    "build": (lambda v: isinstance(v, dict), "an object"),
    "build.projection": (lambda v: isinstance(v, str), "a string"),
    "build.proj_dim": (_positive_int, "a positive integer"),
    "build.seed": (_int, "an integer"),
    "layers": (lambda v: isinstance(v, list) and v, "a non-empty list"),
    "groups": (lambda v: isinstance(v, dict) and all(_strings(g) for g in v.values()),
               "an object of lists of layer names"),
}
LAYER_SCHEMA = {
    "name": (lambda v: isinstance(v, str) and v and "/" not in v and not v.startswith("."),
             "a file-safe name"),
    "dim": (_positive_int, "a positive integer"),
    "units": (lambda v: isinstance(v, list) and all(isinstance(u, dict) and isinstance(u.get("name"), str)
                                                     for u in v), "a list of units with names"),
}
OPTIONAL_LAYER_SCHEMA = {  # absent in format 1 (every layer dense)
    "kind": (lambda v: v in LAYER_KINDS, f"one of {', '.join(LAYER_KINDS)}"),
    "entries": (lambda v: _int(v) and v >= 0, "a count"),
    "exact_norms": (lambda v: isinstance(v, bool), "true or false"),  # layers/NAME.exact_norms.npy
}


def _get(data: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"field '{dotted}' is missing")
        data = data[key]
    return data


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def problem(manifest) -> str | None:
    """What is wrong with a manifest (one phrase), or None when it matches the schema."""
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    try:
        for field, (check, expected) in SCHEMA.items():
            value = _get(manifest, field)
            if not check(value):
                return f"field '{field}' is {_short(value)}, it must be {expected}"
        seen = set()
        for number, layer in enumerate(manifest["layers"]):
            for field, (check, expected) in LAYER_SCHEMA.items():
                if not isinstance(layer, dict) or field not in layer or not check(layer[field]):
                    value = layer.get(field, "missing") if isinstance(layer, dict) else layer
                    return f"layers[{number}].{field} is {_short(value)}, it must be {expected}"
            for field, (check, expected) in OPTIONAL_LAYER_SCHEMA.items():
                if field in layer and not check(layer[field]):
                    return f"layers[{number}].{field} is {_short(layer[field])}, it must be {expected}"
            if layer["name"] in seen:
                return f"layer '{layer['name']}' appears twice"
            seen.add(layer["name"])
        issue = _checkpoints_problem(manifest.get("checkpoints"))
        if issue:
            return issue
        for group, members in manifest["groups"].items():
            unknown = [m for m in members if m not in seen]
            if unknown:
                return f"group '{group}' names unknown layer '{unknown[0]}'"
    except ValueError as exc:
        return str(exc)
    return None


def _checkpoints_problem(entries) -> str | None:
    """TracIn-CP's checkpoints (``tracin.py``), when present: named sub-indexes with positive
    weights, the index itself (".") last."""
    if entries is None:
        return None
    if not isinstance(entries, list) or len(entries) < 2 or not isinstance(entries[-1], dict) \
            or entries[-1].get("index") != ".":
        return "field 'checkpoints' must list two or more checkpoints, the index itself ('.') last"
    for number, entry in enumerate(entries):
        index = entry.get("index") if isinstance(entry, dict) else None
        weight = entry.get("weight") if isinstance(entry, dict) else None
        if not isinstance(index, str) or ".." in Path(index).parts or Path(index).is_absolute() \
                or isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 \
                or not isinstance(entry.get("model"), str):
            return f"checkpoints[{number}] is {_short(entry)}, it must name its index, model and a positive weight"
    return None


def read_manifest(root: Path) -> dict:
    """The manifest of the index at ``root``, checked against the schema (UserError if not)."""
    file = root / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{file} is damaged ({type(exc).__name__}: {exc}); rebuild the index.") from None
    if isinstance(manifest, dict) and _positive_int(manifest.get("format_version")) \
            and manifest["format_version"] > FORMAT_VERSION:
        raise UserError(f"index '{root}' has format {manifest['format_version']}, newer than this "
                        f"lite-influence reads ({FORMAT_VERSION}); upgrade lite-influence.")
    issue = problem(manifest)
    if issue:
        raise UserError(f"{file} is damaged ({issue}); rebuild the index.")
    return manifest
