"""Tables as markdown, CSV (plain numbers, long format) and LaTeX (booktabs), with their legends: how to read the
marks, and every metric's scale, tokenizer or sacrebleu signature and the statistic its test compares."""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Optional

from rlhf_ablate.metrics.registry import MetricSpec
from .groups import BEST, NOT_TESTED, TIE, Cell, Comparison, Table, fmt_value
from .verdicts import primary_mdd

LEGEND = (
    "Cells: mean ± half-width of the 95% Student-t interval over seeds (n = seeds with a finite value; "
    "\"n=1, no CI\" when only one seed finished; NaN values are counted separately and never averaged in; "
    "\"test n=2\" when the column's test used fewer seeds than the cell averages). "
    "↑ higher is better, ↓ lower is better, no arrow: no better direction (never bold). "
    "**Bold**: the best value of the tested rows is better than every other value. Each table answers one "
    "question, its **primary** metric (named under the table). The seed is the unit of replication and the block: configurations x "
    "seeds are a randomized complete block design, the residual variance is pooled over every configuration "
    "(df (values-1)(seeds-1)), and the best is compared with each other value at 5%, two-sided; it is bold only "
    "when it beats all of them (an intersection-union test, so a bold best is false in at most 5% of sweeps). When "
    "the values' variances differ (Brown-Forsythe p < 0.1) each pair gets its own paired-t variance instead; the "
    "variance never drops below the metric's own sampling variance over its prompts, so a discrete metric whose "
    "seeds moved by the same amount is not called separated. "
    "Every other column is **exploratory**: its estimate, CI and p are shown, and it is bold only when its p "
    "survives Holm's correction over every test of the report. "
    "≈: best not separated from the others at this number of seeds. "
    "†: not tested: fewer than two seeds that every value finished. One training run per configuration cannot "
    "tell a configuration from its own training noise, so nothing is bold at one seed (a paired bootstrap over "
    "prompts, where given, measures prompt noise only). "
    "Raw reward-model units (RM chosen/rejected means, margin, length-corrected margin, RM reward of answers), and "
    "win rates judged by each trial's own RM, are tested only between rows scored by the same reward model; across "
    "RMs read the scale-free accuracy, Kendall tau and standardized margin. Reference rows (base model, and SFT "
    "when the axis leaves SFT alone) are shown, not tested. "
    "Minimum detectable difference: the difference between two values that the primary's test would separate "
    "with 80% power at these seeds, from the pooled variance, in the metric's units.")

TEX_PREAMBLE_NOTE = (
    "% Needs \\usepackage{booktabs}. Korean text (prompts, answers, Korean axis values) needs a Hangul font:\n"
    "% pdfLaTeX: \\usepackage{kotex}; XeLaTeX/LuaLaTeX: \\usepackage{kotex} (loads xetexko/luatexko) or\n"
    "% \\usepackage{fontspec} with \\setmainhangulfont{NanumGothic} (kotex), or any installed Hangul font.\n")


def num(x: Optional[float], fmt: str, signed: bool = False) -> str:
    """Fixed decimals from the registry, but never fewer than two significant digits: a BLEU of 0.018 prints
    as 0.018, not 0.02, and a tiny half-width never prints as 0.000 (that reads as "no uncertainty")."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if abs(x) < 1e-9:
        # float noise around zero (sacrebleu's smoothed BLEU of answers sharing no 4-gram is ~1e-15): it is zero
        x = 0.0
    s = format(x, ("+" if signed else "") + fmt)
    m = re.fullmatch(r"\.(\d+)f", fmt)
    if x != 0 and m and abs(x) < 10 ** (1 - int(m.group(1))):
        s = format(x, ("+" if signed else "") + ".2g")
    elif x != 0 and float(re.sub(r"[^0-9.eE+-]", "", s) or 0) == 0:
        s = format(x, ("+" if signed else "") + ".2g")
    return s


def count_text(ok: int, failed: int, stopped: int = 0) -> str:
    return f"{ok} ok" + (f", {failed} failed" if failed else "") + (f", {stopped} stopped" if stopped else "")


def cell_parts(cell: Cell) -> tuple[str, str, str]:
    """(value text, n text, mark symbol) shared by the markdown and LaTeX writers."""
    s, spec = cell.summary, cell.spec
    if not cell.present:
        return "", "", ""
    if s.n == 0:
        return "n/a", f"n=0, {s.n_nan} NaN", ""
    value = num(s.mean, spec.fmt)
    if s.has_ci:
        value = f"{value} ± {num(s.half_width, spec.fmt)}"
        n = f"n={s.n}"
    else:
        n = "n=1, no CI"
    if s.n_nan:
        n += f", {s.n_nan} NaN"
    if cell.test_n is not None:
        n += f"; test n={cell.test_n}"
    return value, n, {TIE: "≈", NOT_TESTED: "†"}.get(cell.mark, "")


def header(spec: MetricSpec) -> str:
    return f"{spec.label} {spec.arrow}".strip()


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def describe(c: Comparison) -> str:
    m = c.metric
    role = "primary" if c.primary else "exploratory"
    head = (f"{header(m)} ({role}): best {c.best} ({num(c.best_mean, m.fmt)}) vs runner-up {c.runner_up} "
            f"({num(c.runner_mean, m.fmt)})")
    extra = "".join(f"; {n}" for n in c.notes)
    if c.verdict == "not tested: different RMs":
        return f"{head}: not tested: scored by different reward models{extra}."
    if c.test is None:
        out = f"{head}: not tested (fewer than two seeds every value finished), never bold{extra}"
        w = c.within_seed
        if w is not None:
            out += (f"; {w.describe()}: difference {num(w.diff, m.fmt, signed=True)} [95% CI {num(w.ci_low, m.fmt)}"
                    f", {num(w.ci_high, m.fmt)}]")
        return out + "."
    t = c.test
    if c.primary:
        adj = "" if t.p_adjusted == t.p_value else f", Holm over the report's primary questions {_p(t.p_adjusted)}"
    else:
        adj = f", Holm over every test of the report {_p(t.p_adjusted)}"
    return (f"{head}: difference {num(t.diff, m.fmt, signed=True)} [95% CI {num(t.ci_low, m.fmt)}, "
            f"{num(t.ci_high, m.fmt)}], p = {_p(t.p_value)} (largest over the {t.n_configs - 1} rivals){adj}; "
            f"{t.describe()}{extra} -> **{c.verdict}**.")


def mdd_line(t: Table) -> str:
    got = primary_mdd(t)
    if got is None:
        return ""
    d, test = got
    spec = t.primary_comparison.metric
    return (f"What these seeds can see: the minimum detectable difference of {header(spec)} (primary) is "
            f"{num(d, spec.fmt)}" + (f" (scale {spec.scale})" if spec.scale else "") + f" at 80% power with {test.n_seeds} seeds (residual SD "
            f"{num(test.sigma, spec.fmt)}, df {test.df:g}); a smaller real difference is usually shown as ≈. "
            f"`python -m analysis plan RUN_DIR` gives the seeds for a target difference.").replace("  ", " ")


_SETTING_NAMES = {"rouge_tokenizer": "ROUGE tokenizer", "bleu_signature": "BLEU sacrebleu signature",
                  "chrf_signature": "chrF sacrebleu signature"}


def definitions(t: Table, settings: dict[str, str]) -> list[str]:
    """One line per metric of the table (scale and definition), then the tokenizer and signatures they used."""
    lines, seen, used = [], set(), []
    for spec in t.specs:
        if spec.suffix in seen:
            continue
        seen.add(spec.suffix)
        lines.append(f"{header(spec)} [{spec.scale or 'as reported'}]: {spec.definition}")
        if spec.setting and spec.setting not in used:
            used.append(spec.setting)
    for key in used:
        lines.append(f"{_SETTING_NAMES.get(key, key)}: `{settings.get(key, 'not recorded')}`.")
    return lines


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _md_cell(cell: Optional[Cell]) -> str:
    if cell is None:
        return "—"
    value, n, sym = cell_parts(cell)
    if not value:
        return "—"
    if cell.mark == BEST:
        value = f"**{value}**"
    return f"{value}{' ' + sym if sym else ''} ({n})"


def _row_head(t: Table, r: tuple) -> list[str]:
    return [fmt_value(v) for v in r]


def to_markdown(t: Table, settings: Optional[dict[str, str]] = None) -> str:
    lines: list[str] = []
    if t.layout == "pivot":
        head = [f"{t.row_axes[0]} \\ {t.col_axis}"] + [fmt_value(c) for c in t.col_keys]
        rows = [[fmt_value(r[0])] + [_md_cell(t.cells.get((r, c))) for c in t.col_keys] for r in t.row_keys]
    else:
        head = list(t.row_axes) + ["trials"] + [header(m) for m in t.columns]
        rows = []
        for r in t.row_keys:
            rows.append(_row_head(t, r) + [count_text(*t.counts[(r, None)])]
                        + [_md_cell(t.cells.get((r, c))) for c in t.col_keys])
    lines.append("| " + " | ".join(_md_escape(h) for h in head) + " |")
    lines.append("|" + "|".join(["---"] * len(head)) + "|")
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    if t.layout == "pivot":
        failed = [f"{t.row_axes[0]}={fmt_value(k[0][0])}, {t.col_axis}={fmt_value(k[1])}: {f} failed"
                  for k, (ok, f, st) in t.counts.items() if f]
        trials = sorted({ok for ok, f, st in t.counts.values()})
        lines += ["", f"Finished trials per cell: {', '.join(map(str, trials))}."
                  + (f" Failed: {'; '.join(failed)}." if failed else "")]
    for note in t.notes:
        lines += ["", note]
    defs = definitions(t, settings or {})
    if defs:
        lines += ["", "Metrics:"] + [f"- {d}" for d in defs]
    if t.primary:
        spec = next((c for c in t.columns if c.suffix == t.primary), None)
        lines += ["", f"Primary metric (the table's question): {header(spec) if spec else t.primary}; every other "
                      "column is exploratory."]
    if t.judge:
        lines += ["", t.judge]
    md = mdd_line(t)
    if md:
        lines += ["", md]
    if t.comparisons:
        lines += ["", "Best vs runner-up (and every other value):"] + [f"- {describe(c)}" for c in t.comparisons]
    return "\n".join(lines) + "\n"


def _csv_num(x: Optional[float]) -> str:
    return "" if x is None or not math.isfinite(x) else format(x, ".10g")


def to_csv(t: Table) -> str:
    """Long format, plain numbers: one row per (configuration, metric)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    axes = list(t.row_axes) + ([t.col_axis] if t.col_axis else [])
    w.writerow(axes + ["metric", "label", "higher_is_better", "scale", "mean", "ci_low", "ci_high", "n", "n_nan",
                       "trials_ok", "trials_failed", "trials_stopped", "mark", "reference", "primary", "test_n"])
    for r in t.row_keys:
        for c in t.col_keys:
            cell = t.cells.get((r, c))
            if cell is None or not cell.present:
                continue
            spec = cell.spec
            key_vals = list(r) + ([c] if t.layout == "pivot" else [])
            ok, failed, stopped = t.counts[(r, c if t.layout == "pivot" else None)]
            s = cell.summary
            hib = "" if spec.higher_is_better is None else str(spec.higher_is_better).lower()
            w.writerow([fmt_value(v) if v is not None else "" for v in key_vals]
                       + [spec.name, spec.label, hib, spec.scale, _csv_num(s.mean), _csv_num(s.ci_low),
                          _csv_num(s.ci_high), s.n, s.n_nan, ok, failed, stopped, cell.mark,
                          "true" if r in t.reference_rows else "false",
                          "true" if spec.suffix == t.primary and r not in t.reference_rows else "false",
                          "" if cell.test_n is None else cell.test_n])
    return buf.getvalue()


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "↑": r"$\uparrow$", "↓": r"$\downarrow$", "±": r"$\pm$", "—": "--", "≈": r"$\approx$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in s)


def _tex_cell(cell: Optional[Cell]) -> str:
    if cell is None:
        return "--"
    value, n, sym = cell_parts(cell)
    if not value:
        return "--"
    v = tex_escape(value)
    if cell.mark == BEST:
        v = rf"\textbf{{{v}}}"
    mark = {"≈": r"$^{\approx}$", "†": r"$^{\dagger}$"}.get(sym, "")
    return rf"{v}{mark} {{\scriptsize ({tex_escape(n)})}}"


def to_latex(t: Table) -> str:
    if t.layout == "pivot":
        head = [f"{t.row_axes[0]} \\ {t.col_axis}"] + [fmt_value(c) for c in t.col_keys]
        rows = [[tex_escape(fmt_value(r[0]))] + [_tex_cell(t.cells.get((r, c))) for c in t.col_keys]
                for r in t.row_keys]
        n_label = 1
    else:
        head = list(t.row_axes) + ["trials"] + [header(m) for m in t.columns]
        rows = [[tex_escape(v) for v in _row_head(t, r)] + [tex_escape(count_text(*t.counts[(r, None)]))]
                + [_tex_cell(t.cells.get((r, c))) for c in t.col_keys] for r in t.row_keys]
        n_label = len(t.row_axes) + 1
    colspec = "l" * n_label + "r" * (len(head) - n_label)
    scales = "; ".join(dict.fromkeys(f"{s.label}: {s.scale}" for s in t.specs if s.scale))
    out = [
        "% Generated by `python -m analysis report`.",
        TEX_PREAMBLE_NOTE.rstrip("\n"),
        "% Bold: the best beats every other value (seeds as blocks, pooled variance, p < 0.05; the primary metric",
        f"% per table, exploratory columns after Holm over the report); primary metric: {t.primary or 'none'};",
        "% $\\approx$: not separated; $\\dagger$: fewer than two complete seeds, not tested.",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{tex_escape(t.title)}. Mean $\\pm$ 95\\% CI over seeds. {tex_escape(scales)}.}}",
        f"\\label{{tab:{t.slug}}}",
        f"\\begin{{tabular}}{{{colspec}}}",
        "\\toprule",
        " & ".join(tex_escape(h) for h in head) + " \\\\",
        "\\midrule",
    ]
    out += [" & ".join(r) + " \\\\" for r in rows]
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(out) + "\n"
