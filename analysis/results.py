"""Load and check RUN_DIR/trials/*/result.json (schema 1, docs/architecture.md), through
``rlhf_ablate.run.result.scan_results`` (the one owner of the file).

The result files are the only input of the analysis, so the loader is forgiving where a sweep is merely
unfinished and loud where the input is unusable:
- a trial directory without result.json is *pending* (still running, queued, or killed before it wrote);
- a file that is not JSON, has another schema or misses required fields is listed under *problems* and skipped;
- ``status: failed`` and ``stopped`` (an ASHA early stop) trials are kept (the report lists them), they just
  contribute no numbers;
- a metric that is null, NaN or not a number counts as NaN (not finite), so it never becomes a fake zero.
Only a missing run directory, or one with no result file at all, is an error.
Ray Tune and SLURM array tasks write the same layout (``run_trial`` writes result.json in both), so nothing here
depends on which scheduler ran the sweep.

:class:`RunResults` is also what a notebook gets back (``rlhf_ablate.run_sweep`` and ``analysis.load_run``):
``.to_pandas()`` gives one row per trial; analysis/report.py: ``Run`` adds ``.report()``, which writes the report
(there, so that this module, which the tables read, never imports the report that reads them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlhf_ablate.errors import RlhfAblateError
from rlhf_ablate.rundir import SCHEMA as SCHEMA_VERSION
from rlhf_ablate.rundir import STATUSES, scan_results


class ReportError(RlhfAblateError):
    """The report cannot be built: no run directory, or no result.json under RUN_DIR/trials/*/."""


@dataclass
class TrialResult:
    trial_id: str
    path: str                       # relative to the run directory, for messages
    status: str                     # "ok", "failed" or "stopped"
    seed: Optional[int]
    axes: dict[str, Any]            # axis name -> hashable value (lists become JSON strings)
    metrics: dict[str, float]       # NaN for null / non-finite / non-numeric
    error: Optional[dict] = None
    config: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    records: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    sweep: Optional[str] = None
    index: Optional[int] = None
    metric_meta: dict = field(default_factory=dict)   # how metrics were computed: tokenizer, sacrebleu signatures
    overoptimization: dict = field(default_factory=dict)   # PPO's gold probe and alarm (rlhf_ablate/ppo/gold.py)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class RunResults:
    run_dir: Path
    trials: list[TrialResult]       # ok, failed and stopped, sorted by (index, trial_id)
    problems: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)   # trial directories with no result.json yet

    @property
    def ok_trials(self) -> list[TrialResult]:
        return [t for t in self.trials if t.ok]

    @property
    def failed_trials(self) -> list[TrialResult]:
        return [t for t in self.trials if t.status == "failed"]

    @property
    def stopped_trials(self) -> list[TrialResult]:
        """Trials an early-stopping scheduler (ASHA) ended: no final eval, so no numbers in the tables."""
        return [t for t in self.trials if t.status == "stopped"]

    @property
    def axis_names(self) -> list[str]:
        """Swept axes in the order the sweep file declares them (first appearance, trials in index order)."""
        return list(dict.fromkeys(k for t in self.trials for k in t.axes))

    @property
    def sweeps(self) -> list[str]:
        return sorted({t.sweep for t in self.trials if t.sweep})

    @property
    def seeds(self) -> list[int]:
        return sorted({t.seed for t in self.trials if t.seed is not None})

    def to_pandas(self) -> Any:
        """One row per trial: ``trial_id``, ``index``, ``seed``, ``status``, one column per swept axis, one per
        metric (NaN where a trial has none), and ``error`` (``type: message`` of a failed or stopped trial)."""
        import pandas as pd

        axes = self.axis_names
        metrics = sorted({k for t in self.trials for k in t.metrics})
        rows = []
        for t in self.trials:
            err = f"{t.error.get('type')}: {t.error.get('message', '')}" if t.error else None
            rows.append({"trial_id": t.trial_id, "index": t.index, "seed": t.seed, "status": t.status,
                         **{a: t.axes.get(a) for a in axes},
                         **{m: t.metrics.get(m, math.nan) for m in metrics}, "error": err})
        return pd.DataFrame(rows, columns=["trial_id", "index", "seed", "status", *axes, *metrics, "error"])

    def __repr__(self) -> str:
        counts = {s: sum(t.status == s for t in self.trials) for s in STATUSES}
        return (f"RunResults({str(self.run_dir)!r}: {len(self.trials)} trials, "
                + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ")")


def _hashable(v: Any) -> Any:
    """Axis values become dict keys; a tied axis whose keys take different values stores a list."""
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=True, ensure_ascii=False)
    return v


def _as_float(v: Any) -> Optional[float]:
    if v is None:
        return math.nan
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return math.nan
    return None


def _parse(data: Any, rel: str, problems: list[str]) -> Optional[TrialResult]:
    if not isinstance(data, dict):
        problems.append(f"{rel}: expected a JSON object, got {type(data).__name__}; skipped.")
        return None
    schema = data.get("schema")
    if schema != SCHEMA_VERSION:
        problems.append(f"{rel}: schema is {schema!r}, this analysis reads schema {SCHEMA_VERSION}; skipped.")
        return None
    status = data.get("status")
    if status not in STATUSES:
        problems.append(f"{rel}: status is {status!r} (expected one of {', '.join(STATUSES)}); skipped.")
        return None
    dir_name = Path(rel).parent.name
    trial_id = data.get("trial_id")
    if not isinstance(trial_id, str) or not trial_id:
        problems.append(f"{rel}: missing trial_id; using the directory name {dir_name!r}.")
        trial_id = dir_name
    axes = data.get("axes")
    if axes is None:
        axes = {}
    if not isinstance(axes, dict):
        problems.append(f"{rel}: 'axes' must be an object; treated as no axes.")
        axes = {}
    raw_metrics = data.get("metrics") or {}
    if not isinstance(raw_metrics, dict):
        problems.append(f"{rel}: 'metrics' must be an object; treated as empty.")
        raw_metrics = {}
    metrics: dict[str, float] = {}
    for k, v in raw_metrics.items():
        f = _as_float(v)
        if f is None:
            problems.append(f"{rel}: metrics[{k!r}] is not a number ({v!r}); counted as NaN.")
            f = math.nan
        metrics[str(k)] = f if math.isfinite(f) else math.nan
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    seed = data.get("seed", config.get("seed"))
    if isinstance(seed, bool) or not isinstance(seed, int):
        if seed is not None:
            problems.append(f"{rel}: seed {seed!r} is not an integer; treated as unknown.")
        seed = None
    error = data.get("error")
    if status != "ok" and not isinstance(error, dict):
        error = {"type": "unknown", "message": str(error) if error else "no error recorded"}
    index = data.get("index")

    def _obj(key: str) -> dict:
        v = data.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            problems.append(f"{rel}: '{key}' must be an object; ignored.")
            return {}
        return v

    return TrialResult(
        trial_id=trial_id, path=rel, status=status, seed=seed,
        axes={str(k): _hashable(v) for k, v in axes.items()}, metrics=metrics,
        error=error if status != "ok" else None, config=config, history=_obj("history"),
        records=_obj("records"), timings=_obj("timings"),
        sweep=data.get("sweep") if isinstance(data.get("sweep"), str) else None,
        index=index if isinstance(index, int) and not isinstance(index, bool) else None,
        metric_meta=_obj("metric_meta"), overoptimization=_obj("overoptimization"))


def load_run(run_dir: str | Path) -> RunResults:
    """Read every RUN_DIR/trials/*/result.json. Raises ReportError when there is nothing to report on."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist. Pass the directory a sweep wrote "
                          f"(default runs/<sweep name>), the one holding trials/<trial_id>/result.json.")
    trials_dir = run_dir / "trials"
    trial_dirs = sorted(p for p in trials_dir.iterdir() if p.is_dir()) if trials_dir.is_dir() else []
    files = [d / "result.json" for d in trial_dirs if (d / "result.json").is_file()]
    if not files:
        pending = f" ({len(trial_dirs)} trial directories, none finished yet)" if trial_dirs else ""
        raise ReportError(f"no result.json under {trials_dir}/*/{pending}. A report needs at least one "
                          f"finished or failed trial; check that {run_dir} is the sweep's run directory.")
    problems: list[str] = []
    pending = [f"trials/{d.name}" for d in trial_dirs if not (d / "result.json").is_file()]
    by_id: dict[str, TrialResult] = {}
    unreadable: list[tuple[Path, str]] = []
    for f, data in scan_results(run_dir, errors=unreadable):
        rel = f"trials/{f.parent.name}/result.json"
        t = _parse(data, rel, problems)
        if t is None:
            continue
        if t.trial_id in by_id:
            other = by_id[t.trial_id]
            # Keep a finished result over a failed one (a retried trial), else the first in sorted order.
            keep, drop = (t, other) if (t.ok and not other.ok) else (other, t)
            problems.append(f"{drop.path}: trial_id {t.trial_id} also in {keep.path}; using {keep.path}.")
            by_id[t.trial_id] = keep
        else:
            by_id[t.trial_id] = t
    problems += [f"trials/{f.parent.name}/result.json: {msg}; skipped." for f, msg in unreadable]
    trials = sorted(by_id.values(), key=lambda t: (t.index if t.index is not None else 1 << 62, t.trial_id))
    return RunResults(run_dir=run_dir, trials=trials, problems=problems, pending=pending)
