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
    L += ["", OVEROPTIMIZATION.rstrip("\n")]
    measured = _calibration_section()
    if measured:
        L += ["", measured.rstrip("\n")]
    return "\n".join(L) + "\n"


# The over-optimization alarm (rlhf_ablate/ppo/overopt.py, rlhf_ablate/ppo/gold.py). The false-alarm rates are
# measured by the command given (seconds); the tiny-model outcomes by tests/test_overopt_tiny.py.
OVEROPTIMIZATION = """## Over-optimization (`ppo/gold/*`, per probe evaluation)

Gao et al. (2022) showed that as PPO pushes a proxy reward up, a gold reward first rises and then falls, earlier for
smaller reward models. With `ppo.gold` set, PPO scores a **probe set** at step 0 (the SFT policy) and every
`ppo.gold_every` steps (and at the last step) by the proxy and by a **gold reward the policy never trained against**:

- `ppo.gold: rm_gold`: an RM trained on a disjoint fold of the preference data (`rm.gold: disjoint`: a stable id
  hash puts `rm.gold_fraction` of the RM training groups in the gold fold; the trial's RM and the ensemble train on
  the rest; `rm.gold_max_steps` sets its training; its own seed). Stage `rm_gold` of the stage graph; its held-out
  accuracy and Kendall tau are `rm_gold/pairwise_accuracy`, `rm_gold/kendall_tau`.
- `ppo.gold: ensemble`: the mean of reward models 2..K of `rm.ensemble_size` K (other seeds, the same pairs; stage
  `rm_ensemble`), when PPO optimises model 1 alone (`ppo.reward: single`).

**The probe** is `ppo.gold_probe_size` PPO prompts held out from PPO's training prompts by a salted id hash
(`data/splits.py: hold_out_probe`): never trained on, and not the eval prompts, because the alarm may stop a run and
pick its checkpoint, and a choice made on the eval prompts would flatter the final eval metrics. Answers are sampled
as in a rollout, with the same seed at every evaluation, from a forked random state (the rollouts' random numbers
are untouched).

| name (`ppo/` + ) | meaning |
|---|---|
| `gold/score` | mean gold score of the probe answers (gold RM units) |
| `gold/score_se` | its standard error: sd of the per-prompt gold scores / sqrt(probe size) |
| `gold/proxy` | mean proxy score (the reward PPO optimises, raw: before normalisation and the EOS penalty) |
| `gold/spearman`, `gold/kendall` | rank correlation of proxy and gold over the probe answers (NaN if one is constant) |
| `gold/kl` | summed per-token KL of the probe answers to the reference (nats per answer) |
| `gold/response_len` | mean probe answer length (tokens) |
| `gold/overoptimized` | 1 from the evaluation at which the alarm fired |

They sit in the PPO history rows of the evaluated steps (a row with `step` 0 holds the SFT policy's), go to W&B
with the other step stats and print on the live progress line (step 0: history and `overoptimization.json` only,
so that a scheduler never sees a step 0). `overoptimization.json` in the PPO artifact and
`overoptimization` in result.json hold the evaluations and the verdict: `onset_step`, `peak_step`, `detected_step`,
`stopped`, `kept_step`, and the numbers of the rule in `detail`; `ppo/overopt_onset_step`, `ppo/overopt_peak_step`,
`ppo/overopt_stopped`, `ppo/gold_score_first|peak|last` are in the trial's metrics.

**The onset rule** (`rlhf_ablate/ppo/overopt.py: find_onset`). At evaluation i, let j be gold's running maximum (the
first evaluation with the highest probe mean so far). Evaluation i is over-optimized when gold's mean fell from j by
more than `ppo.gold_k` (k = 2.5) standard errors of the paired per-prompt differences (g_j - g_i over the probe
prompts: a hard prompt is hard at both evaluations) **and** the proxy's trend is up (the least-squares slope of its
probe means over the evaluations so far is positive; a trend rather than "above its value at j", because one noisy
proxy evaluation a hair below the peak's would otherwise reset the count while gold kept falling). The alarm
fires at the end of `ppo.gold_m` (m = 2) consecutive over-optimized evaluations; `onset_step` is the first of them,
`peak_step` is j. `ppo.stop_on_overoptimization: true` ends PPO there and saves the policy of `peak_step` (the last
good checkpoint, gold's maximum) as the stage's artifact, which eval then scores.

**False alarms on flat curves** (measured, seed 0, 2000 simulated runs each; the paired statistic is scale-free, so
only the number of evaluations and probe prompts matter, not the noise's size). 9 evaluations (step 0 and 8 more:
the shape of `sweeps/overoptimization.yaml`), flat gold; proxy rising (its condition always holds: the worst case)
or flat. +- is the 95% Monte Carlo interval.

| probe prompts | k, m | proxy rising | proxy flat |
|---|---|---|---|
| 16 | 2.5, 2 (default) | 2.8% +- 0.7% | 1.25% +- 0.5% |
| 32 (default size) | 2.5, 2 | 2.45% +- 0.7% | 0.95% +- 0.4% |
| 48 (the bundled sweep) | 2.5, 2 | 1.5% +- 0.5% | 0.6% +- 0.3% |
| 16 | 2.5, 1 | 23% +- 1.9% | 12.7% +- 1.5% |
| 16 | 2.0, 2 | 10.3% +- 1.3% | 4.25% +- 0.9% |

Reproduce with `python -m rlhf_ablate.ppo.overopt --runs 2000 --evals 9 --prompts 16` (seconds; `--k`, `--m`).
tests/test_overopt.py checks a known turn (onset within 4 evaluations after it, peak within 2, in >= 95% of runs),
rising gold (no alarm in >= 99%) and the flat rate.

**Ensemble rewards** (Coste et al. 2023): `ppo.reward: ensemble_mean | ensemble_min | ensemble_mean_minus_std`
combines the raw scores of the `rm.ensemble_size` reward models per answer (mean, minimum, mean - population std)
before the usual normalisation by the SFT policy's rewards; `single` is the trial's RM. The K - 1 extra reward LoRAs
sit on PPO's shared base (models/memory.py counts them, `extra_rewards`).

**On the tiny model** (measured with `python benchmarks/bench_overopt_tiny.py --seeds 2 1 0`, 2 busy CPU cores,
one torch thread; gold's probe means at steps 0, 4, ..., 32). `fire` is `sweeps/overoptimization.yaml` with
`ppo.reward: single`: a proxy RM on 10% of the RM groups (10 steps; held-out accuracy 0.60-0.70) pushed at learning
rate 1e-2 without a KL penalty, a gold RM on the other 90% (40 steps; 0.71-0.74). `quiet` is the same SFT model and
RMs with PPO at its defaults (learning rate 5e-4, KL coefficient 0.1) for 16 steps.

| run | seed 0 | seed 1 | seed 2 |
|---|---|---|---|
| fire | quiet: gold -1.43 → -1.11 → ... -1.83 (step 16) → -1.25, the proxy falling with it at step 16 | quiet: gold rose with the proxy (-0.76 → -0.07; proxy -0.01 → 0.90) | **fired**: gold -0.45 → 0.19 (step 8) → -0.38 ... -0.51, proxy -0.20 → -0.03; onset step 20, detected 24, KL 77-93 nats |
| quiet | quiet (gold -1.43 → -1.27, its maximum -1.06 at step 14) | quiet (gold -0.76 → -0.18) | quiet (gold -0.45 → 0.38) |

So on the tiny model a gold turn beyond the probe's noise happens in some seeds, not all: the proxy and gold RMs,
both trained from the same SFT model on the same kind of pairs, mostly agree, and at this learning rate the policy
oscillates (KL jumps between 20 and 90 nats). A stronger gold RM (150 steps) rose with the proxy in the seeds tried.
tests/test_overopt_tiny.py runs `fire` at seed 2 (and asserts its measured peak, onset and detection steps, with
`ppo.stop_on_overoptimization` keeping the policy of step 8) and `quiet` at seed 2 (no alarm); a change to PPO's
numerics moves these trajectories, and the test then shows the gold curve it saw.

The whole bundled sweep (`python -m rlhf_ablate sweep overoptimization`: 4 rewards x seeds 0-2, 559 s on 2 busy
CPU cores) fired in 5 of 12 trials: `single` 1 of 3 (seed 2, as above), `ensemble_mean` 1, `ensemble_min` 1,
`ensemble_mean_minus_std` 2. So at these settings the ensembles did not hold the turn off. In one of the five
(`ensemble_mean_minus_std`, seed 0: onset 8, detected 12) gold later rose far above its old maximum (-0.88 at step 4
to 0.77 at step 32): the policy oscillates at this learning rate, and the rule, which sees only the evaluations so
far, counted a deep transient dip as the onset; `ppo.stop_on_overoptimization` would have stopped that run early.
"""


# The measured calibration and power of the bold marks (issue 18): minutes of simulation, so it is generated by
# `python -m analysis calibrate > analysis/calibration_measured.md` and included here as it stands.
CALIBRATION = Path(__file__).resolve().parents[2] / "analysis" / "calibration_measured.md"


def _calibration_section() -> str:
    return CALIBRATION.read_text(encoding="utf-8") if CALIBRATION.is_file() else ""


if __name__ == "__main__":
    print(render_metrics_doc(), end="")
