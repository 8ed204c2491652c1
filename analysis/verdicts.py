"""The verdicts of the comparison tables: which value of a column is bold. The design (seeds as blocks, best vs
every other value, variance floors, primary and exploratory columns, the report-wide family) is described in
analysis/tables.py's docstring and docs/metrics.md; analysis/stats.py holds the arithmetic."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from rlhf_ablate.metrics.registry import MetricSpec, reduce_units, spec_for, unit_stats
from .identity import rm_id
from .results import TrialResult
from .stats import ALPHA, BestTest, PairedTest, best_vs_rest, holm, jackknife_floor, mdd, paired_unit_bootstrap
from .groups import (BEST, Comparison, Context, Group, NOT_TESTED, TIE, Table)


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------
def _is_winrate(spec: MetricSpec) -> bool:
    return spec.suffix.startswith("winrate_vs_")


def judge_of(t: TrialResult) -> str:
    """Who judged a trial's win rates: "own RM", "RM <path>", "API <model>", or "" when unrecorded."""
    meta = t.metric_meta.get("compare") if isinstance(t.metric_meta, dict) else None
    if not isinstance(meta, dict):
        return ""
    if meta.get("judge") == "rm":
        who = meta.get("judge_rm") or "own"
        return "own RM" if who == "own" else f"RM {who}"
    if meta.get("judge") == "api":
        api = meta.get("judge_api") or {}
        return f"API {api.get('model') or '?'}" if isinstance(api, dict) else "API"
    return str(meta.get("judge") or "")


def _judge_text(ctx: Context, t: Table) -> str:
    if not any(_is_winrate(s) for s in t.columns):
        return ""
    judges = sorted({judge_of(x) for x in ctx.run.ok_trials if any(_is_winrate(spec_for(n)) for n in x.metrics)}
                    - {""})
    if not judges:
        return "Win rates: the judge is not recorded (metric_meta.compare)."
    text = {"own RM": "each trial's own reward model (it flatters the policy trained on it; compared only between "
                      "rows that share one RM)"}
    return "Win rates judged by " + "; ".join(text.get(j, j) for j in judges) + "."


def _needs_one_rm(spec: MetricSpec, groups: list[Group]) -> bool:
    """Raw RM units, and win rates judged by each trial's own RM, compare only rows scored by one reward model."""
    if spec.rm_scale:
        return True
    # An unrecorded judge is taken to be the default one, the trial's own RM (eval.judge: rm).
    return _is_winrate(spec) and any(judge_of(t) in ("own RM", "") for g in groups for t in g.ok)


def _compare(ctx: Context, t: Table, scope: list[tuple], specs: dict, col: MetricSpec, groups: dict, label,
             primary: bool = False) -> None:
    """The best of the scope's cells against every other one (stats.best_vs_rest, on the seeds every cell's
    configuration finished). Marks come after the report's correction (mark_report)."""
    if not col.tested:
        return
    cands = [k for k in scope if t.cells[k].summary.n >= 1]
    if len(cands) < 2:
        return
    sign = 1.0 if col.higher_is_better else -1.0
    order = sorted(cands, key=lambda k: (-sign * t.cells[k].summary.mean, scope.index(k)))
    best, runner = order[0], order[1]
    cmp = Comparison(col, label(best), label(runner), t.cells[best].summary.mean, t.cells[runner].summary.mean,
                     "not tested", None, keys=(best, runner), primary=primary, scope_keys=tuple(cands))
    t.comparisons.append(cmp)
    if _needs_one_rm(col, [groups[k] for k in cands]) and not _same_rm(*[groups[k] for k in cands]):
        cmp.verdict = "not tested: different RMs"
        return
    vals = {k: ctx.values(groups[k], specs[k]) for k in cands}
    blocks = sorted(set.intersection(*(set(v) for v in vals.values())), key=repr)
    blocks = [s for s in blocks if all(math.isfinite(vals[k][s]) for k in cands)]
    if len(blocks) < 2:
        t.cells[best].mark = NOT_TESTED
        cmp.within_seed = _within_seed(groups[best], groups[runner], specs[best], specs[runner])
        short = [label(k) for k in cands if len(vals[k]) < 2]
        if short and len(blocks) < 2 and len(ctx.run.seeds) > 1:
            cmp.notes.append(f"fewer than two seeds that every value finished ({'; '.join(short)} has fewer)")
        return
    y = np.array([[vals[k][s] for s in blocks] for k in cands])
    floor = _floor(ctx, [groups[k] for k in cands], [specs[k] for k in cands], blocks)
    test = best_vs_rest(y, bool(col.higher_is_better), floor)
    cmp.test = test
    tb, tr = cands[test.best], cands[test.runner_up]
    for k in cands:
        if t.cells[k].summary.n > len(blocks):
            t.cells[k].test_n = len(blocks)
    if tb != best:
        # The cells (every finished seed) and the test (complete seeds only) rank differently: no claim.
        cmp.notes.append(f"the cells rank {label(best)} first, but on the {len(blocks)} seeds every value finished "
                         f"{label(tb)} is ahead: no claim")
        cmp.verdict = "tie: rankings disagree"
    else:
        cmp.keys = (best, tr)
        cmp.runner_up, cmp.runner_mean = label(tr), t.cells[tr].summary.mean
    lost = sorted({label(k) for k in cands if len(vals[k]) > len(blocks)})
    if lost:
        cmp.notes.append(f"unbalanced: the test uses the {len(blocks)} seeds every value finished; "
                         f"{'; '.join(lost)} averaged more in the cell")


def _floor(ctx: Context, groups: list[Group], specs: list[MetricSpec], blocks: list) -> float:
    """Per-observation sampling variance of the metric over its own units (prompts, ranked groups, judged
    prompts), pooled over the complete blocks: the variance floor of stats.best_vs_rest. 0 when no records."""
    out = []
    for s in blocks:
        trials = [g.by_seed().get(s) for g in groups]
        if any(tr is None for tr in trials):
            return 0.0
        v = _seed_floor(ctx, trials, specs)
        if not math.isfinite(v):
            return 0.0
        out.append(v)
    return float(np.mean(out)) if out else 0.0


def _seed_floor(ctx: Context, trials: list[TrialResult], specs: list[MetricSpec]) -> float:
    spec = specs[0]
    if _is_winrate(spec):
        opp = spec.suffix[len("winrate_vs_"):]
        units = []
        for tr, sp in zip(trials, specs):
            recs = tr.records.get("judge")
            if not isinstance(recs, list):
                return math.nan
            rows = {str(r.get("data_id")): r.get("outcome") for r in recs
                    if isinstance(r, dict) and r.get("opponent") == opp and isinstance(r.get("outcome"), (int, float))}
            units.append(rows)
        ids = sorted(set.intersection(*(set(u) for u in units)))
        if len(ids) < 2:
            return math.nan
        arrs = [np.array([[1.0, float(u[i])] for i in ids]) for u in units]
        return jackknife_floor(arrs, _ratio, aligned=True)
    if spec.source is None:
        return math.nan
    per = []
    for tr, sp in zip(trials, specs):
        got = ctx.units(tr, "rm" if spec.source == "rm" else sp.stage, spec.source)
        if got is None:
            return math.nan
        per.append(got)
    ids = sorted(set.intersection(*(set(p[0]) for p in per)))
    if len(ids) < 2:
        return math.nan
    arrs = [u[[ix[i] for i in ids]] for ix, u in per]
    return jackknife_floor(arrs, spec.reduce, aligned=True)


def _ratio(v: np.ndarray):
    return v[..., 1] / v[..., 0]


_ratio.vectorized = True  # type: ignore[attr-defined]


def _same_rm(*groups: Group) -> bool:
    """Every row scored by one reward model on every shared seed (raw RM units are then comparable)."""
    maps = [g.by_seed() for g in groups]
    shared = set.intersection(*(set(m) for m in maps)) if maps else set()
    return bool(shared) and all(len({rm_id(m[s]) for m in maps}) == 1 for s in shared)


def _within_seed(a: Group, b: Group, spec: MetricSpec, spec_b: MetricSpec) -> Optional[PairedTest]:
    """One shared seed: the paired bootstrap over prompts of the metric's own statistic (information only)."""
    if spec.source is None or spec_b.source != spec.source:
        return None
    sa, sb = a.by_seed(), b.by_seed()
    shared = sorted(sa.keys() & sb.keys(), key=repr)
    if len(shared) != 1:
        return None
    s = shared[0]
    ra = sa[s].records.get("rm" if spec.source == "rm" else spec.stage)
    rb = sb[s].records.get("rm" if spec.source == "rm" else spec_b.stage)
    if not isinstance(ra, list) or not isinstance(rb, list):
        return None
    ia = {str(r.get("data_id")): r for r in ra if isinstance(r, dict)}
    ib = {str(r.get("data_id")): r for r in rb if isinstance(r, dict)}
    ids = sorted(ia.keys() & ib.keys())
    if len(ids) < 2:
        return None
    try:
        ua = unit_stats(spec.source, [ia[i] for i in ids])
        ub = unit_stats(spec.source, [ib[i] for i in ids])
    except Exception:  # noqa: BLE001 - malformed records only cost the information line
        return None
    if not (math.isfinite(reduce_units(spec, ua)) and math.isfinite(reduce_units(spec, ub))):
        return None
    return paired_unit_bootstrap(ua, ub, spec.reduce)


def mark_report(tables: list[Table], family: str = "table") -> None:
    """The marks of every table, after the report's corrections (issue 18):
    - a primary question is held to ALPHA on its own (family "table"), or Holm over the report's primary
      questions (family "report");
    - an exploratory column is bold only when its p survives Holm over every test of the report.
    Bold also needs the cells' ranking to agree with the test's (Comparison.verdict is not "tie: ...")."""
    tested = [c for t in tables for c in t.comparisons if c.test is not None]
    primaries = [c for c in tested if c.primary]
    all_adj = holm([c.test.p_value for c in tested])
    prim_adj = holm([c.test.p_value for c in primaries]) if family == "report" else [c.test.p_value
                                                                                     for c in primaries]
    adjusted = {id(c): p for c, p in zip(tested, all_adj)}
    adjusted.update({id(c): p for c, p in zip(primaries, prim_adj)})
    for t in tables:
        for c in t.comparisons:
            if c.test is None:
                continue
            p = adjusted[id(c)]
            c.test = BestTest(**{**c.test.__dict__, "p_adjusted": p})
            best, runner = c.keys
            agree = not c.verdict.startswith("tie: rankings")
            separated = agree and p < ALPHA and c.best_mean != c.runner_mean
            if agree:
                c.verdict = "separated" if separated else "tie"
            t.cells[best].mark = BEST if separated else TIE
            if not separated:
                t.cells[runner].mark = TIE


def report_family(tables: list[Table]) -> tuple[int, int]:
    """(primary questions tested, every test) of a report: what the legend's family statement counts."""
    tested = [c for t in tables for c in t.comparisons if c.test is not None]
    return sum(c.primary for c in tested), len(tested)


def primary_mdd(t: Table) -> Optional[tuple[float, BestTest]]:
    """Minimum detectable difference at 80% power of the table's primary metric, from its pooled variance."""
    c = t.primary_comparison
    if c is None or c.test is None:
        return None
    return mdd(c.test.sigma, c.test.n_seeds, c.test.df), c.test


def _rm_note(t: Table, ctx: Context) -> None:
    raw = [c for c in t.comparisons if c.verdict == "not tested: different RMs"]
    if raw:
        t.notes.append(f"{', '.join(dict.fromkeys(c.metric.label for c in raw))}: raw RM units, or win rates judged "
                       "by each trial's own RM, of different reward models (each RM has its own scale and favours "
                       "its own policy), so shown as they are, not tested. The scale-free RM metrics (accuracy, "
                       "Kendall tau, standardized margin) compare reward models.")
