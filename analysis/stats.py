"""Statistics of the tables: mean ± 95% CI over seeds, and paired tests between the best and the runner-up.

Why these choices:
- **Cell CI**: Student-t interval over seed replicates, mean ± t(0.975, n-1) * s / sqrt(n) with the sample
  standard deviation (ddof=1). With 2 to 5 seeds a normal interval would be far too narrow. One seed gives no
  interval at all; we never print ``± 0``.
- **Best vs runner-up**: a *paired* test, because two configurations evaluated on the same prompts with the same
  seeds share most of their noise (hard prompts are hard for both). Per-example eval records are keyed by
  ``(seed, data_id)``; only keys both sides have are used. The bootstrap is two-level (resample seeds, then
  prompts within each drawn seed), so both sources of noise are in the interval: training randomness across seeds
  and the sampling of eval prompts. Resampling both levels is conservative (Davison & Hinkley 1997, sec. 3.8),
  the safe side for a rule that decides what is printed in bold. With one shared seed it reduces to the ordinary
  paired bootstrap over prompts (Koehn 2004, as in sacrebleu's paired_bs), which covers prompt noise only.
- **Fallback** when no per-example records exist: a paired t-interval on the per-seed differences (needs at least
  two shared seeds); otherwise the pair is "not tested" and nothing is bold.
All randomness comes from one fixed seed, so the same inputs give the same tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Optional

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000
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


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> Summary:
    """Mean ± t-interval over seed replicates. NaN/inf are not counted in ``n`` (reported in ``n_nan``)."""
    vals = [float(v) for v in values]
    finite = np.array([v for v in vals if math.isfinite(v)], dtype=float)
    n, n_nan = int(finite.size), len(vals) - int(finite.size)
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, 0, n_nan)
    mean = float(finite.mean())
    if n == 1:
        return Summary(mean, math.nan, math.nan, 1, n_nan)
    # Identical seeds (e.g. a shared cached stage, or the same tau reached by two seeds and summed in another
    # order) give an exact zero, not float noise such as 1.4e-15.
    sd = 0.0 if float(np.ptp(finite)) <= 1e-12 * max(1.0, abs(mean)) else float(finite.std(ddof=1))
    half = t_quantile(n - 1, confidence) * sd / math.sqrt(n)
    return Summary(mean, mean - half, mean + half, n, n_nan)


@dataclass(frozen=True)
class PairedTest:
    """Difference a - b (best minus runner-up) with its confidence interval and a two-sided p-value."""
    method: str            # "bootstrap" (per-example, paired by (seed, data_id)) or "seed-t" (paired by seed)
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_seeds: int
    n_pairs: int           # paired examples (bootstrap) or paired seeds (seed-t)

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def describe(self) -> str:
        if self.method == "bootstrap":
            how = (f"paired bootstrap over {self.n_seeds} seed{'s' if self.n_seeds != 1 else ''} x prompts, "
                   f"{self.n_pairs} shared examples")
            if self.n_seeds == 1:
                how += "; one seed: prompt noise only"
        else:
            how = f"paired t over {self.n_pairs} shared seeds (no per-example records)"
        return how


def paired_bootstrap(a: Mapping[tuple[Hashable, Hashable], float], b: Mapping[tuple[Hashable, Hashable], float],
                     n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> Optional[PairedTest]:
    """Two-level paired bootstrap of mean(a - b) over the keys ``(seed, data_id)`` both sides share.

    The statistic is the mean over seeds of the per-seed mean difference (each seed weighs the same). Each
    resample draws seeds with replacement, then, independently for every drawn seed, its prompts with
    replacement. Returns None when fewer than 2 shared finite pairs exist.
    """
    shared = sorted((k for k in a.keys() & b.keys()
                     if math.isfinite(a[k]) and math.isfinite(b[k])), key=lambda k: (repr(k[0]), repr(k[1])))
    if len(shared) < 2:
        return None
    by_seed: dict[Hashable, list[float]] = {}
    for k in shared:
        by_seed.setdefault(k[0], []).append(float(a[k]) - float(b[k]))
    seeds = list(by_seed)  # sorted above
    diffs = [np.asarray(by_seed[s]) for s in seeds]
    observed = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    S = len(seeds)
    # prompt-level resampled means: for every seed, an (n_resamples, S) matrix (one independent prompt resample
    # per slot in which that seed may be drawn)
    within = np.empty((S, n_resamples, S))
    for i, d in enumerate(diffs):
        idx = rng.integers(0, d.size, size=(n_resamples, S, d.size))
        within[i] = d[idx].mean(axis=2)
    if S == 1:
        boot = within[0, :, 0]
    else:
        drawn = rng.integers(0, S, size=(n_resamples, S))
        boot = within[drawn, np.arange(n_resamples)[:, None], np.arange(S)[None, :]].mean(axis=1)
    alpha = 1 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    # Two-sided percentile p-value with the +1 correction (never exactly 0 from a finite resample).
    p = min(1.0, 2 * (min(int((boot <= 0).sum()), int((boot >= 0).sum())) + 1) / (n_resamples + 1))
    return PairedTest("bootstrap", observed, float(lo), float(hi), float(p), S, len(shared))


def paired_seed_test(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                     confidence: float = CONFIDENCE) -> Optional[PairedTest]:
    """Paired t-interval on the per-seed differences a[s] - b[s]; None with fewer than 2 shared seeds."""
    shared = sorted((s for s in a.keys() & b.keys() if math.isfinite(a[s]) and math.isfinite(b[s])), key=repr)
    if len(shared) < 2:
        return None
    d = np.array([a[s] - b[s] for s in shared], dtype=float)
    n = d.size
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        p = 1.0 if mean == 0 else 0.0
        return PairedTest("seed-t", mean, mean, mean, p, n, n)
    from scipy.stats import t

    se = sd / math.sqrt(n)
    half = t_quantile(n - 1, confidence) * se
    p = float(2 * t.sf(abs(mean / se), n - 1))
    return PairedTest("seed-t", mean, mean - half, mean + half, p, n, n)
