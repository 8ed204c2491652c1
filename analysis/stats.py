"""Statistics of the tables: mean ± 95% CI over seeds, and the test that decides what is bold.

Why these choices (issue 10; docs/architecture.md, "Statistics in the tables"):
- **The seed is the unit of replication.** A trial's number (corpus BLEU, RM accuracy, ...) carries the noise of
  its own training run; prompts are shared by every trial, so resampling prompts says nothing about how much a
  second training run would move the number. Every interval and every test here is therefore over seeds.
- **Cell CI**: Student-t interval over seed replicates, mean ± t(0.975, n-1) * s / sqrt(n) (ddof=1). One seed
  gives no interval, never ``± 0``.
- **Best vs runner-up**: a paired t-test on the per-seed differences of the statistic the cell shows (pairing by
  seed removes what a seed shares across configurations, e.g. the data order). With fewer than two shared seeds
  nothing is tested and nothing is bold: one training run per configuration cannot separate a configuration from
  its own training noise. The p-values of the tested columns of one table are adjusted together with Holm's
  step-down procedure (Holm 1979), so the chance that a null table shows any bold cell stays at 5%.
  tests/test_calibration.py simulates null sweeps through this code and counts.
- **Within one seed** (information only, never bold): the paired bootstrap over prompts of the corpus statistic
  (Koehn 2004; sacrebleu's paired bootstrap): it says how much the eval prompts alone move the difference.
All randomness comes from one fixed seed, so the same inputs give the same tables.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
N_RESAMPLES = 1000
BOOTSTRAP_SEED = 20240611  # fixed: same inputs -> same intervals, byte for byte


@dataclass(frozen=True)
class Summary:
    """Mean and t-interval of the finite values; ``n`` counts finite values only, ``n_nan`` the others."""
    mean: float
    ci_low: float
    ci_high: float
    n: int
    n_nan: int = 0

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2 if self.has_ci else math.nan

    @property
    def has_ci(self) -> bool:
        return self.n >= 2 and math.isfinite(self.ci_low) and math.isfinite(self.ci_high)


@functools.lru_cache(maxsize=None)
def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    from scipy.special import stdtrit

    return float(stdtrit(df, 0.5 + confidence / 2))  # Student-t quantile (scipy.stats.t.ppf without overhead)


def t_two_sided_p(t_stat: float, df: int) -> float:
    from scipy.special import stdtr

    return float(2 * stdtr(df, -abs(t_stat)))


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean ± t-interval over seed replicates. NaN/inf are not counted in ``n`` (reported in ``n_nan``)."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    n, n_nan = len(finite), len(vals) - len(finite)
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, 0, n_nan)
    mean = math.fsum(finite) / n
    if n == 1:
        return Summary(mean, math.nan, math.nan, 1, n_nan)
    # Identical seeds (e.g. a shared cached stage, or the same tau reached by two seeds and summed in another
    # order) give an exact zero, not float noise such as 1.4e-15.
    sd = 0.0 if max(finite) - min(finite) <= 1e-12 * max(1.0, abs(mean)) else statistics.stdev(finite)
    half = t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    return Summary(mean, mean - half, mean + half, n, n_nan)


@dataclass(frozen=True)
class PairedTest:
    """Difference a - b (best minus runner-up) with its confidence interval and a two-sided p-value."""
    method: str            # "seed-t" (per-seed differences) or "prompt-bootstrap" (one seed, prompts resampled)
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_seeds: int
    n_pairs: int           # paired seeds (seed-t) or paired prompts (prompt-bootstrap)
    p_adjusted: float = math.nan   # Holm-adjusted over the table's tested columns (seed-t only)

    def describe(self) -> str:
        if self.method == "seed-t":
            return f"paired t over {self.n_seeds} shared seeds"
        return (f"paired bootstrap over the {self.n_pairs} prompts of the one seed (prompt noise only, not "
                "training noise)")


def paired_seed_test(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                     confidence: float = CONFIDENCE) -> Optional[PairedTest]:
    """Paired t-interval and two-sided p-value on the per-seed differences a[s] - b[s]; None with fewer than 2
    shared seeds with finite values on both sides."""
    shared = sorted((s for s in a.keys() & b.keys() if math.isfinite(a[s]) and math.isfinite(b[s])), key=repr)
    if len(shared) < 2:
        return None
    d = [a[s] - b[s] for s in shared]
    n = len(d)
    mean = math.fsum(d) / n
    sd = statistics.stdev(d)
    if sd <= 1e-12 * max(1.0, abs(mean)):
        # Every seed moved by exactly the same amount (deterministic stages): no noise to test against.
        p = 1.0 if mean == 0 else 0.0
        return PairedTest("seed-t", mean, mean, mean, p, n, n)
    se = sd / math.sqrt(n)
    half = t_quantile(n - 1, confidence) * se
    p = t_two_sided_p(mean / se, n - 1)
    return PairedTest("seed-t", mean, mean - half, mean + half, p, n, n)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): reject H_i at level alpha iff adjusted p_i <= alpha.
    Controls the family-wise error rate under any dependence between the tests."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_unit_bootstrap(a: np.ndarray, b: np.ndarray, reduce: Callable[[np.ndarray], float],
                          n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                          confidence: float = CONFIDENCE) -> Optional[PairedTest]:
    """Paired bootstrap of reduce(sum a) - reduce(sum b) over units (rows, aligned: row i of a and b is the same
    prompt), resampling the rows and recomputing the statistic from the resampled sums (for BLEU: corpus BLEU of
    the resample, as sacrebleu's paired bootstrap does). Within one seed only: this is prompt noise."""
    if a.shape != b.shape or len(a) < 2:
        return None
    observed = reduce(a.sum(0)) - reduce(b.sum(0))
    if not math.isfinite(observed):
        return None
    rng = np.random.default_rng(seed)
    # The same drawn units on both sides (paired); every resample's summed statistics at once. Fancy indexing,
    # not a matrix product: a BLAS call is slower at these sizes and fights other processes for the cores.
    idx = rng.integers(0, len(a), size=(n_resamples, len(a)))
    sa, sb = a[idx].sum(axis=1), b[idx].sum(axis=1)
    if getattr(reduce, "vectorized", False):  # means reduce every resample at once (registry._mean_of)
        boot = np.asarray(reduce(sa)) - np.asarray(reduce(sb))
    else:
        boot = np.array([reduce(x) - reduce(y) for x, y in zip(sa, sb)])
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return None
    alpha = 1 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * (min(int((boot <= 0).sum()), int((boot >= 0).sum())) + 1) / (boot.size + 1))
    return PairedTest("prompt-bootstrap", float(observed), float(lo), float(hi), float(p), 1, len(a))
