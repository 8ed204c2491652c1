"""Comparison tables: trials grouped by their swept axes, seeds averaged, the best value tested against the
runner-up. Rendering (markdown, CSV, LaTeX) is in analysis/render.py.

Which tables (issue 10, "every stage's table for every axis"): a stage gets a table when the swept axes change it
(its stage cache key differs between trials of one seed; docs/architecture.md, "Identity"), so the tied LoRA-rank
axis gets the reward-model table and the SFT and PPO eval tables, and a kl_coef axis only the PPO one. Eval tables
start with reference rows that the axis does not test: the base model (its answers scored by each trial's RM) and,
in a method's table, SFT when the axis leaves SFT alone. A reference block whose cells are the same for every axis
value is shown once (``all``).

Layouts: one swept axis or three and more: one row per configuration; two axes: a pivot per metric.

Each cell is mean ± 95% t-interval over seeds (stats.py). Within a column, the best mean of the tested rows is
compared with the runner-up by a paired t over shared seeds of the very number the cells average (the metric
registry's value of each trial, rlhf_ablate/metrics/registry.py). The p-values of a table's tested columns are
Holm-adjusted together. Bold only when the adjusted p < 0.05; ≈ when not; † when fewer than two shared seeds exist
(never bold). Metrics in raw RM units are tested only between rows scored by the same reward model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

from rlhf_ablate.metrics.registry import (METHODS, POLICY_STAGES, MetricSpec, known_metric, reduce_units,
                                          spec_for, stage_specs, stage_title, unit_stats)
from .identity import changed_stages, check_settings, rm_id, stage_present
from .results import RunResults, TrialResult
from .stats import ALPHA, PairedTest, Summary, holm, paired_seed_test, paired_unit_bootstrap, summarize

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
@dataclass
class Cell:
    summary: Summary
    spec: MetricSpec
    present: bool          # at least one finished trial of the group carries the metric
    mark: str = ""         # BEST | TIE | NOT_TESTED | ""


@dataclass
class Comparison:
    metric: MetricSpec
    best: str
    runner_up: str
    best_mean: float
    runner_mean: float
    verdict: str           # "separated" | "tie" | "not tested" | "not tested: different RMs"
    test: Optional[PairedTest]
    within_seed: Optional[PairedTest] = None   # one seed only: prompt bootstrap of the corpus statistic
    keys: tuple = ()       # (best cell key, runner-up cell key)


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
    stage: str = ""                   # the stage whose rows are tested
    reference_rows: set = field(default_factory=set)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def specs(self) -> list[MetricSpec]:
        """Every spec a cell of the table uses (reference rows use their own stage's), for the legend."""
        seen = {c.spec.name: c.spec for c in self.cells.values() if c.present}
        return sorted(seen.values(), key=lambda s: (self.col_keys.index(s.suffix) if s.suffix in self.col_keys
                                                    else 0, POLICY_STAGES.index(s.stage)
                                                    if s.stage in POLICY_STAGES else -1))


def _cell(ctx: Context, g: Group, spec: MetricSpec) -> Cell:
    vals = ctx.all_values(g, spec)
    return Cell(summarize(vals), spec, present=bool(vals))


def _label(axes: list[str], values: tuple) -> str:
    return ", ".join(f"{a}={fmt_value(v)}" for a, v in zip(axes, values)) or "all trials"


def build_tables(run: RunResults, problems: Optional[list[str]] = None) -> list[Table]:
    problems = problems if problems is not None else []
    axes = run.axis_names
    excluded, settings = check_settings(run, problems)
    ctx = Context(run, axes, group_trials(run, axes), excluded, settings)
    present = {n for t in run.ok_trials for n in t.metrics}
    # With no swept axis, or axes that change nothing (one value), every stage present gets its table.
    changed = (changed_stages(run) if axes else set()) or {"rm", *POLICY_STAGES}
    stages = [s for s in ("rm", *POLICY_STAGES[1:]) if s in changed and any(m.startswith(s + "/") for m in present)]
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
        title = f"{stage_title(stage)}" + ("" if stage == "rm" else " eval (held-out prompts)")
        if len(axes) == 2:
            tables += _pivots(ctx, stage, unique, present)
            continue
        tables.append(_rows_table(ctx, unique(f"{base}_{stage}"), f"{title}: {', '.join(axes) or 'no swept axes'}",
                                  stage, changed, present))
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
    return tables


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "table"


def _counts(g: Group) -> tuple[int, int, int]:
    return len(g.ok), len(g.failed), len(g.stopped)


def _rows_table(ctx: Context, slug: str, title: str, stage: str, changed: set[str], present: set[str]) -> Table:
    specs = [s for s in stage_specs(stage) if s.name in present]
    col_keys = [s.suffix for s in specs]
    blocks: list[tuple[str, bool]] = []   # (stage, tested)
    if stage != "rm":
        blocks.append(("base", False))
        if stage in METHODS and "sft" not in changed:
            blocks.append(("sft", False))
    blocks.append((stage, True))
    with_stage = stage != "rm"
    t = Table(slug, title, "rows", (["stage"] if with_stage else []) + list(ctx.axes), None, [], col_keys, specs,
              {}, {}, stage=stage)
    for st, tested in blocks:
        if not any(f"{st}/{c}" in present for c in col_keys):
            continue
        rows = []
        for key, g in ctx.groups.items():
            if not any(stage_present(x, st) for x in g.ok) and not (tested and (g.failed or g.stopped)):
                continue
            cells = {c: _cell(ctx, g, spec_for(f"{st}/{c}")) for c in col_keys}
            rows.append((key, g, cells))
        if not tested and len(rows) > 1 and _same_cells([r[2] for r in rows]):
            key, g, cells = rows[0]
            merged = Group(tuple(ALL_VALUES for _ in ctx.axes))
            for _, gg, _ in rows:
                merged.ok += gg.ok
            rows = [(merged.key, merged, cells)]
            t.notes.append(f"{stage_title(st)}: the same for every value of {', '.join(ctx.axes)} "
                           f"({_why_same(st)}), shown once.")
        for key, g, cells in rows:
            rk = ((stage_title(st),) if with_stage else ()) + key
            t.row_keys.append(rk)
            t.counts[(rk, None)] = _counts(g)
            for c, cell in cells.items():
                t.cells[(rk, c)] = cell
            if not tested:
                t.reference_rows.add(rk)
        if tested and rows:
            gmap = dict(zip(t.row_keys[-len(rows):], [r[1] for r in rows]))
            n_axes = len(ctx.axes)
            for c, spec in zip(col_keys, specs):
                keys = [(rk, c) for rk in gmap]
                _compare(ctx, t, keys, spec, {k: gmap[k[0]] for k in keys},
                         lambda k: _label(ctx.axes, k[0][len(k[0]) - n_axes:]))
    _holm_marks(t)
    if stage != "rm" and any(r for r in t.reference_rows):
        t.notes.append("Reference rows (base model" + (", SFT" if any(r[0] == "SFT" for r in t.reference_rows)
                                                        else "") + ") are shown, not tested.")
    _rm_note(t, ctx)
    return t


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


def _pivots(ctx: Context, stage: str, unique, present: set[str]) -> list[Table]:
    a, b = ctx.axes
    row_vals = sorted({k[0] for k in ctx.groups}, key=_sort_key)
    col_vals = sorted({k[1] for k in ctx.groups}, key=_sort_key)
    out = []
    for spec in (s for s in stage_specs(stage) if s.name in present):
        cells, counts, scope = {}, {}, {}
        for r in row_vals:
            for c in col_vals:
                g = ctx.groups.get((r, c))
                if g is None:
                    continue
                cells[((r,), c)] = _cell(ctx, g, spec)
                counts[((r,), c)] = _counts(g)
                scope[((r,), c)] = g
        title = f"{stage_title(stage)} {spec.label} {spec.arrow}: {a} x {b}".replace("  ", " ").strip()
        t = Table(unique(f"{a}_x_{b}_{spec.name}"), title, "pivot", [a], b,
                  [(r,) for r in row_vals], col_vals, [spec], cells, counts, stage=stage)
        _compare(ctx, t, list(scope), spec, scope, lambda k: f"{a}={fmt_value(k[0][0])}, {b}={fmt_value(k[1])}")
        _holm_marks(t)
        _rm_note(t, ctx)
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
def _compare(ctx: Context, t: Table, scope: list[tuple], spec: MetricSpec, groups: dict, label) -> None:
    """Best and runner-up among the scope's cells; their paired test is recorded (marks come after Holm)."""
    if not spec.tested:
        return
    cands = [k for k in scope if t.cells[k].summary.n >= 1]
    if len(cands) < 2:
        return
    sign = 1.0 if spec.higher_is_better else -1.0
    order = sorted(cands, key=lambda k: (-sign * t.cells[k].summary.mean, scope.index(k)))
    best, runner = order[0], order[1]
    gb, gr = groups[best], groups[runner]
    bm, rmean = t.cells[best].summary.mean, t.cells[runner].summary.mean
    cmp = Comparison(spec, label(best), label(runner), bm, rmean, "not tested", None, keys=(best, runner))
    if spec.rm_scale and not _same_rm(gb, gr):
        cmp.verdict = "not tested: different RMs"
    else:
        cmp.test = paired_seed_test(ctx.values(gb, spec), ctx.values(gr, spec))
        if cmp.test is None:
            t.cells[best].mark = NOT_TESTED
            cmp.within_seed = _within_seed(ctx, gb, gr, spec)
    t.comparisons.append(cmp)


def _same_rm(a: Group, b: Group) -> bool:
    """Both rows scored by one reward model on every shared seed (raw RM units are then comparable)."""
    sa, sb = a.by_seed(), b.by_seed()
    shared = sa.keys() & sb.keys()
    return bool(shared) and all(rm_id(sa[s]) == rm_id(sb[s]) for s in shared)


def _within_seed(ctx: Context, a: Group, b: Group, spec: MetricSpec) -> Optional[PairedTest]:
    """One shared seed: the paired bootstrap over prompts of the metric's own statistic (information only)."""
    if spec.source is None:
        return None
    sa, sb = a.by_seed(), b.by_seed()
    shared = sorted(sa.keys() & sb.keys(), key=repr)
    if len(shared) != 1:
        return None
    s = shared[0]
    key = "rm" if spec.source == "rm" else spec.stage
    ra, rb = sa[s].records.get(key), sb[s].records.get(key)
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


def _holm_marks(t: Table) -> None:
    """Holm over the table's tested comparisons, then the marks: bold only when the adjusted p < ALPHA and the
    difference points the way the table ranks them."""
    tested = [c for c in t.comparisons if c.test is not None]
    adjusted = holm([c.test.p_value for c in tested])
    for c, p in zip(tested, adjusted):
        c.test = PairedTest(**{**c.test.__dict__, "p_adjusted": p})
        best, runner = c.keys
        sign = 1.0 if c.metric.higher_is_better else -1.0
        separated = p < ALPHA and c.best_mean != c.runner_mean and sign * c.test.diff > 0
        c.verdict = "separated" if separated else "tie"
        t.cells[best].mark = BEST if separated else TIE
        if not separated:
            t.cells[runner].mark = TIE


def _rm_note(t: Table, ctx: Context) -> None:
    raw = [c for c in t.comparisons if c.verdict == "not tested: different RMs"]
    if raw:
        t.notes.append(f"{', '.join(dict.fromkeys(c.metric.label for c in raw))}: raw RM units of different reward "
                       "models (each RM has its own scale), so shown as they are, not tested. The scale-free "
                       "RM metrics (accuracy, Kendall tau, standardized margin) compare reward models.")
