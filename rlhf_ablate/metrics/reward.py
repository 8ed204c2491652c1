"""Reward-model metrics from ranked answer groups (rank 1 = best): the ``rm/`` namespace of docs/architecture.md.

Pair margins and accuracy, per-prompt Kendall tau-b / Spearman rho against the human ranking (macro-averaged, with
a bootstrap CI over prompts), the length bias of the reward inside each prompt, and two margins that can be read
across reward models: standardized (scale-free) and length-corrected. Every metric is a reducer of per-group
sufficient statistics (:func:`rm_unit_stats`), so a set of groups, or a resample of them, has exactly one value of
each. Pure functions of numbers (no model).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .text import MetricsError

__all__ = ["RM_COLUMNS", "RM_REDUCERS", "rm_group_records", "rm_metrics", "rm_unit_stats"]


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


def _within_length_corr(s: np.ndarray, ln: np.ndarray) -> float:
    """Spearman correlation of score and answer length inside one prompt (NaN when either is constant)."""
    from scipy import stats

    if len(s) < 2 or np.ptp(s) == 0 or np.ptp(ln) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.spearmanr(s, ln).statistic)


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


# ---------------------------------------------------------------------------------------------------------
# Per-group sufficient statistics: every rm/ metric is a function of their sum over groups
# ---------------------------------------------------------------------------------------------------------
# One row per ranked group. Summed over any set of groups (all of them, or a bootstrap resample), the reducers
# below give that set's value of every rm/ metric, so the stage, the table cell and the table's test compute a
# metric in exactly one way (rlhf_ablate/metrics/registry.py binds each name to its reducer).
RM_COLUMNS = (
    "n_pairs", "sum_chosen", "sum_rejected", "sum_margin", "sum_margin_sq", "n_correct", "n_tie", "n_gt_half",
    "tau", "tau_ok", "rho", "rho_ok", "len_corr", "len_corr_ok",
    "ss_within", "dof_within", "sxy_len", "sxx_len", "sum_pair_dlen",
)
_C = {name: i for i, name in enumerate(RM_COLUMNS)}


def rm_unit_stats(groups: Iterable[Group]) -> np.ndarray:
    """(groups x len(RM_COLUMNS)) sufficient statistics, one row per ranked group (see RM_COLUMNS)."""
    arrays = _as_arrays(groups)
    taus, rhos = _per_group_corr(arrays)
    out = np.zeros((len(arrays), len(RM_COLUMNS)))
    for g, ((s, r, ln), tau, rho) in enumerate(zip(arrays, taus, rhos)):
        better, worse = np.nonzero(r[:, None] < r[None, :])  # all (i, j) with rank_i better than rank_j
        m = s[better] - s[worse]
        lc = _within_length_corr(s, ln)
        ds, dl = s - s.mean(), ln - ln.mean()
        row = out[g]
        row[_C["n_pairs"]] = len(m)
        row[_C["sum_chosen"]] = s[better].sum()
        row[_C["sum_rejected"]] = s[worse].sum()
        row[_C["sum_margin"]] = m.sum()
        row[_C["sum_margin_sq"]] = (m * m).sum()
        row[_C["n_correct"]] = (m > 0).sum()
        row[_C["n_tie"]] = (m == 0).sum()
        row[_C["n_gt_half"]] = (m > 0.5).sum()
        for name, v in (("tau", tau), ("rho", rho), ("len_corr", lc)):
            ok = not math.isnan(v)
            row[_C[name]] = v if ok else 0.0
            row[_C[name + "_ok"]] = float(ok)
        row[_C["ss_within"]] = (ds * ds).sum()
        row[_C["dof_within"]] = len(s) - 1
        row[_C["sxy_len"]] = (ds * dl).sum()
        row[_C["sxx_len"]] = (dl * dl).sum()
        row[_C["sum_pair_dlen"]] = (ln[better] - ln[worse]).sum()
    return out


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else math.nan


def _margin_std(v: np.ndarray) -> float:
    n = v[_C["n_pairs"]]
    if n <= 0:
        return math.nan
    mean = v[_C["sum_margin"]] / n
    return float(math.sqrt(max(v[_C["sum_margin_sq"]] / n - mean * mean, 0.0)))


def _length_corrected_margin(v: np.ndarray) -> float:
    # Pooled within-prompt least-squares slope of score on length (prompt means removed, so differences between
    # prompts do not enter), then the margin of the length-corrected scores s - slope * length.
    slope = v[_C["sxy_len"]] / v[_C["sxx_len"]] if v[_C["sxx_len"]] > 0 else 0.0
    return _ratio(v[_C["sum_margin"]] - slope * v[_C["sum_pair_dlen"]], v[_C["n_pairs"]])


def _standardized_margin(v: np.ndarray) -> float:
    # Margin over the pooled within-prompt standard deviation of the scores: unchanged by any affine rescaling of
    # an RM's scores (and by a constant per prompt), so reward models with different scales can be compared.
    sd = math.sqrt(v[_C["ss_within"]] / v[_C["dof_within"]]) if v[_C["dof_within"]] > 0 else math.nan
    return _ratio(v[_C["sum_margin"]] / v[_C["n_pairs"]], sd) if v[_C["n_pairs"]] > 0 and sd > 0 else math.nan


# name -> reducer of the summed RM_COLUMNS vector
RM_REDUCERS: dict[str, Callable[[np.ndarray], float]] = {
    "chosen_mean": lambda v: _ratio(v[_C["sum_chosen"]], v[_C["n_pairs"]]),
    "rejected_mean": lambda v: _ratio(v[_C["sum_rejected"]], v[_C["n_pairs"]]),
    "separation_margin": lambda v: _ratio(v[_C["sum_margin"]], v[_C["n_pairs"]]),
    "margin_std": _margin_std,
    "margin_standardized": _standardized_margin,
    "margin_length_corrected": _length_corrected_margin,
    # a tie (margin exactly 0) counts 1/2, in the cell and in its test alike (issue 10)
    "pairwise_accuracy": lambda v: _ratio(v[_C["n_correct"]] + 0.5 * v[_C["n_tie"]], v[_C["n_pairs"]]),
    "prob_margin_gt_0": lambda v: _ratio(v[_C["n_correct"]], v[_C["n_pairs"]]),
    "prob_margin_gt_0.5": lambda v: _ratio(v[_C["n_gt_half"]], v[_C["n_pairs"]]),
    "kendall_tau": lambda v: _ratio(v[_C["tau"]], v[_C["tau_ok"]]),
    "spearman_rho": lambda v: _ratio(v[_C["rho"]], v[_C["rho_ok"]]),
    "length_bias": lambda v: _ratio(v[_C["len_corr"]], v[_C["len_corr_ok"]]),
}


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
    Every value comes from :data:`RM_REDUCERS` applied to the summed :func:`rm_unit_stats` (docs/metrics.md has
    the definitions); besides those:

    - ``kendall_tau_ci_low/high`` and ``spearman_rho_ci_low/high``: 95 % percentile bootstrap over prompts (fixed
      ``seed``) of the macro-averaged per-prompt correlation; ``*_dropped``: prompts where it is undefined
      (constant scores, all ranks tied, one answer); ``length_bias_dropped`` likewise;
    - ``n_groups``, ``n_pairs``, ``n_answers``.
    Undefined values are NaN.
    """
    arrays = _as_arrays(groups)
    if not arrays:
        raise MetricsError("rm_metrics: no groups to score (the RM eval split is empty)")
    stats_ = rm_unit_stats(arrays)
    total = stats_.sum(axis=0)
    out: dict[str, float] = {name: f(total) for name, f in RM_REDUCERS.items()}
    taus, rhos = _per_group_corr(arrays)
    _, tau_lo, tau_hi, tau_drop = _macro_with_ci(taus, seed, n_resamples)
    _, rho_lo, rho_hi, rho_drop = _macro_with_ci(rhos, seed, n_resamples)
    out.update({
        "kendall_tau_ci_low": tau_lo, "kendall_tau_ci_high": tau_hi, "kendall_tau_dropped": tau_drop,
        "spearman_rho_ci_low": rho_lo, "spearman_rho_ci_high": rho_hi, "spearman_rho_dropped": rho_drop,
        "length_bias_dropped": int(len(arrays) - total[_C["len_corr_ok"]]),
        "n_groups": len(arrays),
        "n_pairs": int(total[_C["n_pairs"]]),
        "n_answers": int(sum(len(s) for s, _, _ in arrays)),
    })
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
