"""docs/metrics.md, generated from the metric registry (rlhf_ablate/metrics/registry.py), so the page cannot drift
from what stages compute and tables test. tests/test_metrics.py checks that the committed page is up to date.

    python -m rlhf_ablate.metrics.docs > docs/metrics.md
"""

from __future__ import annotations

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
        "**Tests.** The seed is the unit of replication: a best value is compared with the runner-up by a paired t-test",
        "over the shared seeds of the per-seed difference of the trial's number (the very number the cells average),",
        "Holm-adjusted over the tested columns of a table. Fewer than two shared seeds: not tested, never bold. A metric",
        "in raw RM units is tested only between rows scored by the same reward model. `better: none` is never tested.",
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
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    print(render_metrics_doc(), end="")
