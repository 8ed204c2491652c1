"""Where rows come from: a file's rows, each with its 1-based line number, for the readers (readers.py).

Every file may be a JSON array or JSON lines; we decide by the first non-space character (``[`` = array), not by
the extension, because the real KoChatGPT files are named ``*.jsonl`` but hold one indented JSON array (they are
written with ``json.dump(..., indent=4)`` in airobotlab/KoChatGPT ``kochatgpt_data_230320.ipynb``) and start with
a UTF-8 BOM in some copies.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError


def iter_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line, row, error) for every row; `error` is a message when the row is not valid JSON."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}).") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_array(path, text)
    else:
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line), None
            except json.JSONDecodeError as e:
                yield n, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _iter_array(path: Path, text: str) -> Iterator[tuple[int, Any, str | None]]:
    """Elements of a top-level JSON array with the line each starts on.

    A broken array cannot be resynchronised after the error, so invalid JSON here is always fatal (even with
    skip_bad_rows): the message names the line where the parser stopped.
    """
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    ws = re.compile(r"[\s,]*")
    while True:
        pos = ws.match(text, pos).end()
        if pos >= len(text):
            raise DataError(f"{path}: line {text.count(chr(10)) + 1}: JSON array is not closed with ']'.")
        if text[pos] == "]":
            rest = text[pos + 1:].strip()
            if rest:
                raise DataError(f"{path}: line {text.count(chr(10), 0, pos) + 1}: extra data after the JSON array.")
            return
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: invalid JSON in array ({e.msg}); a JSON array cannot be "
                            f"read past a syntax error, fix the file or convert it to JSON lines.") from None
        yield line, obj, None
