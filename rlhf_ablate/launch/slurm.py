"""SLURM: one array task per trial (or per trial group), then a report job that runs after the array, whatever its
outcome.

``python -m rlhf_ablate slurm SWEEP.yaml [KEY=VALUE ...] [--out DIR] [--submit]`` writes::

    RUN_DIR/slurm/array.sbatch     #SBATCH --array=0-(N-1)%K; each task runs
                                   #   python -m rlhf_ablate trial SWEEP.yaml --index $SLURM_ARRAY_TASK_ID --out RUN_DIR
                                   # (with trial groups: --group $SLURM_ARRAY_TASK_ID --group-size K, N groups)
    RUN_DIR/slurm/report.sbatch    python -m analysis report RUN_DIR
    RUN_DIR/slurm/logs/%A_%a.out   one log per task (%A = array job id, %a = task index)
    RUN_DIR/slurm/jobs.json        with --submit: the job ids of every submission, newest last

and prints the two ``sbatch`` commands, or with ``--submit`` runs them (the report job with
``--dependency=afterany:<array id>``) and prints the job ids. Over 450 lines, because it is one coherent job:
everything that knows about SLURM (options, the two scripts, submission, and the task side that turns SLURM's
time-limit warning into a recorded failure).

Why this is enough for a cluster:

- **The report comes after any outcome.** The report job depends on the array with ``afterany``: a failed trial
  exits 1, and with ``afterok`` the report job would stay pending forever (``DependencyNeverSatisfied``; docs/stack.md,
  "SLURM"). The report lists failed trials with their reasons.
- **A time limit is a recorded failure, not a silent kill.** ``#SBATCH --signal=B:USR1@<s>`` makes SLURM send the
  task USR1 ``s`` seconds before its time limit. The trial command turns it into ``TimeLimitReached``
  (rlhf_ablate/runtime.py): the trial records ``failed`` with an error message starting "time limit", in the stage
  it reached, and exits; its finished stages are in the cache, so submitting the sweep again resumes it. The script
  ignores USR1 until Python has installed its handler (``trap '' USR1`` before ``exec``), so an early warning is lost
  rather than fatal.
- **Same results layout as Ray.** A task is exactly the ``trial`` command, which calls the same
  ``run_trial_in_sweep`` as the Ray trainable and writes ``RUN_DIR/trials/<trial_id>/result.json``.
- **Shared stage cache.** All tasks use one content-addressed cache (``rlhf_ablate.run.cache``): a ``flock`` per key
  stops two tasks from computing the same SFT or RM stage, and artifacts appear by atomic rename. So in a
  ``kl_coef`` sweep the first task of a seed trains SFT and RM and the others wait for it and reuse them.
- **Requeue-safe.** ``#SBATCH --requeue`` lets the scheduler rerun a preempted task; ``--open-mode=append`` keeps
  the log of the first attempt. The rerun finds its finished stages in the cache, and a trial whose
  ``result.json`` already says ``ok`` is not run again, so results are never duplicated (trial ids are hashes of
  the config, so a rerun writes to the same directory).
- **Same numbers as Ray.** The trial computes with ``resources.cpu`` torch threads wherever it runs
  (rlhf_ablate/runtime.py), so a task computes what the Ray path computes; ``OMP_NUM_THREADS`` is set to
  ``--cpus-per-task`` only so that libraries outside torch do not start a thread per core of the node.
- **Same environment.** The script calls the Python interpreter that generated it (``sys.executable``), and puts
  this checkout on ``PYTHONPATH`` when the package is not installed, so tasks run the code you tested.

Sources: sbatch(1) for ``--array``/``%K``, ``%A``/``%a``, ``--dependency``, ``--requeue``, ``--open-mode``,
``--signal``, ``--parsable``; docs/stack.md ("SLURM") for what was verified on Debian's slurm-wlm.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config.sweep import SweepSpec, Trial
from ..errors import ConfigError, RlhfAblateError
from ..files import atomic_write_text

#: Time limit of the report job: analysis reads result files and bootstraps CIs, minutes at most.
REPORT_TIME = "01:00:00"

#: The report job runs after every task of the array, whatever its outcome (module docstring).
REPORT_DEPENDENCY = "afterany"

#: Seconds before the time limit at which a task is warned (at most; a quarter of a shorter limit). sbatch(1):
#: "the signal may be sent up to 60 seconds earlier than specified", so this is a lower bound on the time left.
TIME_LIMIT_WARNING_S = 120

# sbatch(1) --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; or UNLIMITED/infinite.
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^(unlimited|infinite)$", re.IGNORECASE)


@dataclass(frozen=True)
class SlurmOptions:
    """Scheduler settings after resolving the CLI over the sweep's ``slurm:`` section (CLI wins)."""

    partition: Optional[str]
    account: Optional[str]
    qos: Optional[str]
    time: str
    max_concurrent: int
    cpus_per_task: int
    gpus: int
    mem: Optional[str]
    extra: tuple[str, ...]
    setup: tuple[str, ...]
    notes: tuple[str, ...] = ()  # explanations printed to the user and written into the script


@dataclass(frozen=True)
class SlurmFiles:
    run_dir: Path
    array_script: Path
    report_script: Path
    log_dir: Path
    n_trials: int


# ---------------------------------------------------------------------------------------------------------
# Resolving options
# ---------------------------------------------------------------------------------------------------------

def resolve_options(spec: SweepSpec, trials: Sequence[Trial], *, partition: Optional[str] = None,
                    account: Optional[str] = None, qos: Optional[str] = None, time: Optional[str] = None,
                    max_concurrent: Optional[int] = None) -> SlurmOptions:
    """CLI values (the keyword arguments) override the sweep's ``slurm:`` section; resources come from
    ``slurm.cpus_per_task``/``slurm.gpus_per_task`` when set, else from the sweep's per-trial ``resources:``."""
    s = spec.slurm
    src = spec.path
    k = s.max_concurrent if max_concurrent is None else max_concurrent
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--max-concurrent must be an integer >= 1 (the array throttle %K), got {k!r}.")
    t = s.time if time is None else time
    if not isinstance(t, str) or not _SLURM_TIME.match(t.strip()):
        raise ConfigError(f"{src}: slurm.time / --time must be a SLURM time limit such as 04:00:00, 90, "
                          f"1-12:00:00 or 2-0, got {t!r}.")

    notes: list[str] = []
    cpus = s.cpus_per_task if s.cpus_per_task is not None else spec.resources.cpu
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ConfigError(f"{src}: slurm.cpus_per_task must be an integer >= 1, got {cpus!r}.")
    if s.gpus_per_task is not None:
        if isinstance(s.gpus_per_task, bool) or not isinstance(s.gpus_per_task, int) or s.gpus_per_task < 0:
            raise ConfigError(f"{src}: slurm.gpus_per_task must be an integer >= 0, got {s.gpus_per_task!r}.")
        gpus = s.gpus_per_task
    else:
        gpus = _gpus_from_resources(spec, trials, notes)

    extra = []
    for i, line in enumerate(s.extra or []):
        if not isinstance(line, str) or "\n" in line:
            raise ConfigError(f"{src}: slurm.extra[{i}] must be one sbatch option per string, got {line!r}.")
        line = line.strip()
        if line.startswith("#SBATCH"):
            line = line[len("#SBATCH"):].strip()
        if not line.startswith("-"):
            raise ConfigError(f"{src}: slurm.extra[{i}] must be an sbatch option such as --constraint=a100, got "
                              f"{line!r}.")
        if re.match(r"--?(array|output|error|dependency|a|o|e|d)(=|\s|$)", line):
            raise ConfigError(f"{src}: slurm.extra[{i}] sets {line.split('=')[0]}, which rlhf_ablate sets itself "
                              f"(use slurm.max_concurrent for the throttle); remove it.")
        extra.append(line)
    setup = []
    for i, line in enumerate(s.setup or []):
        if not isinstance(line, str):
            raise ConfigError(f"{src}: slurm.setup[{i}] must be a shell line (string), got {line!r}.")
        setup.append(line)
    for name, value in (("partition", partition if partition is not None else s.partition),
                        ("account", account if account is not None else s.account),
                        ("qos", qos if qos is not None else s.qos),
                        ("mem", s.mem)):
        if value is not None and (not isinstance(value, str) or not value.strip() or re.search(r"\s", value)):
            raise ConfigError(f"{src}: slurm.{name} must be a single word, got {value!r}.")
    return SlurmOptions(
        partition=partition if partition is not None else s.partition,
        account=account if account is not None else s.account,
        qos=qos if qos is not None else s.qos,
        time=t.strip(), max_concurrent=k, cpus_per_task=cpus, gpus=gpus, mem=s.mem,
        extra=tuple(extra), setup=tuple(setup), notes=tuple(notes))


def _gpus_from_resources(spec: SweepSpec, trials: Sequence[Trial], notes: list[str]) -> int:
    """Whole GPUs per array task. SLURM allocates GPUs whole (without MPS/MIG sharding), so a fractional Ray
    request becomes one GPU per task; packing several trials onto one GPU is what the Ray-on-allocation template
    (slurm/ray_on_allocation.sbatch) is for."""
    g = spec.resources.gpu
    if g in ("auto", "probe"):
        # Built-in tiny models train on CPU in seconds; anything else (hub id, local path) wants a GPU.
        from ..config import BUILTIN_MODELS

        if all(t.config.model.base_model in BUILTIN_MODELS for t in trials):
            return 0
        notes.append("resources.gpu=auto: trials use real models, so each task asks for one whole GPU "
                     "(set resources.gpu or slurm.gpus_per_task to change this).")
        return 1
    g = float(g)
    if g <= 0:
        return 0
    if g != int(g):
        notes.append(f"resources.gpu={g:g} is a fraction: SLURM allocates whole GPUs, so each task gets "
                     f"{math.ceil(g)}. To pack {int(1 // g) if g < 1 else 1} trials per GPU, run the Ray sweep "
                     f"on an allocation instead (slurm/ray_on_allocation.sbatch, see docs/slurm.md).")
    return int(math.ceil(g))


def time_limit_seconds(t: str) -> Optional[int]:
    """A SLURM time limit (sbatch(1) formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None if unlimited."""
    t = t.strip().lower()
    if t in ("unlimited", "infinite"):
        return None
    days, _, rest = t.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, sec = 0, parts[0], parts[1]
    else:
        h, m, sec = parts
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def warning_seconds(t: str) -> int:
    """How long before the time limit SLURM warns a task (``--signal=B:USR1@<this>``)."""
    limit = time_limit_seconds(t)
    return TIME_LIMIT_WARNING_S if limit is None else max(1, min(TIME_LIMIT_WARNING_S, limit // 4))


# ---------------------------------------------------------------------------------------------------------
# Script generation
# ---------------------------------------------------------------------------------------------------------

def _source_root() -> Optional[Path]:
    """The directory holding this ``rlhf_ablate`` package when it is a checkout rather than an installed
    distribution; array tasks get it on PYTHONPATH so ``-m rlhf_ablate`` and ``-m analysis`` resolve to this
    code even when the job starts in another directory."""
    root = Path(__file__).resolve().parents[2]  # <root>/rlhf_ablate/launch/slurm.py
    if "site-packages" in root.parts or "dist-packages" in root.parts:
        return None
    return root


def _check_path(p: Path, what: str) -> None:
    # #SBATCH lines are not parsed by a shell, so a path with whitespace cannot be quoted there, and '%' is a
    # filename pattern character in --output.
    if re.search(r"[\s%]", str(p)):
        raise ConfigError(f"{what} {str(p)!r} contains whitespace or '%', which #SBATCH --output and --chdir "
                          f"cannot hold; use a path without them (--out for the run directory, or run the command "
                          f"from another directory).")


def _header(lines: list[str], *, job_name: str, output: Path, chdir: Path, opts: SlurmOptions, time_limit: str,
            cpus: int, gpus: int, mem: Optional[str], extra: Sequence[str], warn_s: int = 0) -> None:
    lines += [f"#SBATCH --job-name={job_name}",
              f"#SBATCH --output={output}",
              "#SBATCH --open-mode=append",
              f"#SBATCH --chdir={chdir}",
              "#SBATCH --ntasks=1",
              f"#SBATCH --cpus-per-task={cpus}",
              f"#SBATCH --time={time_limit}"]
    if warn_s:
        lines.append(f"#SBATCH --signal=B:USR1@{warn_s}")
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    for name in ("partition", "account", "qos"):
        value = getattr(opts, name)
        if value:
            lines.append(f"#SBATCH --{name}={value}")
    lines += [f"#SBATCH {e}" for e in extra]


def _environment(lines: list[str], opts: SlurmOptions) -> None:
    lines += ["", "set -eo pipefail"]
    if opts.setup:
        lines += ["", "# slurm.setup from the sweep file"] + list(opts.setup)
    root = _source_root()
    if root is not None:
        lines += ["", "# this rlhf_ablate checkout (not an installed package): keep tasks on the code that wrote "
                      "this script",
                  f"export PYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    cache_env = os.environ.get("RLHF_ABLATE_CACHE")
    if cache_env:
        lines += ["# the stage cache the submitting shell used; every task shares it",
                  f"export RLHF_ABLATE_CACHE={shlex.quote(str(Path(cache_env).expanduser().resolve()))}"]


def array_script(spec: SweepSpec, trials: Sequence[Trial], run_dir: Path, opts: SlurmOptions, *,
                 sweep_path: Path, overrides: Sequence[str] = (), python: str = sys.executable,
                 chdir: Optional[Path] = None) -> str:
    """The array job: task i runs trial i of the expanded sweep, or, when trials form groups
    (``resources.group_size``, rlhf_ablate/run/groups.py), trial group i: its members one after another in one task,
    their PPO stages trained together."""
    groups = array_groups(spec, trials)
    n = len(groups) if groups else len(trials)
    chdir = (chdir or Path.cwd()).resolve()
    logs = run_dir / "slurm" / "logs"
    cmd = [python, "-m", "rlhf_ablate", "trial", str(sweep_path), *overrides]
    from ..rundir import default_cache_root

    what = (f"{len(trials)} trials in {n} trial groups, one array task per group" if groups
            else f"{n} trials, one array task each")
    task = (f'--group "$SLURM_ARRAY_TASK_ID" --group-size {max(len(g) for g in groups)}' if groups
            else '--index "$SLURM_ARRAY_TASK_ID"')
    lines = ["#!/bin/bash",
             f"# Written by `python -m rlhf_ablate slurm` for sweep '{spec.name}' (version {spec.version}): "
             f"{what}.",
             f"# Sweep file: {sweep_path}",
             f"# Results:    {run_dir}/trials/<trial_id>/result.json (the same layout as the Ray path)",
             f"# Stage cache (shared by all tasks, locked per stage): {default_cache_root(spec)}",
             "# Requeue-safe: a rerun task reuses finished stages and skips a trial whose result.json is ok."]
    lines += [f"# Note: {note}" for note in opts.notes]
    _header(lines, job_name=f"rlhf-{spec.name}", output=logs / "%A_%a.out", chdir=chdir, opts=opts,
            time_limit=opts.time, cpus=opts.cpus_per_task, gpus=opts.gpus, mem=opts.mem, extra=opts.extra,
            warn_s=warning_seconds(opts.time))
    lines.insert(lines.index(f"#SBATCH --job-name=rlhf-{spec.name}") + 1,
                 f"#SBATCH --array=0-{n - 1}%{opts.max_concurrent}")
    lines.append("#SBATCH --requeue")
    _environment(lines, opts)
    lines += ["",
              "# torch threads come from resources.cpu (rlhf_ablate/runtime.py); this keeps other libraries from",
              "# starting a thread per core of the node.",
              "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
              'echo "[rlhf_ablate] task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} of ' + spec.name
              + ' on $(hostname), attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )), $(date -Is)"',
              "# The time-limit warning (--signal=B:USR1) is ignored until the trial command handles it: an early",
              "# warning is lost instead of killing the task; exec keeps the trial the process SLURM signals.",
              "trap '' USR1",
              "exec " + " ".join(shlex.quote(c) for c in cmd) + f" {task} --out " + shlex.quote(str(run_dir)),
              ""]
    return "\n".join(lines)


def array_groups(spec: SweepSpec, trials: Sequence[Trial]) -> list[list[Trial]]:
    """The trial groups the array runs, one per task (``resources.group_size: auto`` resolved here, where the
    array is written, and passed to every task as ``--group-size``); empty when every trial runs alone."""
    from ..launch.resources import resolve_group_size
    from ..run.groups import plan_groups

    groups = plan_groups(resolve_group_size(spec, list(trials)), list(trials))
    return groups if any(len(g) > 1 for g in groups) else []


def report_script(spec: SweepSpec, run_dir: Path, opts: SlurmOptions, *, python: str = sys.executable,
                  chdir: Optional[Path] = None) -> str:
    """The report job: tables, plots and report.md from RUN_DIR/trials/*/result.json. Submitted with
    ``--dependency=afterany:<array id>``, so it starts once every task has ended, failed ones included."""
    chdir = (chdir or Path.cwd()).resolve()
    lines = ["#!/bin/bash",
             f"# Written by `python -m rlhf_ablate slurm` for sweep '{spec.name}': the report, after the array "
             f"job whatever its outcome (submitted with --dependency={REPORT_DEPENDENCY}:<array job id>).",
             f"# Output: {run_dir}/report/"]
    # No GPU and no --mem: the report only reads JSON files and draws plots.
    _header(lines, job_name=f"rlhf-{spec.name}-report", output=run_dir / "slurm" / "logs" / "report_%j.out",
            chdir=chdir, opts=opts, time_limit=REPORT_TIME, cpus=1, gpus=0, mem=None,
            extra=[e for e in opts.extra if not re.match(r"--(gres|gpus|constraint|mem)", e)])
    _environment(lines, opts)
    lines += ["",
              'echo "[rlhf_ablate] report of ' + spec.name + ' on $(hostname), $(date -Is)"',
              "exec " + " ".join(shlex.quote(c) for c in [python, "-m", "analysis", "report", str(run_dir)]),
              ""]
    return "\n".join(lines)


def write_scripts(spec: SweepSpec, trials: Sequence[Trial], run_dir: Path, opts: SlurmOptions, *,
                  sweep_path: Path, overrides: Sequence[str] = (), python: str = sys.executable,
                  chdir: Optional[Path] = None) -> SlurmFiles:
    """Write RUN_DIR/slurm/{array,report}.sbatch (atomically) and create the log directory."""
    run_dir = Path(run_dir).resolve()
    _check_path(run_dir, "run directory")
    _check_path((chdir or Path.cwd()).resolve(), "working directory")
    arr = array_script(spec, trials, run_dir, opts, sweep_path=sweep_path, overrides=overrides, python=python,
                       chdir=chdir)
    rep = report_script(spec, run_dir, opts, python=python, chdir=chdir)
    sdir = run_dir / "slurm"
    logs = sdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output directory
    atomic_write_text(sdir / "array.sbatch", arr, 0o755)
    atomic_write_text(sdir / "report.sbatch", rep, 0o755)
    return SlurmFiles(run_dir=run_dir, array_script=sdir / "array.sbatch", report_script=sdir / "report.sbatch",
                      log_dir=logs, n_trials=len(trials))


# ---------------------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------------------

def find_sbatch() -> str:
    path = shutil.which("sbatch")
    if path is None:
        raise RlhfAblateError(
            f"sbatch not found on PATH: {os.environ.get('PATH', '')}. Run `python -m rlhf_ablate slurm "
            f"... --submit` on a login node of your cluster (or load its slurm module first), drop --submit to only "
            f"write the scripts, or use `python -m rlhf_ablate sweep` to run the sweep with Ray.")
    return path


def submit_commands(files: SlurmFiles, *, dependency: str = REPORT_DEPENDENCY) -> list[str]:
    """The two commands a user can paste into a shell (what --submit runs)."""
    return [f"ARRAY_JOB_ID=$(sbatch --parsable {shlex.quote(str(files.array_script))})",
            f"sbatch --parsable --dependency={dependency}:$ARRAY_JOB_ID {shlex.quote(str(files.report_script))}"]


def _sbatch(sbatch: str, args: list[str]) -> str:
    try:
        proc = subprocess.run([sbatch, "--parsable", *args], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise RlhfAblateError(f"`sbatch {' '.join(args)}` did not answer within 120 s; is slurmctld up "
                              f"(try `sinfo`)?") from None
    if proc.returncode != 0:
        raise RlhfAblateError(f"`sbatch --parsable {' '.join(args)}` failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()}")
    # --parsable prints "jobid" or "jobid;cluster".
    out = proc.stdout.strip().splitlines()
    job = out[-1].split(";")[0].strip() if out else ""
    if not job.isdigit():
        raise RlhfAblateError(f"could not read a job id from `sbatch --parsable` output {proc.stdout!r}.")
    return job


def submit(files: SlurmFiles, *, dependency: str = REPORT_DEPENDENCY, sbatch: Optional[str] = None) -> dict:
    """Submit the array job, then the report job depending on it. Records both ids in RUN_DIR/slurm/jobs.json
    (a list of submissions, newest last) and returns the new record."""
    sbatch = sbatch or find_sbatch()
    array_id = _sbatch(sbatch, [str(files.array_script)])
    record: dict[str, Any] = {"array_job_id": array_id, "report_job_id": None, "n_trials": files.n_trials,
                              "dependency": f"{dependency}:{array_id}",
                              "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "array_script": str(files.array_script), "report_script": str(files.report_script)}
    try:
        record["report_job_id"] = _sbatch(sbatch, [f"--dependency={dependency}:{array_id}",
                                                   str(files.report_script)])
    except RlhfAblateError as e:
        _record(files, record)
        raise RlhfAblateError(f"the array job {array_id} was submitted, but the report job was not: {e} Submit it "
                              f"by hand: sbatch --dependency={dependency}:{array_id} {files.report_script}") from None
    _record(files, record)
    return record


def _record(files: SlurmFiles, record: dict) -> None:
    path = files.run_dir / "slurm" / "jobs.json"
    history = []
    if path.exists():
        try:
            history = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            history = []
    if not isinstance(history, list):
        history = []
    atomic_write_text(path, json.dumps(history + [record], indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# The task side: what `python -m rlhf_ablate trial` runs
# ---------------------------------------------------------------------------------------------------------

def task_trials(spec: SweepSpec, trials: Sequence[Trial], *, index: Optional[int] = None,
                group: Optional[int] = None, group_size: Optional[int] = None,
                source: str = "") -> tuple[SweepSpec, list[Trial]]:
    """What ``trial --index I`` or ``trial --group G [--group-size K]`` runs: ``spec`` with ``resources.group_size``
    resolved (``K`` as the array was written with, else ``auto`` from this machine's GPUs) and the trials, in order."""
    import dataclasses

    from ..launch.resources import resolve_group_size
    from ..run.groups import plan_groups

    if group_size is not None:
        if group is None or group_size < 1:
            raise ConfigError(f"--group-size must be >= 1 and comes with --group, got {group_size}.")
        spec = dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, group_size=group_size))
    spec = resolve_group_size(spec, list(trials))  # a task resolves `auto` from the same GPUs as its group's others
    if index is not None:
        if not 0 <= index < len(trials):
            raise ConfigError(f"{source}: --index {index} is out of range: the sweep has {len(trials)} trials "
                              f"(indices 0..{len(trials) - 1}).")
        return spec, [trials[index]]
    groups = plan_groups(spec, list(trials))
    if group is None or not 0 <= group < len(groups):
        raise ConfigError(f"{source}: --group {group} is out of range: the sweep has {len(groups)} trial groups "
                          f"(indices 0..{len(groups) - 1}) at resources.group_size={spec.resources.group_size}.")
    return spec, groups[group]


def run_tasks(spec: SweepSpec, members: Sequence[Trial], run_dir: Path, *, use_cache: bool = True,
              data: Any = None) -> list[dict]:
    """The trials of one task (a trial group's members, run one after another: the first at PPO trains the group's
    PPO stages, the others find theirs in the cache). After the time-limit warning the members not started are
    recorded as failed for the same reason, instead of being killed at the limit without a record."""
    from ..rundir import record_failure

    results: list[dict] = []
    for t in members:
        if results and (results[-1].get("error") or {}).get("type") == "TimeLimitReached":
            results.append(record_failure(Path(run_dir).resolve(), spec.name, t, "TimeLimitReached",
                                          f"time limit: not started, the task's time limit was near after trial "
                                          f"{results[-1]['trial_id']}", stage="trial"))
            continue
        results.append(run_task(spec, t, run_dir, use_cache=use_cache, data=data))
    return results


def run_task(spec: SweepSpec, trial: Trial, run_dir: Path, *, use_cache: bool = True, data: Any = None) -> dict:
    """Run one trial as a SLURM array task does (also what ``trial`` runs by hand): inside a SLURM job, the time-limit
    warning (``--signal=B:USR1``) becomes a recorded failure with the reason "time limit" (module docstring)."""
    from ..config.sweep import expand
    from ..rundir import read_sweep_json, record_failure, write_sweep_json
    from ..run.trial import run_trial_in_sweep
    from ..runtime import TimeLimitReached, install_time_limit_handler

    if read_sweep_json(run_dir) is None:  # the same run directory layout as a Ray sweep (rlhf_ablate/rundir.py)
        write_sweep_json(Path(run_dir).resolve(), spec, expand(spec), use_cache=use_cache,
                         launcher="slurm" if os.environ.get("SLURM_JOB_ID") else "trial")
    if os.environ.get("SLURM_JOB_ID"):
        install_time_limit_handler()
    try:
        return run_trial_in_sweep(spec, trial, run_dir, use_cache=use_cache, data=data)
    except TimeLimitReached as e:
        # The warning came outside the trial's own failure handling (while W&B started or finished): record it
        # here; a result the trial already finished is kept.
        return record_failure(Path(run_dir).resolve(), spec.name, trial, type(e).__name__, str(e), stage="trial")


# ---------------------------------------------------------------------------------------------------------
# The `slurm` command
# ---------------------------------------------------------------------------------------------------------

def slurm_command(sweep_file: str, overrides: Sequence[str] = (), *, out: Optional[Path] = None,
                  submit_jobs: bool = False, partition: Optional[str] = None, account: Optional[str] = None,
                  qos: Optional[str] = None, time_limit: Optional[str] = None,
                  max_concurrent: Optional[int] = None) -> int:
    """``python -m rlhf_ablate slurm``: write the array and report scripts, and submit them with ``submit_jobs``."""
    from ..config import parse_cli_overrides
    from ..config.sweep import expand, load_sweep
    from ..rundir import run_dir_for, write_sweep_json

    overrides = list(overrides or [])
    # Everything is validated before anything is written or submitted.
    spec = load_sweep(sweep_file, parse_cli_overrides(overrides))
    if spec.search.type == "optuna":
        raise ConfigError(
            f"{sweep_file}: search.type=optuna samples trials at run time from earlier results, but a SLURM "
            f"array needs a fixed list of trials. Use a grid (search.type=grid) here, or run the Optuna search "
            f"with Ray: `python -m rlhf_ablate sweep {sweep_file}` (on a multi-node allocation with "
            f"slurm/ray_on_allocation.sbatch, see docs/slurm.md).")
    trials = expand(spec)
    opts = resolve_options(spec, trials, partition=partition, account=account, qos=qos,
                           time=time_limit, max_concurrent=max_concurrent)
    sbatch = find_sbatch() if submit_jobs else None
    run_dir = run_dir_for(spec, out)
    dependency = REPORT_DEPENDENCY
    files = write_scripts(spec, trials, run_dir, opts, sweep_path=Path(sweep_file).resolve(),
                          overrides=overrides, python=sys.executable)
    write_sweep_json(run_dir, spec, trials, launcher="slurm")

    for note in opts.notes:
        print(f"note: {note}", file=sys.stderr)
    groups = array_groups(spec, trials)
    tasks = len(groups) or len(trials)
    print(f"sweep {spec.name}: {len(trials)} trials{f' in {tasks} trial groups' if groups else ''} -> array "
          f"0-{tasks - 1}%{opts.max_concurrent}")
    if groups:
        print(f"note: a task runs a group's {max(len(g) for g in groups)} trials one after another (their PPO "
              f"stages trained together): its time limit (slurm.time, --time) covers the whole group",
              file=sys.stderr)
    print(f"wrote {files.array_script}")
    print(f"wrote {files.report_script}")
    print(f"logs: {files.log_dir}/%A_%a.out")
    if not submit_jobs:
        print("submit with:")
        for c in submit_commands(files, dependency=dependency):
            print(f"  {c}")
        return 0
    record = submit(files, dependency=dependency, sbatch=sbatch)
    print(f"submitted array job {record['array_job_id']} ({tasks} tasks)")
    print(f"submitted report job {record['report_job_id']} (--dependency={record['dependency']})")
    print(f"watch: squeue -j {record['array_job_id']},{record['report_job_id']}   results: {run_dir}/trials/   "
          f"report: {run_dir}/report/")
    return 0
