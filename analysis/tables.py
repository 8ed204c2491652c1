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
from typing import Optional


from rlhf_ablate.metrics.registry import (METHODS, POLICY_STAGES, MetricSpec, known_metric, spec_for, stage_specs,
                                          stage_title)
from .identity import changed_stages, check_settings, stage_present
from .results import RunResults
from .settings import AnalysisSettings, table_kind
from .stats import summarize
from .groups import (ALIGNED, ALL_VALUES, Cell, Context, Group, Table, _sort_key, fmt_value, group_trials)
from .verdicts import (_compare, _judge_text, _rm_note, mark_report)


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
