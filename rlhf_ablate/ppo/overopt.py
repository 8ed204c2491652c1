"""Over-optimization: the PPO reward of an ensemble, the probe set's summary and the onset rule. No model here.

Gao et al. (2022), "Scaling Laws for Reward Model Overoptimization": as PPO pushes a proxy reward up, a gold reward
first rises and then falls, earlier for smaller reward models. rlhf_ablate/ppo/loop.py scores a fixed probe set of
held-out prompts every ``ppo.gold_every`` steps by the proxy (what PPO optimises) and by a gold reward the policy
never trained against; :func:`find_onset` says when gold turned.

**The onset rule** (docs/metrics.md, "Over-optimization"). Evaluations ``0..n`` (step 0 is the SFT policy) each
give the proxy's probe mean ``p_i`` and the gold scores of the probe prompts ``g_i`` (one per prompt, the same
prompts every time). At evaluation ``i`` let ``j`` be gold's running maximum (the first evaluation with the highest
probe mean so far). Evaluation ``i`` is *over-optimized* when

- gold fell beyond the probe's noise: ``mean(g_j) - mean(g_i) > k * SE``, where SE is the standard error of the
  mean of the per-prompt differences ``g_j - g_i`` (paired: a hard prompt is hard at both evaluations), and
- the proxy's trend is up: the least-squares slope of ``p_0..p_i`` over the steps is positive. (A trend rather than
  ``p_i > p_j``: the probe mean of the proxy is noisy too, and one evaluation a hair below the peak's value would
  otherwise reset the count while gold kept falling; measured on the tiny model, seed 1 of the bundled sweep.)

The alarm fires at the first evaluation that closes a run of ``m`` consecutive over-optimized evaluations (defaults
k = 2.5, m = 2). ``onset_step`` is the step of the first evaluation of that run (gold had fallen by then),
``peak_step`` the step of gold's maximum before it: the last good checkpoint, which
``ppo.stop_on_overoptimization`` keeps. The false-alarm rate on flat gold curves is measured by
:func:`false_alarm_rate` (``python -m rlhf_ablate.ppo.overopt``).

**Ensemble rewards** (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"): ``ppo.reward``
combines K reward models' raw scores per response: their mean, their minimum (worst-case optimisation) or
mean - std (uncertainty-weighted optimisation, with the std's coefficient 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

REWARDS = ("single", "ensemble_mean", "ensemble_min", "ensemble_mean_minus_std")
DEFAULT_K = 2.5
DEFAULT_M = 2


def combine_rewards(member_scores: torch.Tensor, how: str) -> torch.Tensor:
    """``member_scores [K, B]`` (K reward models' raw scores of B responses) -> ``[B]``: ``single`` is member 0;
    ``ensemble_mean``, ``ensemble_min``, ``ensemble_mean_minus_std`` (population std over the K members)."""
    if member_scores.dim() != 2:
        raise ValueError(f"combine_rewards: member scores must be [K, B], got shape {tuple(member_scores.shape)}")
    if how == "single":
        return member_scores[0]
    if member_scores.shape[0] < 2:
        raise ValueError(f"combine_rewards: {how} needs at least 2 reward models, got {member_scores.shape[0]}")
    if how == "ensemble_mean":
        return member_scores.mean(0)
    if how == "ensemble_min":
        return member_scores.min(0).values
    if how == "ensemble_mean_minus_std":
        return member_scores.mean(0) - member_scores.std(0, unbiased=False)
    raise ValueError(f"combine_rewards: unknown reward {how!r} (choices: {', '.join(REWARDS)})")


def rank_correlations(proxy: Sequence[float], gold: Sequence[float]) -> tuple[float, float]:
    """(Spearman rho, Kendall tau-b) of the proxy and gold scores of the same responses; NaN when either is
    constant or there are fewer than 3 responses."""
    from scipy.stats import kendalltau, spearmanr

    x, y = np.asarray(proxy, float), np.asarray(gold, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)


def probe_summary(proxy: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """The probe set's numbers at one evaluation: gold mean and its standard error (per-prompt scores), the proxy
    mean, and their rank correlations over the probe responses."""
    g = np.asarray(gold, float)
    rho, tau = rank_correlations(proxy, gold)
    se = float(g.std(ddof=1) / math.sqrt(len(g))) if len(g) > 1 else math.nan
    return {"gold/score": float(g.mean()), "gold/score_se": se, "gold/proxy": float(np.mean(proxy)),
            "gold/spearman": rho, "gold/kendall": tau}


@dataclass(frozen=True)
class Evaluation:
    """One probe evaluation: the PPO step (0 = before training), the proxy's probe mean, gold per probe prompt."""

    step: int
    proxy: float
    gold: tuple[float, ...]

    @property
    def gold_mean(self) -> float:
        return float(np.mean(self.gold))


def drop_beyond_noise(peak: Evaluation, now: Evaluation, k: float = DEFAULT_K) -> tuple[bool, float, float]:
    """(gold fell by more than k paired standard errors from ``peak`` to ``now``, the drop, its SE)."""
    a, b = np.asarray(peak.gold, float), np.asarray(now.gold, float)
    drop = float(a.mean() - b.mean())
    if len(a) == len(b) and len(a) > 1:
        se = float((a - b).std(ddof=1) / math.sqrt(len(a)))
    else:  # different probe sizes cannot be paired: the SE of a difference of two independent means
        se = float(math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))) if min(len(a), len(b)) > 1 else 0.0
    return drop > k * se and drop > 0, drop, se


def proxy_slope(evals: Sequence[Evaluation]) -> float:
    """Least-squares slope of the proxy's probe means against the steps (0 for fewer than two evaluations)."""
    if len(evals) < 2:
        return 0.0
    x = np.array([e.step for e in evals], float)
    y = np.array([e.proxy for e in evals], float)
    x -= x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum()) if (x * x).sum() > 0 else 0.0


def find_onset(evals: Sequence[Evaluation], k: float = DEFAULT_K, m: int = DEFAULT_M) -> Optional[dict]:
    """The onset rule (module docstring) over evaluations in step order: None, or ``{onset_step, peak_step,
    detected_step, gold_peak, gold_at_detection, drop, drop_se, proxy_peak, proxy_at_detection, k, m}``."""
    if m < 1 or k < 0:
        raise ValueError(f"find_onset: m must be >= 1 and k >= 0, got m={m}, k={k}")
    peak = 0
    run = 0
    for i, e in enumerate(evals):
        if e.gold_mean > evals[peak].gold_mean:
            peak, run = i, 0
            continue
        fell, drop, se = drop_beyond_noise(evals[peak], e, k)
        run = run + 1 if fell and proxy_slope(evals[:i + 1]) > 0 else 0
        if run >= m:
            p = evals[peak]
            return {"onset_step": evals[i - m + 1].step, "peak_step": p.step, "detected_step": e.step,
                    "gold_peak": p.gold_mean, "gold_at_detection": e.gold_mean, "drop": drop, "drop_se": se,
                    "proxy_peak": p.proxy, "proxy_at_detection": e.proxy, "k": k, "m": m}
    return None


def synthetic_run(gold_curve: Sequence[float], proxy_curve: Sequence[float], n_prompts: int, rng: np.random.Generator,
                  prompt_sd: float = 1.0, noise_sd: float = 1.0, steps: Optional[Sequence[int]] = None
                  ) -> list[Evaluation]:
    """Evaluations of a probe of ``n_prompts`` prompts whose true gold and proxy means follow the given curves:
    per-prompt gold = curve + a fixed prompt effect (sd ``prompt_sd``) + fresh sampling noise (sd ``noise_sd``);
    the proxy mean gets noise of the mean's size."""
    prompt = rng.normal(0.0, prompt_sd, n_prompts)
    steps = list(steps) if steps is not None else list(range(len(gold_curve)))
    out = []
    for s, g, p in zip(steps, gold_curve, proxy_curve):
        gold = g + prompt + rng.normal(0.0, noise_sd, n_prompts)
        out.append(Evaluation(s, float(p + rng.normal(0.0, noise_sd / math.sqrt(n_prompts))), tuple(gold)))
    return out


def false_alarm_rate(n_runs: int = 2000, n_evals: int = 9, n_prompts: int = 16, k: float = DEFAULT_K,
                     m: int = DEFAULT_M, proxy_slope: float = 1.0, seed: int = 0) -> float:
    """Fraction of ``n_runs`` simulated runs with a flat gold curve in which :func:`find_onset` fires. The proxy
    rises by ``proxy_slope`` per evaluation (the worst case: its condition always holds; 0 = flat proxy too). The
    paired statistic is scale-free, so only the number of evaluations and probe prompts matter, not the noise's
    size."""
    rng = np.random.default_rng(seed)
    fired = 0
    for _ in range(n_runs):
        evals = synthetic_run([0.0] * n_evals, [proxy_slope * i for i in range(n_evals)], n_prompts, rng)
        fired += find_onset(evals, k, m) is not None
    return fired / n_runs


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m rlhf_ablate.ppo.overopt [--runs N --evals E --prompts P --k K --m M]``: the false-alarm rate
    on flat gold curves, with a rising and a flat proxy."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rlhf_ablate.ppo.overopt", description=main.__doc__)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--evals", type=int, default=9)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=float, default=DEFAULT_K)
    ap.add_argument("--m", type=int, default=DEFAULT_M)
    a = ap.parse_args(argv)
    for slope, what in ((1.0, "rising proxy"), (0.0, "flat proxy")):
        r = false_alarm_rate(a.runs, a.evals, a.prompts, a.k, a.m, proxy_slope=slope)
        mc = math.sqrt(max(r * (1 - r), 1e-12) / a.runs)
        print(f"flat gold, {what}: {a.evals} evaluations x {a.prompts} probe prompts, k={a.k}, m={a.m}: "
              f"false alarms {r:.4f} (+- {1.96 * mc:.4f}, 95% Monte Carlo) in {a.runs} runs")


if __name__ == "__main__":
    main()
