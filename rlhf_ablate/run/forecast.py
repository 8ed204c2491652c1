"""The doctor's forecast of a sweep's device-hours (rlhf_ablate/run/doctor.py measures; this module multiplies), and
its cache: one JSON per trial configuration under ``<cache>/doctor/``, which ``sweep --dry-run`` reads
(:func:`forecast_column`).

A trial's time is each stage's measured seconds per unit (an optimizer step, a rollout micro-batch, a train
micro-batch, 16 eval prompts) times the trial's own count of units. A trial whose batch sizes or lengths differ from
the measured one gets the measured seconds scaled linearly in the tokens a unit processes (an upper bound on a GPU,
where a larger batch costs less than proportionally); a different model or quantization is not scaled.

The over-optimization work (config/overopt.py) is counted where it runs: the gold RM (stage ``rm_gold``, its fold
of the preference data, ``rm.gold_max_steps``), the ensemble's ``rm.ensemble_size`` - 1 other RMs (stage
``rm_ensemble``, each as many steps as the trial's RM, on the same proxy fold), and inside PPO the gold probe (one
evaluation of ``ppo.gold_probe_size`` prompts at step 0, every ``ppo.gold_every`` steps and at the last) and, for
an ensemble reward, the members' extra scoring passes (scaled in forward passes between trials, see
:func:`scoring_passes`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..files import config_hash, read_json
from ..rundir import default_cache_root

EVAL_BATCH = 16           # eval answers 16 prompts per generate call (stages/evaluate.py)
DOCTOR_VERSION = 2        # in every cache key: a change of what is measured invalidates old forecasts
SPEED_WORDS = ("batch", "length", "tokens", "steps", "episodes", "epochs", "rank", "accum", "backend")
# Keys that decide speed without one of those words: the over-optimization work (config/overopt.py).
SPEED_KEYS = ("ensemble_size", "gold", "gold_fraction", "gold_every", "gold_probe_size", "reward")
REWARD_STAGES = ("rm_gold", "rm_ensemble")  # the over-optimization reward stages (run/graph.py), after the RM
# The gold probe's phases (run/doctor_phases.py) and the rollout phase each repeats on the probe prompts.
PROBE_LIKE = {"probe_generation": "generation", "probe_proxy": "scoring", "probe_gold": "scoring"}
PROBE_PHASES = tuple(PROBE_LIKE)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _steps(section: Any, n: int) -> int:
    if section.max_steps > 0:
        return section.max_steps
    per = max(1, section.batch_size * section.grad_accum)
    return max(1, math.ceil(math.ceil(n / per) * section.epochs))


def _pairs(groups: list) -> int:
    return sum(len(g.pairs()) for g in groups)


def gold_evaluations(cfg: Any, ppo_steps: int) -> int:
    """Gold-probe evaluations of a PPO run (ppo/gold.py: GoldProbe.due): step 0, every ``ppo.gold_every`` steps, and
    the last step when it is not one of those; 0 without ``ppo.gold``."""
    if cfg.method != "ppo" or cfg.ppo.gold == "none":
        return 0
    return 1 + ppo_steps // cfg.ppo.gold_every + (1 if ppo_steps % cfg.ppo.gold_every else 0)


def counts(cfg: Any, data: Any) -> dict[str, float]:
    """Units of work of each stage of one trial: optimizer steps (rm_ensemble: of all its RMs), rollout
    micro-batches, gold-probe evaluations, eval prompts. The RMs train on their fold (stages/rm.py: rm_groups)."""
    import dataclasses

    from ..config.overopt import uses_ensemble
    from ..models import ppo_plan, model_shape
    from ..stages.rm import rm_groups

    pairs = _pairs(rm_groups(cfg, data))
    out = {"sft": _steps(cfg.sft, len(data.sft_train)), "rm": _steps(cfg.rm, pairs)}
    if cfg.rm.gold != "none":
        r = cfg.rm if cfg.rm.gold_max_steps <= 0 else dataclasses.replace(cfg.rm, max_steps=cfg.rm.gold_max_steps)
        out["rm_gold"] = _steps(r, _pairs(rm_groups(cfg, data, gold=True)))
    if uses_ensemble(cfg):
        out["rm_ensemble"] = (cfg.rm.ensemble_size - 1) * out["rm"]
        out["rm_ensemble_models"] = cfg.rm.ensemble_size - 1
    m = cfg.method
    if m == "ppo":
        p = cfg.ppo
        shape = model_shape(cfg.model)
        plan = ppo_plan(p, shape.params, shape.vocab)
        steps = max(1, p.total_episodes // p.rollout_batch_size)
        micro = math.ceil(p.rollout_batch_size / plan.rollout_micro)
        out.update(ppo_steps=steps, generation=steps * micro, scoring=steps * micro,
                   update=steps * p.ppo_epochs * math.ceil(p.rollout_batch_size / plan.train_micro))
        out.update({ph: gold_evaluations(cfg, steps) for ph in PROBE_PHASES})
    else:
        sec = getattr(cfg, m)
        n = pairs if m == "dpo" else len(data.ppo_prompts)
        out["update"] = _steps(sec, n) if hasattr(sec, "max_steps") else 1
    out["eval"] = len(data.eval) / EVAL_BATCH   # per eval stage (base, SFT, the method)
    return out


def _tokens(cfg: Any) -> dict[str, float]:
    """What a unit of each phase processes, for the linear-in-tokens extrapolation between trials."""
    p, L = cfg.ppo, cfg.model.max_length
    rm = 2 * cfg.rm.batch_size * cfg.rm.grad_accum * L
    probe = p.gold_probe_size * (p.max_prompt_length + p.max_new_tokens)
    return {"sft": cfg.sft.batch_size * cfg.sft.grad_accum * L, "rm": rm, "rm_gold": rm, "rm_ensemble": rm,
            "probe_generation": p.gold_probe_size * p.max_new_tokens, "probe_proxy": probe * scoring_passes(cfg),
            "probe_gold": probe * gold_models(cfg),
            "generation": p.rollout_micro_batch_size * p.max_new_tokens,
            "scoring": p.rollout_micro_batch_size * (p.max_prompt_length + p.max_new_tokens) * scoring_passes(cfg),
            "update": max(1, p.mini_batch_size // p.grad_accum) * (p.max_prompt_length + p.max_new_tokens)
            if cfg.method == "ppo" else getattr(cfg, cfg.method).batch_size * L,
            "eval": EVAL_BATCH * (p.max_prompt_length + cfg.eval.max_new_tokens)}


def scoring_passes(cfg: Any) -> int:
    """Forward passes of PPO's scoring per row (ppo/rollout.py: score_batch): the policy's and the reference's
    log-probs, the values, and one per reward model PPO's reward reads (``ppo.reward=ensemble_*``: all
    ``rm.ensemble_size``). Scoring is scaled between trials in these passes, each taken as costing the same."""
    return 3 + (cfg.rm.ensemble_size if cfg.ppo.reward != "single" else 1)


def gold_models(cfg: Any) -> int:
    """Reward models gold's score averages (ppo/gold.py: GoldProbe.gold_names)."""
    return 1 if cfg.ppo.gold == "rm_gold" else max(1, cfg.rm.ensemble_size - 1)


def unit_seconds(measured: dict, measured_cfg: Any, cfg: Any) -> dict[str, float]:
    """Seconds per unit of each phase for ``cfg``, from the measurement of ``measured_cfg``."""
    tm, tc = _tokens(measured_cfg), _tokens(cfg)
    out = {}
    for ph, r in measured.items():
        per = r["seconds"] / r.get("steps", 1)
        out[ph] = per * (tc[ph] / tm[ph] if ph in tc and tm[ph] else 1.0)
    for ph, like in PROBE_LIKE.items():  # a probe the measured trial did not run: its rollout phase, per token
        if ph not in out and like in out and tc[like]:
            out[ph] = out[like] * tc[ph] / tc[like]
    out["eval_load"] = measured.get("eval", {}).get("load_seconds", 0.0)  # loading a policy and the RM, per eval
    for ph, r in measured.items():  # once per stage: loading, preparing, merging, saving
        out[f"{ph}_fixed"] = r.get("fixed_seconds", 0.0)
    return out


def padded_fraction(cfg: Any, data: Any, tokenizer: Any, sample: int = 256) -> dict[str, float]:
    """How long the trial's SFT and RM batches are, as a fraction of ``model.max_length`` (what the doctor measures
    at): batches are padded to their longest row, so the mean over random batches (of the stage's batch size, up
    to ``sample`` rows of the data) of the longest tokenized row, cut to ``max_length``."""
    import random

    from ..data.prompting import format_prompt, normalize

    L, eos = cfg.model.max_length, tokenizer.eos_token or ""
    rng = random.Random(0)

    def frac(texts: list[list[str]], batch: int) -> float:
        rows = rng.sample(texts, min(sample, len(texts)))
        if not rows:
            return 1.0
        lens = [max(min(L, len(tokenizer(t)["input_ids"])) for t in row) for row in rows]
        batches = [max(lens[i:i + batch]) for i in range(0, len(lens), max(1, batch))]
        return sum(batches) / len(batches) / L

    from ..stages.rm import rm_groups

    def pairs(groups: list) -> list[list[str]]:
        return [[format_prompt(p.prompt) + normalize(a) + eos for a in (p.chosen, p.rejected)]
                for g in groups for p in g.pairs()]

    sft = [[format_prompt(x.prompt) + normalize(x.completion) + eos] for x in data.sft_train]
    out = {"sft": frac(sft, cfg.sft.batch_size), "rm": frac(pairs(rm_groups(cfg, data)), cfg.rm.batch_size)}
    if cfg.rm.gold != "none":  # the gold RM's fold
        out["rm_gold"] = frac(pairs(rm_groups(cfg, data, gold=True)), cfg.rm.batch_size)
    return out


def stage_seconds(cfg: Any, data: Any, unit: dict[str, float],
                  fraction: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds of each stage of one trial; ``fraction``: :func:`padded_fraction` (1: every batch at max_length)."""
    c, f = counts(cfg, data), fraction or {}
    m = cfg.method
    method = unit.get("update_fixed", 0.0) + sum(unit.get(ph, 0.0) * c.get(ph, 0)
                                                 for ph in ("generation", "scoring", "update", *PROBE_PHASES))
    ev = unit.get("eval_load", 0.0) + unit["eval"] * c["eval"]
    out = {"sft": unit.get("sft_fixed", 0.0) + unit["sft"] * c["sft"] * f.get("sft", 1.0),
           "rm": unit.get("rm_fixed", 0.0) + unit["rm"] * c["rm"] * f.get("rm", 1.0)}
    for st, frac in (("rm_gold", f.get("rm_gold", 1.0)), ("rm_ensemble", f.get("rm", 1.0))):
        if st in c:  # a trial's reward stage that the measured trial lacked runs at the RM's speed
            per, fixed = (unit[st], unit.get(f"{st}_fixed", 0.0)) if st in unit else (unit["rm"], unit.get("rm_fixed", 0.0))
            out[st] = fixed * c.get(f"{st}_models", 1) + per * c[st] * frac
    return {**out, m: method, "eval_base": ev, "eval_sft": ev, "eval_" + m: ev}


def probe_seconds(cfg: Any, data: Any, unit: dict[str, float]) -> float:
    """Seconds of the gold probe inside the PPO stage (part of :func:`stage_seconds`' ``ppo``)."""
    c = counts(cfg, data)
    return sum(unit.get(ph, 0.0) * c.get(ph, 0) for ph in PROBE_PHASES)


def speed_key(cfg: Any, device: str, threads: int) -> str:
    """What decides a trial's speed: the model section, every batch size, length, rank, step count and backend,
    the data, the device and the thread count (not the seed, learning rates or KL coefficients)."""
    d = cfg.to_dict()
    keep = {sec: ({k: v for k, v in vals.items() if any(w in k for w in SPEED_WORDS)}
                  if sec not in ("model", "data") else vals)
            for sec, vals in d.items() if isinstance(vals, dict)}
    for sec in ("rm", "ppo"):
        keep[sec].update({k: v for k, v in d[sec].items() if k in SPEED_KEYS})
    return config_hash({"doctor": DOCTOR_VERSION, "method": cfg.method, "config": keep, "device": device,
                        "threads": threads}, 16)


def doctor_dir() -> Path:
    return default_cache_root().parent / "doctor"


def forecast_column(spec: Any, trials: list) -> dict[str, list[str]]:
    """The ``sweep --dry-run`` column of cached doctor forecasts (device-hours per trial on this machine's device;
    ``*``: extrapolated from the measured trial), or nothing when no trial of the sweep has one."""
    root = doctor_dir()
    if not root.is_dir():
        return {}
    dev = device_name()
    col = []
    for t in trials:
        path = root / f"{speed_key(t.config, dev, spec.resources.cpu)}.json"
        rec = read_json(path) if path.is_file() else None
        col.append("-" if rec is None else f"{rec['hours']:.3g}" + ("" if rec["basis"] == "measured" else "*"))
    if all(c == "-" for c in col):
        return {}
    return {"doctor device-h": col}


def forecast_sweep(spec: Any, trials: list, measured: Any, phases: dict, device: str) -> tuple[list, float]:
    """``([(trial, hours, basis, stage seconds, gold-probe seconds within PPO's)], total hours)`` for every trial of the sweep from the phases
    measured on trial ``measured``; a stage shared through the stage cache (same key) counts once in the total.
    Writes each trial's forecast to ``doctor_dir()/<speed_key>.json``."""
    import dataclasses
    import time

    from ..data import load_data
    from ..files import canonical_json, write_json
    from ..models import load_tokenizer
    from .cache import StageCache
    from .graph import stage_keys, trial_stages

    cache = StageCache(default_cache_root(spec))
    datas: dict[str, Any] = {}
    fractions: dict[str, dict] = {}
    seen: set[str] = set()
    rows, total = [], 0.0
    key_measured = speed_key(measured.config, device, spec.resources.cpu)
    for t in trials:
        c = t.config
        dkey = canonical_json(dataclasses.asdict(c.data))
        if dkey not in datas:
            datas[dkey] = load_data(c.data)
        data = datas[dkey]
        fkey = canonical_json([dkey, dataclasses.asdict(c.model), c.sft.batch_size, c.rm.batch_size, c.rm.gold,
                                c.rm.gold_fraction])
        if fkey not in fractions:
            fractions[fkey] = padded_fraction(c, data, load_tokenizer(c.model))
        unit = unit_seconds(phases, measured.config, c)
        secs = stage_seconds(c, data, unit, fractions[fkey])
        probe = probe_seconds(c, data, unit)
        keys = stage_keys(c, cache, data.fingerprint, spec.resources.cpu)
        wanted = {s.name for s in trial_stages(c)}
        for name, s in secs.items():
            k = keys.get(name, f"{t.trial_id}:{name}")
            if name in wanted and k not in seen:
                seen.add(k)
                total += s / 3600
        hours = sum(secs.values()) / 3600
        key = speed_key(c, device, spec.resources.cpu)
        basis = "measured" if key == key_measured else "extrapolated"
        rows.append((t, hours, basis, secs, probe))
        write_json(doctor_dir() / f"{key}.json", {
            "hours": hours, "basis": basis, "stage_seconds": secs, "gold_probe_seconds": probe, "padded_fraction": fractions[fkey],
            "sweep": spec.name, "trial_id": t.trial_id, "device": device, "threads": spec.resources.cpu,
            "measured_key": key_measured, "measured_trial": measured.trial_id, "phases": phases,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return rows, total
