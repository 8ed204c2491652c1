"""The bottom layer's file helpers: one atomic writer, one file lock, JSON in and out, and one canonical hash.

Every result file, sbatch script and marker the project writes goes through :func:`atomic_write_text` (temporary
sibling, fsync, ``os.replace``), so a reader never sees a half-written file, whatever kills the writer; a directory
that must appear whole (a built-in model) goes through :func:`atomic_dir`.
:func:`file_lock` is the one inter-process lock (the stage cache's per-key lock, the sweep driver's lock on its run
directory, the built-in model build): ``filelock.FileLock``, which is ``fcntl.flock`` on Unix, so the kernel drops
it when its holder dies and a SIGKILLed process never leaves a stuck lock.
:func:`canonical_json` and :func:`config_hash` are the one definition of "the same configuration" behind trial ids,
stage-cache keys and the built-in model cache (docs/architecture.md, "Identity").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional


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


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Fill a directory that appears at ``final`` complete or not at all: the block writes into an empty temporary
    sibling (yielded), which is renamed to ``final`` when the block returns and deleted when it raises. The caller
    holds a lock or otherwise knows ``final`` does not exist yet (the stage cache has its own variant, because two
    nodes without cross-node locks may race for the same name: rlhf_ablate/run/cache.py)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_dir(path: Path | str) -> None:
    """Make a rename inside ``path`` durable: a rename is on disk only once its directory is synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LockBusy(Exception):
    """:func:`file_lock` with a ``timeout`` could not get the lock; ``holder`` is what the holder wrote."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def file_lock(path: Path | str, timeout: Optional[float] = None) -> Iterator[Path]:
    """Hold an exclusive inter-process lock on ``path`` (created if missing) for the ``with`` block.

    ``timeout=None`` waits as long as it takes; ``timeout=0`` tries once. On timeout :class:`LockBusy` names the
    holder, which the lock records in the file (``host=... pid=... since=...``) so that ``cat`` tells who builds a
    stage or drives a sweep. The file is never deleted: deleting a lock file while another process waits on its
    inode would let a third process lock a new inode and enter too (the filelock documentation says the same of
    its Unix lock). Locks across nodes need a file system whose ``flock`` is cluster-wide (docs/slurm.md).
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=-1 if timeout is None else timeout)
    try:
        lock.acquire()
    except Timeout:
        raise LockBusy(path, lock_holder(path)) from None
    try:
        # A separate descriptor for the holder line: filelock owns (and may reopen) its own.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"host={socket.gethostname()} pid={os.getpid()} "
                         f"since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
        finally:
            os.close(fd)
        yield path
    finally:
        lock.release()


def lock_holder(path: Path | str) -> str:
    """The holder line of a lock file (the last holder's, once released), or ''."""
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return ""


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


def config_hash(obj: Any, length: int = 64) -> str:
    """sha256 hex digest of :func:`canonical_json` (its first ``length`` hex digits): the one hash behind trial ids,
    stage-cache keys, built-in model directories and W&B run ids."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]
