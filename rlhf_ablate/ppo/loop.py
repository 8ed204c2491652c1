"""The PPO loop: rollout -> score -> KL-penalised per-token rewards -> GAE -> PPO epochs -> stats.

It follows Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", and reads top to bottom: rollout
(temperature 1, KV cache) -> score (reward normalised by the SFT policy's scores, missing-EOS penalty) -> per-token
KL-penalised rewards -> GAE -> PPO epochs over minibatches -> stats. The math is in rlhf_ablate/ppo/math.py; the
models behind the four roles are in rlhf_ablate/ppo/roles.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import TrialConfig
from ..errors import TrialFailed
from ..files import write_json
from ..runtime import seed_everything
from . import math as ppo_math
from .roles import PPOModels
from .rollout import build_batch, response_logprobs


def train_ppo(cfg: TrialConfig, data, sft_dir: Path, rm_dir: Path, out: Path,
              on_step: Optional[Callable[[dict], None]] = None) -> None:
    p = cfg.ppo
    seed_everything(cfg.seed)
    roles = PPOModels(cfg, sft_dir, rm_dir)
    tok = roles.tokenizer
    dev = next(roles.model.parameters()).device
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=p.learning_rate, eps=1e-5)
    kl_ctl = (ppo_math.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else ppo_math.FixedKLController(p.kl_coef))
    prompts = [x.prompt for x in data.ppo_prompts]
    if not prompts:
        raise TrialFailed("ppo: the data has no PPO prompts")
    g = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    n_steps = max(1, p.total_episodes // p.rollout_batch_size)
    normalizer = None
    history: list[dict] = []
    t_gen = t_score = t_update = 0.0
    for step in range(1, n_steps + 1):
        # ---- rollout -----------------------------------------------------------------------------------------
        while len(order) < p.rollout_batch_size:
            order += torch.randperm(len(prompts), generator=g).tolist()
        batch_prompts = [prompts[i] for i in order[:p.rollout_batch_size]]
        order = order[p.rollout_batch_size:]
        t0 = time.perf_counter()
        roles.train(False)
        responses = roles.generate(batch_prompts, p.max_new_tokens, p.temperature)
        b = build_batch(tok, batch_prompts, responses, dev)
        t1 = time.perf_counter()
        # ---- score -------------------------------------------------------------------------------------------
        with torch.no_grad():
            old_logprobs = response_logprobs(roles.policy_logits(b["ids"], b["attn"]), b, p.temperature)
            ref_logprobs = response_logprobs(roles.ref_logits(b["ids"], b["attn"]), b, p.temperature)
            P, R = b["P"], b["resp"].shape[1]
            old_values = roles.values(b["ids"], b["attn"])[:, P - 1:P + R - 1]
            raw_scores = roles.scores(b["ids"], b["attn"])
        if normalizer is None:
            # N+ details: normalise the RM by its scores on the initial (SFT) policy's samples, so that one kl_coef
            # means the same thing across reward models of different scale.
            normalizer = ppo_math.RewardNormalizer(raw_scores) if p.reward_norm else None
        scores = normalizer(raw_scores) if normalizer is not None else raw_scores
        scores = ppo_math.missing_eos_penalty(scores, b["has_eos"], p.missing_eos_penalty)
        mask = b["rmask"]
        rewards, kl = ppo_math.per_token_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value,
                                                 p.kl_estimator)
        if p.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo_math.compute_gae(rewards, old_values, mask, p.gamma, p.lam)
        advantages = ppo_math.masked_whiten(advantages, mask)
        t2 = time.perf_counter()
        # ---- PPO epochs over minibatches ---------------------------------------------------------------------
        roles.train(True)
        stats: dict[str, list[float]] = {k: [] for k in ("policy/clipfrac", "policy/approx_kl", "val/clipfrac",
                                                         "loss/policy", "loss/value", "objective/entropy")}
        n = p.rollout_batch_size
        micro = max(1, p.mini_batch_size // p.grad_accum)
        for _epoch in range(p.ppo_epochs):
            perm = torch.randperm(n, generator=g)
            for start in range(0, n, p.mini_batch_size):
                mb = perm[start:start + p.mini_batch_size]
                optimizer.zero_grad(set_to_none=True)
                for ms in range(0, len(mb), micro):
                    idx = mb[ms:ms + micro].to(dev)
                    sub = {"P": P, "resp": b["resp"][idx]}
                    ids, attn, m = b["ids"][idx], b["attn"][idx], mask[idx]
                    logits = roles.policy_logits(ids, attn)
                    new_logprobs = response_logprobs(logits, sub, p.temperature)
                    pg_loss, pg_stats = ppo_math.policy_loss(new_logprobs, old_logprobs[idx], advantages[idx], m,
                                                             p.cliprange)
                    new_values = roles.values(ids, attn)[:, P - 1:P + R - 1]
                    vf_loss, vf_clipfrac = ppo_math.value_loss(new_values, old_values[idx], returns[idx], m,
                                                               p.cliprange_value)
                    loss = (pg_loss + p.vf_coef * vf_loss) * len(idx) / len(mb)
                    if not torch.isfinite(loss):
                        raise TrialFailed(f"ppo: loss became {loss.item()} at step {step} (policy {pg_loss.item()}, "
                                          f"value {vf_loss.item()}); lower ppo.learning_rate or raise ppo.kl_coef")
                    loss.backward()
                    with torch.no_grad():
                        ent = ppo_math.entropy_from_logits(logits[:, P - 1:P + R - 1] / p.temperature)
                        stats["objective/entropy"].append(ppo_math.masked_mean(ent, m).item())
                    stats["policy/clipfrac"].append(float(pg_stats["clipfrac"]))
                    stats["policy/approx_kl"].append(float(pg_stats["approx_kl"]))
                    stats["val/clipfrac"].append(float(vf_clipfrac))
                    stats["loss/policy"].append(pg_loss.item())
                    stats["loss/value"].append(vf_loss.item())
                torch.nn.utils.clip_grad_norm_(roles.trainable_parameters(), p.max_grad_norm)
                optimizer.step()
        t3 = time.perf_counter()
        # ---- stats -------------------------------------------------------------------------------------------
        mean_kl = kl.sum(1).mean().item()
        row = {"step": step, "episodes": step * p.rollout_batch_size,
               "objective/kl": mean_kl,
               "objective/scores": raw_scores.mean().item(),
               "objective/scores_normalized": scores.mean().item(),
               "objective/rlhf_reward": (scores - kl_ctl.value * kl.sum(1)).mean().item(),
               "objective/kl_coef": float(kl_ctl.value),
               "objective/eos_frac": b["has_eos"].float().mean().item(),
               "objective/response_len": mask.sum(1).float().mean().item(),
               "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2}
        row.update({k: sum(v) / len(v) for k, v in stats.items() if v})
        history.append(row)
        if on_step is not None:
            on_step({"stage": "ppo", "step": step, "steps": n_steps,
                     **{f"ppo/{k}": v for k, v in row.items() if k != "step"}})
        if not math.isfinite(mean_kl) or mean_kl > p.kl_stop:
            write_json(out / "history.json", history)
            raise TrialFailed(f"ppo: KL blow-up at step {step}: mean KL {mean_kl:.2f} nats > ppo.kl_stop "
                              f"{p.kl_stop}; raise ppo.kl_coef or lower ppo.learning_rate")
        kl_ctl.update(mean_kl, p.rollout_batch_size)
        t_gen, t_score, t_update = t_gen + t1 - t0, t_score + t2 - t1, t_update + t3 - t2
    roles.save_policy(out)
    write_json(out / "history.json", history)
    write_json(out / "ppo_info.json", {"kind": "adapter" if roles.shared else "model", "shared_base": roles.shared,
                                       "reward_shared": roles.reward_shared,
                                       "reward_norm": normalizer.state() if normalizer is not None else None})
    last = history[-1]
    write_json(out / "metrics.json", {
        "ppo/objective/kl": last["objective/kl"], "ppo/objective/scores": last["objective/scores"],
        "ppo/steps": n_steps, "ppo/time_generate": t_gen, "ppo/time_score": t_score, "ppo/time_update": t_update})
