"""report.html: the whole report in one self-contained page (issue 20, part 1), built from the same objects as
report.md (the Table objects of analysis/tables.py, the plots of analysis/plots.py, the side-by-side prompts of
analysis/sidebyside.py), never parsed back from markdown.

- Offline: one file, no request. The Hangul font is an embedded subset (analysis/htmlkit.py), the plots are inline
  SVG (matplotlib draws their glyphs as paths), style and script are inline, and a Content-Security-Policy forbids
  everything else. tests/test_report_html.py opens the page in Chromium and checks.
- Tables: every table of report.md with the same cells (analysis/render.py's ``cell_parts``), CIs, bold and marks,
  then the table's notes, metric definitions and best-vs-runner-up lines. Any other text the Table object carries
  (a field of type str or list of str that this module does not know, e.g. a legend, a family statement or a
  footer added by the statistics) is shown under the table too, with its field name, so new fields appear
  without code here. Click a header to sort; hover a cell for its axis values, seeds and per-seed numbers; each
  row links to its trials.
- Trials: one section per trial with its status, failure (and the end of error.txt), per-step training series
  (every numeric key of the trial's history, PPO first; drawn generically, so a new key such as a gold reward
  shows up by itself), its config and timings. ``TRIAL_HOOKS`` is the named place where later parts add
  per-trial blocks (the over-optimization alarm of issue 20, part 2): each hook takes a trial and returns HTML or
  None, shown under the trial's curves.
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from .htmlkit import CSP, CSS, JS, font_face, font_problem, inline_svg, line_chart
from .identity import check_settings
from .render import LEGEND, TEX_PREAMBLE_NOTE, cell_parts, count_text, definitions, describe, header, num
from .results import RunResults, TrialResult
from .sidebyside import INTRO, pick
from .groups import ALL_VALUES, BEST, Cell, Table, fmt_value

esc = html.escape

# Per-trial blocks added by other parts of the report (e.g. the over-optimization alarm): trial -> HTML or None.
TRIAL_HOOKS: list[Callable[[TrialResult], Optional[str]]] = []

# History series drawn first (and always open); every other numeric key follows under "more series".
FIRST_SERIES = ("objective/scores", "objective/rlhf_reward", "objective/kl")

# Table fields rendered by their own code; any other str / list-of-str field is rendered generically.
_KNOWN_TABLE_FIELDS = {"slug", "title", "layout", "row_axes", "col_axis", "row_keys", "col_keys", "columns",
                       "cells", "counts", "stage", "reference_rows", "comparisons", "notes"}


def md_inline(s: str) -> str:
    """The markdown our text uses inline (**bold**, `code`, [text](href)) as HTML; everything else escaped."""
    out = esc(str(s), quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{m.group(2)}">{m.group(1)}</a>', out)
    return out


def anchor(trial_id: str) -> str:
    return "trial-" + re.sub(r"[^A-Za-z0-9_-]", "_", trial_id)


def _sort_attr(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return f' data-sort="{v!r}"'
    return ""


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def _cell_trials(run: RunResults, t: Table, row_key: tuple, col_key: Any) -> list[TrialResult]:
    """The trials a cell (or row, col_key None) summarises: those whose axes match its axis values."""
    axes = run.axis_names
    if t.layout == "pivot":
        vals = dict(zip(t.row_axes + [t.col_axis], list(row_key) + [col_key]))
    else:
        vals = dict(zip(axes, row_key[len(row_key) - len(axes):] if axes else ()))
    out = []
    for tr in run.trials:
        if all(v == ALL_VALUES or tr.axes.get(a) == v for a, v in vals.items() if a in axes):
            out.append(tr)
    return sorted(out, key=lambda x: (x.seed if x.seed is not None else 1 << 30, x.trial_id))


def _links(trials: Iterable[TrialResult]) -> str:
    return "".join(f'<a href="#{anchor(tr.trial_id)}" title="{esc(tr.trial_id)} ({tr.status})">'
                   f's{tr.seed if tr.seed is not None else "?"}</a>' for tr in trials)


def _hover(run: RunResults, t: Table, row_key: tuple, col_key: Any, cell: Cell) -> str:
    trials = _cell_trials(run, t, row_key, col_key)
    axes = run.axis_names
    if t.layout == "pivot":
        where = f"{t.row_axes[0]}={fmt_value(row_key[0])}, {t.col_axis}={fmt_value(col_key)}"
    else:
        where = ", ".join(f"{a}={fmt_value(v)}" for a, v in zip(axes, row_key[len(row_key) - len(axes):]))
        if len(row_key) > len(axes):
            where = f"{fmt_value(row_key[0])}: " + (where or "all trials")
    spec = cell.spec
    lines = [f"{where or 'all trials'} | {spec.name}"]
    seeds = []
    for tr in trials:
        if tr.status != "ok":
            lines.append(f"seed {tr.seed}: {tr.status} ({tr.trial_id})")
        elif spec.name in tr.metrics:
            seeds.append(tr.seed)
            lines.append(f"seed {tr.seed}: {num(tr.metrics[spec.name], spec.fmt)} ({tr.trial_id})")
    lines.insert(1, "seeds " + (", ".join(map(str, seeds)) or "none"))
    return "\n".join(lines)


def _td(run: RunResults, t: Table, row_key: tuple, col_key: Any) -> str:
    cell = t.cells.get((row_key, col_key))
    if cell is None:
        return '<td class="num" data-sort="">—</td>'
    value, n, sym = cell_parts(cell)
    if not value:
        return '<td class="num" data-sort="">—</td>'
    s = cell.summary
    v = esc(value)
    if cell.mark == BEST:
        v = f"<strong>{v}</strong>"
    mark = f'<span class="mark">{esc(sym)}</span>' if sym else ""
    links = ""
    if t.layout == "pivot":
        links = f'<div class="trials">{_links(_cell_trials(run, t, row_key, col_key))}</div>'
    sort = f' data-sort="{s.mean!r}"' if s.n and math.isfinite(s.mean) else ' data-sort=""'
    return (f'<td class="num"{sort} title="{esc(_hover(run, t, row_key, col_key, cell))}">{v}{mark}'
            f'<span class="n">({esc(n)})</span>{links}</td>')


def _extra_fields(obj: Any) -> list[tuple[str, list[str]]]:
    """Text fields of a table object this module has no code for (str, or list/tuple of str), in field order."""
    out = []
    if not dataclasses.is_dataclass(obj):
        return out
    for f in dataclasses.fields(obj):
        if f.name in _KNOWN_TABLE_FIELDS:
            continue
        v = getattr(obj, f.name, None)
        if isinstance(v, str) and v.strip():
            out.append((f.name, [v]))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            out.append((f.name, [x for x in v if x.strip()]))
    return out


def table_html(run: RunResults, t: Table, settings: dict[str, str], formats: Iterable[str],
               selftest: bool = False) -> str:
    if t.layout == "pivot":
        head = [f"{t.row_axes[0]} \\ {t.col_axis}"] + [fmt_value(c) for c in t.col_keys]
        titles = [""] + [f"{t.col_axis}={fmt_value(c)}" for c in t.col_keys]
        first_metric = 1
    else:
        head = list(t.row_axes) + ["trials"] + [header(m) for m in t.columns]
        titles = [""] * (len(t.row_axes) + 1) + [f"{m.name}: {m.definition}" for m in t.columns]
        first_metric = len(t.row_axes) + 1
    attrs = f' data-selftest="{first_metric}"' if selftest else ""
    L = [f'<div class="wrap"><table class="sortable" id="tbl-{esc(t.slug)}"{attrs}><thead><tr>']
    L += [f'<th title="{esc(ti)}">{esc(h)}</th>' if ti else f"<th>{esc(h)}</th>" for h, ti in zip(head, titles)]
    L.append("</tr></thead><tbody>")
    for r in t.row_keys:
        cls = ' class="ref"' if r in t.reference_rows else ""
        L.append(f"<tr{cls}>")
        for v in r:
            L.append(f"<td{_sort_attr(v)}>{esc(fmt_value(v))}</td>")
        if t.layout != "pivot":
            ok, failed, stopped = t.counts[(r, None)]
            trials = _cell_trials(run, t, r, None)
            L.append(f'<td class="trials" data-sort="{ok}">{esc(count_text(ok, failed, stopped))}<br>'
                     f"{_links(trials)}</td>")
        for c in t.col_keys:
            L.append(_td(run, t, r, c))
        L.append("</tr>")
    L.append("</tbody></table></div>")
    notes: list[str] = []
    if t.layout == "pivot":
        failed = [f"{t.row_axes[0]}={fmt_value(k[0][0])}, {t.col_axis}={fmt_value(k[1])}: {f} failed"
                  for k, (ok, f, st) in t.counts.items() if f]
        trials_per_cell = sorted({ok for ok, f, st in t.counts.values()})
        notes.append(f"Finished trials per cell: {', '.join(map(str, trials_per_cell))}."
                     + (f" Failed: {'; '.join(failed)}." if failed else ""))
    notes += list(t.notes)
    if notes:
        L.append('<ul class="notes">' + "".join(f"<li>{md_inline(n)}</li>" for n in notes) + "</ul>")
    for name, texts in _extra_fields(t):
        label = name.replace("_", " ")
        L.append(f'<div class="extra" data-field="{esc(name)}"><span class="muted">{esc(label)}:</span>'
                 '<ul class="notes">' + "".join(f"<li>{md_inline(x)}</li>" for x in texts) + "</ul></div>")
    defs = definitions(t, settings)
    if defs:
        L.append('<details><summary>Metrics: scales, definitions, tokenizer and signatures</summary>'
                 '<ul class="notes">'
                 + "".join(f"<li>{md_inline(d)}</li>" for d in defs) + "</ul></details>")
    if t.comparisons:
        L.append('<details open><summary>Best vs runner-up</summary><ul class="notes">'
                 + "".join(f"<li>{md_inline(describe(c))}</li>" for c in t.comparisons) + "</ul></details>")
    files = [f'<a href="{esc(t.slug)}.{fmt}">{fmt.upper()}</a>' for fmt in ("csv", "tex") if fmt in formats]
    head_html = f'<h3 id="{esc(t.slug)}">{esc(t.title)}</h3>'
    if files:
        head_html += f'<div class="files">Files beside this page: {", ".join(files)}</div>'
    return head_html + "".join(L)


# ---------------------------------------------------------------------------------------------------------
# Trials
# ---------------------------------------------------------------------------------------------------------
def _numeric_series(rows: Any) -> dict[str, list[tuple[float, float]]]:
    """key -> [(step, value)] for every numeric key of a history list (steps from 'step', else 1, 2, ...)."""
    out: dict[str, list[tuple[float, float]]] = {}
    if not isinstance(rows, list):
        return out
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        step = row.get("step", i + 1)
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            step = i + 1
        for k, v in row.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            out.setdefault(k, []).append((float(step), float(v)))
    return out


def history_html(tr: TrialResult) -> str:
    """Every per-step series of the trial, PPO first: the first few open, the rest folded."""
    hist = tr.history if isinstance(tr.history, dict) else {}
    stages = sorted(hist, key=lambda s: (s != "ppo", s))
    L = []
    for stage in stages:
        series = _numeric_series(hist[stage])
        if not series:
            continue
        first = [k for k in FIRST_SERIES if k in series] + sorted(k for k in series if "gold" in k.lower()
                                                                  and k not in FIRST_SERIES)
        if not first:   # a TRL trainer's log: its loss and accuracy first, its epoch counter last
            first = [k for k in sorted(series, key=lambda k: (not k.endswith("loss"), k))
                     if any(w in k for w in ("loss", "accuracy", "margin"))][:3]
        rest = sorted((k for k in series if k not in first), key=lambda k: (k in ("epoch", "learning_rate"), k))
        if not first:
            first, rest = rest[:3], rest[3:]
        charts = "".join(line_chart(f"{stage}: {k}", [(k, series[k])]) for k in first)
        L.append(f'<div class="charts" data-stage="{esc(stage)}">{charts}</div>')
        if rest:
            more = "".join(line_chart(f"{stage}: {k}", [(k, series[k])]) for k in rest)
            L.append(f"<details><summary>{len(rest)} more {esc(stage)} series</summary>"
                     f'<div class="charts">{more}</div></details>')
    return "".join(L)


def _error_text(run: RunResults, tr: TrialResult, max_lines: int = 60) -> str:
    p = Path(run.run_dir) / tr.path
    p = (p.parent if p.name == "result.json" else p) / "error.txt"
    try:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    cut = len(lines) > max_lines
    return ("...\n" if cut else "") + "\n".join(lines[-max_lines:])


def trial_html(run: RunResults, tr: TrialResult) -> str:
    axes = ", ".join(f"{a}={fmt_value(v)}" for a, v in tr.axes.items()) or "no swept axes"
    L = [f'<section class="trial" id="{anchor(tr.trial_id)}">',
         f'<h3>{esc(tr.trial_id)}: {esc(axes)}, seed {esc(str(tr.seed))} '
         f'<span class="status-{esc(tr.status)}">{esc(tr.status)}</span></h3>']
    if tr.status != "ok" or tr.error:
        err = tr.error or {}
        L.append('<div class="failure">'
                 f'<div><strong>{esc(str(err.get("type") or tr.status))}</strong> in stage '
                 f'<code>{esc(str(err.get("stage") or "?"))}</code>: {esc(str(err.get("message") or ""))}</div>')
        tb = _error_text(run, tr)
        if tb:
            L.append(f"<details open><summary>error.txt (end)</summary><pre>{esc(tb)}</pre></details>")
        L.append("</div>")
    curves = history_html(tr)
    L.append('<div class="curves">' + (curves or '<p class="muted">No per-step history recorded.</p>') + "</div>")
    hooks = [h(tr) for h in TRIAL_HOOKS]
    L.append(f'<div class="alarm-slot" id="alarm-{anchor(tr.trial_id)}">{"".join(x for x in hooks if x)}</div>')
    if tr.timings:
        rows = []
        for stage, v in tr.timings.items():
            if isinstance(v, dict):
                secs = v.get("seconds")
                rows.append(f"<tr><td>{esc(stage)}</td><td class='num'>"
                            f"{esc(f'{secs:.1f}' if isinstance(secs, (int, float)) else '—')}</td>"
                            f"<td>{'cache hit' if v.get('cache_hit') else ''}</td></tr>")
            elif isinstance(v, (int, float)):
                rows.append(f"<tr><td>{esc(stage)}</td><td class='num'>{v:.1f}</td><td></td></tr>")
        if rows:
            L.append("<details><summary>Timings (seconds)</summary><table><thead><tr><th>stage</th><th>seconds</th>"
                     f"<th></th></tr></thead><tbody>{''.join(rows)}</tbody></table></details>")
    if tr.config:
        rows = "".join(f"<tr><td><code>{esc(k)}</code></td><td>"
                       + (f"<strong>{esc(fmt_value(v))}</strong>" if k in tr.axes else esc(fmt_value(v)))
                       + "</td></tr>" for k, v in sorted(tr.config.items()))
        L.append(f"<details><summary>Config ({len(tr.config)} keys; swept axes in bold)</summary>"
                 f'<table class="sortable"><thead><tr><th>key</th><th>value</th></tr></thead><tbody>{rows}'
                 "</tbody></table></details>")
    L.append("</section>")
    return "".join(L)


def _trials_index(run: RunResults) -> str:
    axes = run.axis_names
    head = ["trial", *axes, "seed", "status", "error", "seconds"]
    L = ['<div class="wrap"><table class="sortable" id="tbl-trials"><thead><tr>'
         + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for tr in run.trials:
        total = tr.timings.get("total") if isinstance(tr.timings, dict) else None
        total = total.get("seconds") if isinstance(total, dict) else total
        err = tr.error or {}
        L.append(f'<tr><td><a href="#{anchor(tr.trial_id)}">{esc(tr.trial_id)}</a></td>'
                 + "".join(f"<td{_sort_attr(tr.axes.get(a))}>{esc(fmt_value(tr.axes.get(a)))}</td>" for a in axes)
                 + f"<td{_sort_attr(tr.seed)}>{esc(str(tr.seed))}</td>"
                 + f'<td class="status-{esc(tr.status)}">{esc(tr.status)}</td>'
                 + f"<td>{esc(str(err.get('type') or ''))}</td>"
                 + (f'<td class="num"{_sort_attr(total)}>{total:.1f}</td>' if isinstance(total, (int, float))
                    else '<td class="num"></td>') + "</tr>")
    L.append("</tbody></table></div>")
    return "".join(L)


# ---------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------
def _side_by_side(run: RunResults) -> str:
    sbs = pick(run)
    if sbs is None:
        return ""
    L = [f"<p>{md_inline(INTRO.format(seeds=', '.join(map(str, sbs.seeds))))}</p>"]
    for n, p in enumerate(sbs.prompts, 1):
        L.append(f'<h3>Prompt {n} <code>{esc(p["data_id"])}</code></h3><blockquote lang="ko">{esc(p["prompt"])}'
                 "</blockquote>")
        ref = p["reference"]
        L.append(f'<p lang="ko"><strong>Reference:</strong> {esc(ref) if ref is not None else "—"}</p>')
        L.append('<div class="wrap"><table class="sortable"><thead><tr>'
                 + "".join(f"<th>{esc(h)}</th>" for h in [*sbs.axes, "stage", "answer", "RM score"])
                 + "</tr></thead><tbody>")
        for key, stage, answer, score, trial_id in p["rows"]:
            ans = esc(answer.strip()) if answer and answer.strip() else "<em>(empty answer)</em>"
            L.append("<tr>" + "".join(f"<td{_sort_attr(v)}>{esc(fmt_value(v))}</td>" for v in key)
                     + f'<td><a href="#{anchor(trial_id)}">{esc(stage)}</a></td><td class="answer" lang="ko">{ans}'
                     + "</td>" + (f'<td class="num" data-sort="{score!r}">{score:+.3f}</td>' if score is not None
                                  else '<td class="num">—</td>') + "</tr>")
        L.append("</tbody></table></div>")
    return "".join(L)


def _plots(rep: Any, plot_dir: Optional[Path]) -> str:
    L = []
    for i, p in enumerate(rep.plots):
        svg = ""
        if p.svg and plot_dir is not None and (plot_dir / p.svg).is_file():
            svg = inline_svg((plot_dir / p.svg).read_text(encoding="utf-8"), f"p{i}")
        body = svg or f'<p class="muted">(no SVG of this plot; see <a href="{esc(p.filename)}">the PNG</a>)</p>'
        L.append(f'<figure id="plot-{i}"><h3>{esc(p.title)}</h3>{body}<figcaption>{md_inline(p.caption)} '
                 f'<span class="files">Files: <a href="{esc(p.filename)}">PNG</a>'
                 + (f', <a href="{esc(p.svg)}">SVG</a>' if p.svg else "") + "</span></figcaption></figure>")
    return "".join(L)


def render_html(rep: Any, summary: list[str], formats: Iterable[str] = ("csv", "tex"),
                plot_dir: Optional[Path] = None) -> str:
    """The page as one string. ``rep`` is an analysis.report.Report; ``summary`` the report's summary bullets
    (markdown inline); ``plot_dir`` the directory the plots' SVG files were written to."""
    formats = tuple(formats)
    run: RunResults = rep.run
    title = ", ".join(run.sweeps) or run.run_dir.name
    settings = check_settings(run, [])[1]
    failed, stopped = run.failed_trials, run.stopped_trials
    problem = font_problem()
    if problem and problem not in rep.problems:
        rep.problems.append(problem)
    sections: list[tuple[str, str, str]] = []   # (id, heading, body)
    sections.append(("summary", "Summary", '<ul>' + "".join(f"<li>{md_inline(s)}</li>" for s in summary) + "</ul>"))
    legend = f'<div class="legend">{md_inline(LEGEND)}</div>'
    if "tex" in formats:
        legend += ('<p class="muted">LaTeX files: '
                   + esc(" ".join(x.lstrip("% ").strip() for x in TEX_PREAMBLE_NOTE.splitlines())) + "</p>")
    sections.append(("legend", "How to read the tables", legend))
    first_sortable = next((i for i, t in enumerate(rep.tables) if t.layout == "rows" and len(t.row_keys) > 1
                           and t.col_keys), None)   # the table #selftest sorts (by its first metric)
    tables = "".join(table_html(run, t, settings, formats, selftest=(i == first_sortable))
                     for i, t in enumerate(rep.tables))
    toc_tables = " · ".join(f'<a href="#{esc(t.slug)}">{esc(t.title)}</a>' for t in rep.tables)
    sections.append(("tables", "표 Tables", f'<p class="muted">{toc_tables}</p>{tables}'))
    sbs = _side_by_side(run)
    if sbs:
        sections.append(("side-by-side", "나란히 보기 Side by side: the same prompts, base → SFT → aligned", sbs))
    if rep.plots:
        sections.append(("plots", "그림 Plots", _plots(rep, plot_dir)))
    trials = _trials_index(run) + "".join(trial_html(run, tr) for tr in run.trials)
    sections.append(("trials", "시행 Trials", trials))
    if stopped:
        sections.append(("stopped", "Stopped early (ASHA)",
                         f"<p>{len(stopped)} trial(s) were stopped by the early-stopping scheduler before their final "
                         "eval, so the tables and plots leave them out; their means are optimistic (survivorship, "
                         "see report.md). " + _links(stopped) + "</p>"))
    sections.append(("failed", "Failed trials",
                     "<ul>" + "".join(f'<li><a href="#{anchor(t.trial_id)}">{esc(t.trial_id)}</a>: '
                                      f"{esc(str((t.error or {}).get('type') or '?'))} in "
                                      f"{esc(str((t.error or {}).get('stage') or '?'))}: "
                                      f"{esc(str((t.error or {}).get('message') or ''))}</li>" for t in failed)
                     + "</ul>" if failed else "<p>None.</p>"))
    if run.pending:
        sections.append(("pending", "Pending trials", "<p>Directories without result.json (running, queued, or "
                         "killed before writing): " + ", ".join(f"<code>{esc(p)}</code>" for p in run.pending)
                         + ".</p>"))
    sections.append(("problems", "Problems", "<ul>" + "".join(f"<li>{md_inline(p)}</li>" for p in rep.problems)
                     + "</ul>" if rep.problems else "<p>None.</p>"))
    body = "".join(f'<h2 id="{sid}">{esc(h)}</h2>{b}' for sid, h, b in sections)
    toc = "".join(f'<a href="#{sid}">{esc(h)}</a>' for sid, h, _ in sections)
    head_title = f"Ablation report: {title}"
    page = (f'<nav class="toc">{toc}</nav><main><h1>{esc(head_title)}</h1>'
            '<p class="muted">절제 실험 보고서: one page that works offline. Click a column header to sort; hover a '
            "cell for its seeds and per-seed values; the seed links (s0, s1, ...) open each trial.</p>"
            f'{body}<pre id="selftest-result"></pre></main>')
    # the font subset covers every character of the page (text and attributes alike)
    font_css, _ = font_face(html.unescape(page))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="generator" content="rlhf_ablate analysis/html.py">'
            f"<title>{esc(head_title)}</title><style>{font_css}{CSS}</style><script>{JS}</script></head>\n"
            f"<body>{page}</body></html>\n")
