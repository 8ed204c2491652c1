"""Experiment tracking: one W&B run per trial (offline by default), or a no-op.

Tracking is optional: the tables are built from ``result.json`` alone, never from W&B. A :class:`NoopTracker` stands
in when tracking is off (nanoGPT's pattern), so trial code calls the same four methods either way::

    tracker = make_tracker(spec.tracking, sweep_name=..., trial_id=..., config_flat=cfg.flat(), axes=trial.axes,
                           run_dir=trial_dir)
    tracker.log({"ppo/objective/kl": 0.02, "ppo/objective/scores": 0.4}, step=3)
    tracker.summary({"ppo/rougeL": 0.31})
    tracker.log_table("ppo/samples", ["prompt", "generation", "reward"], rows)
    tracker.finish("ok")

W&B settings
------------
- **Mode:** ``WANDB_MODE`` from the environment if set, else the sweep's ``tracking.wandb`` (offline, online or
  disabled). ``disabled`` gives the no-op tracker. Offline runs need no key and no network; upload them later with
  ``wandb sync RUN_DIR/wandb/wandb/offline-run-*``.
- **Directory:** ``WANDB_DIR`` if the user set it, else ``<run_dir>/wandb`` as an absolute path (under Ray the
  working directory is a temporary one; docs/stack.md). It is passed to ``wandb.init(dir=...)`` rather than written into
  ``os.environ``, so a reused Ray worker process does not carry one trial's directory into the next.
- **Run identity: one W&B run per trial.** The run id is derived from the trial id (:func:`wandb_run_id`:
  ``<trial id>-<hash of sweep name and run directory>``) and ``wandb.init`` gets ``resume="allow"``, so a retried
  trial (rerunning the sweep, a requeued SLURM task) resumes the same run instead of creating a second run with the
  same name; a new run directory starts new runs. Offline, each attempt is its own ``offline-run-*`` directory with
  that id, and ``wandb sync`` appends them to the one run. group = sweep name, name = trial id, tags =
  ``key=value`` of the swept axes, config = the flat dotted trial config (``ppo.kl_coef``), minus anything
  secret-looking (:func:`scrub_config`), plus ``attempt`` (1 for the first start; run/result.py counts them).
- **Step axis:** W&B requires its ``_step`` to increase monotonically, but each stage counts its own steps from 1.
  So ``_step`` just counts log calls; the stage step is logged as ``<stage>/step`` (``ppo/step``) and declared with
  ``define_metric`` as the x-axis of that stage's metrics.
- **Secrets:** the API key is read by wandb itself from ``WANDB_API_KEY`` or ``~/.netrc``; this module never reads
  it, never copies it into config, and console capture is off so nothing printed reaches the run files.

``read_offline_run(path)`` decodes an offline ``.wandb`` file (wandb 0.31 has no public reader; docs/stack.md): the
LevelDB-style log format of ``wandb/sdk/internal/datastore.py``: a 7-byte file header (``:W&B``, magic 0xBEE1,
version 0), then 32 KiB blocks of records, each with a 7-byte header (crc32 u32, length u16, type u8: FULL=1,
FIRST=2, MIDDLE=3, LAST=4) holding a serialized ``wandb_internal_pb2.Record``; a block tail shorter than a header is
zero padding.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

# Config keys whose last component looks like a credential are never sent to W&B.
_SECRET_RE = re.compile(r"(api[_-]?key|(^|[_.-])key$|token|secret|passw(or)?d|credential|auth)", re.IGNORECASE)


def scrub_config(config: dict) -> dict:
    """Drop secret-looking keys and any value that contains a credential from the environment."""
    secrets = [v for k, v in os.environ.items() if v and len(v) >= 8 and _SECRET_RE.search(k)]
    out = {}
    for k, v in config.items():
        last = str(k).rsplit(".", 1)[-1]
        if _SECRET_RE.search(last):
            continue
        if isinstance(v, str) and any(s in v for s in secrets):
            continue
        out[k] = v
    return out


class Tracker:
    """The interface trial code uses. This base class is also the no-op implementation."""

    enabled = False

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class NoopTracker(Tracker):
    """Stands in when W&B is disabled (``tracking.wandb: disabled`` or ``WANDB_MODE=disabled``)."""


def resolve_mode(tracking: Any) -> str:
    """``WANDB_MODE`` wins over the sweep file, so one environment variable switches a whole sweep."""
    mode = os.environ.get("WANDB_MODE") or getattr(tracking, "wandb", "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in ("offline", "online", "disabled"):
        from ..errors import ConfigError

        raise ConfigError(f"W&B mode {mode!r} (from WANDB_MODE or tracking.wandb) must be offline, online or "
                          f"disabled.")
    return mode


def check_tracking(tracking: Any) -> str:
    """Check before launching a sweep that tracking can work; return the mode.

    Online mode needs a key (``WANDB_API_KEY`` or a ``~/.netrc`` entry from ``wandb login``); without one every
    trial would block or fail at ``wandb.init`` in the middle of the night, so refuse up front."""
    mode = resolve_mode(tracking)
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")):
            from ..errors import ConfigError

            raise ConfigError("tracking.wandb is 'online' but no W&B key is configured (WANDB_API_KEY or "
                              "`wandb login`). Log in, or use tracking.wandb: offline (the default) and run "
                              "`wandb sync` later, or WANDB_MODE=disabled.")
    return mode


class WandbTracker(Tracker):
    enabled = True

    def __init__(self, run: Any):
        self.run = run
        self._stages: set[str] = set()
        self._finished = False

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        data = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        if step is not None:
            for stage in {k.split("/", 1)[0] for k in data if "/" in k} or {"trial"}:
                if stage not in self._stages:
                    self._stages.add(stage)
                    self.run.define_metric(f"{stage}/step")
                    self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                data[f"{stage}/step"] = step
        self.run.log(data)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update({k: v for k, v in metrics.items()})

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def finish(self, status: str) -> None:
        if self._finished:
            return
        self._finished = True
        self.run.summary["status"] = status
        sync_file = getattr(self.run.settings, "sync_file", None)
        self.run.finish(exit_code=0 if status == "ok" else 1)
        if sync_file and getattr(self.run.settings, "mode", "") == "offline":
            _wait_for_exit_record(Path(sync_file))


def _wait_for_exit_record(path: Path, timeout: float = 15.0) -> None:
    """wandb 0.31's ``run.finish()`` can return before wandb-core has written the offline transaction log (seen:
    2 runs in 12 had only the 7-byte file header right after finish). Wait, bounded, for the exit record, so a trial
    process that ends right away, or a reader right after, finds the complete run."""
    import time

    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for raw in _iter_records(path.read_bytes()):
                rec = pb.Record()
                rec.ParseFromString(raw)
                if rec.WhichOneof("record_type") == "exit":
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    warnings.warn(f"W&B offline run {path} has no exit record after {timeout:.0f} s; `wandb sync` may need "
                  f"--include-offline of a partial run.", stacklevel=2)


def wandb_run_id(trial_id: str, sweep_name: str, run_dir: Path) -> str:
    """The W&B run id of a trial: stable across its attempts in one run directory (see the module docstring).
    W&B ids allow letters, digits, ``-`` and ``_``; trial ids are ``t`` + hex."""
    from ..files import config_hash

    return f"{trial_id}-{config_hash({'sweep': sweep_name, 'run_dir': str(Path(run_dir).resolve())}, 8)}"


def make_tracker(tracking: Any, *, sweep_name: str, trial_id: str, config_flat: dict, axes: dict,
                 run_dir: Path, attempt: int = 1) -> Tracker:
    """A W&B run for one trial, or a :class:`NoopTracker` when tracking is disabled (see the module docstring)."""
    mode = resolve_mode(tracking)
    if mode == "disabled":
        return NoopTracker()
    wandb_dir = Path(os.environ["WANDB_DIR"]).resolve() if os.environ.get("WANDB_DIR") else \
        (Path(run_dir) / "wandb").resolve()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    try:
        import wandb

        settings = wandb.Settings(console="off", silent=True, save_code=False, disable_git=True,
                                  x_disable_stats=True)
        run = wandb.init(project=getattr(tracking, "project", "rlhf_ablate"),
                         entity=getattr(tracking, "entity", None), group=sweep_name, name=trial_id,
                         id=wandb_run_id(trial_id, sweep_name, run_dir), resume="allow",
                         tags=[f"{k}={v}"[:64] for k, v in axes.items()],  # W&B caps a tag at 64 characters
                         # attempt changes between attempts of the one run: allow_val_change lets a resumed run
                         # take the new value
                         config={**scrub_config(dict(config_flat)), "attempt": attempt}, allow_val_change=True,
                         dir=str(wandb_dir), mode=mode, job_type="trial", reinit="finish_previous",
                         settings=settings)
    except Exception as e:  # tracking must never cost a trial: the tables come from result.json
        warnings.warn(f"W&B could not start for trial {trial_id} ({type(e).__name__}: {e}); continuing without "
                      f"tracking.", stacklevel=2)
        return NoopTracker()
    return WandbTracker(run)


# ---------------------------------------------------------------------------------------------------------
# Reading offline runs back (tests, and users without network who want to check what was logged)
# ---------------------------------------------------------------------------------------------------------

_BLOCK = 32768
_HEADER = 7
_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_offline_runs(root: Path | str) -> list[Path]:
    """Every ``run-*.wandb`` file under ``root`` (a run directory, a WANDB_DIR or an offline-run dir)."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(root.rglob("run-*.wandb"))


def _iter_records(data: bytes) -> Iterable[bytes]:
    if data[:_HEADER] != _FILE_HEADER:
        raise ValueError("not a W&B transaction log (bad file header)")
    off, buf = _HEADER, b""
    while off + _HEADER <= len(data):
        left = _BLOCK - off % _BLOCK
        if left < _HEADER:  # zero padding at the end of a block
            off += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[off:off + _HEADER])
        off += _HEADER
        if rtype == 0 and length == 0:  # zero padding / unwritten tail (a run still being written)
            break
        chunk = data[off:off + length]
        off += length
        if len(chunk) < length:  # torn write at the end of a killed run
            break
        if rtype == _FULL:
            yield chunk
            buf = b""
        elif rtype == _FIRST:
            buf = chunk
        elif rtype == _MIDDLE:
            buf += chunk
        elif rtype == _LAST:
            yield buf + chunk
            buf = b""


def _set(d: dict, item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    value = json.loads(item.value_json)
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def read_offline_run(path: Path | str) -> dict:
    """Decode an offline W&B run: ``{"history": [rows], "summary": {...}, "config": {...}, "tables": {...},
    "group", "name", "id", "tags", "exit_code"}``.

    ``path`` is a ``run-*.wandb`` file or a directory holding exactly one. ``tables`` maps each logged table's
    name to ``{"columns": [...], "data": [[...]]}``, read from the run's ``files/`` directory."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = find_offline_runs(path)
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {path}, found {len(files)}")
    wfile = files[0]
    out: dict = {"history": [], "summary": {}, "config": {}, "tables": {}, "group": None, "name": None,
                 "id": None, "tags": [], "exit_code": None}
    for raw in _iter_records(wfile.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(group=r.run_group, name=r.display_name, id=r.run_id, tags=list(r.tags))
            for item in r.config.update:
                _set(out["config"], item)
        elif kind == "config":
            for item in rec.config.update:
                _set(out["config"], item)
            for item in rec.config.remove:
                out["config"].pop(item.key, None)
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _set(row, item)
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set(out["summary"], item)
            for item in rec.summary.remove:
                out["summary"].pop(item.key or (list(item.nested_key) or [""])[0], None)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    out["config"].pop("_wandb", None)
    out["summary"].pop("_wandb", None)
    for source in [out["summary"], *out["history"]]:
        for name, v in source.items():
            if isinstance(v, dict) and v.get("_type") == "table-file" and "path" in v:
                tfile = wfile.parent / "files" / v["path"]
                if tfile.exists():
                    out["tables"][name] = json.loads(tfile.read_text(encoding="utf-8"))
    return out


if __name__ == "__main__":  # pragma: no cover - `python -m rlhf_ablate.run.tracking RUN.wandb` dumps a run
    json.dump(read_offline_run(sys.argv[1]), sys.stdout, indent=1, ensure_ascii=False, default=str)
