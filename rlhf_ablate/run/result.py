"""The one owner of ``result.json``: its schema, where it lives, and how it is written, read and scanned.

``RUN_DIR/trials/<trial_id>/result.json`` is the record of a trial (docs/architecture.md, "result.json"). The trial
writes it (rlhf_ablate/run/trial.py), the launchers write it for trials that could not (a worker that died, an
early stop), resume reads it to skip finished trials, and the report reads nothing else.
"""

from __future__ import annotations

import datetime as _dt
import functools
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterator, Optional

from ..files import read_json, write_json

SCHEMA = 1
FINISHED = ("ok", "stopped")  # statuses that are never rerun ("stopped": an ASHA early stop)


def run_dir_for(spec: Any, out: Optional[Path]) -> Path:
    """The run directory of a sweep: ``--out``, else ``runs/<sweep name>``."""
    return (Path(out) if out else Path("runs") / spec.name).resolve()


def result_path(run_dir: Path, trial_id: str) -> Path:
    return Path(run_dir) / "trials" / trial_id / "result.json"


def read_result(run_dir: Path, trial_id: str) -> dict | None:
    """The trial's result, or None when there is none (or it cannot be parsed)."""
    try:
        return read_json(result_path(run_dir, trial_id))
    except (OSError, ValueError):
        return None


def write_result(run_dir: Path, result: dict) -> Path:
    """Atomically (re)write the trial's result.json."""
    return write_json(result_path(run_dir, result["trial_id"]), result)


def scan_results(run_dir: Path, sweep_name: Optional[str] = None) -> Iterator[tuple[Path, dict]]:
    """Every parseable result under ``run_dir/trials`` (optionally of one sweep), sorted by path."""
    for p in sorted((Path(run_dir) / "trials").glob("*/result.json")):
        try:
            r = read_json(p)
        except (OSError, ValueError):
            continue
        if sweep_name is None or r.get("sweep") in (sweep_name, None):
            yield p, r


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "sacrebleu", "kiwipiepy",
                "ray", "rlhf_ablate"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                           capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def new_result(trial: Any, sweep_name: str) -> dict:
    """A result with every field of the schema, for ``trial`` (a config.sweep.Trial), status ok and no metrics."""
    return {"schema": SCHEMA, "trial_id": trial.trial_id, "sweep": sweep_name, "index": trial.index,
            "status": "ok", "error": None, "seed": trial.seed, "config": trial.config.flat(),
            "axes": dict(trial.axes), "metrics": {}, "metric_meta": {}, "timings": {}, "history": {},
            "records": {}, "versions": {}, "started_at": now(), "finished_at": None}


def record_failure(run_dir: Path, sweep_name: str, trial: Any, etype: str, message: str, *,
                   stage: str = "driver", status: str = "failed") -> dict:
    """Write a result.json for a trial that could not record its own end (worker death, early stop, time limit),
    unless the trial already wrote a finished one."""
    existing = read_result(run_dir, trial.trial_id)
    if existing is not None and existing.get("status") in FINISHED:
        return existing
    result = new_result(trial, sweep_name)
    result.update(status=status, error={"type": etype, "message": message[:2000], "stage": stage},
                  started_at=(existing or {}).get("started_at"), finished_at=now())
    write_result(run_dir, result)
    return result
