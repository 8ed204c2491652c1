"""Comparison tables: trials grouped by their swept axes, seeds averaged, the best value tested against every other
value. Rendering (markdown, CSV, LaTeX) is in analysis/render.py.

Which tables (issue 10, "every stage's table for every axis"): a stage gets a table when the swept axes change it
(its stage cache key differs between trials of one seed; docs/architecture.md, "Identity"), so the tied LoRA-rank
axis gets the reward-model table and the SFT and aligned-policy eval tables, and a kl_coef axis only the aligned
one. An axis that changes which alignment method runs (``method: [ppo, dpo, grpo, rloo]``) gets one aligned-policy
table with one row per method, so the methods are compared (issue 18). Eval tables start with reference rows that
the axis does not test: the base model (its answers scored by each trial's RM) and SFT when the axis leaves SFT
alone. A reference block whose cells are the same for every axis value is shown once (``all``).

Layouts: one swept axis or three and more: one row per configuration; two axes: a pivot per metric.

The module is one coherent job, hence its length: which rows a table has decides which cells a test compares
(scope, reference rows, the method a row ran, the RM that scored it), so building and testing share those keys.

Each cell is mean ± 95% t-interval over seeds (stats.py). What is bold (issue 18, docs/architecture.md,
"Statistics in the tables"):
- each table answers one question, its **primary** metric (analysis/settings.py; a sweep's ``analysis.primary``);
  the best value of the primary is bold when it beats every other value (stats.best_vs_rest: seeds as blocks,
  residual variance pooled over every configuration, each comparison at 5%, intersection-union), so each
  primary question holds 5% (``analysis.family: report``: Holm over the report's primary questions instead);
- every other column is **exploratory**: estimate, CI and p are shown; bold only when the p survives Holm over
  every test of the report;
- the test runs on the seeds every configuration of the scope finished (complete blocks); a cell that averages
  more seeds says so; the cells' ranking must agree with the test's, or nothing is bold;
- ≈ when not separated; † when fewer than two complete seeds exist (never bold). Metrics in raw RM units, and win
  rates judged by each trial's own RM, are tested only between rows scored by the same reward model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import numpy as np

from rlhf_ablate.metrics.registry import (METHODS, POLICY_STAGES, MetricSpec, known_metric, reduce_units,
                                          spec_for, stage_specs, stage_title, unit_stats)
from .identity import changed_stages, check_settings, rm_id, stage_present
from .results import RunResults, TrialResult
from .settings import AnalysisSettings, table_kind
from .stats import (ALPHA, BestTest, PairedTest, Summary, best_vs_rest, holm, jackknife_floor, mdd,
                    paired_unit_bootstrap, summarize)

BEST, TIE, NOT_TESTED = "best", "tie", "not_tested"
ALL_VALUES = "all"   # the axis value of a collapsed reference row


# ---------------------------------------------------------------------------------------------------------
# Groups and metric settings
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Trials that share every axis value: the seed replicates of one configuration."""
    key: tuple
    ok: list[TrialResult] = field(default_factory=list)
    failed: list[TrialResult] = field(default_factory=list)
    stopped: list[TrialResult] = field(default_factory=list)

    def by_seed(self) -> dict[Hashable, TrialResult]:
        out: dict[Hashable, TrialResult] = {}
        for t in sorted(self.ok, key=lambda t: t.trial_id):
            if t.seed is not None and t.seed not in out:
                out[t.seed] = t
        return out


@dataclass
class Context:
    run: RunResults
    axes: list[str]
    groups: dict[tuple, Group]
    excluded: dict[str, set[str]] = field(default_factory=dict)   # metric -> trial ids left out (settings)
    settings: dict[str, str] = field(default_factory=dict)        # metric_meta key -> the setting used
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    _units: dict = field(default_factory=dict)   # (trial id, records key) -> unit statistics, computed once

    def units(self, t: TrialResult, key: str, source: str) -> Optional[tuple[dict, np.ndarray]]:
        """(data_id -> row, unit statistics) of a trial's records (None when it has none usable)."""
        ck = (t.trial_id, key)
        if ck not in self._units:
            recs = t.records.get(key)
            out = None
            if isinstance(recs, list):
                recs = [r for r in recs if isinstance(r, dict)]
                try:
                    out = ({str(r.get("data_id")): i for i, r in enumerate(recs)}, unit_stats(source, recs))
                except Exception:  # noqa: BLE001 - malformed records: no floor (the pooled residuals still hold)
                    out = None
            self._units[ck] = out
        return self._units[ck]

    def values(self, g: Group, spec: MetricSpec) -> dict[Hashable, float]:
        """seed -> the trial's value of the metric (what the cell averages and the test pairs)."""
        skip = self.excluded.get(spec.name, set())
        return {s: t.metrics[spec.name] for s, t in g.by_seed().items()
                if spec.name in t.metrics and t.trial_id not in skip}

    def all_values(self, g: Group, spec: MetricSpec) -> list[float]:
        skip = self.excluded.get(spec.name, set())
        return [t.metrics[spec.name] for t in g.ok if spec.name in t.metrics and t.trial_id not in skip]


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (2, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def fmt_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def group_trials(run: RunResults, axes: list[str]) -> dict[tuple, Group]:
    groups: dict[tuple, Group] = {}
    for t in run.trials:
        key = tuple(t.axes.get(a) for a in axes)
        g = groups.setdefault(key, Group(key))
        {"ok": g.ok, "stopped": g.stopped}.get(t.status, g.failed).append(t)
    return dict(sorted(groups.items(), key=lambda kv: tuple(_sort_key(v) for v in kv[0])))


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
ALIGNED = "aligned"   # the pseudo-stage of a table that puts several alignment methods side by side


@dataclass
class Cell:
    summary: Summary
    spec: MetricSpec
    present: bool          # at least one finished trial of the group carries the metric
    mark: str = ""         # BEST | TIE | NOT_TESTED | ""
    test_n: Optional[int] = None   # seeds the column's test used, when fewer than the cell averages


@dataclass
class Comparison:
    metric: MetricSpec
    best: str
    runner_up: str
    best_mean: float
    runner_mean: float
    verdict: str           # "separated" | "tie" | "not tested" | "not tested: different RMs" | ...
    test: Optional[BestTest]
    within_seed: Optional[PairedTest] = None   # one seed only: prompt bootstrap of the corpus statistic
    keys: tuple = ()       # (best cell key, runner-up cell key)
    primary: bool = False  # the table's question (5% per question); else exploratory (Holm over the report)
    notes: list = field(default_factory=list)   # unbalanced seeds, ranking disagreements
    scope_keys: tuple = ()  # every cell key the test covered, scope order


@dataclass
class Table:
    slug: str
    title: str
    layout: str                       # "rows" or "pivot"
    row_axes: list[str]               # ["stage", *axes] for eval tables
    col_axis: Optional[str]           # pivot only
    row_keys: list[tuple]
    col_keys: list                    # metric suffixes (rows) or column-axis values (pivot)
    columns: list[MetricSpec]         # rows: the tested stage's spec per column; pivot: [the metric]
    cells: dict[tuple, Cell]          # (row_key, col_key) -> Cell
    counts: dict[tuple, tuple[int, int, int]]   # (row_key, col_key or None) -> (ok, failed, stopped)
    stage: str = ""                   # the stage whose rows are tested (ALIGNED: several methods)
    reference_rows: set = field(default_factory=set)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    primary: Optional[str] = None     # suffix of the primary metric (the table's question)
    judge: str = ""                   # who judged the win rates, when the table has any

    @property
    def specs(self) -> list[MetricSpec]:
        """Every spec a cell of the table uses (reference rows use their own stage's), for the legend."""
        seen = {c.spec.name: c.spec for c in self.cells.values() if c.present}
        return sorted(seen.values(), key=lambda s: (self.col_keys.index(s.suffix) if s.suffix in self.col_keys
                                                    else 0, POLICY_STAGES.index(s.stage)
                                                    if s.stage in POLICY_STAGES else -1))

    @property
    def primary_comparison(self) -> Optional[Comparison]:
        return next((c for c in self.comparisons if c.primary), None)


def _cell(ctx: Context, g: Group, spec: MetricSpec) -> Cell:
    vals = ctx.all_values(g, spec)
    return Cell(summarize(vals), spec, present=bool(vals))


def _label(axes: list[str], values: tuple) -> str:
    return ", ".join(f"{a}={fmt_value(v)}" for a, v in zip(axes, values)) or "all trials"


def _method_of(g: Group, methods: list[str]) -> Optional[str]:
    """The alignment method a configuration ran (the first of ``methods`` any of its trials reports)."""
    for m in methods:
        if any(stage_present(t, m) for t in g.ok):
            return m
    return None


def _merged_methods(ctx: Context, stages: list[str]) -> list[str]:
    """Alignment methods that the swept axes switch between (each configuration runs one of them): they share
    one aligned-policy table, one row per method (issue 18)."""
    methods = [s for s in stages if s in METHODS]
    if len(methods) < 2:
        return []
    for g in ctx.groups.values():
        ran = {m for m in methods for t in g.ok if stage_present(t, m)}
        if len(ran) > 1:
            return []   # a configuration that runs two methods: keep one table per method
    return methods


def build_tables(run: RunResults, problems: Optional[list[str]] = None,
                 analysis: Optional[AnalysisSettings] = None) -> list[Table]:
    problems = problems if problems is not None else []
    axes = run.axis_names
    excluded, settings = check_settings(run, problems)
    ctx = Context(run, axes, group_trials(run, axes), excluded, settings, analysis or AnalysisSettings())
    present = {n for t in run.ok_trials for n in t.metrics}
    # With no swept axis, or axes that change nothing (one value), every stage present gets its table.
    changed = (changed_stages(run) if axes else set()) or {"rm", *POLICY_STAGES}
    stages = [s for s in ("rm", *POLICY_STAGES[1:]) if s in changed and any(m.startswith(s + "/") for m in present)]
    merged = _merged_methods(ctx, stages)
    if merged:
        at = stages.index(merged[0])
        stages = [s for s in stages if s not in merged]
        stages.insert(at, ALIGNED)
    used: set[str] = set()

    def unique(slug: str) -> str:
        slug = _slug(slug)
        s, i = slug, 2
        while s in used:
            s, i = f"{slug}_{i}", i + 1
        used.add(s)
        return s

    base = "_".join(axes) if axes else "trials"
    tables: list[Table] = []
    for stage in stages:
        methods = merged if stage == ALIGNED else [stage]
        name = ("aligned policy (" + ", ".join(stage_title(m) for m in merged) + ")") if stage == ALIGNED \
            else stage_title(stage)
        title = name + ("" if stage == "rm" else " eval (held-out prompts)")
        if len(axes) == 2:
            tables += _pivots(ctx, stage, methods, name, unique, present)
            continue
        tables.append(_rows_table(ctx, unique(f"{base}_{stage}"), f"{title}: {', '.join(axes) or 'no swept axes'}",
                                  stage, methods, changed, present))
    other = sorted(n for n in present if not known_metric(n) and "/" in n and n.split("/")[0] not in
                   ("rm", *POLICY_STAGES))
    other += sorted(n for n in present if not known_metric(n) and ("/" not in n or n.split("/")[0] in
                                                                    ("rm", *POLICY_STAGES)))
    if other:
        tables.append(_other_table(ctx, unique(f"{base}_other"), other))
    if not tables:
        tables.append(Table(unique(base), ", ".join(axes) or "all trials", "rows", list(axes), None,
                            list(ctx.groups), [], [], {}, {(k, None): _counts(g) for k, g in ctx.groups.items()},
                            notes=["No finished trial has metrics for a table yet."]))
    mark_report(tables, ctx.analysis.family)
    return tables


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "table"


def _counts(g: Group) -> tuple[int, int, int]:
    return len(g.ok), len(g.failed), len(g.stopped)


def _col_specs(methods: list[str], present: set[str]) -> list[MetricSpec]:
    """The columns of a stage's (or merged methods') table: registry order, any method that reports it."""
    out: dict[str, MetricSpec] = {}
    for m in methods:
        for s in stage_specs(m):
            if s.name in present and s.suffix not in out:
                out[s.suffix] = s
    order = {s.suffix: i for i, s in enumerate(stage_specs(methods[0]))}
    return sorted(out.values(), key=lambda s: order.get(s.suffix, len(order)))


def _primary(ctx: Context, stage: str, col_keys: list[str], specs: list[MetricSpec]) -> Optional[str]:
    want = ctx.analysis.primary_for(table_kind(stage))
    return want if want in col_keys and spec_for_suffix(specs, want).tested else None


def spec_for_suffix(specs: list[MetricSpec], suffix: str) -> MetricSpec:
    return next(s for s in specs if s.suffix == suffix)


def _rows_table(ctx: Context, slug: str, title: str, stage: str, methods: list[str], changed: set[str],
                present: set[str]) -> Table:
    specs = _col_specs(methods, present)
    col_keys = [s.suffix for s in specs]
    blocks: list[tuple[str, bool]] = []   # (stage, tested)
    if stage != "rm":
        blocks.append(("base", False))
        if (stage in METHODS or stage == ALIGNED) and "sft" not in changed:
            blocks.append(("sft", False))
    blocks.append((stage, True))
    with_stage = stage != "rm"
    t = Table(slug, title, "rows", (["stage"] if with_stage else []) + list(ctx.axes), None, [], col_keys, specs,
              {}, {}, stage=stage, primary=_primary(ctx, stage, col_keys, specs))
    for st, tested in blocks:
        st_methods = methods if tested else [st]
        if not any(f"{m}/{c}" in present for m in st_methods for c in col_keys):
            continue
        rows = []
        for key, g in ctx.groups.items():
            m = st_methods[0]
            if len(st_methods) > 1:
                m = _method_of(g, st_methods) or (_failed_method(g, st_methods) if g.failed or g.stopped else None)
            if m is None or (not any(stage_present(x, m) for x in g.ok) and not (tested and (g.failed or g.stopped))):
                continue
            cells = {c: _cell(ctx, g, spec_for(f"{m}/{c}")) for c in col_keys}
            rows.append((key, g, cells, m))
        if not tested and len(rows) > 1 and _same_cells([r[2] for r in rows]):
            key, g, cells, m = rows[0]
            merged = Group(tuple(ALL_VALUES for _ in ctx.axes))
            for _, gg, _, _ in rows:
                merged.ok += gg.ok
            rows = [(merged.key, merged, cells, m)]
            t.notes.append(f"{stage_title(st)}: the same for every value of {', '.join(ctx.axes)} "
                           f"({_why_same(st)}), shown once.")
        first = len(t.row_keys)
        for key, g, cells, m in rows:
            rk = ((stage_title(m),) if with_stage else ()) + key
            t.row_keys.append(rk)
            t.counts[(rk, None)] = _counts(g)
            for c, cell in cells.items():
                t.cells[(rk, c)] = cell
            if not tested:
                t.reference_rows.add(rk)
        if tested and rows:
            gmap = dict(zip(t.row_keys[first:], [r[1] for r in rows]))
            n_axes = len(ctx.axes)
            for c, spec in zip(col_keys, specs):
                keys = [(rk, c) for rk in gmap]
                _compare(ctx, t, keys, {k: t.cells[k].spec for k in keys}, spec, {k: gmap[k[0]] for k in keys},
                         lambda k: _label(ctx.axes, k[0][len(k[0]) - n_axes:]), primary=(c == t.primary))
    if stage != "rm" and any(r for r in t.reference_rows):
        t.notes.append("Reference rows (base model" + (", SFT" if any(r[0] == "SFT" for r in t.reference_rows)
                                                        else "") + ") are shown, not tested.")
    _rm_note(t, ctx)
    t.judge = _judge_text(ctx, t)
    return t


def _failed_method(g: Group, methods: list[str]) -> str:
    for t in g.failed + g.stopped:
        m = t.config.get("method") if isinstance(t.config, dict) else None
        if m in methods:
            return m
    return methods[0]


def _why_same(stage: str) -> str:
    return {"base": "one model and data, greedy answers, scored by each seed's RM",
            "sft": "the axis does not change SFT"}.get(stage, "identical values")


def _same_cells(cell_maps: list[dict[str, Cell]]) -> bool:
    first = cell_maps[0]
    for other in cell_maps[1:]:
        for c, cell in first.items():
            a, b = cell.summary, other[c].summary
            if (a.n, a.n_nan) != (b.n, b.n_nan) or not _close(a.mean, b.mean) or not _close(a.ci_low, b.ci_low):
                return False
    return True


def _close(a: float, b: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))


def _pivots(ctx: Context, stage: str, methods: list[str], name: str, unique, present: set[str]) -> list[Table]:
    a, b = ctx.axes
    row_vals = sorted({k[0] for k in ctx.groups}, key=_sort_key)
    col_vals = sorted({k[1] for k in ctx.groups}, key=_sort_key)
    out = []
    specs = _col_specs(methods, present)
    primary = _primary(ctx, stage, [s.suffix for s in specs], specs)
    for col in specs:
        cells, counts, scope, cspecs = {}, {}, {}, {}
        for r in row_vals:
            for c in col_vals:
                g = ctx.groups.get((r, c))
                if g is None:
                    continue
                m = (_method_of(g, methods) or _failed_method(g, methods)) if len(methods) > 1 else methods[0]
                spec = spec_for(f"{m}/{col.suffix}")
                cells[((r,), c)] = _cell(ctx, g, spec)
                counts[((r,), c)] = _counts(g)
                scope[((r,), c)] = g
                cspecs[((r,), c)] = spec
        title = f"{name} {col.label} {col.arrow}: {a} x {b}".replace("  ", " ").strip()
        slug_name = col.name if stage != ALIGNED else f"{ALIGNED}/{col.suffix}"
        t = Table(unique(f"{a}_x_{b}_{slug_name}"), title, "pivot", [a], b,
                  [(r,) for r in row_vals], col_vals, [col], cells, counts, stage=stage,
                  primary=col.suffix if col.suffix == primary else None)
        _compare(ctx, t, list(scope), cspecs, col, scope, lambda k: f"{a}={fmt_value(k[0][0])}, {b}={fmt_value(k[1])}",
                 primary=col.suffix == primary)
        _rm_note(t, ctx)
        t.judge = _judge_text(ctx, t)
        out.append(t)
    return out


def _other_table(ctx: Context, slug: str, names: list[str]) -> Table:
    specs = [spec_for(n) for n in names]
    t = Table(slug, f"other metrics: {', '.join(ctx.axes) or 'no swept axes'}", "rows", list(ctx.axes), None,
              list(ctx.groups), names, specs, {}, {})
    for key, g in ctx.groups.items():
        t.counts[(key, None)] = _counts(g)
        for n, s in zip(names, specs):
            t.cells[(key, n)] = _cell(ctx, g, s)
    t.notes.append("Metrics the registry does not know: shown as reported, no direction, never tested.")
    return t


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
