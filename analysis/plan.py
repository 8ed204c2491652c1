"""``python -m analysis plan RUN_DIR [--effect X]``: how many seeds a follow-up sweep needs (issue 18).

From a pilot run, for each table's primary metric: the residual SD of the test (pooled over the configurations,
seeds as blocks), then the fewest seeds at which a difference of X (default: the observed gap between the best
and the runner-up) is separated with 80% power at the level the report holds the question to (noncentral t on
(a-1)(s-1) df, two-sided; stats.power_of). Then what those seeds cost, from the stage times in result.json: a
seed costs every stage that was computed for it (cache hits cost nothing, so a stage shared by the
configurations of one seed, such as SFT in a kl_coef sweep, is counted once).

The power is that of the comparison with the runner-up; when several values sit near the best, the best must
beat each of them, so the real power is somewhat lower. The variance is estimated from the pilot's few seeds, so
the answer is itself uncertain: treat it as an order of magnitude.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .report import build_report
from .render import header, num
from .stats import ALPHA, POWER, power_of, seeds_needed
from .verdicts import report_family


def seed_cost(run) -> tuple[float, int]:
    """(mean seconds of compute per seed over every configuration, seeds measured) from result.json timings."""
    per_seed: dict = defaultdict(float)
    seen: set = set()
    for t in sorted(run.ok_trials, key=lambda t: t.trial_id):
        for stage, v in (t.timings or {}).items():
            if stage == "total" or not isinstance(v, dict) or v.get("cache_hit"):
                continue
            key = (stage, v.get("key") or t.trial_id)   # a stage shared by one seed's trials counts once
            sec = v.get("seconds")
            if key in seen or not isinstance(sec, (int, float)) or not math.isfinite(sec):
                continue
            seen.add(key)
            per_seed[t.seed] += float(sec)
    vals = [v for v in per_seed.values() if v > 0]
    return (sum(vals) / len(vals) if vals else math.nan), len(vals)


def _dur(sec: float) -> str:
    if not math.isfinite(sec):
        return "unknown"
    if sec < 120:
        return f"{sec:.0f} s"
    if sec < 7200:
        return f"{sec / 60:.0f} min"
    return f"{sec / 3600:.1f} h"


def plan(run_dir: str | Path, effect: Optional[float] = None, power: float = POWER) -> str:
    rep = build_report(run_dir)
    k, _ = report_family(rep.tables)
    alpha = ALPHA / k if (rep.settings.family == "report" and k > 1) else ALPHA
    cost, measured = seed_cost(rep.run)
    L = [f"Seeds needed for {power:.0%} power (two-sided alpha {alpha:.3g} per question"
         + (f", Holm over {k} questions taken at its strictest" if alpha < ALPHA else "") + ")",
         f"A seed costs {_dur(cost)} of compute over all configurations (stage times in result.json, mean over "
         f"{measured} seed(s); cache hits excluded).", ""]
    any_row = False
    for t in rep.tables:
        c = t.primary_comparison
        if c is None:
            continue
        spec = c.metric
        if c.test is None or not (c.test.sigma > 0):
            L.append(f"- {t.title}: {header(spec)}: no residual variance yet (needs at least two seeds that every "
                     "value finished); run a pilot with 2 or 3 seeds.")
            continue
        any_row = True
        tst = c.test
        gap = abs(tst.diff)
        target = abs(effect) if effect is not None else gap
        what = f"difference {num(target, spec.fmt)}" + ("" if effect is not None else
                                                         " (the observed best-vs-runner-up gap)")
        need = seeds_needed(target, tst.sigma, tst.n_configs, alpha, power)
        now = power_of(target, tst.sigma, tst.n_seeds, tst.n_configs, alpha)
        line = (f"- {t.title}: {header(spec)}, {tst.n_configs} values, residual SD {num(tst.sigma, spec.fmt)} from "
                f"{tst.n_seeds} seeds: {what}: power now {now:.0%}; ")
        if need is None:
            line += "more than 200 seeds needed (the difference is tiny next to the seed noise)."
        else:
            more = max(0, need - tst.n_seeds)
            line += (f"{need} seeds needed ({more} more), about {_dur(need * cost)} of compute in all"
                     + (f", {_dur(more * cost)} for the new seeds." if more else "."))
        L.append(line)
    if not any_row:
        L += ["", "Nothing to plan from: no table's primary metric was tested in this run."]
    return "\n".join(L) + "\n"
