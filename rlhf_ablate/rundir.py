"""The one owner of the run directory's layout and of ``result.json``: where trials, results, ``sweep.json`` and
the stage cache live, and how a result is written, read and scanned (issue 17: every launcher, the trial, compare,
chat and analysis go through here, so the layout is written down once).

::

    RUN_DIR/
        sweep.json                     the sweep, its trials and its stage cache (written by every launcher)
        trials/<trial_id>/result.json  the record of a trial
        trials/<trial_id>/attempts.jsonl, error.txt
    <cache root>/<bucket>/<key>/       a stage artifact (rlhf_ablate/run/cache.py builds and checks it)

``RUN_DIR/trials/<trial_id>/result.json`` is the record of a trial (docs/architecture.md, "result.json"). The trial
writes it (rlhf_ablate/run/trial.py), the launchers write it for trials that could not (a worker that died, an
early stop, a SLURM time limit), resume reads it to skip finished trials, and the report reads nothing else
(analysis/results.py loads it through :func:`scan_results`).

Beside it, ``attempts.jsonl`` counts the starts of the trial in this run directory, one line per start (host, pid,
time, SLURM job); the attempt number goes into result.json and the trial's W&B config, so a retried trial is
recognisable as such.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator, Optional

from .files import read_json, write_json

SCHEMA = 1
FINISHED = ("ok", "stopped")  # statuses that are never rerun ("stopped": an ASHA early stop)
STATUSES = ("ok", "failed", "stopped")
ATTEMPTS = "attempts.jsonl"


def run_dir_for(spec: Any, out: Optional[Path]) -> Path:
    """The run directory of a sweep: ``--out``, else ``runs/<sweep name>``."""
    return (Path(out) if out else Path("runs") / spec.name).resolve()


SWEEP_JSON = "sweep.json"


def trial_dir(run_dir: Path, trial_id: str) -> Path:
    return Path(run_dir) / "trials" / trial_id


def result_path(run_dir: Path, trial_id: str) -> Path:
    return trial_dir(run_dir, trial_id) / "result.json"


def run_dir_of_trial(tdir: Path) -> Path:
    """The run directory a trial directory (``RUN_DIR/trials/<id>``) belongs to."""
    return Path(tdir).parent.parent


# ---- the stage cache's place ----------------------------------------------------------------------------------

def default_cache_root(spec: Any = None) -> Path:
    """``spec.cache_dir`` if the sweep sets it, else ``$RLHF_ABLATE_CACHE/stages``, else
    ``~/.cache/rlhf_ablate/stages``. Relative ``cache_dir`` values are resolved against the current directory."""
    cache_dir = getattr(spec, "cache_dir", None) if spec is not None else None
    if cache_dir:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("RLHF_ABLATE_CACHE")
    if env:
        return (Path(env).expanduser() / "stages").resolve()
    return (Path.home() / ".cache" / "rlhf_ablate" / "stages").resolve()


def artifact_path(cache_root: Path, bucket: str, key: str) -> Path:
    """Where the stage cache keeps the artifact of ``bucket``/``key`` (rlhf_ablate/run/cache.py)."""
    return Path(cache_root) / bucket / key


def cache_root_of(result: dict, run_dir: Optional[Path] = None) -> Path:
    """The stage cache a trial's artifacts live in: its result.json's ``cache_dir`` (every launcher writes it), else
    the run's sweep.json."""
    from .errors import ConfigError

    if result.get("cache_dir"):
        return Path(result["cache_dir"])
    sweep = read_sweep_json(run_dir) if run_dir is not None else None
    if sweep and sweep.get("cache_dir"):
        return Path(sweep["cache_dir"])
    raise ConfigError(f"{run_dir or 'trial'}: the trial's result.json names no stage cache (cache_dir) and there is "
                      f"no sweep.json beside it.")


def trial_artifacts(result: dict, run_dir: Optional[Path] = None) -> dict[str, Path]:
    """Stage name -> artifact directory of every stage of the trial whose artifact is still in the stage cache
    (read from result.json's ``timings``: each stage's cache bucket and key)."""
    root = cache_root_of(result, run_dir)
    out = {}
    for stage, t in (result.get("timings") or {}).items():
        if isinstance(t, dict) and "key" in t:
            d = artifact_path(root, t.get("bucket", stage), t["key"])
            if d.is_dir():
                out[stage] = d
    return out


# ---- sweep.json ----------------------------------------------------------------------------------------------

def write_sweep_json(run_dir: Path, spec: Any, trials: list, *, use_cache: bool = True, launcher: str = "") -> Path:
    """``RUN_DIR/sweep.json``: the sweep, its trials and its stage cache. Every launcher (Ray, SLURM, ``trial``,
    the notebook API) writes it; a rewrite keeps the first start time."""
    path = Path(run_dir) / SWEEP_JSON
    prev = read_sweep_json(run_dir) or {}
    return write_json(path, {
        "name": spec.name, "version": spec.version, "path": str(Path(spec.path).resolve()),
        "description": spec.description, "search": spec.search.type, "scheduler": spec.scheduler.type,
        "cache_dir": str(default_cache_root(spec)), "use_cache": use_cache, "launcher": launcher or prev.get("launcher"),
        "first_started_at": prev.get("first_started_at") or now(), "last_started_at": now(),
        "trials": [{"index": t.index, "trial_id": t.trial_id, "seed": t.seed, "axes": t.axes} for t in trials]})


def read_sweep_json(run_dir: Path) -> Optional[dict]:
    try:
        d = read_json(Path(run_dir) / SWEEP_JSON)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def read_result(run_dir: Path, trial_id: str) -> dict | None:
    """The trial's result, or None when there is none (or it cannot be parsed)."""
    try:
        return read_json(result_path(run_dir, trial_id))
    except (OSError, ValueError):
        return None


def write_result(run_dir: Path, result: dict) -> Path:
    """Atomically (re)write the trial's result.json."""
    return write_json(result_path(run_dir, result["trial_id"]), result)


def scan_results(run_dir: Path, sweep_name: Optional[str] = None, *,
                 errors: Optional[list] = None) -> Iterator[tuple[Path, Any]]:
    """Every parseable result under ``run_dir/trials`` (optionally of one sweep), sorted by path.

    A file that cannot be read or is not JSON is skipped; with ``errors`` given, ``(path, message)`` is appended for
    it (the report lists them). The parsed value is returned as it is: checking its fields is the reader's job."""
    for p in sorted((Path(run_dir) / "trials").glob("*/result.json")):
        try:
            r = read_json(p)
        except UnicodeDecodeError as e:
            _note(errors, p, f"not UTF-8 text ({e.reason})")
            continue
        except json.JSONDecodeError as e:
            _note(errors, p, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); a trial killed while "
                             f"writing leaves such a file, rerun it")
            continue
        except OSError as e:
            _note(errors, p, f"cannot be read ({e.strerror})")
            continue
        if sweep_name is None or not isinstance(r, dict) or r.get("sweep") in (sweep_name, None):
            yield p, r


def _note(errors: Optional[list], path: Path, message: str) -> None:
    if errors is not None:
        errors.append((path, message))


def begin_attempt(run_dir: Path, trial_id: str) -> int:
    """Record that the trial starts (again) and return its attempt number: 1 the first time in this run directory.

    One ``write`` on an ``O_APPEND`` descriptor per start, so concurrent starts (a requeued SLURM task beside a
    Ray retry) never interleave lines; a start killed before it wrote result.json still counts."""
    path = trial_dir(run_dir, trial_id) / ATTEMPTS
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": now(),
                       "slurm_job": os.environ.get("SLURM_JOB_ID")}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return attempts(run_dir, trial_id)


def attempts(run_dir: Path, trial_id: str) -> int:
    """How many times the trial has started in this run directory (0: never)."""
    try:
        text = (trial_dir(run_dir, trial_id) / ATTEMPTS).read_text(errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if line.strip())


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    out = {"python": platform.python_version()}
    # From the installed distributions' metadata, importing nothing: an import here took seconds (ray, trl), and a
    # blanket except around it swallowed SLURM's time-limit warning raised meanwhile (rlhf_ablate/runtime.py).
    from importlib.metadata import PackageNotFoundError, version

    for mod, dist in (("torch", "torch"), ("transformers", "transformers"), ("trl", "trl"), ("peft", "peft"),
                      ("bitsandbytes", "bitsandbytes"), ("datasets", "datasets"), ("sacrebleu", "sacrebleu"),
                      ("kiwipiepy", "kiwipiepy"), ("ray", "ray"), ("rlhf_ablate", "rlhf-ablate")):
        try:
            out[mod] = version(dist)
        except PackageNotFoundError:  # a missing optional package is just not reported
            pass
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                           capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def new_result(trial_id: str, *, sweep: str, index: int, seed: int, config: dict, axes: dict,
               attempt: int = 0, threads: Optional[int] = None) -> dict:
    """A result with every field of the schema (docs/architecture.md, "result.json"): status ok, no metrics yet."""
    return {"schema": SCHEMA, "trial_id": trial_id, "sweep": sweep, "index": index, "status": "ok", "error": None,
            "seed": seed, "config": dict(config), "axes": dict(axes), "metrics": {}, "metric_meta": {},
            "timings": {}, "history": {}, "records": {}, "versions": {}, "attempt": attempt, "threads": threads,
            "started_at": now(), "finished_at": None}


def result_for(trial: Any, sweep_name: str, run_dir: Optional[Path] = None) -> dict:
    """:func:`new_result` for ``trial`` (a config.sweep.Trial), with its attempt count when ``run_dir`` is given."""
    return new_result(trial.trial_id, sweep=sweep_name, index=trial.index, seed=trial.seed,
                      config=trial.config.flat(), axes=trial.axes,
                      attempt=attempts(run_dir, trial.trial_id) if run_dir is not None else 0)


def error_record(etype: str, message: str, stage: str) -> dict:
    return {"type": etype, "message": str(message)[:2000], "stage": stage}


def record_failure(run_dir: Path, sweep_name: str, trial: Any, etype: str, message: str, *,
                   stage: str = "driver", status: str = "failed", **extra: Any) -> dict:
    """Write a result.json for a trial that could not record its own end (worker death, early stop, time limit),
    unless the trial already wrote a finished one. ``extra`` fields go into the error record (``ppo_step`` of an
    early stop)."""
    existing = read_result(run_dir, trial.trial_id)
    if existing is not None and existing.get("status") in FINISHED:
        return existing
    result = result_for(trial, sweep_name, run_dir)
    result.update(status=status, error={**error_record(etype, message, stage), **extra},
                  started_at=(existing or {}).get("started_at"), finished_at=now())
    write_result(run_dir, result)
    return result
