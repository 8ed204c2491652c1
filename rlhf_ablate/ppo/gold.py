"""The gold probe of a PPO run: every ``ppo.gold_every`` steps (and at step 0, the SFT policy) the policy answers a
fixed set of held-out prompts, which the proxy (the reward PPO optimises) and a gold reward the policy never trained
against both score; the onset rule (rlhf_ablate/ppo/overopt.py) watches the two. docs/metrics.md,
"Over-optimization", defines every number.

- The probe prompts are ``ppo.gold_probe_size`` PPO prompts held out from PPO's training prompts
  (data/splits.py: hold_out_probe), not the eval prompts: the alarm may stop a run and choose its checkpoint, and a
  choice made on the eval prompts would flatter the final eval metrics.
- The answers are sampled as in a rollout (temperature ``ppo.temperature``) with the same fixed seed at every
  evaluation, from a forked RNG, so that turning the probe on leaves the PPO rollouts' random numbers alone and
  consecutive evaluations share their sampling noise where the policy did not change.
- Generation and scoring retry at half the rollout micro-batch after an out-of-memory error, as the rollout does
  (rollout.py: rollout_adaptive; phases ``probe_generation`` and ``probe_scoring``); the seed is set inside each
  attempt, so a retried probe samples what a run at the smaller micro-batch samples.
- Gold is the gold RM (``ppo.gold=rm_gold``) or the mean of ensemble members 2..K (``ppo.gold=ensemble``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import TrialConfig
from ..files import read_json
from .overopt import Evaluation, find_onset, probe_summary
from .rollout import build_batch, rollout_adaptive, score_batch

PROBE_SEED_OFFSET = 7777  # the probe's sampling seed: trial seed + this, the same at every evaluation


def reward_roles(cfg: TrialConfig, dirs: dict[str, Path]) -> dict[str, Path]:
    """PPO's extra reward models by role name from the reward stages' artifact dirs (run/graph.py): ``reward_k``
    for ensemble member k (``rm_ensemble/members/k``), ``gold`` for the gold RM (``rm_gold``)."""
    out: dict[str, Path] = {}
    if "rm_ensemble" in dirs:
        for rel in read_json(dirs["rm_ensemble"] / "ensemble.json")["members"]:
            out[f"reward_{rel.rsplit('/', 1)[-1]}"] = dirs["rm_ensemble"] / rel
    if "rm_gold" in dirs:
        out["gold"] = dirs["rm_gold"]
    return out


class GoldProbe:
    """Evaluations of the probe set, the onset rule over them, and the policy at gold's running maximum (the
    checkpoint ``ppo.stop_on_overoptimization`` keeps)."""

    def __init__(self, cfg: TrialConfig, probe_prompts: list[str]):
        self.cfg = cfg
        self.prompts = probe_prompts
        self.evals: list[Evaluation] = []
        self.rows: list[dict] = []
        self.onset: Optional[dict] = None
        self.best_state: Optional[dict] = None
        self.best_step = 0

    @property
    def gold_names(self) -> list[str]:
        if self.cfg.ppo.gold == "rm_gold":
            return ["gold"]
        return [f"reward_{k}" for k in range(1, self.cfg.rm.ensemble_size)]

    @torch.no_grad()
    def gold_scores(self, roles, b: dict) -> torch.Tensor:
        """Gold's score of each row of the batch ``b``: the mean over :attr:`gold_names`, ``roles.plan.rollout_micro``
        rows at a time (doctor measures this pass too: run/doctor_phases.py)."""
        micro, n = roles.plan.rollout_micro, b["ids"].shape[0]
        gold = torch.zeros(n, device=b["ids"].device)
        for s in range(0, n, micro):
            ids, attn = b["ids"][s:s + micro], b["attn"][s:s + micro]
            gold[s:s + micro] = torch.stack([roles.scores(ids, attn, name) for name in self.gold_names]).mean(0)
        return gold

    def due(self, step: int, last: bool = False) -> bool:
        return self.cfg.ppo.gold != "none" and (step % self.cfg.ppo.gold_every == 0 or last)

    @torch.no_grad()
    def evaluate(self, roles, step: int) -> dict:
        """Score the probe at ``step``; returns the ``gold/*`` stats for the history row (and updates the onset and
        the best checkpoint)."""
        p = self.cfg.ppo
        dev = next(roles.model.parameters()).device

        def sample() -> list[dict]:  # seeded inside the attempt: a retry after an out-of-memory error resamples
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # from the same seed
                torch.manual_seed(self.cfg.seed + PROBE_SEED_OFFSET)
                return roles.generate(self.prompts)

        responses = rollout_adaptive(roles, "probe_generation", sample)
        b = build_batch(roles.tokenizer, self.prompts, responses, dev)

        sc, gold = rollout_adaptive(roles, "probe_scoring",
                                    lambda: (score_batch(roles, b, p.temperature), self.gold_scores(roles, b)))
        mask = b["rmask"]
        kl = ((sc["old_logprobs"] - sc["ref_logprobs"]) * mask).sum(1).mean().item()
        proxy = sc["raw_scores"].cpu().tolist()
        gold_l = gold.cpu().tolist()
        e = Evaluation(step, float(sum(proxy) / len(proxy)), tuple(gold_l))
        self.evals.append(e)
        if self.best_state is None or e.gold_mean > max(x.gold_mean for x in self.evals[:-1]):
            self.best_state, self.best_step = roles.policy_state(), step
        if self.onset is None:
            self.onset = find_onset(self.evals, p.gold_k, p.gold_m)
        row = {**probe_summary(proxy, gold_l), "gold/kl": kl, "gold/response_len": mask.sum(1).float().mean().item(),
               "gold/overoptimized": float(self.onset is not None)}
        # Per-prompt scores kept in overoptimization.json (not the history), so the rule can be rerun on a record.
        self.rows.append({"step": step, **row, "gold_per_prompt": gold_l, "proxy_per_prompt": proxy})
        return row

    def record(self, stopped: bool, n_steps: int, last_step: int) -> dict:
        """What the PPO artifact (overoptimization.json) and result.json's ``overoptimization`` say."""
        o = self.onset or {}
        return {"gold": self.cfg.ppo.gold, "reward": self.cfg.ppo.reward, "probe_size": len(self.prompts),
                "every": self.cfg.ppo.gold_every, "k": self.cfg.ppo.gold_k, "m": self.cfg.ppo.gold_m,
                "onset_step": o.get("onset_step"), "peak_step": o.get("peak_step"),
                "detected_step": o.get("detected_step"), "detail": self.onset, "stopped": stopped,
                "kept_step": self.best_step if stopped else last_step, "steps_planned": n_steps,
                "evaluations": self.rows}

    def metrics(self) -> dict:
        """The numbers for metrics.json (``ppo/overopt_*``, ``ppo/gold_score_*``)."""
        g = [e.gold_mean for e in self.evals]
        out = {"ppo/gold_score_first": g[0], "ppo/gold_score_peak": max(g), "ppo/gold_score_last": g[-1]} if g else {}
        if self.onset:
            out.update({"ppo/overopt_onset_step": self.onset["onset_step"],
                        "ppo/overopt_peak_step": self.onset["peak_step"]})
        return out
