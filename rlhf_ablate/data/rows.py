"""Where rows come from: a file (JSON array, JSON lines, Parquet, CSV/TSV, gzipped JSON) or a ``datasets``
``save_to_disk`` directory, as :class:`Table`s whose rows carry their location ("line 12", "row 7") for errors.

JSON files may be an array or JSON lines whatever the extension: we decide by the first non-space character
(``[`` = array), because the real KoChatGPT files are named ``*.jsonl`` but hold one indented JSON array (they are
written with ``json.dump(..., indent=4)`` in airobotlab/KoChatGPT ``kochatgpt_data_230320.ipynb``) and start with a
UTF-8 BOM in some copies. An array is read element by element with ``json.JSONDecoder.raw_decode`` and the line count
is carried forward, so reading is linear (counting newlines from the start of the file for every element made 48k
rows take 39 s, issue 11) and strict: a missing comma, two commas in a row or a trailing comma is an error that names
the line, as it is for ``json.loads``.

A JSON string may hold a lone UTF-16 surrogate (``"\\ud800"``): ``json`` accepts the escape, but the text cannot be
encoded as UTF-8 later (tokenizers, hashing, writing files). Such a row is a bad row like any other, named by line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DataError

Row = tuple[str, Any, "str | None"]  # (location, row, error message or None)

JSON_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TABLE_EXTS = JSON_EXTS + (".parquet", ".csv", ".tsv")


@dataclass
class Table:
    """Rows of one file or one split. ``label`` names it in messages (a path, or "DIR split 'train'")."""

    label: str
    rows: Callable[[], Iterator[Row]]


# ---------------------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------------------

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_WS = re.compile(r"[ \t\n\r]*")


def _surrogate_field(obj: Any, where: str = "") -> str | None:
    """The field that holds a lone surrogate (json joins valid pairs into one character, so any left is lone)."""
    if isinstance(obj, str):
        return (where or "the row") if _SURROGATE.search(obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _surrogate_field(k, where) or _surrogate_field(v, f"{where}.{k}" if where else f"field '{k}'")
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _surrogate_field(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _surrogate_error(obj: Any) -> str | None:
    where = _surrogate_field(obj)
    if where is None:
        return None
    return (f"{where} holds a lone UTF-16 surrogate (an escape like \\ud800 without its pair), which is not valid "
            f"Unicode text")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a data file.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}).") from None
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e}).") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        hint = " (it looks like UTF-16: save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}){hint}.") from None


def json_rows(path: Path) -> Iterator[Row]:
    """Rows of a JSON array or JSON-lines file (see the module docstring)."""
    text = _read_text(path)
    check = _SURROGATE_ESCAPE.search(text) is not None  # the common case pays nothing for the surrogate check
    start = _JSON_WS.match(text).end()
    if text.startswith("[", start):
        yield from _array_rows(path, text, start + 1, check)
        return
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if n == 1 and line.lstrip().startswith("{") and _whole_object(text):
                raise DataError(f"{path}: holds one JSON object, not rows; expected JSON lines (one object per "
                                f"line) or a JSON array of objects.") from None
            yield f"line {n}", None, f"invalid JSON ({e.msg} at column {e.colno})"
            continue
        yield f"line {n}", obj, _surrogate_error(obj) if check else None


def _whole_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _array_rows(path: Path, text: str, pos: int, check: bool) -> Iterator[Row]:
    """Elements of a top-level JSON array, each with the line it starts on; linear in the file size.

    A broken array cannot be resynchronised after a syntax error, so invalid JSON here is always fatal (even with
    skip_bad_rows): the message names the line where the parser stopped."""
    dec = json.JSONDecoder()
    n = len(text)
    line, counted = 1 + text.count("\n", 0, pos), pos  # newlines are counted once, from `counted` on
    want_value, first, comma = True, True, pos

    def where(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    def fail(p: int, what: str) -> DataError:
        return DataError(f"{path}: line {where(p)}: {what}; a JSON array cannot be read past a syntax error (fix "
                         f"the file, or write it as JSON lines).")

    while True:
        pos = _JSON_WS.match(text, pos).end()
        if pos >= n:
            raise fail(pos, "the JSON array is not closed with ']'")
        c = text[pos]
        if c == "]":
            if want_value and not first:
                raise fail(comma, "a comma before ']' (trailing comma)")
            end = _JSON_WS.match(text, pos + 1).end()
            if end < n:
                raise fail(end, "extra data after the JSON array")
            return
        if not want_value:
            if c != ",":
                raise fail(pos, "expected ',' or ']' after an array element (a missing comma?)")
            comma, pos, want_value = pos, pos + 1, True
            continue
        if c == ",":
            raise fail(pos, "two commas in a row (an empty array element)" if not first else
                       "a comma before the first element")
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: invalid JSON in array ({e.msg}); a JSON array cannot be "
                            f"read past a syntax error (fix the file, or write it as JSON lines).") from None
        yield f"line {where(pos)}", obj, _surrogate_error(obj) if check else None
        pos, want_value, first = end, False, False


# ---------------------------------------------------------------------------------------------------------
# Parquet, CSV, save_to_disk
# ---------------------------------------------------------------------------------------------------------

def parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]}).") from None
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"row {n}", row, None


# CSV cells are text; these columns hold numbers or lists (ranks), which we read as JSON when they look like it.
_JSON_CELL = re.compile(r"^(rank\d*|ranking|messages)$")


def csv_rows(path: Path) -> Iterator[Row]:
    text = _read_text(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long answers exceed the default 128 KiB per cell
    # newline="": csv splits records itself, so a quoted cell may hold line breaks (the csv module docs)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{path}: line 1: not valid CSV ({e}).") from None
    if not header:
        raise DataError(f"{path}: empty CSV file (no header line).")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"{path}: line 1: the header names column(s) {dup} twice.")
    start = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({e}).") from None
        loc, start = f"line {start}", reader.line_num + 1
        if not cells:
            continue
        if len(cells) != len(header):
            yield loc, None, f"has {len(cells)} cells but the header has {len(header)} columns"
            continue
        row: dict[str, Any] = {}
        for k, v in zip(header, cells):
            if _JSON_CELL.match(k) and v.strip():
                try:
                    v = json.loads(v)
                except ValueError:
                    pass  # left as text: the reader says what it expected
            row[k] = v
        yield loc, row, None


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def dataset_tables(obj: Any, label: str) -> dict[str, Table]:
    """A ``datasets`` Dataset (one table, named '') or DatasetDict (one per split) as tables."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        return {str(split): _dataset_table(ds, f"{label} split '{split}'") for split, ds in obj.items()}
    return {"": _dataset_table(obj, label)}


def _dataset_table(ds: Any, label: str) -> Table:
    def rows() -> Iterator[Row]:
        n = 0
        for batch in ds.iter(batch_size=2048):  # honours select()/shuffle() indices, unlike the raw Arrow table
            cols = list(batch)
            for values in zip(*(batch[c] for c in cols)):
                n += 1
                yield f"row {n}", dict(zip(cols, values)), None

    return Table(label, rows)


def load_saved(path: Path) -> dict[str, Table]:
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable save_to_disk dataset ({' '.join(str(e).split())[:200]}).") from None
    return dataset_tables(obj, str(path))


def open_path(path: Path) -> dict[str, Table]:
    """The tables of a file or save_to_disk directory: one table named '' for a file or a Dataset, one per split
    for a DatasetDict."""
    name = path.name.lower()
    if path.is_dir():
        if is_saved_dataset(path):
            return load_saved(path)
        raise DataError(f"{path}: a directory, but not a save_to_disk dataset (no dataset_dict.json, or state.json "
                        f"and dataset_info.json).")
    if not path.exists():
        raise DataError(f"{path}: file not found.")
    if name.endswith((".parquet", ".pq")):
        return {"": Table(str(path), lambda: parquet_rows(path))}
    if name.endswith((".csv", ".tsv")):
        return {"": Table(str(path), lambda: csv_rows(path))}
    if name.endswith(JSON_EXTS) or "." not in name:
        return {"": Table(str(path), lambda: json_rows(path))}
    raise DataError(f"{path}: unknown file type; data files are JSON lines or a JSON array (.jsonl, .json, "
                    f"optionally .gz), Parquet (.parquet) or CSV/TSV (.csv, .tsv).")


def iter_rows(path: Path) -> Iterator[Row]:
    """Rows of one file (any format of :func:`open_path` with a single table)."""
    tables = open_path(Path(path))
    if len(tables) != 1:
        raise DataError(f"{path}: holds the splits {sorted(tables)}; name one of them (DIR/split).")
    yield from next(iter(tables.values())).rows()
