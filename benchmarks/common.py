"""Shared helpers of the benchmarks: a tiny kl_coef sweep, timed subprocesses, medians, the JSON record."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# The bundled kl_coef sweep, one seed, shortened so a trial takes seconds on a CPU: the same stages and the same
# cache keys structure as a real run, only fewer steps and examples.
TINY = {"model.quantization": "none", "sft.max_steps": 2, "rm.max_steps": 2, "sft.batch_size": 8,
        "rm.batch_size": 8, "ppo.total_episodes": 8, "ppo.rollout_batch_size": 4, "ppo.mini_batch_size": 4,
        "ppo.max_new_tokens": 8, "eval.max_new_tokens": 8, "data.max_sft": 16, "data.max_rm_groups": 8,
        "data.max_ppo_prompts": 8, "data.max_eval": 4}


SRC = [ROOT]  # where the measured code is imported from; snapshot() points it at a frozen copy


def snapshot(work: Path) -> Path:
    """Copy the package (with its bundled sweeps) into ``work/src`` and measure that copy, so that edits to the
    working tree during a long benchmark cannot change (or break) the code between repeats."""
    src = work / "src"
    for name in ("rlhf_ablate",):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    SRC[0] = src
    return src


def write_kl_sweep(dest: Path, cache_dir: Path, name: str = "kl_coef_bench", size: str = "tiny") -> Path:
    """The bundled kl_coef sweep, one seed, each trial alone (no trial groups); ``size="tiny"`` shortens every stage (:data:`TINY`), ``"bundled"`` keeps
    the sweep's own stage sizes (the defaults of rlhf_ablate/config/schema.py)."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}.yaml"
    kl_coef = SRC[0] / "rlhf_ablate" / "sweeps" / "kl_coef.yaml"
    path.write_text(yaml.safe_dump({"include": str(kl_coef), "name": name, "seeds": [0],
                                    "base": TINY if size == "tiny" else {}, "cache_dir": str(cache_dir),
                                    "tracking": {"wandb": "disabled"},
                                    "resources": {"group_size": 1}}))  # trials alone (bench_groups.py: groups)
    return path


def env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled",
            "PYTHONPATH": os.pathsep.join([str(SRC[0])] + [p for p in os.environ.get("PYTHONPATH", "").split(
                os.pathsep) if p])}


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    """Wall seconds of a subprocess (interpreter start and imports included, as a user would see them)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=cwd, env=env(), stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"benchmark run failed (exit {p.returncode}): {' '.join(cmd)}\nsee {log}:\n"
                         + log.read_text()[-3000:])
    return seconds


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "rlhf_ablate"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=5).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {"git_dirty_rlhf_ablate": dirty,"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "git_commit": commit, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_result(name: str, record: dict, out: Path | None) -> Path:
    path = out or ROOT / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **record}, indent=1))
    return path


def trial_ok(run_dir: Path) -> int:
    from rlhf_ablate.rundir import scan_results  # the one reader of result.json

    return sum(1 for _, r in scan_results(run_dir) if r.get("status") == "ok")


PY = sys.executable
