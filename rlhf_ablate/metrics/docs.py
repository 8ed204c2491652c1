"""docs/metrics.md, generated from the metric registry (rlhf_ablate/metrics/registry.py), so the page cannot drift
from what stages compute and tables test. tests/test_metrics.py checks that the committed page is up to date.

    python -m analysis calibrate --sims 500 --power-sims 500 > analysis/calibration_measured.md   # minutes
    python -m rlhf_ablate.metrics.docs > docs/metrics.md
"""

from __future__ import annotations

from pathlib import Path

from .registry import (AUXILIARY_SUFFIXES, METHODS, POLICY_STAGES, REGISTRY, TRAINING_STAT_PREFIXES, MetricSpec,
                       stage_specs)

_DIRECTION = {True: "higher", False: "lower", None: "none"}


def _row(m: MetricSpec, name: str) -> str:
    setting = f"`{m.setting}`" if m.setting else "—"
    units = "raw: one RM only" if m.rm_scale else "scale-free" if m.source == "rm" else "—"
    return (f"| `{name}` | {m.label} | {_DIRECTION[m.higher_is_better]} | {m.scale} | {m.definition} | "
            f"{setting} | {units} | {'yes' if m.in_table else 'no'} |")


def render_metrics_doc() -> str:
    head = "| name | label | better | scale | definition | setting recorded | RM units | in table |"
    rule = "|---|---|---|---|---|---|---|---|"
    L = [
        "# Metrics",
        "",
        "Generated from `rlhf_ablate/metrics/registry.py` by `python -m rlhf_ablate.metrics.docs > docs/metrics.md`;",
        "`tests/test_metrics.py` fails when this page is out of date. Do not edit by hand.",
        "",
        "Every metric is computed once, as a reducer of per-unit sufficient statistics summed over the units: one",
        "held-out prompt for the eval metrics, one ranked answer group for the reward-model metrics. The sum over all",
        "units is the trial's number (what result.json, W&B and the table cells carry); the sum over a resample of units",
        "is a bootstrap replicate of the same statistic (corpus BLEU is resampled as corpus BLEU, as sacrebleu's paired",
        "bootstrap does).",
        "",
        "**Tests** (docs/architecture.md, \"Statistics in the tables\"). The seed is the unit of replication and the",
        "block. Each table has a primary metric (Kendall tau for the reward model, ROUGE-L for the SFT and aligned-policy",
        "eval tables; `analysis.primary` in a sweep file): its best value is compared with every other value on the",
        "trial's number (the very number the cells average), on the seeds every configuration finished, by t with the",
        "residual variance of configurations x seeds pooled over every configuration ((a-1)(s-1) df), each comparison",
        "at 5%; bold when it beats all of them. Other columns are exploratory: bold only after Holm over every test of",
        "the report. Unequal variances (Brown-Forsythe p < 0.1): per-pair paired t. Fewer than two complete seeds: not",
        "tested, never bold. A metric in raw RM units, or a win rate judged by each trial's own RM, is tested only",
        "between rows scored by the same reward model. `better: none` is never tested.",
        "",
        "**Discrete, bounded and tied metrics.** Accuracies and win rates on a small set often move every seed by the",
        "same amount, which gives a residual variance of zero. The variance is therefore never taken below the",
        "metric's own sampling variance: the leave-one-unit-out jackknife of the metric over its units (prompts, ranked",
        "groups, or judged prompts for a win rate), with each unit's deviation centred over the configurations of one",
        "seed so that what a prompt shares cancels. With no records to compute it from and no variance, nothing is",
        "claimed (p = 1, never 0). Exact sign-flip tests were not used: at 2 seeds their smallest p is 0.5.",
        "",
        "**Settings.** A metric with a recorded setting (ROUGE tokenizer, sacrebleu signature, in result.json",
        "`metric_meta`) is averaged only over trials with the same setting; the report lists the others under Problems.",
        "",
        "## Reward model (`rm/`, held-out ranked groups)",
        "",
        head, rule,
    ]
    L += [_row(m, m.name) for m in stage_specs("rm", table_only=False)]
    stages = ", ".join(f"`{s}/`" for s in POLICY_STAGES)
    L += ["", f"## Eval of each policy ({stages}; held-out prompts)", "",
          f"The same metrics for every policy stage: the base model, SFT and each method ({', '.join(METHODS)}). "
          "`<stage>/kl_to_ref` exists for the methods only (SFT is the reference).", "", head, rule]
    seen = set()
    for stage in ("ppo",):
        for m in stage_specs(stage, table_only=False):
            if m.suffix not in seen:
                seen.add(m.suffix)
                L.append(_row(m, f"<stage>/{m.suffix}"))
    L += ["", "## Other names a trial reports (not in the tables)", ""]
    for stage, names in AUXILIARY_SUFFIXES.items():
        L.append(f"- `{stage}/`: " + ", ".join(f"`{n}`" for n in names))
    L.append(f"- per-step training stats of a method (`{METHODS[0]}/objective/scores`, ...): names starting with "
             + ", ".join(f"`{p}`" for p in TRAINING_STAT_PREFIXES))
    L.append("")
    L.append(f"{len(REGISTRY)} registered metrics.")
    measured = _calibration_section()
    if measured:
        L += ["", measured.rstrip("\n")]
    return "\n".join(L) + "\n"


# The measured calibration and power of the bold marks (issue 18): minutes of simulation, so it is generated by
# `python -m analysis calibrate > analysis/calibration_measured.md` and included here as it stands.
CALIBRATION = Path(__file__).resolve().parents[2] / "analysis" / "calibration_measured.md"


def _calibration_section() -> str:
    return CALIBRATION.read_text(encoding="utf-8") if CALIBRATION.is_file() else ""


if __name__ == "__main__":
    print(render_metrics_doc(), end="")
