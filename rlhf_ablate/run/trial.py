"""One trial: data(version) -> SFT -> RM -> PPO (or DPO) -> eval, each stage a cached artifact directory,
then ``RUN_DIR/trials/<trial_id>/result.json`` (docs/architecture.md; rlhf_ablate/run/result.py owns the file).

The Ray trainable and the SLURM array task are thin shells around :func:`run_trial_in_sweep`. A trial never
raises for a failure of its own: it records ``status: failed`` with the error class, message and stage, so the
sweep goes on and the table lists it.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..config import TrialConfig
from .cache import StageCache, default_cache_root
from .result import SCHEMA, begin_attempt, error_record, new_result, now, read_result, result_path, versions, write_result

OnStep = Callable[[dict], None] | None


def stage_keys(cfg: TrialConfig, cache: StageCache, data_fp: str, threads: int = 1) -> dict[str, str]:
    """Each stage's key hashes its own config, its upstream keys and the data fingerprint (the cache adds the
    code version). So a kl_coef sweep shares SFT and RM, and a changed SFT setting invalidates everything after.
    The torch thread count is in every key: it changes the rounding, so the same key always means the same numbers
    (rlhf_ablate/runtime.py)."""
    a = dataclasses.asdict
    common = {"model": a(cfg.model), "seed": cfg.seed, "data": data_fp, "threads": threads}
    keys = {"sft": cache.key("sft", {**common, "sft": a(cfg.sft)})}
    keys["rm"] = cache.key("rm", {**common, "rm": a(cfg.rm),
                                  "upstream": [keys["sft"]] if cfg.rm.init_from == "sft" else []})
    keys["eval_sft"] = cache.key("eval", {**common, "eval": a(cfg.eval), "policy": "sft",
                                          "upstream": [keys["sft"], keys["rm"]]})
    # The base model's answers depend on the model, data and eval settings only (greedy decoding, no seed): one
    # artifact per model and data; the trial's RM scores them in a small stage of its own.
    keys["eval_base"] = cache.key("eval", {"model": a(cfg.model), "data": data_fp, "eval": a(cfg.eval),
                                           "policy": "base"})
    keys["score_base"] = cache.key("eval", {"policy": "base", "scored_by": keys["rm"],
                                            "upstream": [keys["eval_base"], keys["rm"], keys["sft"]]})
    if cfg.method == "ppo":
        keys["ppo"] = cache.key("ppo", {**common, "ppo": a(cfg.ppo), "upstream": [keys["sft"], keys["rm"]]})
    elif cfg.method == "dpo":
        keys["dpo"] = cache.key("dpo", {**common, "dpo": a(cfg.dpo), "upstream": [keys["sft"]]})
    else:  # grpo, rloo: the RM is upstream only when it gives the reward
        m = cfg.method
        keys[m] = cache.key(m, {**common, m: a(getattr(cfg, m)), "reward": a(cfg.reward),
                                "upstream": [keys["sft"]] + ([keys["rm"]] if cfg.reward.type == "rm" else [])})
    keys["eval_" + cfg.method] = cache.key("eval", {**common, "eval": a(cfg.eval), "policy": cfg.method,
                                                    "upstream": [keys[cfg.method], keys["rm"], keys["sft"]]})
    if wants_compare(cfg):
        evals = [k for k in ("score_base", "eval_sft", "eval_" + cfg.method) if k in keys]
        keys["compare"] = cache.key("compare", {**common, "eval": a(cfg.eval), "upstream": [keys[k] for k in evals]})
    return keys


def wants_compare(cfg: TrialConfig) -> bool:
    """The compare stage (win rates, embedding similarity) runs when it has something to compute."""
    return cfg.eval.judge != "none" or bool(cfg.eval.embedding_model)


def run_trial(cfg: TrialConfig, run_dir: Path, *, trial_id: str | None = None, sweep_name: str = "",
              index: int = 0, axes: dict | None = None, cache: StageCache, tracker: Any = None,
              on_step: OnStep = None, threads: int = 1, attempt: int = 0, data: Any = None) -> dict:
    """Run every stage (reusing cached ones) and write result.json atomically. Returns the result dict.

    ``threads``: the torch thread count every stage computes with (the sweep's ``resources.cpu``), whatever the
    environment says (rlhf_ablate/runtime.py). ``data``: the trial's DataBundle when the caller has already loaded
    it (else it is loaded here)."""
    from ..data import load_data
    from ..files import read_json
    from ..runtime import set_threads

    set_threads(threads)
    trial_id = trial_id or cfg.trial_id
    tdir = Path(run_dir) / "trials" / trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = new_result(trial_id, sweep=sweep_name, index=index, seed=cfg.seed, config=cfg.flat(),
                                        axes=axes or {}, attempt=attempt, threads=threads)
    result["versions"] = dict(versions())
    result["cache_dir"] = str(cache.root)  # where the artifacts live (chat, eval.judge_rm_from)
    emit = on_step or (lambda _e: None)
    t_start = time.perf_counter()
    stage = "data"

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
        keys = stage_keys(cfg, cache, data.fingerprint, threads)
        dirs: dict[str, Path] = {}

        def run(name: str, cache_stage: str, build: Callable[[Path], None]) -> Path:
            nonlocal stage
            stage = name
            emit({"stage": name, "event": "start"})
            r = cache.run(cache_stage, keys[name], build)
            result["timings"][name] = r.timing()
            emit({"stage": name, "event": "end", "cache_hit": r.hit, "seconds": r.seconds})
            dirs[name] = r.path
            return r.path

        from ..stages.evaluate import evaluate_policy, generate_base, score_base
        from ..stages.rm import train_rm
        from ..stages.sft import train_sft

        run("sft", "sft", lambda out: train_sft(cfg, data, out))
        run("rm", "rm", lambda out: train_rm(cfg, data, dirs["sft"] if cfg.rm.init_from == "sft" else None, out))
        run("eval_base", "eval", lambda out: generate_base(cfg, data, out))
        run("score_base", "eval", lambda out: score_base(cfg, dirs["sft"], dirs["rm"], dirs["eval_base"], out))
        run("eval_sft", "eval", lambda out: evaluate_policy(cfg, data, "sft", dirs["sft"], dirs["rm"], None, out))
        if cfg.method == "ppo":
            from ..stages.ppo import train_ppo

            run("ppo", "ppo", lambda out: train_ppo(cfg, data, dirs["sft"], dirs["rm"], out, on_step=step_cb))
        elif cfg.method == "dpo":
            from ..stages.dpo import train_dpo

            run("dpo", "dpo", lambda out: train_dpo(cfg, data, dirs["sft"], out))
        else:
            from ..stages.online_rl import train_online_rl

            run(cfg.method, cfg.method, lambda out: train_online_rl(cfg, data, dirs["sft"], dirs["rm"], out))
        m = cfg.method
        run("eval_" + m, "eval", lambda out: evaluate_policy(cfg, data, m, dirs["sft"], dirs["rm"], dirs[m], out))
        if "compare" in keys:
            from ..stages.compare import compare

            evals = {"base": dirs["score_base"], "sft": dirs["eval_sft"], m: dirs["eval_" + m]}
            run("compare", "compare", lambda out: compare(cfg, evals, out))

        stage = "collect"
        metrics: dict[str, Any] = {}
        for name in ("sft", "rm", m, "score_base", "eval_sft", "eval_" + m, "compare"):
            if name in dirs:
                metrics.update(read_json(dirs[name] / "metrics.json"))
        result["metrics"] = metrics
        result["metric_meta"] = read_json(dirs["eval_sft"] / "meta.json")
        result["records"] = {"rm": read_json(dirs["rm"] / "records.json"),
                             "base": read_json(dirs["score_base"] / "records.json"),
                             "sft": read_json(dirs["eval_sft"] / "records.json"),
                             m: read_json(dirs["eval_" + m] / "records.json")}
        if "compare" in dirs:
            result["records"]["judge"] = read_json(dirs["compare"] / "records.json")
            result["metric_meta"]["compare"] = read_json(dirs["compare"] / "meta.json")
        result["history"] = {s: read_json(dirs[s] / "history.json") for s in ("sft", "rm", m)
                             if (dirs[s] / "history.json").exists()}
    except Exception as e:  # noqa: BLE001 - a trial failure is recorded, never raised: the sweep goes on
        result["status"] = "failed"
        result["error"] = error_record(type(e).__name__, str(e), stage)
        (tdir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        emit({"stage": stage, "event": "failed", "error": f"{type(e).__name__}: {e}"[:300]})
    result["versions"].update(_builtin_weights(cfg))
    result["timings"]["total"] = round(time.perf_counter() - t_start, 3)
    result["finished_at"] = now()
    write_result(run_dir, result)
    if tracker is not None:
        _track_final(tracker, cfg, result)
    return result


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
    tracker = make_tracker(spec.tracking, sweep_name=spec.name, trial_id=trial.trial_id,
                           config_flat=trial.config.flat(), axes=trial.axes, run_dir=run_dir, attempt=attempt)
    status = "failed"
    try:
        result = run_trial(trial.config, run_dir, trial_id=trial.trial_id, sweep_name=spec.name, index=trial.index,
                           axes=trial.axes, cache=cache, tracker=tracker, on_step=on_step,
                           threads=spec.resources.cpu, attempt=attempt, data=data)
        status = result["status"]
        return result
    except SystemExit:
        status = "stopped"  # Ray ends the trial thread of a trial its scheduler stopped with SystemExit(0)
        raise
    finally:
        tracker.finish(status)


__all__ = ["run_trial", "run_trial_in_sweep", "result_path", "read_result", "stage_keys", "SCHEMA"]
