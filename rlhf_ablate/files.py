"""The bottom layer's file helpers: one atomic writer, JSON in and out, and one canonical hash.

Every artifact, result file, sbatch script and report the project writes goes through :func:`atomic_write_text`
(temporary sibling, fsync, ``os.replace``), so a reader never sees a half-written file, whatever kills the writer.
:func:`canonical_json` and :func:`config_hash` are the one definition of "the same configuration" behind trial ids,
stage-cache keys and the built-in model cache (docs/architecture.md, "Identity").
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _json_default(o: Any) -> Any:
    """numpy scalars, tensors and paths, as JSON; anything else is an error, not a silent ``str()``."""
    if hasattr(o, "item") and callable(o.item) and getattr(o, "ndim", 1) == 0:
        return o.item()
    if hasattr(o, "tolist") and callable(o.tolist):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_text(path: Path | str, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` so that it appears complete or not at all (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dumps(obj: Any) -> str:
    """The project's JSON text: UTF-8 Korean kept readable, numpy and tensors converted."""
    return json.dumps(obj, ensure_ascii=False, indent=1, default=_json_default)


def write_json(path: Path | str, obj: Any) -> Path:
    """Atomically write ``obj`` as JSON (see :func:`atomic_write_text`)."""
    return atomic_write_text(path, dumps(obj))


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, non-JSON values (paths, tuples) as strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(obj: Any) -> str:
    """sha256 hex digest of :func:`canonical_json`: the one hash behind trial ids and cache keys."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
