"""One micro-batch of every phase of a trial, timed, with its peak GPU memory, and the memory estimate of each phase
beside it: what ``python -m rlhf_ablate doctor`` (rlhf_ablate/run/doctor.py) measures on the sweep's largest trial.

- SFT, RM and the over-optimization reward stages (the gold RM ``rm_gold``, the ensemble's other members
  ``rm_ensemble``): :data:`STEPS` optimizer steps of the real stages (rm_ensemble: of each of its models).
- PPO: one micro-batch of generation, scoring and the update on its roles (ppo/roles.py, with the extra reward
  models ppo/gold.py: reward_roles gives it, as ppo/loop.py loads them), and with ``ppo.gold`` set one evaluation
  of the gold probe (``ppo.gold_probe_size`` prompts: the sampled answers, the proxy's pass, gold's scores) as
  ppo/gold.py: GoldProbe.evaluate runs it. Another method: :data:`STEPS` steps of its stage.
- Eval: one batch of 16 prompts in the order and micro-batches of stages/evaluate.py: evaluate_policy (greedy
  answers, then the RM loaded and scoring them, then, with the RM freed, the KL pass); loading timed apart.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

from ..runtime import StageHooks, observe_stages, release_memory
from .forecast import EVAL_BATCH, PROBE_LIKE, REWARD_STAGES

STEPS = 2  # optimizer steps of each TRL stage measured: the second holds the AdamW state


class Meter:
    """Time and, on a GPU, peak memory of a block, relative to what was allocated before the models were loaded."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.base = torch.cuda.memory_allocated() if self.cuda else 0
        self.base_reserved = torch.cuda.memory_reserved() if self.cuda else 0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        out = {"seconds": time.perf_counter() - self.t0}
        if self.cuda:
            out["allocated_bytes"] = torch.cuda.max_memory_allocated() - self.base
            out["reserved_bytes"] = torch.cuda.max_memory_reserved() - self.base_reserved
        return out


class _Window(StageHooks):
    """A TRL stage's training, from each prepared model to the end of its training (rlhf_ablate/runtime.py): one
    window per model the stage trains (rm_ensemble trains its members one after another)."""

    def __init__(self, meter: Meter):
        self.meter, self.windows = meter, []

    def model_ready(self, *models: Any) -> None:
        self.meter.start()

    def trained(self) -> None:
        self.windows.append(self.meter.stop())


def measure_config(cfg: Any) -> Any:
    """The trial cut to what the measurement needs: two optimizer steps of each TRL-trained stage."""
    from ..config import METHOD_CONFIGS

    over = {f"{m}.max_steps": STEPS for m, c in METHOD_CONFIGS.items() if "max_steps" in c.__dataclass_fields__}
    gold = {"rm.gold_max_steps": STEPS} if cfg.rm.gold != "none" else {}
    return cfg.replace(**{"sft.max_steps": STEPS, "rm.max_steps": STEPS, **gold, **over})


def _trl_stage(node: Any, ctx: Any, out: Path) -> dict:
    """Per model the stage trains: ``seconds`` of :data:`STEPS` steps and ``fixed_seconds`` (loading, preparing,
    merging and saving: once per model, whatever its step count); ``models``: how many it trained."""
    meter = Meter()
    window = _Window(meter)
    t0 = time.perf_counter()
    with observe_stages(window):
        node.build(ctx, out)
    if not window.windows:
        raise RuntimeError(f"doctor: the {node.name} stage ended without training")
    release_memory()
    n, train = len(window.windows), sum(w["seconds"] for w in window.windows)
    res = {"seconds": train / n, "steps": STEPS, "models": n, "fixed_seconds": (time.perf_counter() - t0 - train) / n}
    for k in ("allocated_bytes", "reserved_bytes"):
        if k in window.windows[0]:
            res[k] = max(w[k] for w in window.windows)
    return res


def _ppo_phases(cfg: Any, data: Any, dirs: dict[str, Path], out: Path) -> dict:
    """Generation, scoring and one update micro-batch of PPO on its roles, as ppo/loop.py runs them, and the gold
    probe's evaluation when ``ppo.gold`` is set."""
    import torch

    from ..ppo import math as ppo_math
    from ..ppo.gold import reward_roles
    from ..ppo.loop import ppo_update
    from ..ppo.roles import PPOModels
    from ..ppo.rollout import build_batch, score_batch

    p = cfg.ppo
    meter = Meter()
    t0 = time.perf_counter()
    roles = PPOModels(cfg, dirs["sft"], dirs["rm"], reward_roles(cfg, {k: dirs[k] for k in REWARD_STAGES
                                                                       if k in dirs}))
    fixed = time.perf_counter() - t0
    dev = next(roles.model.parameters()).device
    prompts = [x.prompt for x in data.ppo_prompts][:roles.plan.rollout_micro]
    res: dict[str, dict] = {}
    warmup = None
    if p.generation_backend == "compiled":  # the first call compiles the decode step: once per process, not per step
        t0 = time.perf_counter()
        roles.generate(prompts)
        warmup = time.perf_counter() - t0
    meter.start()
    responses = roles.generate(prompts)
    res["generation"] = {**meter.stop(), "rows": len(prompts),
                         "tokens": sum(len(r["ids"]) for r in responses), "compile_seconds": warmup}
    b = build_batch(roles.tokenizer, prompts, responses, dev)
    meter.start()
    sc = score_batch(roles, b, p.temperature)
    res["scoring"] = {**meter.stop(), "rows": len(prompts)}
    rewards, _ = ppo_math.per_token_rewards(sc["raw_scores"], sc["old_logprobs"], sc["ref_logprobs"], b["rmask"],
                                            p.kl_coef, p.kl_estimator)
    adv, ret = ppo_math.compute_gae(rewards, sc["old_values"], b["rmask"], p.gamma, p.lam)
    n = min(roles.plan.train_micro, len(prompts))
    keep = lambda d: {k: (v[:n] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in d.items()}  # noqa: E731
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=p.learning_rate)
    one = dataclasses.replace(p, ppo_epochs=1, mini_batch_size=n)
    meter.start()
    ppo_update(roles, optimizer, keep(b), keep(sc), adv[:n], ret[:n], one, torch.Generator().manual_seed(0))
    res["update"] = {**meter.stop(), "rows": n}
    if p.gold != "none":
        res.update(_probe_phases(cfg, roles, data, meter, dev))
    t0 = time.perf_counter()
    roles.save_policy(out)
    res["update"]["fixed_seconds"] = fixed + time.perf_counter() - t0  # loading the roles, saving the policy
    del roles, optimizer
    release_memory()
    return res


def _probe_phases(cfg: Any, roles: Any, data: Any, meter: Meter, dev: Any) -> dict:
    """One evaluation of the gold probe as ppo/gold.py: GoldProbe.evaluate runs it on ``ppo.gold_probe_size``
    prompts: the sampled answers, the proxy's pass (score_batch's four passes, the ensemble's members included) and
    gold's scores (the gold RM or members 2..K), ``plan.rollout_micro`` rows at a time."""
    from ..ppo.gold import GoldProbe
    from ..ppo.rollout import build_batch, score_batch

    rows = list(data.ppo_prompts)
    prompts = [rows[i % len(rows)].prompt for i in range(cfg.ppo.gold_probe_size)]
    probe, res = GoldProbe(cfg, prompts), {}
    meter.start()
    responses = roles.generate(prompts)
    res["probe_generation"] = {**meter.stop(), "rows": len(prompts)}
    b = build_batch(roles.tokenizer, prompts, responses, dev)
    meter.start()
    score_batch(roles, b, cfg.ppo.temperature)
    res["probe_proxy"] = {**meter.stop(), "rows": len(prompts)}
    meter.start()
    probe.gold_scores(roles, b)
    res["probe_gold"] = {**meter.stop(), "rows": len(prompts), "gold_models": len(probe.gold_names)}
    return res


def _eval_phase(cfg: Any, data: Any, sft: Path, rm: Path, policy_dir: Path) -> dict:
    """One eval batch as stages/evaluate.py: evaluate_policy runs it (its text metrics aside), in its order and
    micro-batches: the policy's greedy answers (EVAL_GENERATE_MICRO prompts a call), then the RM loaded and scoring
    them (EVAL_SCORE_MICRO a pass), then, with the RM freed, the KL pass (PPO's rollout micro-batch). Loading the
    policy and the RM is timed apart (``load_seconds``)."""
    from ..models import generate, load_policy, load_rm, model_shape, ppo_plan, sampling_for, score_texts
    from ..models import seq_cls_scorer
    from ..models.memory import EVAL_GENERATE_MICRO, EVAL_SCORE_MICRO
    from ..stages.evaluate import kl_to_reference

    prompts = [x.prompt for x in data.eval][:EVAL_BATCH]
    shape = model_shape(cfg.model)
    kl_micro = ppo_plan(cfg.ppo, shape.params, shape.vocab).rollout_micro
    meter = Meter()
    t0 = time.perf_counter()
    policy, ref, tok = load_policy(cfg, sft, policy_dir)
    load = time.perf_counter() - t0
    sampling = sampling_for(cfg, "eval").kwargs()
    if cfg.ppo.generation_backend == "compiled":  # compile the decode steps of both samplings outside the timing
        generate(policy, tok, prompts, **sampling, batch_size=EVAL_GENERATE_MICRO)
        if ref is not None:
            kl_to_reference(cfg, policy, ref, tok, prompts, kl_micro)
    meter.start()
    t1 = time.perf_counter()
    greedy = generate(policy, tok, prompts, **sampling, batch_size=EVAL_GENERATE_MICRO)
    decode = {"decode_seconds": time.perf_counter() - t1, "decode_tokens": sum(len(g["ids"]) for g in greedy)}
    t2 = time.perf_counter()
    rm_model, rm_tok = load_rm(cfg, rm, sft)
    rm_load = time.perf_counter() - t2
    scorer = seq_cls_scorer(rm_model)
    score_texts(scorer, rm_tok, prompts, [g["text"] for g in greedy], cfg.model.max_length, batch_size=EVAL_SCORE_MICRO)
    del rm_model, scorer
    release_memory()  # the RM is part of the scoring phase only, as in evaluate_policy
    if ref is not None:
        kl_to_reference(cfg, policy, ref, tok, prompts, kl_micro)
    out = meter.stop()
    out["seconds"] -= rm_load  # the peak memory keeps the RM's load, as the memory probe's eval window does
    out = {**out, "rows": len(prompts), "load_seconds": load + rm_load, **decode}
    del policy, ref
    release_memory()
    return out


def measure(cfg: Any, work: Path, say: Callable[[str], None]) -> dict:
    """Every phase of one trial, one micro-batch each (see the module docstring); ``work`` holds the artifacts."""
    from .. import models
    from .graph import Ctx, trial_stages
    from .probe import fill_data

    mcfg = measure_config(cfg)
    data = fill_data(mcfg, models.load_tokenizer(mcfg.model))
    data = dataclasses.replace(data, eval=list(data.ppo_prompts)[:EVAL_BATCH])
    nodes = {s.name: s for s in trial_stages(mcfg)}
    dirs: dict[str, Path] = {}
    phases: dict[str, dict] = {}
    for name in ("sft", "rm", *REWARD_STAGES):
        if name not in nodes:
            continue
        each = f", each of {mcfg.rm.ensemble_size - 1} reward models" if name == "rm_ensemble" else ""
        say(f"measuring {name} ({STEPS} optimizer steps{each}) ...")
        dirs[name] = work / name
        dirs[name].mkdir(parents=True)
        phases[name] = _trl_stage(nodes[name], Ctx(mcfg, data, dirs=dict(dirs)), dirs[name])
    m = mcfg.method
    dirs[m] = work / m
    dirs[m].mkdir(parents=True)
    if m == "ppo":
        probe = (f"; the gold probe ({mcfg.ppo.gold_probe_size} prompts: answers, proxy, gold)"
                 if mcfg.ppo.gold != "none" else "")
        say(f"measuring ppo: generation, scoring, update (one micro-batch each){probe} ...")
        phases.update(_ppo_phases(mcfg, data, dirs, dirs[m]))
    else:
        say(f"measuring {m} ({STEPS} optimizer steps) ...")
        phases["update"] = _trl_stage(nodes[m], Ctx(mcfg, data, dirs=dict(dirs)), dirs[m])
    say(f"measuring eval ({EVAL_BATCH} prompts: greedy answers, RM scores, the KL pass) ...")
    phases["eval"] = _eval_phase(mcfg, data, dirs["sft"], dirs["rm"], dirs[m])
    release_memory()
    return phases


# A probe phase's memory is PPO's resident part plus the rollout phase it repeats on the probe prompts (PROBE_LIKE):
# generate and score_batch take plan.rollout_micro rows at a time, gold's scores are an RM forward of as many rows.


def estimates(cfg: Any, device: str) -> dict[str, float]:
    """The memory estimate of each measured phase, in bytes (rlhf_ablate/run/graph.py: estimate_stage_bytes): a
    phase of PPO is PPO's resident part (its extra reward models, ``extra_rewards``, included: the measured roles
    hold them too) plus that phase."""
    from .graph import estimate_stage_bytes

    st = estimate_stage_bytes(cfg, device)
    out = {k: st[k]["peak"] for k in ("sft", "rm", *REWARD_STAGES) if k in st}
    m = st.get(cfg.method, {})
    resident = m.get("peak", 0.0) - m.get("largest_phase", 0.0)
    phases = {"generation": "generation", "scoring": "scoring", "update": "update"}
    if cfg.method == "ppo" and cfg.ppo.gold != "none":
        phases.update(PROBE_LIKE)
    for ph, like in phases.items():
        out[ph] = resident + m[f"phase:{like}"] if f"phase:{like}" in m else m.get("peak", 0.0)
    ev = st.get("eval_" + cfg.method)
    if ev:
        out["eval"] = ev["peak"]
    return out
