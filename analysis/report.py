"""RUN_DIR/trials/*/result.json -> RUN_DIR/report/{report.md, report.html, <table>.csv, <table>.tex, *.png, *.svg}.

The report is written into a temporary directory next to the target and renamed into place, so a reader (or a
report job on SLURM that is killed) never sees half a report. Nothing in it depends on the time or the machine:
inputs are sorted, the bootstrap seed is fixed, and the PNGs carry no date or software metadata.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from . import overopt
from .html import render_html
from .plots import Plot, make_plots
from .render import LEGEND, TEX_PREAMBLE_NOTE, to_csv, to_latex, to_markdown
from .results import ReportError, RunResults, load_run
from .sidebyside import side_by_side
from .identity import check_settings
from .settings import AnalysisSettings, load_settings
from .stats import ALPHA
from .groups import Table, _sort_key, fmt_value
from .tables import build_tables
from .verdicts import report_family

FORMATS = ("md", "csv", "tex", "html")


@dataclass
class Report:
    run: RunResults
    tables: list[Table]
    plots: list[Plot] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    out_dir: Optional[Path] = None
    markdown: str = ""
    settings: AnalysisSettings = field(default_factory=AnalysisSettings)


def build_report(run_dir: str | Path) -> Report:
    """Load the results and build the tables (no files written, no plots)."""
    run = load_run(run_dir)
    problems = list(run.problems)
    settings = load_settings(run_dir, problems)
    return Report(run=run, tables=build_tables(run, problems, settings), problems=problems, settings=settings)


def family_statement(rep: Report) -> str:
    """The legend's exact statement of what a bold claims, for this report's questions (issue 18)."""
    k, m = report_family(rep.tables)
    prim = [f"{t.title}: {c.metric.label}" for t in rep.tables for c in t.comparisons if c.primary and c.test]
    if k == 0:
        return ("This report tests no question: fewer than two seeds that every value finished, or no tested "
                "metric. Nothing is bold.")
    a = int(round(ALPHA * 100))
    qs = "question" if k == 1 else "questions"
    if rep.settings.family == "report":
        head = (f"This report asks {k} {qs} (the primary metric of each table: {'; '.join(prim)}), corrected "
                f"together (Holm; `analysis.family: report`): the chance that any primary bold of this report is "
                f"false is at most {a}%.")
    else:
        bound = min(100.0, k * ALPHA * 100)
        indep = 100 * (1 - (1 - ALPHA) ** k)
        head = (f"This report asks {k} {qs} (the primary metric of each table: {'; '.join(prim)}). Each bold has "
                f"at most a {a}% chance of being false"
                + (f"; the chance that at least one of the {k} is false is at most {bound:.0f}% ({k} x {a}%; "
                   f"{indep:.0f}% if the questions were independent). Set `analysis.family: report` in the sweep "
                   f"file for {a}% over the whole report." if k > 1 else "."))
    return (head + f" The other {m - k} tested columns are exploratory: bold only after Holm over all {m} tests, "
            f"so together they have at most a {a}% chance of any false bold. Primary metrics: "
            f"{', '.join(f'{kk} = {v}' for kk, v in rep.settings.primary.items())} ({rep.settings.source}).")


def _md_text(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def summary_lines(run: RunResults) -> list[str]:
    """The summary bullets (markdown inline), shared by report.md and report.html."""
    ok, failed, stopped = run.ok_trials, run.failed_trials, run.stopped_trials
    L: list[str] = []
    L.append(f"Trials: {len(ok)} finished, {len(failed)} failed, "
             + (f"{len(stopped)} stopped early by the scheduler, " if stopped else "")
             + f"{len(run.pending)} pending (no result.json yet)"
             + (f", {len(run.problems)} unreadable or invalid (see Problems)" if run.problems else "") + ".")
    if run.sweeps:
        L.append(f"Sweep: {', '.join(run.sweeps)}.")
    if run.axis_names:
        for a in run.axis_names:
            vals = sorted({t.axes.get(a) for t in run.trials}, key=_sort_key)
            L.append(f"Axis `{a}`: {', '.join(fmt_value(v) for v in vals)}.")
    else:
        L.append("No swept axes: one configuration, seeds only.")
    L.append(f"Seeds: {', '.join(map(str, run.seeds)) or 'unknown'}.")
    if run.pending or failed or stopped:
        L.append("This sweep is incomplete: cells show n for the seeds that finished.")
    if len(run.seeds) == 1:
        L.append("One seed: every number is one training run, so no difference is tested and nothing is bold.")
    alarm = overopt.summary_line(run)
    if alarm:
        L.append(alarm)
    return L


def render_markdown(rep: Report, formats: Iterable[str] = FORMATS) -> str:
    run = rep.run
    ok, failed, stopped = run.ok_trials, run.failed_trials, run.stopped_trials
    title = ", ".join(run.sweeps) or run.run_dir.name
    settings = check_settings(run, [])[1]
    L: list[str] = [f"# Ablation report: {title}", ""]
    L.append("## Summary")
    L.append("")
    L += [f"- {line}" for line in summary_lines(run)]
    L.append("")
    L.append("## How to read the tables")
    L.append("")
    L.append(family_statement(rep))
    L.append("")
    L.append(LEGEND)
    if "tex" in formats:
        L += ["", "LaTeX files: " + " ".join(x.lstrip("% ").strip() for x in TEX_PREAMBLE_NOTE.splitlines())]
    L.append("")
    L.append("## Tables")
    for t in rep.tables:
        L.append("")
        L.append(f"### {t.title}")
        L.append("")
        files = [f"[{fmt}]({t.slug}.{fmt})" for fmt in ("csv", "tex") if fmt in formats]
        if files:
            L.append("Files: " + ", ".join(files))
            L.append("")
        L.append(to_markdown(t, settings).rstrip("\n"))
    sbs = side_by_side(run)
    if sbs:
        L += ["", "## Side by side: the same prompts, base → SFT → aligned", ""] + sbs
    if rep.plots:
        L.append("")
        L.append("## Plots")
        for p in rep.plots:
            L.append("")
            L.append(f"### {p.title}")
            L.append("")
            L.append(f"![{p.title}]({p.filename})" + (f" ([SVG]({p.svg}))" if p.svg else ""))
            L.append("")
            L.append(p.caption)
    L += overopt.markdown_section(run)
    if stopped:
        L += ["", "## Stopped early (ASHA)", "",
              f"{len(stopped)} trial(s) were stopped by the early-stopping scheduler before their final eval, so "
              "the tables and plots leave them out. Survivorship: the scheduler stops the trials that look worst "
              "at a rung, so the finished trials of a configuration are its better seeds and its mean is biased "
              "upward; compare configurations on the seeds that all of them finished (n in each cell), and read a "
              "configuration with stopped seeds as optimistic.", "",
              "| trial | axes | seed | reason |", "|---|---|---|---|"]
        for t in stopped:
            err = t.error or {}
            axes = ", ".join(f"{k}={fmt_value(v)}" for k, v in t.axes.items()) or "—"
            L.append("| " + " | ".join(_md_text(str(x)) for x in (
                t.trial_id, axes, t.seed if t.seed is not None else "?", err.get("message") or "stopped")) + " |")
    L.append("")
    L.append("## Failed trials")
    L.append("")
    if failed:
        L.append("| trial | axes | seed | stage | error | message |")
        L.append("|---|---|---|---|---|---|")
        for t in failed:
            err = t.error or {}
            axes = ", ".join(f"{k}={fmt_value(v)}" for k, v in t.axes.items()) or "—"
            L.append("| " + " | ".join(_md_text(str(x)) for x in (
                t.trial_id, axes, t.seed if t.seed is not None else "?", err.get("stage") or "?",
                err.get("type") or "?", err.get("message") or "")) + " |")
    else:
        L.append("None.")
    if run.pending:
        L.append("")
        L.append("## Pending trials")
        L.append("")
        L.append("Directories without result.json (running, queued, or killed before writing): "
                 + ", ".join(f"`{p}`" for p in run.pending) + ".")
    L.append("")
    L.append("## Problems")
    L.append("")
    L.extend([f"- {_md_text(p)}" for p in rep.problems] or ["None."])
    return "\n".join(L) + "\n"


def write_report(run_dir: str | Path, out: str | Path | None = None, formats: Iterable[str] = FORMATS,
                 plots: bool = True) -> Report:
    """Build the tables and plots and write them to ``out`` (default RUN_DIR/report), replacing it atomically."""
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ReportError(f"--format: unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}.")
    rep = build_report(run_dir)
    out_dir = Path(out) if out is not None else Path(run_dir) / "report"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if plots:
            rep.plots = make_plots(rep.run, tmp, rep.problems)
        for t in rep.tables:
            if "csv" in formats:
                (tmp / f"{t.slug}.csv").write_text(to_csv(t), encoding="utf-8")
            if "tex" in formats:
                (tmp / f"{t.slug}.tex").write_text(to_latex(t), encoding="utf-8")
        if "html" in formats:   # the same report as one self-contained page (analysis/html.py); first, so
            # that a problem it finds (no Korean font) is listed in report.md too
            (tmp / "report.html").write_text(render_html(rep, summary_lines(rep.run), formats, tmp),
                                             encoding="utf-8")
        rep.markdown = render_markdown(rep, formats)
        if "md" in formats:
            (tmp / "report.md").write_text(rep.markdown, encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rep.out_dir = out_dir
    return rep


def _typed(v: str):
    """CSV text back to a number where it is one, so W&B tables sort and plot numerically."""
    if v in ("", "true", "false"):
        return None if v == "" else v == "true"
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


class Run(RunResults):
    """What a notebook gets (``rlhf_ablate.run_sweep``, ``rlhf_ablate.load_run``, ``analysis.load_run``): the run's
    results (analysis/results.py: RunResults, ``.to_pandas()``) and ``.report()``."""

    def report(self, out: Optional[Path] = None, **kwargs) -> "Report":
        """Write the report (tables, plots, report.md) of this run: :func:`write_report`."""
        return write_report(self.run_dir, out, **kwargs)


def open_run(run_dir: str | Path) -> Run:
    """The results of a run directory with ``.report()`` (analysis/results.py: load_run reads them)."""
    r = load_run(run_dir)
    return Run(**{f: getattr(r, f) for f in r.__dataclass_fields__})

