"""The over-optimization keys: the gold signal and the onset alarm (``ppo.gold*``, ``ppo.stop_on_overoptimization``),
the ensemble reward (``ppo.reward``, ``rm.ensemble_size``) and the gold RM trained on a disjoint fold of the
preference data (``rm.gold*``). Parts of PPOConfig and RMConfig (rlhf_ablate/config/schema.py), so the dotted keys
stay flat; the rules that span them are :func:`validate_overoptimization`. The rule itself is
rlhf_ablate/ppo/overopt.py; docs/metrics.md, "Over-optimization", says what each number means."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError
from .fields import help_field as _f


@dataclass(frozen=True)
class GoldParams:
    """PPO's side: the reward it optimises and the gold signal it is watched by."""

    reward: Literal["single", "ensemble_mean", "ensemble_min", "ensemble_mean_minus_std"] = _f(
        "single", "PPO's reward: the trial's RM, or the mean, minimum or mean - std of the rm.ensemble_size reward "
                  "models (Coste et al. 2023: conservative ensembles hold off over-optimization).")
    gold: Literal["none", "rm_gold", "ensemble"] = _f(
        "none", "Gold reward scored on the probe prompts, never trained against: rm_gold = the RM trained on a "
                "disjoint fold of the preference data (needs rm.gold=disjoint); ensemble = the mean of ensemble "
                "members 2..K (needs rm.ensemble_size >= 2 and ppo.reward=single).")
    gold_every: int = _f(1, "Score the probe prompts by proxy and gold every this many PPO steps (and at step 0).")
    gold_probe_size: int = _f(32, "Probe prompts, held out from the PPO prompts (never trained on; not the eval "
                                  "set, which the final metrics use).")
    gold_k: float = _f(2.5, "Onset rule: gold's fall from its running maximum must exceed this many paired standard "
                            "errors of the probe mean (rlhf_ablate/ppo/overopt.py).")
    gold_m: int = _f(2, "Onset rule: for this many consecutive evaluations, while the proxy's least-squares "
                        "slope over the evaluations so far is positive.")
    stop_on_overoptimization: bool = _f(
        False, "Stop PPO at the onset and keep the policy of gold's maximum (the last good checkpoint) as the "
               "stage's artifact.")


@dataclass(frozen=True)
class EnsembleParams:
    """The reward model's side: extra reward models trained beside the trial's RM."""

    ensemble_size: int = _f(1, "Reward models trained on the same pairs with different seeds (the trial's RM is "
                               "the first); K >= 2 for ppo.reward=ensemble_* or ppo.gold=ensemble.")
    gold: Literal["none", "disjoint"] = _f(
        "none", "disjoint: train a gold RM on rm.gold_fraction of the RM training groups (by a stable id hash); the "
                "trial's RM and the ensemble train on the rest.")
    gold_fraction: float = _f(0.5, "rm.gold=disjoint: fraction of the RM training groups held out for the gold RM.")
    gold_max_steps: int = _f(0, "rm.gold=disjoint: the gold RM's optimizer steps (0 = rm.max_steps / rm.epochs as "
                                "for the trial's RM).")


def validate_overoptimization(cfg: Any, source: str) -> None:
    """Rules across ppo.reward/gold* and rm.ensemble_size/gold*, each naming the keys and how to fix it."""
    p, r = cfg.ppo, cfg.rm

    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: '{key}' {msg}")

    if r.ensemble_size < 1:
        bad("rm.ensemble_size", f"must be >= 1, got {r.ensemble_size}.")
    if p.reward != "single" and r.ensemble_size < 2:
        bad("ppo.reward", f"is {p.reward!r}, which combines several reward models, but rm.ensemble_size is "
            f"{r.ensemble_size}. Set rm.ensemble_size >= 2 (e.g. 3), or ppo.reward=single.")
    if not 0 < r.gold_fraction < 1:
        bad("rm.gold_fraction", f"must lie strictly between 0 and 1, got {r.gold_fraction}.")
    if r.gold_max_steps < 0:
        bad("rm.gold_max_steps", f"must be >= 0 (0 = as the trial's RM), got {r.gold_max_steps}.")
    if p.gold_every < 1 or p.gold_probe_size < 3 or p.gold_m < 1 or p.gold_k < 0:
        bad("ppo.gold_every", f"must be >= 1, with ppo.gold_probe_size >= 3, ppo.gold_m >= 1 and ppo.gold_k >= 0 "
            f"(got {p.gold_every}, {p.gold_probe_size}, {p.gold_m}, {p.gold_k}).")
    if p.gold == "rm_gold" and r.gold != "disjoint":
        bad("ppo.gold", "is 'rm_gold', which needs a gold RM: set rm.gold=disjoint (trained on a held-out fold of "
            "the preference data).")
    if r.gold == "disjoint" and p.gold != "rm_gold" and cfg.method == "ppo":
        bad("rm.gold", "is 'disjoint', but nothing reads the gold RM: set ppo.gold=rm_gold.")
    if p.gold == "ensemble" and (r.ensemble_size < 2 or p.reward != "single"):
        bad("ppo.gold", f"is 'ensemble' (the mean of ensemble members 2..K), which needs rm.ensemble_size >= 2 "
            f"(got {r.ensemble_size}) and ppo.reward=single (got {p.reward!r}): a policy trained on the ensemble "
            f"would be judged by its own reward. Use ppo.gold=rm_gold with an ensemble reward.")
    if p.stop_on_overoptimization and p.gold == "none":
        bad("ppo.stop_on_overoptimization", "needs a gold signal: set ppo.gold (rm_gold or ensemble).")
    cap = cfg.data.max_ppo_prompts
    if cap and probe_prompts_problem(cfg, cap):
        bad("ppo.gold_probe_size", f"is {p.gold_probe_size}, but data.max_ppo_prompts={cap} caps the PPO prompts below "
            f"twice that (the probe holds out {p.gold_probe_size}, PPO trains on the rest): lower "
            f"ppo.gold_probe_size or raise data.max_ppo_prompts.")


def probe_prompts_problem(cfg: Any, n_ppo_prompts: int) -> str:
    """Why ``n_ppo_prompts`` PPO prompts are too few for the gold probe (``""`` when they are enough): the probe
    holds out ``ppo.gold_probe_size`` of them and PPO needs at least as many left to train on. Checked on the config
    (data.max_ppo_prompts), before any stage runs (run/trial.py, the launchers' preflight) and by PPO itself."""
    p = cfg.ppo
    if cfg.method != "ppo" or p.gold == "none" or n_ppo_prompts >= 2 * p.gold_probe_size:
        return ""
    return (f"ppo.gold_probe_size={p.gold_probe_size} holds out that many PPO prompts for the gold probe, but the "
            f"data has {n_ppo_prompts} PPO prompts (fewer than twice as many, {2 * p.gold_probe_size}); lower "
            f"ppo.gold_probe_size or use more PPO prompts (data.max_ppo_prompts, data.ppo_file)")


def uses_ensemble(cfg: Any) -> bool:
    """PPO reads the RM ensemble's other members: for its reward (ppo.reward=ensemble_*) or as gold. Otherwise the
    rm_ensemble stage does not run, whatever rm.ensemble_size says."""
    return (cfg.method == "ppo" and cfg.rm.ensemble_size >= 2
            and (cfg.ppo.reward != "single" or cfg.ppo.gold == "ensemble"))


def uses_gold_rm(cfg: Any) -> bool:
    return cfg.method == "ppo" and cfg.ppo.gold == "rm_gold"
