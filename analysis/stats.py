"""Statistics of the tables: mean ± 95% CI over seeds, and the test that decides what is bold.

The tables use :func:`best_vs_rest` (issue 18, at the end of this module): configurations x seeds as a randomized
complete block design, the best against every other value. :func:`paired_seed_test` below is the per-pair test
of issue 10, kept for notebooks and as the reference the per-pair fallback reproduces.

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
        # Every seed moved by exactly the same amount (deterministic stages, or a discrete metric by chance): no
        # noise to test against, which is not evidence of a difference (issue 18), so p = 1, never 0.
        p = 1.0
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


# ---------------------------------------------------------------------------------------------------------
# Issue 18: the best against every other value, configurations x seeds as a randomized complete block design
# ---------------------------------------------------------------------------------------------------------
POWER = 0.80
HOMOGENEITY_ALPHA = 0.10   # Brown-Forsythe p below this: per-pair variances instead of the pooled one
RCBD, PAIRED, NONE = "rcbd", "paired", "none"


@dataclass(frozen=True)
class BestTest:
    """"Configuration ``best`` is better than every other one in the scope", tested on complete seed blocks.

    The claim is an intersection of a-1 one-directional claims (best > j for every j), so it is tested as an
    intersection-union test (Berger 1982): each comparison at the two-sided level alpha, the claim holds when all
    hold, and its p-value is the largest of theirs. The chance of bolding a value that is not the best is then at
    most alpha whatever the other means are (the worst case is two values tied at the top), with no correction
    for the a-1 comparisons; simulated in tests/test_calibration.py."""
    method: str                  # RCBD (pooled residual variance) or PAIRED (per-pair variance, heterogeneous)
    best: int                    # index into the scope's configurations
    runner_up: int               # the rival with the largest p (closest in mean)
    diff: float                  # best - runner-up in the metric's units (means over the complete blocks)
    ci_low: float                # 95% interval of that difference
    ci_high: float
    p_value: float               # intersection-union p: the largest two-sided p over the rivals (1 if any is worse)
    df: float
    sigma: float                 # residual SD of one observation that the test used
    n_seeds: int                 # complete blocks (seeds every configuration of the scope finished)
    n_configs: int
    floor: bool = False          # the metric's own sampling variance (a floor) set sigma, not the residuals
    homogeneity_p: float = math.nan
    p_rivals: tuple = ()         # two-sided p against each rival, scope order (nan for the best itself)
    p_adjusted: float = math.nan  # Holm over the report's tests (exploratory columns), else the raw p
    means: tuple = ()            # per-configuration means over the complete blocks (test means)

    def describe(self) -> str:
        blocks = f"{self.n_configs} values x {self.n_seeds} seeds"
        if self.method == RCBD:
            out = (f"best vs each of the {self.n_configs - 1} others, t with the residual variance pooled over "
                   f"{blocks} (seed = block, df {self.df:g})")
        else:
            out = (f"best vs each of the {self.n_configs - 1} others, paired t per pair (df {self.df:g}): the "
                   f"variances differ between values (Brown-Forsythe p = {self.homogeneity_p:.2g}), so no pooling")
        if self.floor:
            out += "; variance floored at the metric's own sampling variance over its units (prompts or ranked groups)"
        return out


def mdd(sigma: float, n_seeds: int, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable difference between two values at ``power``: (t_{1-alpha/2} + t_{power}) * SE of the
    difference, SE = sigma * sqrt(2 / n_seeds) (the normal-theory approximation to the noncentral t)."""
    if not (math.isfinite(sigma) and sigma > 0 and n_seeds >= 1 and df >= 1):
        return math.nan
    return (t_quantile_p(1 - alpha / 2, df) + t_quantile_p(power, df)) * sigma * math.sqrt(2 / n_seeds)


def t_quantile_p(q: float, df: float) -> float:
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def power_of(effect: float, sigma: float, n_seeds: int, n_configs: int, alpha: float = ALPHA) -> float:
    """Power to separate two values ``effect`` apart with ``n_seeds`` seeds: noncentral t on the RCBD df
    (n_configs - 1)(n_seeds - 1) at two-sided ``alpha`` (the comparison with the runner-up)."""
    from scipy.stats import nct

    df = max(1, (max(n_configs, 2) - 1) * (n_seeds - 1))
    if n_seeds < 2 or not (sigma > 0):
        return math.nan
    ncp = abs(effect) / (sigma * math.sqrt(2 / n_seeds))
    c = t_quantile_p(1 - alpha / 2, df)
    return float(nct.sf(c, df, ncp) + nct.cdf(-c, df, ncp))


def seeds_needed(effect: float, sigma: float, n_configs: int, alpha: float = ALPHA, power: float = POWER,
                 max_seeds: int = 200) -> Optional[int]:
    """The fewest seeds with ``power_of`` >= power, or None beyond ``max_seeds``."""
    if not (math.isfinite(effect) and effect != 0 and math.isfinite(sigma) and sigma > 0):
        return None
    for s in range(2, max_seeds + 1):
        if power_of(effect, sigma, s, n_configs, alpha) >= power:
            return s
    return None


def _brown_forsythe(z: np.ndarray) -> float:
    """p of the Brown-Forsythe test (Levene's test with medians; Brown & Forsythe 1974) that the configurations'
    block-centred values (rows of ``z``) share one variance: one-way ANOVA of the absolute deviations from each
    row's median. nan with fewer than 3 seeds (no information) or no spread at all."""
    k, n = z.shape
    if n < 3 or k < 2:
        return math.nan
    from scipy.special import fdtrc

    dev = np.abs(z - np.median(z, axis=1, keepdims=True))
    row = dev.mean(axis=1)
    within = float(((dev - row[:, None]) ** 2).sum())
    between = float(n * ((row - dev.mean()) ** 2).sum())
    if within <= 0:
        return math.nan
    f = (between / (k - 1)) / (within / (k * n - k))
    return float(fdtrc(k - 1, k * n - k, f))


def best_vs_rest(y: np.ndarray, higher_is_better: bool, floor_var: float = 0.0,
                 confidence: float = CONFIDENCE) -> Optional[BestTest]:
    """Test the best of ``y`` (configurations x complete seed blocks, all finite) against every other row.

    Residual variance: two-way additive model (configuration + seed), pooled over every configuration,
    df (a-1)(s-1). When Brown-Forsythe rejects one variance (p < HOMOGENEITY_ALPHA, needs >= 3 seeds), each pair
    gets its own paired-t variance with s-1 df instead. Either variance is floored at ``floor_var`` (per
    observation), the metric's own sampling variance: discrete metrics give identical per-seed differences by
    chance, and a zero variance is not evidence. With no variance at all (floor 0 too), nothing is claimed (p=1).
    None with fewer than two configurations or two seeds."""
    y = np.asarray(y, dtype=float)
    a, s = y.shape
    if a < 2 or s < 2 or not np.isfinite(y).all():
        return None
    sign = 1.0 if higher_is_better else -1.0
    means = y.mean(axis=1)
    best = int(np.argmax(sign * means))   # first on ties: scope order
    tiny = 1e-12 * max(1.0, float(np.abs(y).max()))
    block = y - y.mean(axis=0, keepdims=True)       # seed effects removed
    resid = block - block.mean(axis=1, keepdims=True)
    df_pool = (a - 1) * (s - 1)
    s2 = float((resid ** 2).sum()) / df_pool if np.ptp(resid) > tiny else 0.0
    floor_var = float(floor_var) if floor_var and math.isfinite(floor_var) and floor_var > 0 else 0.0
    # The homogeneity check centres each seed at its median, not its mean: a mean would spread one noisy
    # configuration's variance over every row and hide it.
    hom = _brown_forsythe(y - np.median(y, axis=0, keepdims=True)) if a >= 3 else math.nan
    pooled = a == 2 or not (hom < HOMOGENEITY_ALPHA)
    p_rivals, rows = [], []
    for j in range(a):
        if j == best:
            p_rivals.append(math.nan)
            continue
        d = sign * (y[best] - y[j])
        if pooled:
            var, df = 2 * max(s2, floor_var), df_pool
        else:
            vd = float(np.var(d, ddof=1)) if np.ptp(d) > tiny else 0.0
            var, df = max(vd, 2 * floor_var), s - 1
        md = float(d.mean())
        if var <= 0:
            p = 1.0     # no noise to test against (deterministic, or a lattice with no floor): no claim
            se = 0.0
        else:
            se = math.sqrt(var / s)
            p = t_two_sided_p(md / se, df) if md > 0 else 1.0
        p_rivals.append(p)
        rows.append((p, -md, j, md, se, df, var))
    p_max, _, runner, md, se, df, var = max(rows)
    half = t_quantile(int(df), confidence) * se if se > 0 else 0.0
    diff = sign * md
    floor_used = floor_var > 0 and (2 * floor_var >= var - 1e-300) and var > 0
    return BestTest(RCBD if pooled else PAIRED, best, runner, diff, diff - half, diff + half, p_max, df,
                    math.sqrt(var / 2), s, a, floor_used, hom, tuple(p_rivals), math.nan, tuple(means.tolist()))


def jackknife_floor(units: Sequence[np.ndarray], reduce: Callable[[np.ndarray], float],
                    aligned: bool = True) -> float:
    """Per-observation sampling variance of a metric from its units (prompts or ranked groups), the part that a
    new eval of the same policy would change, net of what the configurations of one seed share.

    ``units``: one (n_units x stats) array per configuration of one seed, rows aligned (the same prompt in row i
    of every array) when ``aligned``. The leave-one-unit-out jackknife of each configuration's value; with aligned
    units the per-unit deviations are centred over the configurations first (a hard prompt is hard for every
    configuration and cancels in a difference), and a/(a-1) undoes the centring's shrinkage. Returns the mean
    jackknife variance over configurations (nan when it cannot be computed)."""
    jk = []
    for u in units:
        n = len(u)
        if n < 2:
            return math.nan
        total = u.sum(axis=0)
        loo = total[None, :] - u
        if getattr(reduce, "vectorized", False):
            th = np.asarray(reduce(loo), dtype=float)
        else:
            th = np.array([reduce(r) for r in loo], dtype=float)
        if not np.isfinite(th).all():
            return math.nan
        jk.append(th - th.mean())
    a = len(jk)
    if a == 0:
        return math.nan
    if aligned and a >= 2 and len({len(x) for x in jk}) == 1:
        dev = np.array(jk)
        dev = dev - dev.mean(axis=0, keepdims=True)
        scale = a / (a - 1)
    else:
        dev, scale = jk, 1.0
    n = np.array([len(x) for x in dev], dtype=float)
    v = [(m - 1) / m * float(np.sum(np.asarray(x) ** 2)) for m, x in zip(n, dev)]
    return scale * float(np.mean(v))
