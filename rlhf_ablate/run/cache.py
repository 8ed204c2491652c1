"""Content-addressed stage cache: keys, atomic writes, locks.

Every stage of a trial (SFT, RM, PPO, DPO, eval) is a function that writes an artifact directory. The cache
stores that directory under ``<root>/<stage>/<key>`` where ``key`` hashes everything the artifact depends on:

- the stage's own config, the keys of its upstream stages and the data fingerprint (the caller builds this
  ``payload``; see :meth:`StageCache.key`);
- the *code version*: a hash of the source of the package files that compute stages (:func:`code_version`).

So in a ``kl_coef`` sweep of K values the SFT and RM keys are identical across trials and those stages run once;
only PPO fans out. The cache is shared by all trials of a sweep and across sweeps (and across users, if they point
``cache_dir`` at the same place).

Guarantees
----------
- **Nothing half-written is ever visible.** A build writes into ``<root>/<stage>/.tmp-<key>-<pid>-<rand>``, then
  writes a ``COMPLETE`` marker, then ``os.rename``s the directory to its final name (atomic within a file
  system). A build that raises has its temporary directory deleted and the exception re-raised. A process killed
  with SIGKILL leaves a ``.tmp-*`` directory behind; no reader ever looks at those, and the next build of the same
  key (which holds the key's lock, so no live process can own them) deletes them.
- **No stage is computed twice concurrently.** A miss takes an exclusive lock on ``<root>/<stage>/<key>.lock``
  (:func:`rlhf_ablate.files.file_lock`, ``fcntl.flock`` through ``filelock``), re-checks, and only then builds. A
  second trial needing the same stage blocks on the lock and then finds the finished artifact (a hit). The holder
  writes ``host pid time`` into the lock file, so ``cat <key>.lock`` tells you who is building it. The kernel drops
  a flock when its holder dies, so a SIGKILLed builder never leaves a stuck lock.
- **Shared file systems.** ``flock`` is local-only on NFSv3 (each client sees only its own locks). On NFSv4 Linux
  emulates flock with NFS byte-range locks, which the server arbitrates across clients; on Lustre it works when
  the file system is mounted with the ``flock`` option (not ``localflock``). BeeGFS/GPFS behave like NFSv4 by
  default. On a file system without cross-node locks two nodes could build the same stage at once; the rename
  still keeps the result consistent (the loser's ``rename`` fails on a non-empty target and its copy is
  discarded), it only wastes GPU time.

The code version
----------------
:func:`code_version` hashes every ``.py`` file under ``rlhf_ablate/`` except the orchestration code listed in
:data:`ORCHESTRATION` (the ``launch/`` package, the CLI, sweep expansion, tracking, the result file and this cache),
which decides *how* and *where* trials run but not *what* a stage computes. Editing those keeps every cached artifact; editing a stage, the
data readers, the model loading or the PPO math invalidates all of them, which is the safe direction. Set
``RLHF_ABLATE_CODE_VERSION`` to pin the version explicitly (for example to reuse artifacts after a pure refactor);
you then take responsibility for the artifacts matching the code.

Checked on every lookup
-----------------------
A finished build records every file of the artifact in its ``COMPLETE`` marker (path, size, and the sha256 of
files up to :data:`HASH_LIMIT`), after checking that the files the stage promises (rlhf_ablate/run/graph.py) are
there. A lookup compares the sizes, and the hashes of files up to :data:`VERIFY_HASH_LIMIT` (cheap); a missing,
truncated or altered entry, as a full or flaky shared file system leaves behind, is moved aside to
``<root>/<stage>/.damaged-<key>-<time>`` and rebuilt, with a warning that names the entry and why
(``StageRun.repaired``, in result.json's timings).

Each build (hit or not, cached or not) that actually ran a stage appends one JSON line to
``<root>/executions.jsonl`` (stage, key, pid, host, seconds, status: ``ok``, ``failed``, or ``interrupted`` when
the build was ended from outside: an ASHA stop, Ctrl-C, SLURM's time-limit warning), which benchmarks and tests
use to count stage executions.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import functools
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..files import atomic_write_text, canonical_json, config_hash, file_lock, fsync_dir

COMPLETE = "COMPLETE"
EXECUTIONS_LOG = "executions.jsonl"
KEY_HEX = 32  # 128 bits of sha256: collisions are not a practical concern for a cache
HASH_LIMIT = 64 * 2**20         # files up to this size are hashed when an artifact is finished
VERIFY_HASH_LIMIT = 16 * 2**20  # ... and their hash is checked on a lookup (larger files: their size only)
log = logging.getLogger("rlhf_ablate.cache")


class StageIncomplete(Exception):
    """A stage's build returned without writing a file it promises."""

# Code (paths relative to the package) that orchestrates trials but does not compute stage artifacts. Editing it
# must not invalidate the cache. A directory entry covers everything under it. tests/test_cache.py checks that each
# entry exists, so a move cannot silently turn an exclusion off.
ORCHESTRATION = frozenset({"launch", "cli.py", "__main__.py", "config/sweep.py", "config/sections.py", "config/sweep_files.py", "run/tracking.py",
                           "rundir.py", "run/cache.py"})

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def code_version(package_dir: Optional[Path] = None) -> str:
    """Hash of the source of the stage-computing modules (see the module docstring).

    ``RLHF_ABLATE_CODE_VERSION`` in the environment overrides it."""
    pinned = os.environ.get("RLHF_ABLATE_CODE_VERSION")
    if pinned:
        return pinned
    return _code_version(str((package_dir or PACKAGE_DIR).resolve()))


@functools.lru_cache(maxsize=8)
def _code_version(package_dir: str) -> str:
    root = Path(package_dir)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if "__pycache__" in rel.parts or rel.as_posix() in ORCHESTRATION or rel.parts[0] in ORCHESTRATION:
            continue
        h.update(rel.as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class StageRun:
    """What :meth:`StageCache.run` returns."""

    stage: str
    key: str
    path: Path        # the complete artifact directory
    hit: bool         # True: reused (possibly after waiting on another process's build)
    seconds: float    # build seconds (about 0 on a hit)
    waited: float = 0.0  # seconds spent waiting on the lock held by another builder
    repaired: Optional[str] = None  # why a damaged entry was moved aside and rebuilt

    def timing(self) -> dict:
        """The shape of one entry of result.json ``timings`` (see docs/architecture.md)."""
        out = {"seconds": round(self.seconds, 3), "cache_hit": self.hit, "key": self.key, "bucket": self.stage,
               "waited": round(self.waited, 3)}
        if self.repaired:
            out["repaired"] = self.repaired
        return out


class StageCache:
    """Content-addressed, lock-protected, atomically written stage artifacts under ``root``.

    ``enabled=False`` (``--no-cache``) never reads the cache: each :meth:`run` builds into a fresh private
    directory ``<root>/uncached/<stage>/<key>-<pid>-<rand>`` (still atomically renamed) and reports a miss. Those
    directories are not reused; delete ``<root>/uncached`` when you no longer need them.
    """

    def __init__(self, root: Path | str, enabled: bool = True):
        self.root = Path(root).expanduser().resolve()
        self.enabled = enabled
        self._payloads: dict[str, dict] = {}  # key -> what it hashes, written to the artifact's config.json

    # ---- keys ----------------------------------------------------------------------------------------------
    def key(self, stage: str, payload: dict) -> str:
        """sha256 of the canonical JSON of ``{stage, payload, code_version}``, truncated to 32 hex digits.

        ``payload`` is built by the caller: the stage's own config, the upstream stage keys and the data
        fingerprint. The seed belongs in it too when the stage is stochastic."""
        content = {"stage": stage, "payload": payload, "code_version": code_version()}
        key = config_hash(content, KEY_HEX)
        self._payloads[key] = content
        return key

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_complete(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / COMPLETE).is_file()

    # ---- the one operation -----------------------------------------------------------------------------------
    def run(self, stage: str, key: str, build: Callable[[Path], None], promises: Sequence[str] = ()) -> StageRun:
        """Return the artifact of ``stage``/``key``, building it with ``build(tmp_dir)`` on a miss or when the cached
        entry is damaged (module docstring, "Checked on every lookup").

        ``build`` must write everything into the directory it is given (which exists and is empty), including the
        files in ``promises`` (paths relative to it), and return normally; if it raises, nothing is kept and the
        exception propagates unchanged."""
        _check_name(stage, "stage")
        _check_name(key, "key")
        stage_dir = self.root / stage
        if not self.enabled:
            return self._build_uncached(stage, key, build, promises)

        final = stage_dir / key
        if (final / COMPLETE).is_file() and damage(final, promises) is None:  # fast path, no lock
            return StageRun(stage, key, final, hit=True, seconds=0.0)

        stage_dir.mkdir(parents=True, exist_ok=True)
        t_wait = time.monotonic()
        repaired = None
        with file_lock(self.lock_path(stage, key)):
            waited = time.monotonic() - t_wait
            if (final / COMPLETE).is_file():  # built by another process while we waited, or damaged
                repaired = damage(final, promises)
                if repaired is None:
                    return StageRun(stage, key, final, hit=True, seconds=0.0, waited=waited)
                aside = stage_dir / f".damaged-{key}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                os.rename(final, aside)
                log.warning("stage cache: %s/%s is damaged (%s); moved aside to %s and rebuilt", stage, key,
                            repaired, aside)
            # We hold the key's lock, so any temporary directory of this key belongs to a dead builder.
            for stale in stage_dir.glob(f".tmp-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in stage_dir.glob(f".log-{key}-*"):
                stale.unlink(missing_ok=True)
            if final.exists():  # no COMPLETE marker: cannot come from this code, but never trust it
                shutil.rmtree(final, ignore_errors=True)
            seconds = self._build_into(stage_dir, stage, key, final, build, promises)
        return StageRun(stage, key, final, hit=False, seconds=seconds, waited=waited, repaired=repaired)

    # ---- trial groups (rlhf_ablate/run/groups.py) ------------------------------------------------------------
    def lock_path(self, stage: str, key: str) -> Path:
        """The lock :meth:`run` takes on a miss: a trial group's builder holds its other members' locks with it."""
        return self.root / stage / f"{key}.lock"

    def staging(self, stage: str, key: str) -> Path:
        """A fresh directory to build ``stage``/``key``'s artifact in before :meth:`commit`; named like a build's
        temporary directory, so a builder that dies leaves nothing a later build of the key does not delete."""
        d = self.root / stage / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}-group"
        d.mkdir(parents=True)
        return d

    def commit(self, stage: str, key: str, src: Path, promises: Sequence[str] = ()) -> float:
        """Install ``src`` (built by this process beside another stage: a trial group's member) as ``stage``/``key``,
        atomically and checked like any build (:meth:`run`). The caller holds :meth:`lock_path` of the key."""
        _check_name(stage, "stage")
        _check_name(key, "key")
        stage_dir, final = self.root / stage, self.root / stage / key
        if final.exists() and not (final / COMPLETE).is_file():
            shutil.rmtree(final, ignore_errors=True)

        def move(out: Path) -> None:
            for item in src.iterdir():
                os.rename(item, out / item.name)
        return self._build_into(stage_dir, stage, key, final, move, promises)

    # ---- internals -------------------------------------------------------------------------------------------
    def _build_uncached(self, stage: str, key: str, build: Callable[[Path], None], promises: Sequence[str]) -> StageRun:
        private = self.root / "uncached" / stage
        private.mkdir(parents=True, exist_ok=True)
        final = private / f"{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        seconds = self._build_into(private, stage, key, final, build, promises)
        return StageRun(stage, key, final, hit=False, seconds=seconds)

    def _build_into(self, parent: Path, stage: str, key: str, final: Path, build: Callable[[Path], None],
                    promises: Sequence[str] = ()) -> float:
        tmp = parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        t0 = time.monotonic()
        try:
            log = parent / f".log-{tmp.name[len('.tmp-'):]}"  # beside the build directory: `build` gets it empty
            try:
                with _stage_log(log, stage, key):
                    build(tmp)
                os.replace(log, tmp / "log.txt")
            finally:
                log.unlink(missing_ok=True)
            if key in self._payloads:  # what the key hashes: the stage's config, upstream keys, data, code
                (tmp / "config.json").write_text(canonical_json(self._payloads[key]), encoding="utf-8")
            missing = [f for f in promises if not (tmp / f).is_file()]
            if missing:
                raise StageIncomplete(f"stage {stage} finished without writing {', '.join(missing)}, which it "
                                      f"promises (rlhf_ablate/run/graph.py)")
            seconds = time.monotonic() - t0
            marker = {"stage": stage, "key": key, "seconds": round(seconds, 3), "host": socket.gethostname(),
                      "pid": os.getpid(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "code_version": code_version(), "files": manifest(tmp)}
            atomic_write_text(tmp / COMPLETE, json.dumps(marker))
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError as e:
                # Only possible without working cross-node locks: another node renamed first. Keep theirs.
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and (final / COMPLETE).is_file():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    raise
            fsync_dir(parent)  # the rename is durable only once the parent is synced
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            # "interrupted": the build was ended from outside (an ASHA stop, Ctrl-C, SLURM's time-limit warning),
            # not by an error of its own.
            self._log_execution(stage, key, time.monotonic() - t0,
                                "failed" if isinstance(e, Exception) and not _is_interrupt(e) else "interrupted")
            raise
        self._log_execution(stage, key, seconds, "ok")
        return seconds

    def _log_execution(self, stage: str, key: str, seconds: float, status: str) -> None:
        line = json.dumps({"stage": stage, "key": key, "pid": os.getpid(), "host": socket.gethostname(),
                           "seconds": round(seconds, 3), "status": status, "cached": self.enabled,
                           "time": time.time()}) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        # One write() on an O_APPEND descriptor: lines from concurrent trials do not interleave.
        fd = os.open(self.root / EXECUTIONS_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def executions(self) -> list[dict]:
        return read_executions(self.root)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(artifact: Path) -> dict[str, list]:
    """Every file of an artifact directory: relative path -> [size, sha256 or None above HASH_LIMIT]."""
    out = {}
    for p in sorted(artifact.rglob("*")):
        if p.is_file() and p.name != COMPLETE:
            size = p.stat().st_size
            out[p.relative_to(artifact).as_posix()] = [size, _sha256(p) if size <= HASH_LIMIT else None]
    return out


def damage(artifact: Path, promises: Sequence[str] = ()) -> Optional[str]:
    """Why a complete artifact cannot be served (None: it can): a file of its manifest is missing, has another size,
    or (up to VERIFY_HASH_LIMIT) another hash; or a promised file is not there."""
    try:
        files = json.loads((artifact / COMPLETE).read_text()).get("files")
    except (OSError, ValueError) as e:
        return f"unreadable {COMPLETE} marker: {e}"
    for rel in promises:
        if not (artifact / rel).is_file():
            return f"{rel} is missing"
    for rel, (size, sha) in (files or {}).items():
        p = artifact / rel
        try:
            actual = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual} bytes, {size} were written"
        if sha is not None and size <= VERIFY_HASH_LIMIT and _sha256(p) != sha:
            return f"{rel} has changed since it was written (sha256)"
    return None


def read_executions(root: Path | str) -> list[dict]:
    """Every line of ``<root>/executions.jsonl`` (empty if none). A torn last line (SIGKILL) is skipped."""
    p = Path(root) / EXECUTIONS_LOG
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@contextlib.contextmanager
def _stage_log(path: Path, stage: str, key: str):
    """Python warnings and log records at INFO and above, from the start to the end of a build, into log.txt."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    was_capturing = logging.getLogger("py.warnings").handlers or None
    root.addHandler(handler)
    logging.captureWarnings(True)
    root_level = root.level
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.getLogger("rlhf_ablate").info("build %s/%s on %s pid %d", stage, key, socket.gethostname(), os.getpid())
    try:
        yield
    finally:
        logging.getLogger("rlhf_ablate").info("end of build %s/%s", stage, key)
        root.removeHandler(handler)
        root.setLevel(root_level)
        if not was_capturing:
            logging.captureWarnings(False)
        handler.close()


def _is_interrupt(e: BaseException) -> bool:
    from ..runtime import TimeLimitReached

    return isinstance(e, TimeLimitReached)


def _check_name(value: str, what: str) -> None:
    if not value or "/" in value or value.startswith(".") or value in ("uncached",):
        raise ValueError(f"invalid cache {what} {value!r}: must be a plain, non-hidden directory name")
