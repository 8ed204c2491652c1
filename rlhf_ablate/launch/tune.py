"""Ray Tune driver: ``python -m rlhf_ablate sweep SWEEP.yaml``.

What it promises a researcher who starts a sweep at night:

- **Every trial ends done or failed with a reason.** The trainable never raises: the trial function records its
  own failures (OOM, NaN loss, bad data, divergence) in ``result.json``; a worker that dies outright (killed,
  segfault) is recorded by the driver's callback (rlhf_ablate/launch/progress.py). The sweep goes on either way.
- **No GPU-hour is spent twice.** Our own ``RUN_DIR/trials/<id>/result.json`` is the record of finished trials, not
  Ray's experiment snapshot (which is saved at most every ~10 s, so a driver killed sooner would restart trials from
  zero on ``Tuner.restore``; docs/stack.md, "Ray Tune"). Before launching, every trial whose result says ``ok`` (or ``stopped``, an
  ASHA early stop) is skipped. Finished stages of interrupted trials come back from the stage cache.
- **Rerunning the same command continues the sweep**, exactly like ``--resume``: ok trials are never rerun, failed
  trials are retried (a failure is often transient: OOM next to another job, a preempted node), trials never
  started are run. ``--resume`` only adds a check that there is a sweep to resume. A second driver on the same run
  directory is refused (a lock on ``RUN_DIR/.driver.lock``, rlhf_ablate/files.py: ``file_lock``).
- **Resources:** per trial from the sweep (``resources.cpu``, ``resources.gpu`` or the packing estimate of
  :mod:`rlhf_ablate.launch.resources`); an impossible trial is refused before Ray starts.
- **Cluster:** ``--address`` or ``RAY_ADDRESS`` connects to an existing Ray cluster (the run directory and the stage
  cache must then be on a file system every node sees); otherwise Ray starts locally with this machine's CPUs and
  GPUs.
- **Search:** grid (the default, and what ablations are); Optuna TPE (``search.type: optuna``) through Ray's
  ``OptunaSearch`` inside a ``ConcurrencyLimiter``, seeded on resume with the finished trials; ASHA early stopping
  (``scheduler.type: asha``) on a per-PPO-step metric. Its time axis is the PPO step (``time_attr="ppo_step"``, a
  field only PPO step reports carry), not ``training_iteration``: every stage event is a ``tune.report`` too, so
  counting iterations put the first PPO step at iteration 9 and the rungs nowhere near ``grace_period`` steps. A
  trial that passes every rung runs to its end (``stop_last_trials=False``): its eval is the search metric.
- **ASHA stops are deterministic.** Reporting is synchronous: the trial thread waits inside ``tune.report`` until
  the driver has decided, so a stopped trial ends exactly at the PPO step of the decision (recorded as ``stopped``
  with that ``ppo_step``). Ray then ends the thread by raising ``SystemExit`` in it; the worker waits for that
  thread to unwind (its interrupted stage build cleaned up and logged) before the worker stops or takes the next
  trial, so nothing of a stopped trial happens after the sweep returns. (Ray's own cleanup does not wait; a stopped
  trial's interrupted build was then logged after the driver had returned, about once in a CI run.)
- **Warm workers.** Trials of the same resources reuse one worker process (``reuse_actors``): torch, transformers
  and TRL are imported once per worker, not once per trial. Isolation where it matters: after every trial the
  worker collects garbage and empties the CUDA cache (``runtime.release_memory``), so GPU memory goes back.
- **The same numbers as ``trial`` and SLURM:** the trial computes with ``resources.cpu`` torch threads
  (rlhf_ablate/runtime.py), not the ``OMP_NUM_THREADS`` Ray sets.
- **What you see:** one line per trial event (stage start/end with cache hits, every few PPO steps with the key
  metric, done/failed), then a summary table and the path to the results. Ray's own progress table is silenced.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigError
from ..files import LockBusy, file_lock
from ..rundir import FINISHED, SWEEP_JSON, read_result, record_failure, scan_results, write_sweep_json
from .progress import LiveLines, summary_table

# Seconds a worker waits for a stopped trial's thread to unwind before it stops or takes the next trial (Ray reads
# TUNE_FUNCTION_THREAD_TIMEOUT_S in FunctionTrainable.reset_config; its default of 2 s is less than a W&B finish).
THREAD_STOP_TIMEOUT_S = 120
GROUP_STOP_TIMEOUT_S = 7 * 24 * 3600  # how long Tune lets a stopped group builder finish the group (_setup_env)


# ---------------------------------------------------------------------------------------------------------
# The trainable (runs in a Ray worker)
# ---------------------------------------------------------------------------------------------------------

def _numeric(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def _trainable(config: dict, *, spec: Any, run_dir: str, use_cache: bool, trial_fn: Optional[Callable]) -> None:
    from ray import tune

    from ..run import graph  # noqa: F401 - every method (plugins' too) is known before the trial's config is built

    trial = _trial_from_config(spec, config, tune.get_context().get_trial_id() or "")
    if trial_fn is None:
        from ..run.trial import run_trial_in_sweep as trial_fn  # noqa: N813 - the default trial function

    def on_step(event: dict) -> None:
        # Everything goes to the driver through tune.report: live lines (stage events), ASHA (per PPO step).
        payload = {"trial_index": trial.index, "trial_key": trial.trial_id, "event": event.get("event", "step"),
                   "stage": event.get("stage", "")}
        payload.update(_numeric(event))
        if event.get("stage") == "ppo" and "step" in event:
            payload["ppo_step"] = int(event["step"])  # ASHA's time axis (module docstring)
        if "error" in event:
            payload["error"] = str(event["error"])[:300]
        if "cache_hit" in event:
            payload["cache_hit"] = bool(event["cache_hit"])
        if "phase" in event:  # an out-of-memory retry's part of the stage (launch/progress.py)
            payload["phase"] = str(event["phase"])
        tune.report(payload)

    from ..runtime import release_memory

    try:
        result = trial_fn(spec, trial, Path(run_dir), use_cache=use_cache, on_step=on_step)
    except Exception as e:  # noqa: BLE001 - the trial function should record its own failures; be safe anyway
        result = record_failure(Path(run_dir), spec.name, trial, type(e).__name__,
                                f"{e}\n{traceback.format_exc()}", stage="trial")
    finally:
        release_memory()  # the warm worker runs the next trial: give this one's memory (GPU included) back
    final = {"trial_index": trial.index, "trial_key": trial.trial_id, "event": "end", "stage": "done",
             "status": result.get("status", "failed")}
    final.update(_numeric(result.get("metrics") or {}))
    if result.get("error"):
        final["error"] = f"{result['error'].get('type')}: {result['error'].get('message', '')}"[:300]
    tune.report(final)


def _trial_from_config(spec: Any, config: dict, tune_id: str = "") -> Any:
    """Grid: ``{"index": i}`` into the expanded list. Optuna: the sampled dotted keys; the sample number (the
    suffix of Tune's trial id, ``abc12_00003``) picks the seed round-robin and serves as the display index."""
    from ..config.sweep import expand

    if "index" in config:
        return expand(spec)[config["index"]]
    params = dict(config)
    tail = tune_id.rsplit("_", 1)[-1]
    number = int(tail) if tail.isdigit() else 0
    seed = spec.seeds[number % len(spec.seeds)]
    return spec.trial(params, seed, number, params)


# ---------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------

def _make_trainable(fn: Callable, request: Callable) -> type:
    """``fn`` (a function trainable) as a Tune trainable class whose worker, when the trial ends or is stopped,
    waits for the trial thread to unwind (see "ASHA stops are deterministic" in the module docstring)."""
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(tune.with_resources(fn, request))

    class WarmTrainable(base):
        def cleanup(self):
            _wait_for_thread()
            super().cleanup()

        def reset_config(self, new_config):
            _wait_for_thread()  # Ray's reset_config waits TUNE_FUNCTION_THREAD_TIMEOUT_S at most
            return super().reset_config(new_config)

    WarmTrainable.__name__ = "rlhf_ablate_trial"
    return WarmTrainable


def _wait_for_thread() -> None:
    """End the trial thread (a thread parked in ``tune.report`` wakes with ``SystemExit``) and wait for it to unwind:
    up to THREAD_STOP_TIMEOUT_S, and while it trains a trial group, until the group's other members are trained and
    committed (a builder whose own trial was stopped trains them to the end: rlhf_ablate/run/groups.py)."""
    from ray.train._internal.session import get_session

    from ..run.groups import building

    session = get_session()
    if session is not None and session.training_started:
        session.finish(timeout=THREAD_STOP_TIMEOUT_S)
        while building() and session.training_thread.is_alive():
            session.training_thread.join(timeout=5)


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])  # <root>/rlhf_ablate/launch/tune.py


def _init_ray(address: Optional[str], num_gpus: int) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "TUNE_FUNCTION_THREAD_TIMEOUT_S": str(THREAD_STOP_TIMEOUT_S),
           "PYTHONPATH": os.pathsep.join(
        [_package_root()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    for k in ("WANDB_MODE", "WANDB_DIR", "RLHF_ABLATE_CACHE", "RLHF_ABLATE_CODE_VERSION", "RLHF_ABLATE_PLUGINS", "HF_HOME",
              "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    kwargs: dict = {"runtime_env": {"env_vars": env}, "log_to_driver": False, "include_dashboard": False,
                    "configure_logging": True, "logging_level": "ERROR"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # A local Ray's workers inherit this process's environment, so the variables need no runtime environment,
        # whose setup made each actor start 1 to 2 s slower on a busy 2-core machine (measured side by side).
        # address="local": a new Ray of this machine's CPUs and GPUs, never the cluster a `ray start` left running
        # here (ray.init() without an address joins that one; --address or RAY_ADDRESS choose a cluster).
        os.environ.update(kwargs.pop("runtime_env")["env_vars"])
        ray.init(address="local", num_cpus=os.cpu_count() or 1, num_gpus=num_gpus, **kwargs)


def _setup_env(address: Optional[str]) -> None:
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"          # absolute paths anyway; keeps relative data paths working
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")     # no Ray progress table: our own lines instead
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no Ray CSV/TB/JSON loggers per trial
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # stage events carry no search metric
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "1000")
    # A stopped trial's worker that builds a trial group stops only when the group is trained (_wait_for_thread);
    # Tune kills a worker still stopping after TUNE_FORCE_TRIAL_CLEANUP_S (600 s), which would end the group.
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(GROUP_STOP_TIMEOUT_S))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local Ray: no token written under ~/.ray (docs/stack.md)


def _request(spec: Any, trial: Any, gpus: list) -> dict:
    """The trial's Ray resources (launch/resources.py). Without a GPU visible to the driver every trial asks for
    ``resources.gpu`` as given (0 for ``auto``), so the memory estimate decides nothing, and computing it would
    import torch and transformers into the driver: 12 s of a 62 s CPU benchmark sweep on a busy 2-core machine
    (``python -X importtime``)."""
    from .resources import trial_resources

    if gpus:
        return trial_resources(spec, trial, gpus)
    g = spec.resources.gpu
    return {"cpu": spec.resources.cpu, "gpu": 0.0 if isinstance(g, str) else float(g), "estimate_gb": None}


def run_sweep(spec: Any, run_dir: Path, *, resume: bool = False, max_concurrent: Optional[int] = None,
              use_cache: bool = True, address: Optional[str] = None, report: bool = True,
              trial_fn: Optional[Callable] = None, stream: Any = None) -> int:
    """Run (or continue) every trial of ``spec`` under ``run_dir``. Returns 0 if all trials are ok, 1 otherwise.

    ``trial_fn(spec, trial, run_dir, *, use_cache, on_step) -> result dict`` defaults to
    :func:`rlhf_ablate.run.trial.run_trial_in_sweep`; it must write ``result.json`` and return it."""
    from .resources import detect_gpus, resolve_group_size
    from ..config.sweep import expand
    from ..run.tracking import check_tracking

    out = stream or sys.stdout
    run_dir = Path(run_dir).resolve()
    if resume and not (run_dir / SWEEP_JSON).exists():
        raise ConfigError(f"--resume: {run_dir} holds no sweep to resume (no sweep.json). Run without --resume to "
                          f"start it, or pass the --out directory of the sweep you mean.")
    trials = expand(spec)
    check_tracking(spec.tracking)
    run_dir.mkdir(parents=True, exist_ok=True)
    address = address or None
    _setup_env(address)

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(run_dir / ".driver.lock", timeout=0))
        except LockBusy as e:
            raise ConfigError(f"another sweep driver is already running on {run_dir} ({e.holder}). Wait for it, or "
                              f"stop it; rerunning the same command later continues the sweep.") from None
        write_sweep_json(run_dir, spec, trials, use_cache=use_cache, launcher="ray")
        gpus = [] if address and os.environ.get("RLHF_ABLATE_GPUS") is None else detect_gpus()
        spec = resolve_group_size(spec, trials, gpus)  # trial groups: every member agrees on K
        optuna = spec.search.type == "optuna"
        done = {t.trial_id for t in trials if (read_result(run_dir, t.trial_id) or {}).get("status") in FINISHED}
        pending = [t for t in trials if t.trial_id not in done] if not optuna else []
        retried = [t for t in pending if read_result(run_dir, t.trial_id) is not None]
        resources = {t.index: _request(spec, t, gpus) for t in (pending or trials[:1])}  # refuse early
        print(f"sweep {spec.name} (version {spec.version}): {len(trials) if not optuna else spec.search.num_samples}"
              f" trials, {len(done)} already done" + (f", {len(retried)} failed before and retried" if retried
                                                       else "") + f"; run directory {run_dir}", file=out, flush=True)
        t0 = time.monotonic()
        if optuna:
            prior = _optuna_prior(spec, run_dir)
            finished = sum(r.get("status") in FINISHED for r in _all_results(run_dir, spec.name))
            remaining = spec.search.num_samples - finished  # ok and ASHA-stopped samples count as done
            if remaining > 0:
                _fit(spec, run_dir, [], resources, gpus, max_concurrent, use_cache, address, trial_fn, out,
                     optuna_prior=prior, num_samples=remaining)
            ids = [r["trial_id"] for r in _all_results(run_dir, spec.name)]
        else:
            if pending:
                _fit(spec, run_dir, pending, resources, gpus, max_concurrent, use_cache, address, trial_fn, out)
            ids = [t.trial_id for t in trials]
        # A trial that did not record an end (driver-side problem) is reported as such, never silently missing.
        results = []
        for tid in ids:
            r = read_result(run_dir, tid)
            if r is None:
                t = next(t for t in trials if t.trial_id == tid)
                r = record_failure(run_dir, spec.name, t, "NotRun", "the trial did not record a result; rerun the "
                                   "same command to retry it")
            results.append(r)
        print(summary_table(results, spec), file=out)
        failed = [r for r in results if r.get("status") not in FINISHED]
        stopped = sum(r.get("status") == "stopped" for r in results)
        print(f"{len(results) - len(failed)}/{len(results)} trials finished"
              f"{f' ({stopped} stopped early by {spec.scheduler.type})' if stopped else ' ok'} in "
              f"{time.monotonic() - t0:.0f}s; results: {run_dir / 'trials'}", file=out, flush=True)
        if report:
            _write_report(run_dir, out)
    return 0 if not failed else 1


def _fit(spec: Any, run_dir: Path, pending: list, resources: dict, gpus: list, max_concurrent: Optional[int],
         use_cache: bool, address: Optional[str], trial_fn: Optional[Callable], out: Any, *,
         optuna_prior: Optional[list] = None, num_samples: int = 0) -> None:
    import ray
    from ray import tune

    _init_ray(address, len(gpus))
    if address and not gpus and spec.resources.gpu in ("auto", "probe") and ray.cluster_resources().get("GPU", 0) > 0:
        # The driver cannot see the cluster's GPU memory: ask for whole GPUs (set RLHF_ABLATE_GPUS to pack).
        for r in resources.values():
            r["gpu"] = 1.0
    default_res = next(iter(resources.values()))

    def request(config: dict) -> dict:
        r = resources.get(config.get("index"), default_res)
        return {"cpu": r["cpu"], "gpu": r["gpu"]}

    trainable = _make_trainable(
        tune.with_parameters(_trainable, spec=spec, run_dir=str(run_dir), use_cache=use_cache, trial_fn=trial_fn),
        request)
    total = len(expand_ids(spec)) if optuna_prior is None else spec.search.num_samples
    lines = LiveLines(spec, run_dir, total, out, lookup=lambda cfg, tid: _trial_from_config(spec, cfg, tid))
    limit = max_concurrent or spec.max_concurrent or None
    scheduler = None
    if spec.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="ppo_step", metric=spec.scheduler.metric,
                                  mode=spec.scheduler.mode, grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor, max_t=spec.scheduler.max_t,
                                  stop_last_trials=False)
    if optuna_prior is None:
        param_space = {"index": tune.grid_search([t.index for t in pending])}
        tune_config = tune.TuneConfig(num_samples=1, scheduler=scheduler, max_concurrent_trials=limit,
                                      reuse_actors=True)
    else:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        space = {k: _tune_dist(k, d) for k, d in spec.search.space.items()}
        class _OptunaSearch(OptunaSearch):
            # Ray's OptunaSearch reads the metric from *every* result (for Optuna pruning); our stage events and
            # PPO steps do not carry the search metric (an eval metric known at the end), so skip those.
            def on_trial_result(self, trial_id: str, result: dict) -> None:
                if self.metric in result:
                    super().on_trial_result(trial_id, result)

        searcher = _OptunaSearch(metric=spec.search.metric, mode=spec.search.mode,
                                points_to_evaluate=[p for p, _ in optuna_prior] or None,
                                evaluated_rewards=[v for _, v in optuna_prior] or None)
        searcher = ConcurrencyLimiter(searcher, max_concurrent=min(limit or spec.search.max_concurrent,
                                                                   spec.search.max_concurrent))
        param_space = space
        tune_config = tune.TuneConfig(num_samples=num_samples, search_alg=searcher, scheduler=scheduler,
                                      metric=spec.search.metric if scheduler is None else None,
                                      mode=spec.search.mode if scheduler is None else None, reuse_actors=True)
    run_config = tune.RunConfig(
        name=f"tune-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
        storage_path=str(run_dir / "ray"), verbose=0, callbacks=[lines.callback()],
        # Not log_to_file=True: Ray then swaps sys.stdout for a Tee without isatty(), which transformers' model
        # loading report calls (AttributeError in every stage). Stages keep their own log.txt instead.
        failure_config=tune.FailureConfig(max_failures=0))
    import logging

    # Ray logs every crashed trial's traceback at ERROR; our line and result.json already carry the reason.
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)
    try:
        tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config).fit()
    finally:
        tune_logger.setLevel(level)


def expand_ids(spec: Any) -> list[str]:
    from ..config.sweep import expand

    return [t.trial_id for t in expand(spec)]


def _tune_dist(key: str, dist: dict) -> Any:
    from ray import tune

    kind, arg = next(iter(dist.items()))
    if kind == "loguniform":
        return tune.loguniform(arg[0], arg[1])
    if kind == "uniform":
        return tune.uniform(arg[0], arg[1])
    if kind == "int":
        return tune.randint(int(arg[0]), int(arg[1]) + 1)  # inclusive upper bound in the sweep file
    if kind == "choice":
        return tune.choice(list(arg))
    raise ConfigError(f"search.space.{key}: unknown distribution {kind!r} (loguniform, uniform, int, choice).")


def _all_results(run_dir: Path, sweep_name: str) -> list[dict]:
    return [r for _, r in scan_results(run_dir, sweep_name)]


def _optuna_prior(spec: Any, run_dir: Path) -> list[tuple[dict, float]]:
    """Finished trials of an earlier (interrupted) Optuna run: fed back to the new searcher, not rerun."""
    prior = []
    for r in _all_results(run_dir, spec.name):
        if r.get("status") == "ok" and spec.search.metric in r.get("metrics", {}):
            params = {k: r["config"][k] for k in spec.search.space if k in r.get("config", {})}
            if len(params) == len(spec.search.space):
                prior.append((params, r["metrics"][spec.search.metric]))
    return prior


def _write_report(run_dir: Path, out: Any) -> None:
    try:
        from analysis.report import write_report
    except ImportError:
        return
    try:
        rep = write_report(run_dir)
        out_dir = getattr(rep, "out_dir", None) or run_dir / "report"
        print(f"report: {Path(out_dir) / 'report.md'}", file=out, flush=True)
    except Exception as e:  # noqa: BLE001 - the trials are done; a report problem must not hide that
        print(f"report not written ({type(e).__name__}: {e}); run `python -m analysis report {run_dir}`",
              file=out, flush=True)
