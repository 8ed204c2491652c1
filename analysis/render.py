"""Tables as markdown, CSV (plain numbers, long format) and LaTeX (booktabs), with their legends: how to read the
marks, and every metric's scale, tokenizer or sacrebleu signature and the statistic its test compares."""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Optional

from rlhf_ablate.metrics.registry import MetricSpec
from .stats import ALPHA
from .tables import BEST, NOT_TESTED, TIE, Cell, Comparison, Table, fmt_value

LEGEND = (
    "Cells: mean ± half-width of the 95% Student-t interval over seeds (n = seeds with a finite value; "
    "\"n=1, no CI\" when only one seed finished; NaN values are counted separately and never averaged in). "
    "↑ higher is better, ↓ lower is better, no arrow: no better direction (never bold). "
    "**Bold**: the best value of the tested rows differs from the runner-up: paired t-test over the shared seeds "
    "of the per-seed difference of the very number the cells average, two-sided, p < 0.05 after Holm's "
    "correction over all tested columns of that table (so a table in which nothing differs shows a bold cell in "
    "at most 5% of sweeps). The seed is the unit of replication: each seed is one training run. "
    "≈: best and runner-up not separated at this number of seeds. "
    "†: best by mean, not tested: fewer than two seeds that both configurations finished. One training run per "
    "configuration cannot tell a configuration from its own training noise, so nothing is bold at one seed (a "
    "paired bootstrap over prompts, where given, measures prompt noise only). "
    "Raw reward-model units (RM chosen/rejected means, margin, length-corrected margin, RM reward of answers) are "
    "tested only between rows scored by the same reward model; across RMs read the scale-free accuracy, Kendall "
    "tau and standardized margin. Reference rows (base model, and SFT in a method's table when the axis leaves "
    "SFT alone) are shown, not tested.")

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
    return value, n, {TIE: "≈", NOT_TESTED: "†"}.get(cell.mark, "")


def header(spec: MetricSpec) -> str:
    return f"{spec.label} {spec.arrow}".strip()


def describe(c: Comparison) -> str:
    m = c.metric
    head = (f"{header(m)}: best {c.best} ({num(c.best_mean, m.fmt)}) vs runner-up {c.runner_up} "
            f"({num(c.runner_mean, m.fmt)})")
    if c.verdict == "not tested: different RMs":
        return f"{head}: not tested: raw units of different reward models."
    if c.test is None:
        out = f"{head}: not tested (fewer than two shared seeds), never bold"
        w = c.within_seed
        if w is not None:
            out += (f"; {w.describe()}: difference {num(w.diff, m.fmt, signed=True)} [95% CI {num(w.ci_low, m.fmt)}"
                    f", {num(w.ci_high, m.fmt)}]")
        return out + "."
    t = c.test
    return (f"{head}: per-seed difference {num(t.diff, m.fmt, signed=True)} [95% CI {num(t.ci_low, m.fmt)}, "
            f"{num(t.ci_high, m.fmt)}], p = {t.p_value:.3g}, Holm-adjusted {t.p_adjusted:.3g} (alpha {ALPHA:g}), "
            f"{t.describe()} -> **{c.verdict}**.")


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
    if t.comparisons:
        lines += ["", "Best vs runner-up:"] + [f"- {describe(c)}" for c in t.comparisons]
    return "\n".join(lines) + "\n"


def _csv_num(x: Optional[float]) -> str:
    return "" if x is None or not math.isfinite(x) else format(x, ".10g")


def to_csv(t: Table) -> str:
    """Long format, plain numbers: one row per (configuration, metric)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    axes = list(t.row_axes) + ([t.col_axis] if t.col_axis else [])
    w.writerow(axes + ["metric", "label", "higher_is_better", "scale", "mean", "ci_low", "ci_high", "n", "n_nan",
                       "trials_ok", "trials_failed", "trials_stopped", "mark", "reference"])
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
                          "true" if r in t.reference_rows else "false"])
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
        "% Bold: differs from the runner-up, paired t over seeds, Holm-adjusted p < 0.05 over the table's tested",
        "% columns; $\\approx$: not separated; $\\dagger$: fewer than two shared seeds, not tested.",
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
