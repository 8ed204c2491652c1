"""The side-by-side section: a few fixed held-out prompts, the reference answer, and the base, SFT and aligned
answers of every configuration, each with its RM score. Our users' reports all show this (issue 10).

The prompts are fixed, not picked: the ``N_PROMPTS`` eval prompts with the smallest sha256 of their data_id among
those every configuration answered, so a rerun, or another sweep on the same data, shows the same prompts. For each
configuration the answers are those of its lowest finished seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from rlhf_ablate.metrics.registry import POLICY_STAGES, stage_title
from .results import RunResults, TrialResult
from .groups import fmt_value, group_trials

N_PROMPTS = 3


def _records(t: TrialResult, stage: str) -> dict[str, dict]:
    recs = t.records.get(stage)
    if not isinstance(recs, list):
        return {}
    return {str(r["data_id"]): r for r in recs if isinstance(r, dict) and r.get("data_id") is not None
            and isinstance(r.get("generation"), str)}


def _text(s: Optional[str]) -> str:
    """One markdown table cell: pipes escaped, line breaks kept as <br>."""
    if s is None:
        return "—"
    s = s.strip().replace("|", "\\|").replace("\r", "")
    return "<br>".join(s.split("\n")) or "*(empty answer)*"


def _quote(s: str) -> list[str]:
    return ["> " + line if line else ">" for line in s.strip().split("\n")]


@dataclass
class SideBySide:
    """What the section shows: the configurations' axes, the seeds used, and per prompt its text, reference and
    one row per (configuration, stage) answer. Markdown (below) and HTML (analysis/html.py) render the same."""
    axes: list[str]
    seeds: list
    prompts: list[dict]      # {"data_id", "prompt", "reference", "rows": [(axis values, stage, answer, RM score)]}


INTRO = ("Fixed held-out prompts (the smallest sha256 of the data_id among the prompts every configuration "
         "answered; not picked by hand), answered greedily by each stage. Seed {seeds} (the lowest finished seed of "
         "each configuration). RM score: that configuration's reward model; RM scores compare answers within one "
         "configuration, not across reward models.")


def pick(run: RunResults, n_prompts: int = N_PROMPTS) -> Optional[SideBySide]:
    """The prompts and answers of the section (None when no trial kept eval records)."""
    axes = run.axis_names
    chosen: list[tuple[tuple, TrialResult]] = []
    for key, g in group_trials(run, axes).items():
        ok = sorted((t for t in g.ok if any(_records(t, s) for s in POLICY_STAGES)),
                    key=lambda t: (t.seed if t.seed is not None else 1 << 30, t.trial_id))
        if ok:
            chosen.append((key, ok[0]))
    if not chosen:
        return None
    per_trial = {t.trial_id: {s: _records(t, s) for s in POLICY_STAGES} for _, t in chosen}
    ids = None
    for recs in per_trial.values():
        have = set().union(*(set(r) for r in recs.values() if r))
        ids = have if ids is None else ids & have
    ids = sorted(ids or (), key=lambda i: hashlib.sha256(i.encode("utf-8")).hexdigest())[:n_prompts]
    if not ids:
        return None
    seeds = sorted({t.seed for _, t in chosen if t.seed is not None})
    prompts = []
    for data_id in ids:
        first = next(per_trial[t.trial_id][s][data_id] for _, t in chosen for s in POLICY_STAGES
                     if data_id in per_trial[t.trial_id][s])
        rows = []
        for key, t in chosen:
            for stage in POLICY_STAGES:
                r = per_trial[t.trial_id][stage].get(data_id)
                if r is None:
                    continue
                score = r.get("reward")
                rows.append((key, stage_title(stage), r.get("generation"),
                             score if isinstance(score, (int, float)) else None, t.trial_id))
        prompts.append({"data_id": data_id, "prompt": first.get("prompt") or "", "reference": first.get("reference"),
                        "rows": rows})
    return SideBySide(axes, seeds, prompts)


def side_by_side(run: RunResults, n_prompts: int = N_PROMPTS) -> list[str]:
    """Markdown lines of the section (empty when no trial kept eval records)."""
    sbs = pick(run, n_prompts)
    if sbs is None:
        return []
    L = [INTRO.format(seeds=", ".join(map(str, sbs.seeds)))]
    for n, p in enumerate(sbs.prompts, 1):
        L += ["", f"### Prompt {n} (`{p['data_id']}`)", ""] + _quote(p["prompt"])
        L += ["", f"**Reference:** {_text(p['reference'])}", ""]
        L += ["| " + " | ".join([*sbs.axes, "stage", "answer", "RM score"]) + " |",
              "|" + "|".join(["---"] * (len(sbs.axes) + 3)) + "|"]
        for key, stage, answer, score, _ in p["rows"]:
            score_txt = f"{score:+.3f}" if score is not None else "—"
            L.append("| " + " | ".join([*(_text(fmt_value(v)) for v in key), stage, _text(answer), score_txt])
                     + " |")
    return L
