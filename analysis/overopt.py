"""The over-optimization alarm in the report: which trials' gold reward turned down while the proxy rose
(rlhf_ablate/ppo/overopt.py states the rule), as a report.md section, a summary line, and a block in each trial's
section of report.html (its ``TRIAL_HOOKS`` alarm slot). The PPO curves mark the onset (analysis/plots.py)."""

from __future__ import annotations

import html as _html
from typing import Optional

from . import html as report_html
from .groups import fmt_value
from .results import RunResults, TrialResult


def watched(run: RunResults) -> list[TrialResult]:
    """Finished trials whose PPO run had a gold probe."""
    return [t for t in run.ok_trials if t.overoptimization]


def affected(run: RunResults) -> list[TrialResult]:
    """Trials whose alarm fired (an onset step was found)."""
    return [t for t in watched(run) if t.overoptimization.get("onset_step") is not None]


def onset_step(t: TrialResult) -> Optional[int]:
    s = t.overoptimization.get("onset_step") if t.overoptimization else None
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def _num(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def _row(t: TrialResult) -> list[str]:
    o = t.overoptimization
    d = o.get("detail") or {}
    axes = ", ".join(f"{k}={fmt_value(v)}" for k, v in t.axes.items()) or "—"
    kept = f"yes, policy of step {o.get('kept_step')}" if o.get("stopped") else "no"
    return [t.trial_id, axes, str(t.seed if t.seed is not None else "?"), str(o.get("gold", "?")),
            str(o.get("reward", "?")), str(o.get("peak_step")), str(o.get("onset_step")), str(o.get("detected_step")),
            f"{_num(d.get('gold_peak'))} → {_num(d.get('gold_at_detection'))}",
            f"{_num(d.get('proxy_peak'))} → {_num(d.get('proxy_at_detection'))}", kept]


HEADER = ["trial", "axes", "seed", "gold", "ppo.reward", "gold peak step", "onset step", "detected at",
          "gold (peak → detection)", "proxy (peak → detection)", "stopped, kept"]
RULE = ("The rule (rlhf_ablate/ppo/overopt.py; docs/metrics.md, \"Over-optimization\"): on a fixed probe of held-out "
        "prompts, gold fell below its running maximum by more than k paired standard errors while the proxy's "
        "trend was up (least-squares slope over the evaluations so far), for m consecutive evaluations; the onset "
        "step is the first of them.")


def summary_line(run: RunResults) -> Optional[str]:
    w, a = watched(run), affected(run)
    if not w:
        # Say so where PPO ran unwatched: an absent alarm must not read as "no over-optimization".
        if any(t.config.get("method", "ppo") == "ppo" for t in run.ok_trials):
            return ("Over-optimization alarm: off (no PPO trial had a gold signal; set ppo.gold, e.g. with "
                    "rm.gold=disjoint, or run the bundled `overoptimization` sweep; docs/metrics.md).")
        return None
    ids = ", ".join(f"`{t.trial_id}` (step {onset_step(t)})" for t in a)
    return (f"Over-optimization alarm: fired in {len(a)} of {len(w)} trials with a gold probe"
            + (f": {ids}." if a else "."))


def markdown_section(run: RunResults) -> list[str]:
    """The report.md section: every trial whose alarm fired, and how many were watched."""
    w, a = watched(run), affected(run)
    if not w:
        return []
    L = ["", "## Over-optimization alarm", "", RULE, ""]
    if not a:
        return L + [f"No alarm in the {len(w)} trials with a gold probe."]
    L += [f"Fired in {len(a)} of {len(w)} trials with a gold probe (the PPO curves mark the onset):", "",
          "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    L += ["| " + " | ".join(c.replace("|", "\\|") for c in _row(t)) + " |" for t in a]
    return L


def alarm_html(t: TrialResult) -> Optional[str]:
    """The trial section's alarm block (report.html's ``TRIAL_HOOKS``): fired or quiet, with its numbers."""
    o = t.overoptimization
    if not o:
        return None
    esc = _html.escape
    if o.get("onset_step") is None:
        n = len(o.get("evaluations") or [])
        return (f'<div class="alarm quiet"><strong>Over-optimization alarm: quiet.</strong> Gold '
                f'({esc(str(o.get("gold")))}) watched on {esc(str(o.get("probe_size")))} probe prompts at {n} '
                f'evaluations; it never fell beyond k={esc(str(o.get("k")))} SE for m={esc(str(o.get("m")))} '
                f'evaluations while the proxy rose.</div>')
    cells = "".join(f"<tr><th>{esc(h)}</th><td>{esc(v)}</td></tr>" for h, v in zip(HEADER[3:], _row(t)[3:]))
    return (f'<div class="alarm fired" style="border-left:4px solid #c0392b;padding-left:8px">'
            f'<strong>Over-optimization alarm: fired at step {esc(str(o.get("onset_step")))}.</strong> '
            f'{esc(RULE)}<table>{cells}</table></div>')


if alarm_html not in report_html.TRIAL_HOOKS:
    report_html.TRIAL_HOOKS.append(alarm_html)
