"""One trial: data(version), then the stages of its graph (rlhf_ablate/run/graph.py: SFT -> RM -> evals -> the
method -> its eval -> compare), each a cached artifact directory, then ``RUN_DIR/trials/<trial_id>/result.json``
(docs/architecture.md; rlhf_ablate/rundir.py owns the file).

The Ray trainable and the SLURM array task are thin shells around :func:`run_trial_in_sweep`. A trial never
raises for a failure of its own: it records ``status: failed`` with the error class, message and stage, so the
sweep goes on and the table lists it.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..config import TrialConfig
from ..config.overopt import probe_prompts_problem
from ..errors import TrialFailed
from .cache import StageCache
from ..rundir import (SCHEMA, begin_attempt, default_cache_root, error_record, new_result, now, read_result,
                      result_path, trial_dir, versions, write_result)

OnStep = Callable[[dict], None] | None


def run_trial(cfg: TrialConfig, run_dir: Path, *, trial_id: str | None = None, sweep_name: str = "",
              index: int = 0, axes: dict | None = None, cache: StageCache, tracker: Any = None,
              on_step: OnStep = None, threads: int = 1, attempt: int = 0, data: Any = None,
              group: Any = ()) -> dict:
    """Run every stage (reusing cached ones) and write result.json atomically. Returns the result dict.

    ``threads``: the torch thread count every stage computes with (the sweep's ``resources.cpu``), whatever the
    environment says (rlhf_ablate/runtime.py). ``data``: the trial's DataBundle when the caller has already loaded
    it (else it is loaded here). ``group``: the other trials of its trial group (rlhf_ablate/run/groups.py), whose
    PPO stages it trains with its own when it gets there first."""
    from ..data import load_data
    from ..files import read_json
    from ..runtime import MicroBatchOutOfMemory, recording_retries, release_memory, set_threads
    from .graph import Ctx, stage_keys, trial_stages
    from .groups import follow, replay

    set_threads(threads)
    trial_id = trial_id or cfg.trial_id
    tdir = trial_dir(run_dir, trial_id)
    tdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = new_result(trial_id, sweep=sweep_name, index=index, seed=cfg.seed, config=cfg.flat(),
                                        axes=axes or {}, attempt=attempt, threads=threads)
    result["versions"] = dict(versions())
    result["cache_dir"] = str(cache.root)  # where the artifacts live (chat, eval.judge_rm_from)
    emit = on_step or (lambda _e: None)
    t_start = time.perf_counter()
    stage = "data"
    retries: list[dict] = []

    def step_cb(event: dict) -> None:
        emit(event)
        if tracker is not None and "step" in event:
            tracker.log({k: v for k, v in event.items() if "/" in k and isinstance(v, (int, float))},
                        step=event["step"])

    try:
        emit({"stage": "data", "event": "start"})
        data = load_data(cfg.data) if data is None else data
        result["data"] = {"version": data.version, "fingerprint": data.fingerprint,
                          "sizes": {k: len(getattr(data, k)) for k in ("sft_train", "rm_train", "rm_eval",
                                                                       "ppo_prompts", "eval")}}
        if problem := probe_prompts_problem(cfg, len(data.ppo_prompts)):  # before SFT and the RMs train, not at PPO
            raise TrialFailed(f"data: {problem}")
        keys = stage_keys(cfg, cache, data.fingerprint, threads)
        ctx = Ctx(cfg, data, on_step=step_cb, cache=cache, keys=keys,
                  group=[(t.trial_id, t.config, k) for t in group
                         if (k := stage_keys(t.config, cache, data.fingerprint, threads))["sft"] == keys["sft"]])
        stages = trial_stages(cfg)
        for s in stages:  # run order: each stage after its upstream ones (rlhf_ablate/run/graph.py)
            stage = s.name
            emit({"stage": s.name, "event": "start"})
            # A group member whose stage another trial trains reports its steps as they come (run/groups.py)
            followed = follow(cache, keys[s.name], step_cb) if s.name == cfg.method and ctx.group else 0
            with recording_retries(lambda ev: emit({**ev, "event": "oom_retry"})) as retries:
                r = cache.run(s.bucket, keys[s.name], lambda out, s=s: _build(s, ctx, out), s.promises(cfg))
            release_memory()  # the stage's models are gone: give their memory back before the next one loads
            result["timings"][s.name] = r.timing()
            if (r.path / RETRIES_FILE).is_file():  # how the artifact was built, also on a cache hit
                result["timings"][s.name]["oom_retries"] = read_json(r.path / RETRIES_FILE)
            if r.repaired:
                emit({"stage": s.name, "event": "repaired", "reason": f"{s.bucket}/{r.key}: {r.repaired}"})
            if s.name == cfg.method and (r.path / "group.json").is_file() \
                    and read_json(r.path / "group.json")["builder"] != trial_id:  # its steps ran in another trial
                replay(read_json(r.path / "history.json"), followed, step_cb)
            emit({"stage": s.name, "event": "end", "cache_hit": r.hit, "seconds": r.seconds})
            ctx.dirs[s.name] = r.path

        stage = "collect"
        metrics: dict[str, Any] = {}
        for s in stages:
            if (ctx.dirs[s.name] / "metrics.json").is_file():
                metrics.update(read_json(ctx.dirs[s.name] / "metrics.json"))
        result["metrics"] = metrics
        result["metric_meta"] = read_json(ctx.dirs["eval_sft"] / "meta.json")
        if "compare" in ctx.dirs:
            result["metric_meta"]["compare"] = read_json(ctx.dirs["compare"] / "meta.json")
        result["records"] = {s.records_as: read_json(ctx.dirs[s.name] / "records.json") for s in stages
                             if s.records_as}
        result["history"] = {s.name: read_json(ctx.dirs[s.name] / "history.json") for s in stages
                             if s.history and (ctx.dirs[s.name] / "history.json").exists()}
        if (ctx.dirs[cfg.method] / "group.json").is_file():  # trained in a trial group (run/groups.py)
            result["group"] = read_json(ctx.dirs[cfg.method] / "group.json")
        overopt = ctx.dirs[cfg.method] / "overoptimization.json"  # the alarm's record (rlhf_ablate/ppo/gold.py)
        if overopt.is_file():
            result["overoptimization"] = read_json(overopt)
    except Exception as e:  # noqa: BLE001 - a trial failure is recorded, never raised: the sweep goes on
        if isinstance(e, MicroBatchOutOfMemory):
            e = out_of_memory_failure(cfg, stage, e)
        result["status"] = "failed"
        result["error"] = error_record(type(e).__name__, str(e), stage)
        if retries and stage not in result["timings"]:  # the failed stage's retries, before its last attempt
            result["error"]["oom_retries"] = list(retries)
        (tdir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        emit({"stage": stage, "event": "failed", "error": f"{type(e).__name__}: {e}"[:300]})
    result["versions"].update(_builtin_weights(cfg))
    result["timings"]["total"] = round(time.perf_counter() - t_start, 3)
    result["finished_at"] = now()
    write_result(run_dir, result)
    if tracker is not None:
        _track_final(tracker, cfg, result)
    return result


def probe_prompt_checks(trials: list) -> list[str]:
    """The gold probe's share of the PPO prompts (config/overopt.py: probe_prompts_problem), on the cleaned data of
    each distinct data config a probing PPO trial reads (load_data: what the trial reads first anyway), for the
    launchers' preflight (cli.py: preflight). A data source that does not load is left to the source checks and to
    the trial, which records it."""
    import dataclasses

    from ..data import load_data
    from ..errors import ConfigError
    from ..files import canonical_json

    counts: dict[str, int] = {}
    lines = []
    for t in trials:
        cfg = t.config
        if not probe_prompts_problem(cfg, 0):  # no probe (not PPO, or ppo.gold=none)
            continue
        key = canonical_json(dataclasses.asdict(cfg.data))
        if key not in counts:
            try:
                counts[key] = len(load_data(cfg.data).ppo_prompts)
            except Exception:  # noqa: BLE001 - reported by the preflight's source checks, or by the trial itself
                continue
            lines.append(f"data {cfg.data.source}: {counts[key]} PPO prompts")
        problem = probe_prompts_problem(cfg, counts[key])
        if problem:
            raise ConfigError(f"trial {t.index} ({t.trial_id}): {problem}")
    return lines


RETRIES_FILE = "oom_retries.json"   # in a stage's artifact: its micro-batch retries (rlhf_ablate/runtime.py)


def _build(s: Any, ctx: Any, out: Path) -> None:
    """Build stage ``s`` into ``out``, with its out-of-memory retries (if any) in ``out/oom_retries.json``."""
    from ..files import write_json
    from ..runtime import recording_retries

    with recording_retries() as retries:
        s.build(ctx, out)
    if retries:
        write_json(out / RETRIES_FILE, retries)


def out_of_memory_failure(cfg: TrialConfig, stage: str, e: Exception) -> Exception:
    """The TrialFailed of a stage that ran out of memory at a micro-batch of 1: what it measured and what the memory
    estimate (rlhf_ablate/models/memory.py, per stage in rlhf_ablate/run/graph.py) expected on this device."""
    from ..errors import TrialFailed
    from ..models import memory
    from .graph import estimate_stage_bytes

    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        est = estimate_stage_bytes(cfg, device).get(stage, {}).get("peak")
        est_text = (f"{est / memory.GIB:.2f} GiB of tensors estimated on {device}" if est is not None
                    else "no estimate (the stage loads no model)")
    except Exception as err:  # noqa: BLE001 - the estimate must not hide the out-of-memory error
        est_text = f"no estimate ({type(err).__name__}: {err})"
    return TrialFailed(f"{e} (the memory estimate for stage {stage}: {est_text}). Lower the stage's batch or "
                       f"sequence lengths, or give the trial more memory (resources.gpu).")


def _builtin_weights(cfg: TrialConfig) -> dict:
    """The sha256 of the built-in model's weights this trial used (models/builtin.py), so that a difference between
    machines shows in result.json instead of only in the numbers."""
    from ..config import BUILTIN_MODELS

    if cfg.model.base_model not in BUILTIN_MODELS:
        return {}
    from ..models.builtin import builtin_dir, builtin_sha256

    sha = builtin_sha256(builtin_dir(cfg.model.base_model))
    return {"builtin_sha256": sha} if sha else {}


def _track_final(tracker: Any, cfg: TrialConfig, result: dict) -> None:
    numeric = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    tracker.summary({**numeric, "status": result["status"]})
    rows = [[r.get("data_id"), r.get("prompt"), r.get("generation"), r.get("reference"), r.get("reward")]
            for r in result["records"].get(cfg.method, [])[:cfg.eval.num_samples_logged]]
    if rows:
        tracker.log_table(f"{cfg.method}/samples", ["data_id", "prompt", "generation", "reference", "reward"], rows)


def run_trial_in_sweep(spec, trial, run_dir: Path, *, use_cache: bool = True, on_step: OnStep = None,
                       data: Any = None) -> dict:
    """What a Ray trainable or a SLURM array task runs (and ``trial``). A trial whose result.json is already ``ok``
    is not rerun (resume, and SLURM requeue after preemption); its result is returned as it is.

    Every start counts as an attempt (run/result.py: ``attempts.jsonl``); the attempt number goes into result.json
    and the W&B run, which a retry resumes (run/tracking.py). The thread count is the sweep's ``resources.cpu``.
    The data is loaded and checked before the tracker starts: a trial that fails there records its failure in
    result.json but leaves no W&B run, stage lock or executions.jsonl entry behind."""
    from ..data import load_data
    from .tracking import make_tracker

    run_dir = Path(run_dir).resolve()
    done = read_result(run_dir, trial.trial_id)
    if done is not None and done.get("status") == "ok":
        return done
    attempt = begin_attempt(run_dir, trial.trial_id)
    cache = StageCache(default_cache_root(spec), enabled=use_cache)
    if data is None:
        try:
            data = load_data(trial.config.data)
        except Exception:  # noqa: BLE001 - recorded (stage "data", error.txt) by run_trial, without a tracker
            return run_trial(trial.config, run_dir, trial_id=trial.trial_id, sweep_name=spec.name,
                             index=trial.index, axes=trial.axes, cache=cache, on_step=on_step,
                             threads=spec.resources.cpu, attempt=attempt)
    from .groups import members_of

    group = members_of(spec, trial)
    tracker = make_tracker(spec.tracking, sweep_name=spec.name, trial_id=trial.trial_id,
                           config_flat=trial.config.flat(), axes=trial.axes, run_dir=run_dir, attempt=attempt)
    status = "failed"
    try:
        result = run_trial(trial.config, run_dir, trial_id=trial.trial_id, sweep_name=spec.name, index=trial.index,
                           axes=trial.axes, cache=cache, tracker=tracker, on_step=on_step,
                           threads=spec.resources.cpu, attempt=attempt, data=data, group=group)
        status = result["status"]
        return result
    except SystemExit:
        status = "stopped"  # Ray ends the trial thread of a trial its scheduler stopped with SystemExit(0)
        raise
    finally:
        tracker.finish(status)


__all__ = ["run_trial", "run_trial_in_sweep", "probe_prompt_checks", "result_path", "read_result", "SCHEMA"]
