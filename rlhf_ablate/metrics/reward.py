"""Reward-model metrics from ranked answer groups (rank 1 = best): the ``rm/`` namespace of docs/architecture.md.

Pair margins and accuracy, per-prompt Kendall tau-b / Spearman rho against the human ranking (macro-averaged, with
a bootstrap CI over prompts), and the length bias of the reward. Pure functions of numbers (no model).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .text import MetricsError

__all__ = ["rm_metrics", "rm_group_records"]


# ---------------------------------------------------------------------------------------------------------
# Reward-model metrics from ranked groups
# ---------------------------------------------------------------------------------------------------------

Group = tuple[Sequence[float], Sequence[int], Sequence[int]] | Mapping[str, Any]


def _as_arrays(groups: Iterable[Group]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for i, g in enumerate(groups):
        if isinstance(g, Mapping):
            try:
                scores, ranks, lengths = g["scores"], g["ranks"], g["lengths"]
            except KeyError as e:
                raise MetricsError(f"rm_metrics: group {i} has no {e.args[0]!r} field") from None
        else:
            scores, ranks, lengths = g
        s = np.asarray(scores, dtype=float)
        r = np.asarray(ranks, dtype=float)
        ln = np.asarray(lengths, dtype=float)
        if not (s.ndim == r.ndim == ln.ndim == 1) or not (len(s) == len(r) == len(ln)) or len(s) == 0:
            raise MetricsError(
                f"rm_metrics: group {i} needs equally long, non-empty scores/ranks/lengths, "
                f"got {len(np.atleast_1d(s))}/{len(np.atleast_1d(r))}/{len(np.atleast_1d(ln))}")
        if not np.isfinite(s).all():
            raise MetricsError(f"rm_metrics: group {i} has a NaN or infinite reward score: {s.tolist()}")
        out.append((s, r, ln))
    return out


def _per_group_corr(groups) -> tuple[list[float], list[float]]:
    """tau-b and rho of scores against MINUS the ranks (rank 1 = best), NaN where undefined."""
    from scipy import stats

    taus, rhos = [], []
    with warnings.catch_warnings():
        # Constant input (all scores equal, or all ranks tied) gives NaN; those prompts are counted as dropped.
        warnings.simplefilter("ignore")
        for s, r, _ in groups:
            if len(s) < 2:
                taus.append(math.nan)
                rhos.append(math.nan)
                continue
            taus.append(float(stats.kendalltau(s, -r).statistic))  # variant="b" is the default: tie-corrected
            rhos.append(float(stats.spearmanr(s, -r).statistic))
    return taus, rhos


def _macro_with_ci(values: list[float], seed: int, n_resamples: int) -> tuple[float, float, float, int]:
    """(mean, ci_low, ci_high, n_dropped) over the non-NaN values; 95 % percentile bootstrap over prompts."""
    from scipy import stats

    arr = np.asarray(values, dtype=float)
    kept = arr[~np.isnan(arr)]
    dropped = int(len(arr) - len(kept))
    if len(kept) == 0:
        return math.nan, math.nan, math.nan, dropped
    mean = float(kept.mean())
    if len(kept) < 2:
        return mean, math.nan, math.nan, dropped
    # Percentile rather than BCa: BCa returns NaN (with a warning) when every prompt has the same tau,
    # e.g. a perfect reward model, where the honest interval is [mean, mean].
    res = stats.bootstrap((kept,), np.mean, n_resamples=n_resamples, confidence_level=0.95,
                          method="percentile", rng=np.random.default_rng(seed), vectorized=True)
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high), dropped


def rm_metrics(
    groups: Iterable[Group],
    *,
    prefix: str = "rm/",
    seed: int = 0,
    n_resamples: int = 2000,
) -> dict[str, float]:
    """The ``rm/`` metrics of docs/architecture.md from ranked groups, keys prefixed with ``prefix``.

    Each group is one prompt: ``(scores, ranks, lengths)`` (or a mapping with those keys, the ``records["rm"]``
    form of result.json), rank 1 = best, ties allowed. Pairs are every (better, worse) pair with different ranks.

    - ``chosen_mean`` / ``rejected_mean``: mean score of the better / worse answer over all pairs (an answer
      counts once per pair it is in, as in RM training); ``separation_margin`` = their difference = mean margin;
      ``margin_std``: population std of the pair margins.
    - ``pairwise_accuracy``: fraction of pairs with margin > 0, a tie (margin == 0) counting 1/2;
      ``prob_margin_gt_0`` / ``prob_margin_gt_0.5``: fraction of pairs with margin strictly > 0 / > 0.5.
    - ``kendall_tau``: per-prompt tau-b (tie-corrected) of scores vs minus ranks, macro-averaged; prompts where it
      is undefined (constant scores, all ranks tied, one answer) are dropped and counted in
      ``kendall_tau_dropped``; ``kendall_tau_ci_low/high``: 95 % percentile bootstrap over prompts (fixed
      ``seed``). ``spearman_rho`` (+ ``_dropped``, ``_ci_low/high``): the same with Spearman's rho.
    - ``length_corr``: **Spearman** rank correlation of score vs answer length over all answers (rank-based, so
      a few very long answers do not dominate); positive = the RM prefers longer answers.
    - ``n_groups``, ``n_pairs``, ``n_answers``.
    Undefined values are NaN.
    """
    from scipy import stats

    arrays = _as_arrays(groups)
    if not arrays:
        raise MetricsError("rm_metrics: no groups to score (the RM eval split is empty)")

    chosen, rejected = [], []
    for s, r, _ in arrays:
        better, worse = np.nonzero(r[:, None] < r[None, :])  # all (i, j) with rank_i better than rank_j
        chosen.append(s[better])
        rejected.append(s[worse])
    chosen_s = np.concatenate(chosen)
    rejected_s = np.concatenate(rejected)
    margins = chosen_s - rejected_s
    n_pairs = len(margins)

    taus, rhos = _per_group_corr(arrays)
    tau, tau_lo, tau_hi, tau_drop = _macro_with_ci(taus, seed, n_resamples)
    rho, rho_lo, rho_hi, rho_drop = _macro_with_ci(rhos, seed, n_resamples)

    all_scores = np.concatenate([s for s, _, _ in arrays])
    all_lengths = np.concatenate([ln for _, _, ln in arrays])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input -> NaN, reported as such
        length_corr = float(stats.spearmanr(all_scores, all_lengths).statistic) if len(all_scores) > 1 else math.nan

    nan = math.nan
    out = {
        "chosen_mean": float(chosen_s.mean()) if n_pairs else nan,
        "rejected_mean": float(rejected_s.mean()) if n_pairs else nan,
        "separation_margin": float(margins.mean()) if n_pairs else nan,
        "margin_std": float(margins.std()) if n_pairs else nan,
        "pairwise_accuracy": float(((margins > 0) + 0.5 * (margins == 0)).mean()) if n_pairs else nan,
        "prob_margin_gt_0": float((margins > 0).mean()) if n_pairs else nan,
        "prob_margin_gt_0.5": float((margins > 0.5).mean()) if n_pairs else nan,
        "kendall_tau": tau,
        "kendall_tau_ci_low": tau_lo,
        "kendall_tau_ci_high": tau_hi,
        "kendall_tau_dropped": tau_drop,
        "spearman_rho": rho,
        "spearman_rho_ci_low": rho_lo,
        "spearman_rho_ci_high": rho_hi,
        "spearman_rho_dropped": rho_drop,
        "length_corr": length_corr,
        "n_groups": len(arrays),
        "n_pairs": n_pairs,
        "n_answers": int(len(all_scores)),
    }
    return {f"{prefix}{k}": v for k, v in out.items()}


def rm_group_records(groups: Iterable[Group], data_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per-prompt records for ``result.json["records"]["rm"]``: scores, ranks, lengths, kendall_tau and
    spearman_rho of that prompt (``None`` where undefined, so the file stays strict JSON)."""
    arrays = _as_arrays(groups)
    if data_ids is not None and len(data_ids) != len(arrays):
        raise MetricsError(f"rm_group_records: {len(data_ids)} data_ids for {len(arrays)} groups")
    taus, rhos = _per_group_corr(arrays)
    records = []
    for i, ((s, r, ln), tau, rho) in enumerate(zip(arrays, taus, rhos)):
        rec: dict[str, Any] = {}
        if data_ids is not None:
            rec["data_id"] = data_ids[i]
        rec.update({
            "scores": s.tolist(),
            "ranks": [int(x) for x in r],
            "lengths": [int(x) for x in ln],
            "kendall_tau": None if math.isnan(tau) else tau,
            "spearman_rho": None if math.isnan(rho) else rho,
        })
        records.append(rec)
    return records
