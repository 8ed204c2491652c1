"""The doctor's forecast of a sweep's device-hours (rlhf_ablate/run/doctor.py measures; this module multiplies), and
its cache: one JSON per trial configuration under ``<cache>/doctor/``, which ``sweep --dry-run`` reads
(:func:`forecast_column`).

A trial's time is each stage's measured seconds per unit (an optimizer step, a rollout micro-batch, a train
micro-batch, 16 eval prompts) times the trial's own count of units. A trial whose batch sizes or lengths differ from
the measured one gets the measured seconds scaled linearly in the tokens a unit processes (an upper bound on a GPU,
where a larger batch costs less than proportionally); a different model or quantization is not scaled.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..files import config_hash, read_json
from ..rundir import default_cache_root

EVAL_BATCH = 16           # eval answers 16 prompts per generate call (stages/evaluate.py)
DOCTOR_VERSION = 1        # in every cache key: a change of what is measured invalidates old forecasts
SPEED_WORDS = ("batch", "length", "tokens", "steps", "episodes", "epochs", "rank", "accum", "backend")


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _steps(section: Any, n: int) -> int:
    if section.max_steps > 0:
        return section.max_steps
    per = max(1, section.batch_size * section.grad_accum)
    return max(1, math.ceil(math.ceil(n / per) * section.epochs))


def counts(cfg: Any, data: Any) -> dict[str, float]:
    """Units of work of each stage of one trial: optimizer steps, rollout micro-batches, eval prompts."""
    from ..models import ppo_plan, model_shape

    pairs = sum(len(g.pairs()) for g in data.rm_train)
    out = {"sft": _steps(cfg.sft, len(data.sft_train)), "rm": _steps(cfg.rm, pairs)}
    m = cfg.method
    if m == "ppo":
        p = cfg.ppo
        shape = model_shape(cfg.model)
        plan = ppo_plan(p, shape.params, shape.vocab)
        steps = max(1, p.total_episodes // p.rollout_batch_size)
        micro = math.ceil(p.rollout_batch_size / plan.rollout_micro)
        out.update(ppo_steps=steps, generation=steps * micro, scoring=steps * micro,
                   update=steps * p.ppo_epochs * math.ceil(p.rollout_batch_size / plan.train_micro))
    else:
        sec = getattr(cfg, m)
        n = pairs if m == "dpo" else len(data.ppo_prompts)
        out["update"] = _steps(sec, n) if hasattr(sec, "max_steps") else 1
    out["eval"] = len(data.eval) / EVAL_BATCH   # per eval stage (base, SFT, the method)
    return out


def _tokens(cfg: Any) -> dict[str, float]:
    """What a unit of each phase processes, for the linear-in-tokens extrapolation between trials."""
    p, L = cfg.ppo, cfg.model.max_length
    return {"sft": cfg.sft.batch_size * cfg.sft.grad_accum * L, "rm": 2 * cfg.rm.batch_size * cfg.rm.grad_accum * L,
            "generation": p.rollout_micro_batch_size * p.max_new_tokens,
            "scoring": p.rollout_micro_batch_size * (p.max_prompt_length + p.max_new_tokens),
            "update": max(1, p.mini_batch_size // p.grad_accum) * (p.max_prompt_length + p.max_new_tokens)
            if cfg.method == "ppo" else getattr(cfg, cfg.method).batch_size * L,
            "eval": EVAL_BATCH * (p.max_prompt_length + cfg.eval.max_new_tokens)}


def unit_seconds(measured: dict, measured_cfg: Any, cfg: Any) -> dict[str, float]:
    """Seconds per unit of each phase for ``cfg``, from the measurement of ``measured_cfg``."""
    tm, tc = _tokens(measured_cfg), _tokens(cfg)
    out = {}
    for ph, r in measured.items():
        per = r["seconds"] / r.get("steps", 1)
        out[ph] = per * (tc[ph] / tm[ph] if ph in tc and tm[ph] else 1.0)
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

    sft = [[format_prompt(x.prompt) + normalize(x.completion) + eos] for x in data.sft_train]
    pairs = [[format_prompt(p.prompt) + normalize(a) + eos for a in (p.chosen, p.rejected)]
             for g in data.rm_train for p in g.pairs()]
    return {"sft": frac(sft, cfg.sft.batch_size), "rm": frac(pairs, cfg.rm.batch_size)}


def stage_seconds(cfg: Any, data: Any, unit: dict[str, float],
                  fraction: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds of each stage of one trial; ``fraction``: :func:`padded_fraction` (1: every batch at max_length)."""
    c, f = counts(cfg, data), fraction or {}
    m = cfg.method
    method = unit.get("update_fixed", 0.0) + sum(unit.get(ph, 0.0) * c.get(ph, 0)
                                                 for ph in ("generation", "scoring", "update"))
    ev = unit.get("eval_load", 0.0) + unit["eval"] * c["eval"]
    return {"sft": unit.get("sft_fixed", 0.0) + unit["sft"] * c["sft"] * f.get("sft", 1.0),
            "rm": unit.get("rm_fixed", 0.0) + unit["rm"] * c["rm"] * f.get("rm", 1.0),
            m: method, "eval_base": ev, "eval_sft": ev, "eval_" + m: ev}


def speed_key(cfg: Any, device: str, threads: int) -> str:
    """What decides a trial's speed: the model section, every batch size, length, rank, step count and backend,
    the data, the device and the thread count (not the seed, learning rates or KL coefficients)."""
    d = cfg.to_dict()
    keep = {sec: ({k: v for k, v in vals.items() if any(w in k for w in SPEED_WORDS)}
                  if sec not in ("model", "data") else vals)
            for sec, vals in d.items() if isinstance(vals, dict)}
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
    """``([(trial, hours, basis, stage seconds)], total hours)`` for every trial of the sweep from the phases
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
        fkey = canonical_json([dkey, dataclasses.asdict(c.model), c.sft.batch_size, c.rm.batch_size])
        if fkey not in fractions:
            fractions[fkey] = padded_fraction(c, data, load_tokenizer(c.model))
        secs = stage_seconds(c, data, unit_seconds(phases, measured.config, c), fractions[fkey])
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
        rows.append((t, hours, basis, secs))
        write_json(doctor_dir() / f"{key}.json", {
            "hours": hours, "basis": basis, "stage_seconds": secs, "padded_fraction": fractions[fkey],
            "sweep": spec.name, "trial_id": t.trial_id, "device": device, "threads": spec.resources.cpu,
            "measured_key": key_measured, "measured_trial": measured.trial_id, "phases": phases,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return rows, total
