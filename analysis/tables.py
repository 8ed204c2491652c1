"""Comparison tables: trials grouped by their swept axes, seeds averaged, best values tested against runner-ups.

Layouts (what our users publish, docs/architecture.md):
- one swept axis: one row per value, one column per metric of that axis' set (rlhf_ablate/metrics/registry.py: table_kind);
- two axes: a pivot per metric (rows = first axis, columns = second axis);
- three or more: one row per combination.
Wide metric sets are split by stage (reward model / SFT / PPO / DPO) so a table fits a page.

Each cell is mean ± 95% t-interval over seeds, with n (finite values only). Within a column (or a pivot) the best
mean is compared with the runner-up by a paired test (stats.py); it is bold only when the difference's interval
excludes 0, marked ≈ (with the runner-up) when it does not, and † when no test was possible.
Writers: markdown, CSV (plain numbers, long format), LaTeX (booktabs).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

from rlhf_ablate.metrics.registry import ALL, MetricSpec, metrics_for, rm_group_value, table_kind
from .results import RunResults, TrialResult
from .stats import N_RESAMPLES, PairedTest, Summary, paired_bootstrap, paired_seed_test, summarize

SPLIT_ABOVE = 8  # metric columns; wider sets are split into one table per stage
STAGE_TITLES = {"rm": "reward model", "sft": "SFT", "ppo": "PPO", "dpo": "DPO"}

BEST, TIE, NOT_TESTED = "best", "tie", "not_tested"

LEGEND = (
    "Cells: mean ± half-width of the 95% Student-t interval over seeds (n = seeds with a finite value; "
    "\"n=1, no CI\" when only one seed finished; NaN values are counted separately and never averaged in). "
    "↑ higher is better, ↓ lower is better, no arrow: no better direction. "
    "**Bold**: the best value is statistically separated from the runner-up (the 95% interval of their paired "
    f"difference excludes 0: a two-level paired bootstrap over shared seeds and eval prompts, {N_RESAMPLES} "
    "resamples, fixed seed; a paired t-interval over shared seeds when the trials carry no per-example records). "
    "≈: best and runner-up are not separated (a tie at this number of seeds and prompts). "
    "†: best by mean, but not tested (no per-example records and fewer than two shared seeds).")


@dataclass
class Group:
    """Trials that share every axis value: the seed replicates of one configuration."""
    key: tuple
    ok: list[TrialResult] = field(default_factory=list)
    failed: list[TrialResult] = field(default_factory=list)

    def seed_values(self, metric: str) -> dict[Hashable, float]:
        out: dict[Hashable, float] = {}
        for t in sorted(self.ok, key=lambda t: t.trial_id):
            if t.seed is not None and metric in t.metrics and t.seed not in out:
                out[t.seed] = t.metrics[metric]
        return out

    def per_example(self, spec: MetricSpec) -> dict[tuple, float]:
        """(seed, data_id) -> value from records.<stage>; RM metrics get one value per ranked group."""
        if spec.record is None:
            return {}
        stage, fld = spec.record
        acc: dict[tuple, list[float]] = {}
        seen_seeds = set()
        for t in sorted(self.ok, key=lambda t: t.trial_id):
            recs = t.records.get(stage)
            if t.seed is None or t.seed in seen_seeds or not isinstance(recs, list):
                continue
            seen_seeds.add(t.seed)
            for rec in recs:
                if not isinstance(rec, dict) or rec.get("data_id") is None:
                    continue
                if stage == "rm":
                    v = rm_group_value(fld, rec)
                else:
                    raw = rec.get(fld)
                    v = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else math.nan
                if math.isfinite(v):
                    acc.setdefault((t.seed, str(rec["data_id"])), []).append(v)
        return {k: sum(v) / len(v) for k, v in acc.items()}


@dataclass
class Cell:
    summary: Summary
    present: bool          # at least one finished trial of the group carries the metric
    mark: str = ""         # BEST | TIE | NOT_TESTED | ""


@dataclass
class Comparison:
    metric: MetricSpec
    best: str
    runner_up: str
    best_mean: float
    runner_mean: float
    verdict: str           # "separated" | "tie" | "not tested"
    test: Optional[PairedTest]

    def describe(self) -> str:
        m = self.metric
        head = (f"{m.label} {m.arrow}: best {self.best} ({_num(self.best_mean, m.fmt)}) vs runner-up "
                f"{self.runner_up} ({_num(self.runner_mean, m.fmt)})")
        if self.test is None:
            return f"{head}: not tested (no per-example records and fewer than two shared seeds)."
        t = self.test
        what = "per-example difference" if t.method == "bootstrap" else "per-seed difference"
        return (f"{head}: {what} {_num(t.diff, m.fmt, signed=True)} [95% CI {_num(t.ci_low, m.fmt)}, "
                f"{_num(t.ci_high, m.fmt)}], p = {t.p_value:.3g}, {t.describe()} -> **{self.verdict}**.")


@dataclass
class Table:
    slug: str
    title: str
    layout: str                       # "rows" or "pivot"
    row_axes: list[str]
    col_axis: Optional[str]           # pivot only
    row_keys: list[tuple]
    col_keys: list                    # metric names (rows) or column-axis values (pivot)
    metrics: list[MetricSpec]         # rows: one per column; pivot: [the metric]
    cells: dict[tuple, Cell]          # (row_key, col_key) -> Cell
    counts: dict[tuple, tuple[int, int]]   # (row_key, col_key or None) -> (ok, failed)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def spec(self, col_key: Any) -> MetricSpec:
        return self.metrics[0] if self.layout == "pivot" else next(m for m in self.metrics if m.name == col_key)


# ---------------------------------------------------------------------------------------------------------
# Grouping and building
# ---------------------------------------------------------------------------------------------------------
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
        (g.ok if t.ok else g.failed).append(t)
    return dict(sorted(groups.items(), key=lambda kv: tuple(_sort_key(v) for v in kv[0])))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "table"


def _split_by_stage(specs: list[MetricSpec]) -> list[tuple[str, list[MetricSpec]]]:
    if len(specs) <= SPLIT_ABOVE:
        return [("", specs)]
    parts: dict[str, list[MetricSpec]] = {}
    for s in specs:
        parts.setdefault(s.stage if s.stage in STAGE_TITLES else "other", []).append(s)
    return [(STAGE_TITLES.get(k, "other metrics"), v) for k, v in parts.items()]


def build_tables(run: RunResults) -> list[Table]:
    axes = run.axis_names
    groups = group_trials(run, axes)
    present = {m for t in run.ok_trials for m in t.metrics}
    kinds = {table_kind(a) for a in axes} or {ALL}
    specs = metrics_for(kinds, present)
    tables: list[Table] = []
    used: set[str] = set()

    def unique(slug: str) -> str:
        s, i = slug, 2
        while s in used:
            s, i = f"{slug}_{i}", i + 1
        used.add(s)
        return s

    if len(axes) == 2:
        a, b = axes
        row_vals = sorted({k[0] for k in groups}, key=_sort_key)
        col_vals = sorted({k[1] for k in groups}, key=_sort_key)
        for spec in specs:
            cells, counts = {}, {}
            for r in row_vals:
                for c in col_vals:
                    g = groups.get((r, c))
                    if g is None:
                        continue
                    cells[((r,), c)] = _cell(g, spec)
                    counts[((r,), c)] = (len(g.ok), len(g.failed))
            t = Table(unique(_slug(f"{a}_x_{b}_{spec.name}")), f"{spec.label} {spec.arrow}: {a} x {b}".strip(),
                      "pivot", [a], b, [(r,) for r in row_vals], col_vals, [spec], cells, counts)
            scope = list(cells)
            _mark(t, scope, spec, {k: groups[(k[0][0], k[1])] for k in scope})
            tables.append(t)
        if not specs:
            tables.append(_rows_table(unique(_slug("_x_".join(axes))), " x ".join(axes), axes, groups, []))
        return tables

    title_axes = ", ".join(axes) if axes else "all trials (no swept axes)"
    for part_title, part in _split_by_stage(specs):
        title = f"{title_axes}: {part_title}" if part_title else title_axes
        slug = unique(_slug("_".join(axes) if axes else "trials") + (f"_{_slug(part_title)}" if part_title else ""))
        tables.append(_rows_table(slug, title, axes, groups, part))
    return tables


def _cell(g: Group, spec: MetricSpec) -> Cell:
    vals = [t.metrics[spec.name] for t in g.ok if spec.name in t.metrics]
    return Cell(summarize(vals), present=bool(vals))


def _rows_table(slug: str, title: str, axes: list[str], groups: dict[tuple, Group], specs: list[MetricSpec]) -> Table:
    row_keys = list(groups)
    cells = {(r, s.name): _cell(groups[r], s) for r in row_keys for s in specs}
    counts = {(r, None): (len(groups[r].ok), len(groups[r].failed)) for r in row_keys}
    t = Table(slug, title, "rows", list(axes), None, row_keys, [s.name for s in specs], specs, cells, counts)
    if not specs:
        t.notes.append("No finished trial has metrics for this table yet.")
    for s in specs:
        scope = [(r, s.name) for r in row_keys]
        _mark(t, scope, s, {(r, s.name): groups[r] for r in row_keys})
    return t


def _label(t: Table, key: tuple) -> str:
    row, col = key
    parts = [f"{a}={fmt_value(v)}" for a, v in zip(t.row_axes, row)]
    if t.layout == "pivot":
        parts.append(f"{t.col_axis}={fmt_value(col)}")
    return ", ".join(parts) or "all trials"


def compare(best: Group, runner: Group, spec: MetricSpec) -> Optional[PairedTest]:
    """Paired test of best - runner-up: per-example bootstrap, else paired-by-seed t, else None."""
    a, b = best.per_example(spec), runner.per_example(spec)
    test = paired_bootstrap(a, b) if a and b else None
    if test is None:
        test = paired_seed_test(best.seed_values(spec.name), runner.seed_values(spec.name))
    return test


def _mark(t: Table, scope: list[tuple], spec: MetricSpec, groups: dict[tuple, Group]) -> None:
    """Find the best and runner-up among the scope's cells, test them, and set the marks."""
    if spec.higher_is_better is None:
        return
    cands = [k for k in scope if t.cells[k].summary.n >= 1]
    if len(cands) < 2:
        return
    sign = 1.0 if spec.higher_is_better else -1.0
    order = sorted(cands, key=lambda k: (-sign * t.cells[k].summary.mean, scope.index(k)))
    best, runner = order[0], order[1]
    test = compare(groups[best], groups[runner], spec)
    bm, rm = t.cells[best].summary.mean, t.cells[runner].summary.mean
    if test is None:
        verdict = "not tested"
        t.cells[best].mark = NOT_TESTED
    else:
        # diff = best - runner-up; separated only if the whole interval lies on the better side of 0, so a
        # test that disagrees with the table's ordering (possible: corpus vs per-example scores) never bolds.
        separated = bm != rm and (test.ci_low > 0 if sign > 0 else test.ci_high < 0)
        verdict = "separated" if separated else "tie"
        t.cells[best].mark = BEST if separated else TIE
        if not separated:
            t.cells[runner].mark = TIE
    t.comparisons.append(Comparison(spec, _label(t, best), _label(t, runner), bm, rm, verdict, test))


# ---------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------
def _num(x: float, fmt: str, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    s = format(x, ("+" if signed else "") + fmt)
    # A tiny half-width must not print as 0.000 (that reads as "no uncertainty").
    if x != 0 and float(re.sub(r"[^0-9.eE+-]", "", s) or 0) == 0:
        s = format(x, ("+" if signed else "") + ".2g")
    return s


def _count_text(ok: int, failed: int) -> str:
    return f"{ok} ok" + (f", {failed} failed" if failed else "")


def cell_parts(cell: Cell, spec: MetricSpec) -> tuple[str, str, str]:
    """(value text, n text, mark symbol) shared by the markdown and LaTeX writers."""
    s = cell.summary
    if not cell.present:
        return "", "", ""
    if s.n == 0:
        return "n/a", f"n=0, {s.n_nan} NaN", ""
    value = _num(s.mean, spec.fmt)
    if s.has_ci:
        value = f"{value} ± {_num(s.half_width, spec.fmt)}"
        n = f"n={s.n}"
    else:
        n = "n=1, no CI"
    if s.n_nan:
        n += f", {s.n_nan} NaN"
    sym = {TIE: "≈", NOT_TESTED: "†"}.get(cell.mark, "")
    return value, n, sym


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_cell(cell: Optional[Cell], spec: MetricSpec) -> str:
    if cell is None:
        return "—"
    value, n, sym = cell_parts(cell, spec)
    if not value:
        return "—"
    if cell.mark == BEST:
        value = f"**{value}**"
    return f"{value}{' ' + sym if sym else ''} ({n})"


def _header(spec: MetricSpec) -> str:
    return f"{spec.label} {spec.arrow}".strip()


def to_markdown(t: Table) -> str:
    lines: list[str] = []
    if t.layout == "pivot":
        spec = t.metrics[0]
        header = [f"{t.row_axes[0]} \\ {t.col_axis}"] + [fmt_value(c) for c in t.col_keys]
        rows = [[fmt_value(r[0])] + [_md_cell(t.cells.get((r, c)), spec) for c in t.col_keys] for r in t.row_keys]
    else:
        header = list(t.row_axes or ["trials"]) + ["trials"] + [_header(m) for m in t.metrics]
        if not t.row_axes:
            header = header[1:]
        rows = []
        for r in t.row_keys:
            ok, failed = t.counts[(r, None)]
            rows.append([fmt_value(v) for v in r] + [_count_text(ok, failed)]
                        + [_md_cell(t.cells.get((r, m.name)), m) for m in t.metrics])
    lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    if t.layout == "pivot":
        failed = [f"{t.row_axes[0]}={fmt_value(k[0][0])}, {t.col_axis}={fmt_value(k[1])}: {f} failed"
                  for k, (ok, f) in t.counts.items() if f]
        trials = sorted({ok for ok, f in t.counts.values()})
        lines.append("")
        lines.append(f"Finished trials per cell: {', '.join(map(str, trials))}."
                     + (f" Failed: {'; '.join(failed)}." if failed else ""))
    for note in t.notes:
        lines.append("")
        lines.append(note)
    if t.comparisons:
        lines.append("")
        lines.append("Best vs runner-up:")
        lines.extend(f"- {c.describe()}" for c in t.comparisons)
    return "\n".join(lines) + "\n"


def _csv_num(x: Optional[float]) -> str:
    return "" if x is None or not math.isfinite(x) else format(x, ".10g")


def to_csv(t: Table) -> str:
    """Long format, plain numbers: one row per (configuration, metric)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    axes = list(t.row_axes) + ([t.col_axis] if t.col_axis else [])
    w.writerow(axes + ["metric", "label", "higher_is_better", "mean", "ci_low", "ci_high", "n", "n_nan",
                       "trials_ok", "trials_failed", "mark"])
    for r in t.row_keys:
        for c in t.col_keys:
            cell = t.cells.get((r, c))
            if cell is None or not cell.present:
                continue
            spec = t.spec(c)
            key_vals = list(r) + ([c] if t.layout == "pivot" else [])
            ok, failed = t.counts[(r, c if t.layout == "pivot" else None)]
            s = cell.summary
            hib = "" if spec.higher_is_better is None else str(spec.higher_is_better).lower()
            w.writerow([fmt_value(v) if v is not None else "" for v in key_vals]
                       + [spec.name, spec.label, hib, _csv_num(s.mean), _csv_num(s.ci_low), _csv_num(s.ci_high),
                          s.n, s.n_nan, ok, failed, cell.mark])
    return buf.getvalue()


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "↑": r"$\uparrow$", "↓": r"$\downarrow$", "±": r"$\pm$", "—": "--", "≈": r"$\approx$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in s)


def _tex_cell(cell: Optional[Cell], spec: MetricSpec) -> str:
    if cell is None:
        return "--"
    value, n, sym = cell_parts(cell, spec)
    if not value:
        return "--"
    v = tex_escape(value)
    if cell.mark == BEST:
        v = rf"\textbf{{{v}}}"
    mark = {"≈": r"$^{\approx}$", "†": r"$^{\dagger}$"}.get(sym, "")
    return rf"{v}{mark} {{\scriptsize ({tex_escape(n)})}}"


def to_latex(t: Table) -> str:
    if t.layout == "pivot":
        spec = t.metrics[0]
        header = [f"{t.row_axes[0]} \\ {t.col_axis}"] + [fmt_value(c) for c in t.col_keys]
        rows = [[fmt_value(r[0])] + [_tex_cell(t.cells.get((r, c)), spec) for c in t.col_keys]
                for r in t.row_keys]
        n_label = 1
    else:
        header = list(t.row_axes) + ["trials"] + [_header(m) for m in t.metrics]
        rows = [[tex_escape(fmt_value(v)) for v in r] + [tex_escape(_count_text(*t.counts[(r, None)]))]
                + [_tex_cell(t.cells.get((r, m.name)), m) for m in t.metrics] for r in t.row_keys]
        n_label = len(t.row_axes) + 1
    header_tex = [tex_escape(h) for h in header]
    if t.layout == "pivot":
        rows = [[tex_escape(row[0])] + row[1:] for row in rows]
    colspec = "l" * n_label + "r" * (len(header) - n_label)
    out = [
        "% Generated by `python -m analysis report`; needs \\usepackage{booktabs}.",
        "% Bold: separated from the runner-up (paired test, 95%); $\\approx$: tie; $\\dagger$: not tested.",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{tex_escape(t.title)}. Mean $\\pm$ 95\\% CI over seeds.}}",
        f"\\label{{tab:{t.slug}}}",
        f"\\begin{{tabular}}{{{colspec}}}",
        "\\toprule",
        " & ".join(header_tex) + " \\\\",
        "\\midrule",
    ]
    out += [" & ".join(r) + " \\\\" for r in rows]
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(out) + "\n"
