"""Which artifact a trial's stage is and which reward model scored it, read from result.json: what decides which
stages get a table (the swept axes change them) and whether raw RM units may be compared. Also the check that
averaged trials computed their metrics with the same settings (metric_meta)."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Optional

from rlhf_ablate.metrics.registry import METHODS, POLICY_STAGES, spec_for
from .results import RunResults, TrialResult


# What each stage is built from, as config-key prefixes: used only when result files carry no stage cache keys.
_STAGE_INPUTS = {"sft": ("model.", "data.", "sft.", "eval."), "rm": ("model.", "data.", "rm.", "sft."),
                 "base": ("model.", "data.", "eval.")}


def _inputs(stage: str) -> tuple[str, ...]:
    return _STAGE_INPUTS.get(stage, ("model.", "data.", "sft.", "rm.", "eval.", f"{stage}."))


def stage_id(t: TrialResult, stage: str) -> Optional[str]:
    """The trial's artifact of ``stage`` (its stage cache key), else a digest of the config it is built from."""
    timing = t.timings.get("eval_base" if stage == "base" else stage)
    if isinstance(timing, dict) and timing.get("key"):
        # A policy's answers also change with the eval settings (an eval.* axis), which its training key omits.
        evals = sorted((k, repr(v)) for k, v in t.config.items() if k.startswith("eval.")) if stage != "rm" else []
        return str(timing["key"]) + (hashlib.sha256(repr(evals).encode()).hexdigest()[:8] if evals else "")
    # No keys (hand-written results): the config keys the stage reads; a key outside every known namespace
    # (a tied axis name such as "lora_rank") may change anything.
    items = sorted((k, repr(v)) for k, v in t.config.items()
                   if k.startswith(_inputs(stage)) or ("." not in k and k not in ("seed", "method")))
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def rm_id(t: TrialResult) -> Optional[str]:
    return stage_id(t, "rm")


def stage_present(t: TrialResult, stage: str) -> bool:
    return any(k.startswith(stage + "/") for k in t.metrics)


def changed_stages(run: RunResults) -> set[str]:
    """Stages whose artifact differs between finished trials of one seed: the stages the swept axes change."""
    out: set[str] = set()
    by_seed: dict[Any, list[TrialResult]] = {}
    for t in run.ok_trials:
        by_seed.setdefault(t.seed, []).append(t)
    for stage in ("rm", *POLICY_STAGES):
        for trials in by_seed.values():
            have = [t for t in trials if stage_present(t, stage)]
            ids = {stage_id(t, stage) for t in have}
            # A method only some configurations ran (a method axis) also varies with the axes.
            if len(ids) > 1 or (stage in METHODS and have and len(have) < len(trials)):
                out.add(stage)
                break
    return out


def check_settings(run: RunResults, problems: list[str]) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Trials whose metric settings (ROUGE tokenizer, sacrebleu signature) differ from the rest are not averaged
    with them: per metric_meta key the most common setting is used, the others are left out and listed."""
    excluded: dict[str, set[str]] = {}
    used: dict[str, str] = {}
    keys = sorted({m.setting for m in map(spec_for, {n for t in run.ok_trials for n in t.metrics}) if m.setting})
    for key in keys:
        seen = Counter(str(t.metric_meta[key]) for t in run.ok_trials if t.metric_meta.get(key))
        if not seen:
            continue
        setting = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        used[key] = setting
        odd = [t for t in run.ok_trials if t.metric_meta.get(key) and str(t.metric_meta[key]) != setting]
        if not odd:
            continue
        names = sorted({n for t in odd for n in t.metrics if spec_for(n).setting == key})
        for n in names:
            excluded.setdefault(n, set()).update(t.trial_id for t in odd)
        problems.append(
            f"{len(odd)} trial(s) computed {', '.join(names)} with {key} = "
            f"{'; '.join(sorted({str(t.metric_meta[key]) for t in odd}))}, not {setting} like the other "
            f"{seen[setting]}: they are left out of those cells ({', '.join(t.trial_id for t in odd)}). Rerun "
            "them with the same eval settings to compare them.")
    return excluded, used
