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
from .result import SCHEMA, now, read_result, result_path, versions, write_result

OnStep = Callable[[dict], None] | None


def stage_keys(cfg: TrialConfig, cache: StageCache, data_fp: str) -> dict[str, str]:
    """Each stage's key hashes its own config, its upstream keys and the data fingerprint (the cache adds the
    code version). So a kl_coef sweep shares SFT and RM, and a changed SFT setting invalidates everything after."""
    a = dataclasses.asdict
    common = {"model": a(cfg.model), "seed": cfg.seed, "data": data_fp}
    keys = {"sft": cache.key("sft", {**common, "sft": a(cfg.sft)})}
    keys["rm"] = cache.key("rm", {**common, "rm": a(cfg.rm),
                                  "upstream": [keys["sft"]] if cfg.rm.init_from == "sft" else []})
    keys["eval_sft"] = cache.key("eval", {**common, "eval": a(cfg.eval), "policy": "sft",
                                          "upstream": [keys["sft"], keys["rm"]]})
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
        evals = [k for k in ("eval_base", "eval_sft", "eval_" + cfg.method) if k in keys]
        keys["compare"] = cache.key("compare", {**common, "eval": a(cfg.eval), "upstream": [keys[k] for k in evals]})
    return keys


def wants_compare(cfg: TrialConfig) -> bool:
    """The compare stage (win rates, embedding similarity) runs when it has something to compute."""
    return cfg.eval.judge != "none" or bool(cfg.eval.embedding_model)


def run_trial(cfg: TrialConfig, run_dir: Path, *, trial_id: str | None = None, sweep_name: str = "",
              index: int = 0, axes: dict | None = None, cache: StageCache, tracker: Any = None,
              on_step: OnStep = None) -> dict:
    """Run every stage (reusing cached ones) and write result.json atomically. Returns the result dict."""
    from ..data import load_data
    from ..files import read_json
    from ..runtime import set_threads

    set_threads()
    trial_id = trial_id or cfg.trial_id
    tdir = Path(run_dir) / "trials" / trial_id
    tdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "schema": SCHEMA, "trial_id": trial_id, "sweep": sweep_name, "index": index, "status": "ok",
        "error": None, "seed": cfg.seed, "config": cfg.flat(), "axes": dict(axes or {}), "metrics": {},
        "metric_meta": {}, "timings": {}, "history": {}, "records": {}, "versions": versions(),
        "started_at": now(), "finished_at": None,
        "cache_dir": str(cache.root)}
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
        data = load_data(cfg.data)
        result["data"] = {"version": data.version, "fingerprint": data.fingerprint,
                          "sizes": {k: len(getattr(data, k)) for k in ("sft_train", "rm_train", "rm_eval",
                                                                       "ppo_prompts", "eval")}}
        keys = stage_keys(cfg, cache, data.fingerprint)
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

        from ..stages.evaluate import evaluate_policy
        from ..stages.rm import train_rm
        from ..stages.sft import train_sft

        run("sft", "sft", lambda out: train_sft(cfg, data, out))
        run("rm", "rm", lambda out: train_rm(cfg, data, dirs["sft"] if cfg.rm.init_from == "sft" else None, out))
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

            evals = {k[len("eval_"):]: dirs[k] for k in ("eval_base", "eval_sft", "eval_" + m) if k in dirs}
            run("compare", "compare", lambda out: compare(cfg, evals, out))

        stage = "collect"
        metrics: dict[str, Any] = {}
        for name in ("sft", "rm", m, "eval_sft", "eval_" + m, "compare"):
            if name in dirs:
                metrics.update(read_json(dirs[name] / "metrics.json"))
        result["metrics"] = metrics
        result["metric_meta"] = read_json(dirs["eval_sft"] / "meta.json")
        result["records"] = {"rm": read_json(dirs["rm"] / "records.json"),
                             "sft": read_json(dirs["eval_sft"] / "records.json"),
                             m: read_json(dirs["eval_" + m] / "records.json")}
        if "compare" in dirs:
            result["records"]["judge"] = read_json(dirs["compare"] / "records.json")
            result["metric_meta"]["compare"] = read_json(dirs["compare"] / "meta.json")
        result["history"] = {s: read_json(dirs[s] / "history.json") for s in ("sft", "rm", m)
                             if (dirs[s] / "history.json").exists()}
    except Exception as e:  # noqa: BLE001 - a trial failure is recorded, never raised: the sweep goes on
        result["status"] = "failed"
        result["error"] = {"type": type(e).__name__, "message": str(e)[:2000], "stage": stage}
        (tdir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        emit({"stage": stage, "event": "failed", "error": f"{type(e).__name__}: {e}"[:300]})
    result["timings"]["total"] = round(time.perf_counter() - t_start, 3)
    result["finished_at"] = now()
    write_result(run_dir, result)
    if tracker is not None:
        _track_final(tracker, cfg, result)
    return result


def _track_final(tracker: Any, cfg: TrialConfig, result: dict) -> None:
    numeric = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    tracker.summary({**numeric, "status": result["status"]})
    rows = [[r.get("data_id"), r.get("prompt"), r.get("generation"), r.get("reference"), r.get("reward")]
            for r in result["records"].get(cfg.method, [])[:cfg.eval.num_samples_logged]]
    if rows:
        tracker.log_table(f"{cfg.method}/samples", ["data_id", "prompt", "generation", "reference", "reward"], rows)


def run_trial_in_sweep(spec, trial, run_dir: Path, *, use_cache: bool = True, on_step: OnStep = None) -> dict:
    """What a Ray trainable or a SLURM array task runs. A trial whose result.json is already ``ok`` is not rerun
    (resume, and SLURM requeue after preemption); its result is returned as it is."""
    from .tracking import make_tracker

    run_dir = Path(run_dir).resolve()
    done = read_result(run_dir, trial.trial_id)
    if done is not None and done.get("status") == "ok":
        return done
    cache = StageCache(default_cache_root(spec), enabled=use_cache)
    tracker = make_tracker(spec.tracking, sweep_name=spec.name, trial_id=trial.trial_id,
                           config_flat=trial.config.flat(), axes=trial.axes, run_dir=run_dir)
    status = "failed"
    try:
        result = run_trial(trial.config, run_dir, trial_id=trial.trial_id, sweep_name=spec.name, index=trial.index,
                           axes=trial.axes, cache=cache, tracker=tracker, on_step=on_step)
        status = result["status"]
        return result
    finally:
        tracker.finish(status)


__all__ = ["run_trial", "run_trial_in_sweep", "result_path", "read_result", "stage_keys", "SCHEMA"]
