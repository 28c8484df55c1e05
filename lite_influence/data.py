"""Reading training and query rows, their texts, text pairs and labels; seeded label noise.

Everything a user can get wrong in a data file (a missing column, a stray byte, a label the
model does not know) surfaces here as a one-line ``UserError`` naming the file, the line or row
and the fix, so the slow gradient passes downstream only ever see clean inputs.

Decisions where the design was silent:

- Text is read as UTF-8; a leading byte-order mark (Excel's "CSV UTF-8") is dropped.
- CSV uses the ``csv`` module's default dialect (double quotes, ``QUOTE_MINIMAL``), so a
  field may hold quotes, commas and newlines when quoted. TSV is read as GLUE and most corpora
  write it: one row per line, split on tabs, with no quote processing (``QUOTE_NONE``, pandas'
  ``quoting=3``), so a sentence that starts with ``"`` stays one row with its quote; reading
  it with quote processing merged 40 rows into 34. Hence a TSV field cannot hold a tab or a
  newline, and ``write_rows`` refuses to write one (use .csv or .jsonl). Blank lines are
  skipped; a line with a different number of fields from the header, or a repeated header
  name, is an error naming the line, so the number of examples is the number of data lines.
- Parquet files are read with ``pyarrow`` (a dependency of ``datasets``), whole, as rows; a
  ``save_to_disk`` folder with ``datasets`` itself. Our own readers stay for CSV/TSV/JSON:
  importing ``datasets`` costs about 0.9 s here, and its errors do not name the bad line.
- JSON lines: blank lines are skipped, every other line must be one JSON object. A ``.json``
  file whose first non-blank character is ``[`` is read as one array of objects.
- Row numbers in messages are 1-based data rows (the header is not a row); line numbers are
  physical lines in the file.
- Text and pair values must be non-blank after stripping whitespace; numbers and booleans are
  turned into text with ``str()``, lists and dicts are refused (they are not one text).
- A label is a valid id when it is one of ``label2id``'s values (for the usual contiguous
  ``0..K-1`` this is ``0 <= v < len(label2id)``).
- ``write_rows`` writes ``\\n`` line ends, creates missing parent folders and keeps only
  ``columns``; in CSV/TSV every value comes back as a string and ``None`` comes back as ``""``.
- ``flip_labels`` counts ``round(fraction * N)`` with half-to-even rounding, after snapping
  float noise (``0.05 * 50``) to the nearest half, as ``ndr`` does for its cutoffs.
- ``fingerprint_file`` of a folder hashes every file in it, hidden ones included, each as its
  relative POSIX path, its byte length and its sha256, so renames and moved bytes both show.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lite_influence.errors import UserError

__all__ = [
    "Examples",
    "read_rows",
    "load_examples",
    "load_lm_examples",
    "label_id",
    "with_label_ids",
    "flip_labels",
    "stratified_sample",
    "fingerprint_file",
    "write_rows",
    "TEXT_COLUMNS",
    "LABEL_COLUMNS",
]

TEXT_COLUMNS = ("text", "sentence", "prompt", "content", "question")
LABEL_COLUMNS = ("label", "labels")
COMPLETION_COLUMNS = ("completion", "response", "answer", "output", "target")
_FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_WRITE_FORMATS = (".csv", ".tsv", ".jsonl")
_SUPPORTED = ".csv, .tsv, .jsonl, .json, .parquet or a folder saved with datasets' save_to_disk"
_MAX_LISTED = 20


# ---------------------------------------------------------------- reading rows


def read_rows(path) -> tuple[list[dict], list[str]]:
    """One entry point for every input format, so the CLI and the library accept the same files."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path} does not exist; check the path ({_SUPPORTED}).")
    if p.is_dir():
        rows, columns = _read_saved_dataset(p)
    else:
        rows, columns = _read_file(p)
    if not rows:
        raise UserError(f"{path} is empty; it needs a header (or keys) and at least one data row.")
    return rows, columns


def _read_file(p: Path) -> tuple[list[dict], list[str]]:
    ext = p.suffix.lower()
    if ext not in _FILE_FORMATS:
        raise UserError(f"{p} has an unsupported extension {ext or '(none)'!r}; use {_SUPPORTED}.")
    if ext == ".parquet":
        return _read_parquet(p)
    if ext in (".csv", ".tsv"):
        return _read_utf8(p, lambda f: _parse_delimited(f, p, "\t" if ext == ".tsv" else ","))
    return _read_utf8(p, lambda f: _parse_json(f, p, allow_array=ext == ".json"))


def _read_utf8(p: Path, parse):
    """Decoding in C is fast; only when it fails do we rescan byte lines to name the bad one."""
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            return parse(f)
    except UnicodeDecodeError:
        line = _first_bad_line(p)
        raise UserError(f"{p} is not UTF-8 text (bad bytes on line {line}); re-save it as UTF-8.") from None


def _first_bad_line(p: Path) -> int:
    """A newline byte never occurs inside a multi-byte UTF-8 character, so lines decode alone."""
    with open(p, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def _raise_field_limit() -> None:
    """Long documents exceed csv's 128 KiB default field size; sys.maxsize overflows a C long
    on some platforms, so halve until accepted."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _parse_delimited(f, p: Path, delimiter: str) -> tuple[list[dict], list[str]]:
    _raise_field_limit()
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
    try:
        header = _next_nonblank(reader)
        if header is None:
            return [], []
        _check_header(header, p)
        rows = [_row_dict(fields, header, reader.line_num, p) for fields in reader if fields]
    except csv.Error as e:
        raise UserError(f"line {reader.line_num} of {p} is not valid {_kind(p)} ({e}); fix or remove it.") from None
    return rows, list(header)


def _kind(p: Path) -> str:
    return "TSV" if p.suffix.lower() == ".tsv" else "CSV"


def _next_nonblank(reader) -> list[str] | None:
    for fields in reader:
        if fields:
            return fields
    return None


def _check_header(header: list[str], p: Path) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise UserError(f"the header of {p} repeats column {name!r}; rename one of them.")
        seen.add(name)


def _row_dict(fields: list[str], header: list[str], line: int, p: Path) -> dict:
    """A field-count mismatch usually means a stray quote or delimiter swallowed part of a line,
    which would silently corrupt texts, so it stops the read."""
    if len(fields) != len(header):
        fix = ("TSV has no quoting: remove the stray tab from that text, or save the file as .csv or .jsonl"
               if p.suffix.lower() == ".tsv" else "quote fields that contain the delimiter, quotes or newlines")
        raise UserError(f"line {line} of {p} has {len(fields)} fields but the header has {len(header)}; {fix}.")
    return dict(zip(header, fields))


def _parse_json(f, p: Path, allow_array: bool) -> tuple[list[dict], list[str]]:
    if allow_array:
        text = f.read()
        if text.lstrip().startswith("["):
            return _parse_json_array(text, p)
        return _parse_json_lines(text.split("\n"), p, allow_array)
    return _parse_json_lines(f, p, allow_array)


def _parse_json_array(text: str, p: Path) -> tuple[list[dict], list[str]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"line {e.lineno} of {p} is not valid JSON ({e.msg}); fix the file.") from None
    for i, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise UserError(f"item {i} of the array in {p} is {_json_type(item)}, not a JSON object; "
                            f"make every item an object of column: value.")
    return _union_rows(items)


def _parse_json_lines(lines: Iterable[str], p: Path, allow_array: bool) -> tuple[list[dict], list[str]]:
    hint = " (a .json file must hold one object per line or one array of objects)" if allow_array else ""
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"line {number} of {p} is not valid JSON ({e.msg}){hint}; fix or remove it.") from None
        if not isinstance(item, dict):
            raise UserError(f"line {number} of {p} is {_json_type(item)}, not a JSON object{hint}; "
                            f"write one object of column: value per line.")
        items.append(item)
    return _union_rows(items)


def _json_type(item: Any) -> str:
    names = {list: "a list", dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(item), "a number")


def _union_rows(items: list[dict]) -> tuple[list[dict], list[str]]:
    """JSON lines may omit keys; the union in first-seen order gives every row the same columns."""
    columns = list(dict.fromkeys(key for item in items for key in item))
    return [{c: item.get(c) for c in columns} for item in items], columns


def _read_parquet(p: Path) -> tuple[list[dict], list[str]]:
    try:
        import pyarrow.parquet as pq  # lazy: heavy, and only needed for this one format
    except ImportError:
        raise UserError(f"{p} is a Parquet file but `pyarrow` is not installed; run `pip install datasets`.") from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{p} is not a readable Parquet file ({type(e).__name__}: {e}); re-export it.") from None
    return table.to_pylist(), list(table.column_names)


def _read_saved_dataset(p: Path) -> tuple[list[dict], list[str]]:
    if not ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        raise UserError(f"{p} is a folder but not a dataset saved with save_to_disk; pass a file ({_SUPPORTED}).")
    try:
        import datasets  # lazy: heavy, and only needed for this one format
    except ImportError:
        raise UserError(f"{p} is a saved Hugging Face dataset but `datasets` is not installed; "
                        f"run `pip install datasets`.") from None
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        ds = _train_split(ds, p)
    return ds.to_list(), list(ds.column_names)


def _train_split(dd, p: Path):
    if "train" in dd:
        return dd["train"]
    splits = ", ".join(dd.keys())
    first = next(iter(dd.keys()), "SPLIT")
    raise UserError(f"{p} has no 'train' split (splits: {splits}); pass one split's folder, e.g. {p / first}.")


# ---------------------------------------------------------------- examples


@dataclass(frozen=True)
class Examples:
    """Texts and label ids ready for tokenising, plus the original rows so the index can store
    every column next to its results."""

    texts: list[str]
    pairs: list[str] | None
    labels: list[int] | None
    rows: list[dict]
    columns: list[str]
    used_columns: tuple[str, ...] = ()  # text, pair and label columns; the rest are "extra"
    completions: list[str | None] | None = None  # causal LM: texts are then the prompts

    def __len__(self) -> int:
        return len(self.texts)


def load_examples(path, *, text_col=None, pair_col=None, label_col=None,
                  label2id: dict[str, int] | None = None, require_label=True, limit=None,
                  raw_labels=False) -> Examples:
    """Picks the columns (guessing the usual names) and validates only the rows that are kept,
    so a quick ``limit`` run on a huge file stays quick. ``raw_labels``: every label is checked
    to be there but kept as written, for ``with_label_ids`` once the model's label2id is known:
    build and train read and check their files this way before the model loads (seconds), so
    a bad file is the first and only error."""
    rows, columns = read_rows(path)
    text_col = _text_column(columns, text_col, path)
    pair_col = _given_column(columns, pair_col, "--pair-col", path) if pair_col is not None else None
    label_col = _label_column(columns, label_col, require_label, path)
    rows = rows[: _check_limit(limit)] if limit is not None else rows
    texts = [_text(r[text_col], i, text_col, path) for i, r in enumerate(rows, start=1)]
    pairs = [_text(r[pair_col], i, pair_col, path) for i, r in enumerate(rows, start=1)] if pair_col else None
    labels = None
    if label_col is not None:
        labels = [_row_label(r[label_col], label2id, i, label_col, path, raw_labels) for i, r in enumerate(rows, start=1)]
    _check_unique_ids(rows, columns, path)
    used = tuple(c for c in (text_col, pair_col, label_col) if c is not None)
    return Examples(texts=texts, pairs=pairs, labels=labels, rows=rows, columns=list(columns),
                    used_columns=used)


def load_lm_examples(path, *, text_col=None, completion_col=None, label_col=None, queries=False,
                     limit=None) -> Examples:
    """Prompt and completion rows for a causal language model (``texts`` are the prompts).

    The completion column is ``completion_col``, else the first of ``COMPLETION_COLUMNS``
    present; the prompt column ``text_col``, else the first of ``TEXT_COLUMNS``, else none
    (empty prompts). Prompts may be blank; completions may not. Without a completion column,
    training rows are whole texts (the text column is the completion, after an empty prompt),
    unless the file has a label column: then it is a classification file given to a causal
    model, which is refused, naming the columns. With ``queries``, the rows are prompts whose
    completion may be missing or blank (None: the model's greedy continuation is used).
    """
    rows, columns = read_rows(path)
    if completion_col is not None:
        completion_col = _given_column(columns, completion_col, "--completion-col", path)
    else:
        completion_col = next((c for c in COMPLETION_COLUMNS if c in columns), None)
    rows = rows[: _check_limit(limit)] if limit is not None else rows
    numbered = list(enumerate(rows, start=1))
    if completion_col is None:
        label = _label_column(columns, label_col, False, path)
        if label is not None and not queries:
            raise UserError(f"the model is a causal language model but {path} looks like a classification file "
                            f"(label column {label!r}, no completion column); columns are: {_names(columns)}; "
                            f"pass --completion-col (and --text-col for the prompt), or --task classification.")
        text_col = _text_column(columns, text_col, path)
        texts = [_text(r[text_col], i, text_col, path) for i, r in numbered]
        prompts, completions = (texts, [None] * len(texts)) if queries else ([""] * len(texts), texts)
    else:
        if text_col is not None:
            text_col = _given_column(columns, text_col, "--text-col", path)
        else:
            text_col = next((c for c in TEXT_COLUMNS if c in columns and c != completion_col), None)
        prompts = [_prompt(r[text_col], i, text_col, path) if text_col else "" for i, r in numbered]
        if queries:
            completions = [None if _blank(r[completion_col]) else _text(r[completion_col], i, completion_col, path)
                           for i, r in numbered]
        else:
            completions = [_text(r[completion_col], i, completion_col, path) for i, r in numbered]
    _check_unique_ids(rows, columns, path)
    used = tuple(c for c in (text_col, completion_col) if c is not None)
    return Examples(texts=prompts, pairs=None, labels=None, rows=rows, columns=list(columns),
                    used_columns=used, completions=completions)


def _blank(value) -> bool:
    return _missing(value) or (isinstance(value, str) and not value.strip())


def _prompt(value, row: int, column: str, path) -> str:
    """A prompt may be blank (the completion alone carries the loss), but must be text."""
    return "" if _blank(value) else _text(value, row, column, path)


def _check_unique_ids(rows: list[dict], columns: list[str], path) -> None:
    """An ``id`` column is the user's key for joining results back: it must name one row."""
    if "id" not in columns:
        return
    first: dict = {}
    for number, row in enumerate(rows, start=1):
        key = row.get("id")
        if key in first:
            raise UserError(f"id {key!r} appears in rows {first[key]} and {number} of {path}; "
                            "ids must be unique (rename the column if it is not a key).")
        first[key] = number


def _given_column(columns: list[str], name: str, flag: str, path) -> str:
    if name not in columns:
        raise UserError(f"column {name!r} not found in {path}; columns are: {_names(columns)}; "
                        f"pass {flag} with one of them.")
    return name


def _text_column(columns: list[str], name, path) -> str:
    if name is not None:
        return _given_column(columns, name, "--text-col", path)
    found = next((c for c in TEXT_COLUMNS if c in columns), None)
    if found is None:
        raise UserError(f"no text column in {path} (looked for {', '.join(TEXT_COLUMNS)}); "
                        f"columns are: {_names(columns)}; pass --text-col with one of them.")
    return found


def _label_column(columns: list[str], name, require_label: bool, path) -> str | None:
    if name is not None:
        return _given_column(columns, name, "--label-col", path)
    found = next((c for c in LABEL_COLUMNS if c in columns), None)
    if found is None and require_label:
        raise UserError(f"no label column in {path} (looked for {', '.join(LABEL_COLUMNS)}); "
                        f"columns are: {_names(columns)}; pass --label-col with one of them.")
    return found


def _names(columns: Sequence[str]) -> str:
    return ", ".join(str(c) for c in columns) or "(none)"


def _check_limit(limit) -> int:
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise UserError(f"limit must be a positive whole number of rows, got {limit!r}.")
    return int(limit)


def _text(value, row: int, column: str, path) -> str:
    """Blank texts give zero-token inputs whose gradients are meaningless, so they are refused."""
    if isinstance(value, (list, dict)):
        raise UserError(f"row {row} of {path} has {_json_type(value)} in column {column!r}, not text; "
                        f"store one string per row in that column.")
    text = value if isinstance(value, str) else ("" if _missing(value) else str(value))
    if not text.strip():
        raise UserError(f"row {row} of {path} has an empty {column!r}; fill it in or remove the row.")
    return text


def _missing(value) -> bool:
    """None, and the NaN that pandas writes for an empty cell, both mean no value."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row_label(value, label2id, row: int, column: str, path, raw: bool = False):
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        raise UserError(f"row {row} of {path} has no label in column {column!r}; fill it in or remove the row.")
    return value if raw else label_id(value, label2id, where=f" in row {row} of {path}")


def with_label_ids(examples: Examples, label2id: dict[str, int] | None, path, *, unnamed_hint: str = "") -> Examples:
    """The labels of ``load_examples(raw_labels=True)`` as ids of ``label2id``. A label name
    given to a head whose classes have no names (``unnamed``: a new head) cannot be any class
    yet; ``unnamed_hint`` says how the command names them (train: ``--label-names``)."""
    if examples.labels is None:
        return examples
    labels = []
    for row, value in enumerate(examples.labels, start=1):
        where = f" in row {row} of {path}"
        named = isinstance(value, str) and _as_int(value) is None and value not in (label2id or {})
        if named and unnamed_hint and label2id and unnamed(label2id):
            raise UserError(f"label {_show(value)}{where} is a name, but the model's classes have none yet "
                            f"({_label_list(label2id)}: a new head's); {unnamed_hint}")
        labels.append(label_id(value, label2id, where=where))
    return replace(examples, labels=labels)


def unnamed(label2id: dict[str, int]) -> bool:
    """Whether the classes carry transformers' placeholder names (LABEL_0, LABEL_1, ...)."""
    return all(name == f"LABEL_{i}" for name, i in label2id.items())


def label_names_in(examples: Examples, most: int = 10) -> list[str]:
    """The distinct label names of raw labels, in first-seen order (for a hint)."""
    names = dict.fromkeys(v for v in examples.labels or () if isinstance(v, str) and _as_int(v) is None)
    return list(names)[:most]


# ---------------------------------------------------------------- labels


def label_id(value, label2id: dict[str, int] | None = None, *, where: str = "") -> int:
    """Accepts either ids or the model's label names, because datasets ship both and the user
    should not have to convert one to the other. ``where`` (e.g. " in row 7 of a.csv") only
    locates the value in the error message."""
    number = _as_int(value)
    if label2id is None:
        if number is not None and number >= 0:
            return number
        raise UserError(f"label {_show(value)}{where} is not a non-negative integer id; use ids 0, 1, ... "
                        f"or give the label names (label2id) of the model.")
    if number is not None and number in set(label2id.values()):
        return number
    if isinstance(value, str) and value in label2id:
        return int(label2id[value])
    raise UserError(f"label {_show(value)}{where} is not one of the model's labels: {_label_list(label2id)}; "
                    f"use one of these ids or names.")


def _as_int(value) -> int | None:
    """1, "1", 1.0 and "1.0" (pandas writes integer columns with gaps as floats) all mean id 1."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, str):
        return _str_as_int(value)
    return None


def _str_as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _show(value) -> str:
    return f"'{value}'" if isinstance(value, str) else repr(value)


def _label_list(label2id: dict[str, int]) -> str:
    """Long label sets (ImageNet-sized) would swamp a one-line message, so only the first few."""
    pairs = sorted((int(i), name) for name, i in label2id.items())
    shown = ", ".join(f"{i} ({name})" for i, name in pairs[:_MAX_LISTED])
    return shown + (f", ... ({len(pairs)} in all)" if len(pairs) > _MAX_LISTED else "")


# ---------------------------------------------------------------- benchmark noise and sampling


def flip_labels(labels, fraction, num_classes, seed) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's label noise: the flipped examples are the ground truth NDR scores a
    ranking against, so the same seed must always flip the same examples to the same classes.
    Adding a uniform offset in 1..K-1 modulo K picks uniformly among the other classes."""
    y = _check_flip_args(labels, fraction, num_classes)
    n_flip = int(round(_half_snap(float(fraction) * y.size)))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(y.size, size=n_flip, replace=False)
    offsets = rng.integers(1, num_classes, size=n_flip)
    flipped = y.copy()
    flipped[chosen] = (y[chosen] + offsets) % num_classes
    noisy = np.zeros(y.size, dtype=bool)
    noisy[chosen] = True
    return flipped, noisy


def _check_flip_args(labels, fraction, num_classes) -> np.ndarray:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) or not 0 <= fraction < 1:
        raise UserError(f"the noise fraction must be in [0, 1), got {fraction!r}; pass e.g. 0.2 for 20%.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise UserError(f"flipping labels needs at least 2 classes, got num_classes={num_classes!r}.")
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise UserError("labels to flip must be a 1-D list of integer label ids.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"labels to flip must be ids in 0..{num_classes - 1}, found {y.min()}..{y.max()}; "
                        f"pass the model's number of classes.")
    return y


def _half_snap(x: float) -> float:
    """0.05 * 50 lands an ulp above 2.5, which would round up while the user means 2.5;
    snapping to the nearest half keeps round-half-even what a user expects (as in ndr)."""
    y = 2.0 * x
    r = round(y)
    return r / 2.0 if abs(y - r) <= 1e-9 * max(1.0, abs(y)) else x


def stratified_sample(labels, n, seed) -> np.ndarray:
    """A small query or influence set must keep the class balance of the full set, or the
    per-class influence averages it feeds are skewed; sorted so rows keep file order."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise UserError("labels to sample from must be a 1-D list, one label per example.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= y.size:
        raise UserError(f"cannot sample {n!r} examples from {y.size}; ask for a whole number from 0 to {y.size}.")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    sizes = _largest_remainder(counts, int(n))
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(inverse == k), size=s, replace=False) for k, s in enumerate(sizes)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def _largest_remainder(counts: np.ndarray, n: int) -> np.ndarray:
    """Hamilton apportionment: floors, then one more to the largest fractional parts (ties go
    to the class that sorts first), so sizes sum to exactly n and none exceeds its class."""
    quotas = counts * n / counts.sum()
    sizes = np.floor(quotas).astype(np.int64)
    order = np.argsort(-(quotas - sizes), kind="stable")
    sizes[order[: n - int(sizes.sum())]] += 1
    return sizes


# ---------------------------------------------------------------- fingerprints and writing


def fingerprint_file(path) -> str:
    """The index manifest records this so a query can tell that the training data changed
    since the build (``fingerprint.fingerprint_path``: streamed, and cached per file)."""
    from .fingerprint import fingerprint_path

    if not Path(path).exists():
        raise UserError(f"{path} does not exist; check the path.")
    return fingerprint_path(Path(path))


def write_rows(path, rows: Iterable[dict], columns: Sequence[str]) -> Path:
    """Atomic (the store's write_file: temp file, fsync, rename) so a crash or a concurrent reader
    never sees half a file. CSV/TSV hold strings only: values come back as str, None as ""."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in _WRITE_FORMATS:
        raise UserError(f"cannot write {path}: unsupported extension {ext or '(none)'!r}; use .csv, .tsv or .jsonl.")
    from .store.atomic import write_file

    p.parent.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            _write_body(f, ext, rows, list(columns))

    return write_file(p, fill)


def _write_body(f, ext: str, rows: Iterable[dict], columns: list[str]) -> None:
    if ext == ".jsonl":
        for row in rows:
            f.write(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False, default=_json_default) + "\n")
        return
    if ext == ".tsv":
        rows = [_tsv_row(row, columns) for row in rows]
        writer = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, quotechar=None)
    else:
        writer = csv.writer(f, delimiter=",", lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([row.get(c) for c in columns] for row in rows)


def _tsv_row(row: dict, columns: list[str]) -> dict:
    """TSV is read without quoting, so a value that holds a tab or a line break cannot be
    written to it without becoming two fields or two rows."""
    for c in columns:
        value = row.get(c)
        if isinstance(value, str) and any(ch in value for ch in "\t\n\r"):
            raise UserError(f"column {c!r} holds a tab or a line break ({value[:40]!r}), which TSV cannot "
                            "store; write .csv or .jsonl instead.")
    return row


def _json_default(value):
    """numpy scalars and arrays (labels, scores) are common in rows; anything else is a bug."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} value as JSON")
