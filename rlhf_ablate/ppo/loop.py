"""The PPO loop: rollout -> score -> KL-penalised per-token rewards -> GAE -> PPO epochs -> stats.

It follows Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", and reads top to bottom: rollout
(temperature 1, KV cache) -> score (reward normalised by the SFT policy's scores, missing-EOS penalty) -> per-token
KL-penalised rewards -> GAE -> PPO epochs over minibatches -> stats. The math is in rlhf_ablate/ppo/math.py; the
models behind the four roles are in rlhf_ablate/ppo/roles.py.

Over-optimization (rlhf_ablate/ppo/gold.py, rlhf_ablate/ppo/overopt.py): with ``ppo.gold`` set, a probe set of
held-out prompts is scored by the proxy and a gold reward at step 0 and every ``ppo.gold_every`` steps; the onset
rule's verdict goes into the history (``gold/*``) and ``overoptimization.json``, and ``ppo.stop_on_overoptimization``
ends the run at the onset with the policy of gold's maximum.

Memory (issue 9): generation and the four scoring passes run ``plan.rollout_micro`` prompts at a time; the update runs
``plan.train_micro`` rollouts per forward/backward and accumulates gradients over a minibatch; log-probs exist only
for response positions, reduced in float32 chunks; the policy's backward runs before the value's forward, so the
two graphs are never alive together (and with gradient checkpointing, each adapter's layers are recomputed while
that adapter is active). The plan comes from rlhf_ablate/models/memory.py, which the memory estimate reads too.
On an out-of-memory error (rlhf_ablate/runtime.py: adapt_micro_batch) generation and scoring rerun with half the
rollout micro-batch, and the update reruns the minibatch with half the train micro-batch, accumulating over twice as
many passes (the effective minibatch is unchanged); the smaller micro-batch stays for the rest of the stage. The gold
probe's generation and scoring retry the same way (rlhf_ablate/ppo/gold.py). A retried rollout generation draws
its samples again, at a different micro-batch, from where the failed attempt left the random stream, so the random
stream differs from that step on: the run stays valid but is not bit-identical to one that did not hit the error
(result.json's ``oom_retries`` says that it happened). Scoring and the update are deterministic and reproduce the
numbers of a run at the smaller micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import PPOConfig, TrialConfig
from ..config.overopt import probe_prompts_problem
from ..data.splits import hold_out_probe
from ..errors import TrialFailed
from ..files import write_json
from ..models import compute_dtype, enable_tf32
from ..runtime import adapt_micro_batch, seed_everything, stage_hooks
from . import math as ppo_math
from .gold import GoldProbe, reward_roles
from .roles import PPOModels
from .rollout import build_batch, rollout_adaptive, score_batch


def learning_rate(p: PPOConfig, step: int, n_steps: int) -> float:
    """``ppo.lr_schedule``: constant, or linear decay from the peak at step 1 towards 0 (cleanrl's anneal_lr:
    ``frac = 1 - (step - 1) / n_steps``)."""
    if p.lr_schedule == "linear":
        return p.learning_rate * (1.0 - (step - 1) / n_steps)
    return p.learning_rate


def train_ppo(cfg: TrialConfig, data, sft_dir: Path, rm_dir: Path, out: Path,
              on_step: Optional[Callable[[dict], None]] = None,
              extra_rm_dirs: Optional[dict[str, Path]] = None) -> None:
    """``extra_rm_dirs``: the reward stages besides the trial's RM (``rm_ensemble``, ``rm_gold``) by stage name."""
    p = cfg.ppo
    seed_everything(cfg.seed)
    enable_tf32()
    roles = PPOModels(cfg, sft_dir, rm_dir, reward_roles(cfg, extra_rm_dirs or {}))
    stage_hooks().model_ready(*roles.all_models())
    tok = roles.tokenizer
    dev = next(roles.model.parameters()).device
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=p.learning_rate, eps=1e-5,
                                  weight_decay=p.weight_decay)
    # fp16 (never chosen by "auto") needs loss scaling; bf16 and fp32 do not. Disabled, the scaler passes through.
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and compute_dtype(cfg.model) == "float16")
    kl_ctl = (ppo_math.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else ppo_math.FixedKLController(p.kl_coef))
    if problem := probe_prompts_problem(cfg, len(data.ppo_prompts)):  # run/trial.py checks it before any stage too
        raise TrialFailed(f"ppo: {problem}")
    train_rows, probe_rows = (hold_out_probe(data.ppo_prompts, p.gold_probe_size, cfg.data.split_seed)
                              if p.gold != "none" else (data.ppo_prompts, []))
    prompts = [x.prompt for x in train_rows]
    if not prompts:
        raise TrialFailed("ppo: the data has no PPO prompts")
    probe = GoldProbe(cfg, [x.prompt for x in probe_rows])
    g = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    n_steps = max(1, p.total_episodes // p.rollout_batch_size)
    normalizer = None
    history: list[dict] = []
    if probe.due(0):  # the SFT policy: gold's first value, and the first checkpoint to go back to
        history.append({"step": 0, **probe.evaluate(roles, 0)})
    stopped = False
    t_gen = t_score = t_update = 0.0
    for step in range(1, n_steps + 1):
        lr = learning_rate(p, step, n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # ---- rollout -----------------------------------------------------------------------------------------
        picked, order = next_prompts(order, len(prompts), p.rollout_batch_size, g)
        batch_prompts = [prompts[i] for i in picked]
        t0 = time.perf_counter()
        # the rollout sampling (models/generation.py: sampling_for)
        responses = rollout_adaptive(roles, "generation", lambda: roles.generate(batch_prompts))
        b = build_batch(tok, batch_prompts, responses, dev)
        t1 = time.perf_counter()
        # ---- score -------------------------------------------------------------------------------------------
        sc = rollout_adaptive(roles, "scoring", lambda: score_batch(roles, b, p.temperature))
        raw_scores = sc["raw_scores"]
        if normalizer is None:
            # N+ details: normalise the RM by its scores on the initial (SFT) policy's samples, so that one kl_coef
            # means the same thing across reward models of different scale.
            normalizer = ppo_math.RewardNormalizer(raw_scores) if p.reward_norm else None
        scores, rewards, kl = kl_rewards(p, kl_ctl.value, normalizer, raw_scores, b, sc)
        mask = b["rmask"]
        t2 = time.perf_counter()
        # ---- PPO epochs over minibatches (skipped when the rollout has almost no response tokens) --------------
        stats: list[dict] = []
        if mask.sum() >= 2:
            advantages, returns = advantages_and_returns(p, rewards, sc["old_values"], mask)
            stats = ppo_update(roles, optimizer, b, sc, advantages, returns, p, g, step, scaler)
        t3 = time.perf_counter()
        # ---- stats -------------------------------------------------------------------------------------------
        row = step_row(p, step, lr, kl_ctl, raw_scores, scores, kl, b, (t1 - t0, t2 - t1, t3 - t2), stats)
        mean_kl = row["objective/kl"]
        if probe.due(step, last=step == n_steps):
            row.update(probe.evaluate(roles, step))
            stopped = p.stop_on_overoptimization and probe.onset is not None
        history.append(row)
        if on_step is not None:
            on_step(step_event(row, n_steps))
        if not math.isfinite(mean_kl) or mean_kl > p.kl_stop:
            write_json(out / "history.json", history)
            raise TrialFailed(kl_blow_up(step, mean_kl, p.kl_stop))
        kl_ctl.update(mean_kl, p.rollout_batch_size)
        t_gen, t_score, t_update = t_gen + t1 - t0, t_score + t2 - t1, t_update + t3 - t2
        if stopped:  # over-optimized: back to the policy of gold's maximum, the last good checkpoint
            roles.load_policy_state(probe.best_state)
            break
    stage_hooks().trained()
    if p.gold != "none":
        write_json(out / "overoptimization.json", probe.record(stopped, n_steps, history[-1]["step"]))
    write_artifact(out, roles, p, history, normalizer, (t_gen, t_score, t_update),
                   metrics={**probe.metrics(), **({"ppo/overopt_stopped": float(stopped)} if p.gold != "none" else {})})


# ---- what a PPO step and its artifact are, for one trial or each member of a trial group (rlhf_ablate/ppo/group.py)

def next_prompts(order: list[int], n_prompts: int, size: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    """The next ``size`` prompt indices of the shuffled passes over ``n_prompts`` prompts (a new permutation from
    ``g`` when ``order`` runs short), and the indices left for later steps."""
    while len(order) < size:
        order = order + torch.randperm(n_prompts, generator=g).tolist()
    return order[:size], order[size:]


def kl_rewards(p: PPOConfig, kl_coef: float, normalizer, raw_scores: torch.Tensor, b: dict,
               sc: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores, rewards, kl)``: the sequence scores normalised and EOS-penalised, and the per-token KL-penalised
    rewards with the KL they were penalised by."""
    scores = normalizer(raw_scores) if normalizer is not None else raw_scores
    # A response that stopped at the template's next-turn header ended its turn: no missing-EOS penalty.
    scores = ppo_math.missing_eos_penalty(scores, b["has_eos"] | b["stopped"], p.missing_eos_penalty)
    rewards, kl = ppo_math.per_token_rewards(scores, sc["old_logprobs"], sc["ref_logprobs"], b["rmask"], kl_coef,
                                             p.kl_estimator)
    return scores, rewards, kl


def advantages_and_returns(p: PPOConfig, rewards: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the (optionally whitened) rewards; the advantages whitened."""
    if p.whiten_rewards:
        rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = ppo_math.compute_gae(rewards, values, mask, p.gamma, p.lam)
    return ppo_math.masked_whiten(advantages, mask), returns


def step_event(row: dict, n_steps: int) -> dict:
    """A PPO step's report (progress lines, W&B, ASHA) from its history row; a trial group's member reports the same
    (rlhf_ablate/run/groups.py: follow, replay)."""
    return {"stage": "ppo", "step": row["step"], "steps": n_steps,
            **{f"ppo/{k}": v for k, v in row.items() if k != "step"}}


def step_row(p: PPOConfig, step: int, lr: float, kl_ctl, raw_scores: torch.Tensor, scores: torch.Tensor,
             kl: torch.Tensor, b: dict, times: tuple[float, float, float], stats: list[dict]) -> dict:
    """A step's row of history.json: the rollout's objective statistics, the phases' seconds and the update's
    per-pass stats summarised (:func:`summarize`)."""
    mask = b["rmask"]
    row = {"step": step, "episodes": step * p.rollout_batch_size, "lr": lr,
           "objective/kl": kl.sum(1).mean().item(),
           "objective/scores": raw_scores.mean().item(),
           "objective/scores_normalized": scores.mean().item(),
           "objective/non_score_reward": (-kl_ctl.value * kl.sum(1)).mean().item(),
           "objective/rlhf_reward": (scores - kl_ctl.value * kl.sum(1)).mean().item(),
           "objective/kl_coef": float(kl_ctl.value),
           "objective/eos_frac": b["has_eos"].float().mean().item(),
           "objective/stopped_frac": b["stopped"].float().mean().item(),
           "objective/empty_frac": (mask.sum(1) == 0).float().mean().item(),
           "objective/response_len": mask.sum(1).float().mean().item(),
           "time/generate": times[0], "time/score": times[1], "time/update": times[2]}
    row.update(summarize(stats))
    return row


def pass_stats(where: dict, pg_loss: torch.Tensor, pg_stats: dict, vf_loss: torch.Tensor, vf_clipfrac,
               entropy: torch.Tensor, mask: torch.Tensor) -> dict:
    """One forward/backward pass's stats (``ppo_update``'s list)."""
    return {**where, "policy/clipfrac": float(pg_stats["clipfrac"]), "policy/approx_kl": float(pg_stats["approx_kl"]),
            "ratio_mean": float(pg_stats["ratio_mean"]), "ratio_min": float(pg_stats["ratio_min"]),
            "ratio_max": float(pg_stats["ratio_max"]), "val/clipfrac": float(vf_clipfrac),
            "loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
            "objective/entropy": ppo_math.masked_mean(entropy, mask).item()}


def kl_blow_up(step: int, mean_kl: float, kl_stop: float) -> str:
    return (f"ppo: KL blow-up at step {step}: mean KL {mean_kl:.2f} nats > ppo.kl_stop {kl_stop}; raise "
            f"ppo.kl_coef or lower ppo.learning_rate")


def loss_not_finite(which: str, loss: torch.Tensor, step: int) -> str:
    return (f"ppo: the {which} loss became {loss.item()} at step {step}; lower ppo.learning_rate or raise "
            f"ppo.kl_coef")


def write_artifact(out: Path, roles: PPOModels, p: PPOConfig, history: list[dict], normalizer, times: tuple,
                   adapter: str = "policy", info: Optional[dict] = None, metrics: Optional[dict] = None) -> None:
    """The PPO stage's artifact: the policy (``adapter`` of ``roles``), history.json, ppo_info.json (``info``
    added) and metrics.json (``metrics`` added)."""
    roles.save_policy(out, adapter)
    write_json(out / "history.json", history)
    write_json(out / "ppo_info.json", {"kind": "adapter" if roles.shared else "model", "shared_base": roles.shared,
                                       "reward_shared": roles.reward_shared,
                                       "value_from_reward": roles.value_from_reward,
                                       "gradient_checkpointing": roles.plan.gradient_checkpointing,
                                       "reward_norm": normalizer.state() if normalizer is not None else None,
                                       "reward": p.reward, "extra_rewards": sorted(roles.extra_heads)
                                       + sorted(roles.extra_models), **(info or {})})
    last = history[-1]
    write_json(out / "metrics.json", {
        "ppo/objective/kl": last["objective/kl"], "ppo/objective/scores": last["objective/scores"],
        "ppo/steps": last["step"], "ppo/time_generate": times[0], "ppo/time_score": times[1],
        "ppo/time_update": times[2], **(metrics or {})})


def ppo_update(roles: PPOModels, optimizer: torch.optim.Optimizer, b: dict, sc: dict, advantages: torch.Tensor,
               returns: torch.Tensor, p: PPOConfig, g: torch.Generator, step: int = 0,
               scaler: Optional[torch.amp.GradScaler] = None) -> list[dict]:
    """``ppo.ppo_epochs`` epochs over shuffled minibatches of the rollout, ``roles.plan.train_micro`` rollouts per
    forward/backward. Returns one stats dict per forward/backward pass, in order (``stats[0]`` is the first micro-batch
    of the first minibatch of the first epoch, where the ratio must be exactly 1); the minibatch's gradient norm (before
    clipping) is on its last micro-batch.

    A minibatch that runs out of memory is rerun from zeroed gradients with half the micro-batch (to a divisor of
    ``ppo.mini_batch_size``); each pass's loss is weighted by its share of the minibatch, so the accumulated gradient
    is the same sum (rlhf_ablate/runtime.py: adapt_micro_batch)."""
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    params = roles.trainable_parameters()
    n = b["rmask"].shape[0]
    out: list[dict] = []
    optimizer.zero_grad(set_to_none=True)
    for epoch in range(p.ppo_epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, p.mini_batch_size):
            mb = perm[start:start + p.mini_batch_size]
            mark = len(out)

            def attempt(micro: int) -> bool:
                del out[mark:]  # the failed attempt's passes
                optimizer.zero_grad(set_to_none=True)
                roles.plan = dataclasses.replace(roles.plan, train_micro=micro)
                return _minibatch(roles, b, sc, advantages, returns, p, mb, micro, scaler, step,
                                  {"epoch": epoch, "minibatch": start // p.mini_batch_size}, out)

            if not adapt_micro_batch("ppo", roles.plan.train_micro, attempt, total=p.mini_batch_size,
                                     phase="update"):
                continue
            scaler.unscale_(optimizer)
            out[-1]["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm))
            scaler.step(optimizer)
            scaler.update()
            # Gradients are freed, not zeroed: they would otherwise sit in memory through the next rollout.
            optimizer.zero_grad(set_to_none=True)
    return out


def _minibatch(roles: PPOModels, b: dict, sc: dict, advantages: torch.Tensor, returns: torch.Tensor, p: PPOConfig,
               mb: torch.Tensor, micro: int, scaler: torch.amp.GradScaler, step: int, where: dict,
               out: list[dict]) -> bool:
    """Forward/backward passes of ``micro`` rollouts over the minibatch ``mb``, gradients accumulated, one stats dict
    per pass appended to ``out``. Returns whether any pass ran (False: only empty responses)."""
    mask = b["rmask"]
    R = b["resp"].shape[1]
    stepped = False
    for ms in range(0, len(mb), micro):
        idx = mb[ms:ms + micro].to(mask.device)
        m = mask[idx]
        if m.sum() == 0:  # only empty responses: nothing to train on
            continue
        ids, attn, resp = b["ids"][idx], b["attn"][idx], b["resp"][idx]
        weight = len(idx) / len(mb)
        # Policy forward and backward first, then the value's: never both graphs at once.
        new_logprobs, entropy = roles.logprobs("policy", ids, attn, resp, p.temperature, with_entropy=True)
        pg_loss, pg_stats = ppo_math.policy_loss(new_logprobs, sc["old_logprobs"][idx], advantages[idx], m,
                                                 p.cliprange)
        _check_finite(pg_loss, "policy", step)
        scaler.scale(pg_loss * weight).backward()
        del new_logprobs
        new_values = roles.values(ids, attn, n_last=R)
        vf_loss, vf_clipfrac = ppo_math.value_loss(new_values, sc["old_values"][idx], returns[idx], m,
                                                   p.cliprange_value)
        _check_finite(vf_loss, "value", step)
        scaler.scale(vf_loss * (p.vf_coef * weight)).backward()
        stepped = True
        out.append(pass_stats(where, pg_loss, pg_stats, vf_loss, vf_clipfrac, entropy, m))
    return stepped


def _check_finite(loss: torch.Tensor, which: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrialFailed(loss_not_finite(which, loss, step))


def summarize(stats: list[dict]) -> dict:
    """Per-step means of the per-pass stats, and TRL's ``val/ratio`` / ``val/ratio_var`` (mean and variance of the
    per-pass mean ratios) and the mean gradient norm."""
    if not stats:
        return {}
    keys = ("policy/clipfrac", "policy/approx_kl", "val/clipfrac", "loss/policy", "loss/value", "objective/entropy")
    row = {k: sum(s[k] for s in stats) / len(stats) for k in keys}
    ratios = torch.tensor([s["ratio_mean"] for s in stats], dtype=torch.float64)
    row["val/ratio"] = ratios.mean().item()
    row["val/ratio_var"] = ratios.var(unbiased=False).item()
    norms = [s["grad_norm"] for s in stats if "grad_norm" in s]
    if norms:
        row["grad_norm"] = sum(norms) / len(norms)
    return row
