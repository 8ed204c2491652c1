"""The one definition of every metric: how it is computed, which way is better, how it prints, its scale, the
tokenizer or signature it depends on, and the statistic its test compares. Stages, tables, tests and
docs/metrics.md all read it, so a cell and its test cannot disagree (issue 10).

Modelled on lm-evaluation-harness, where every metric declares its aggregation and ``higher_is_better``.

How a value is computed: each metric is a *reducer* of per-unit sufficient statistics summed over units. A unit is
one held-out prompt for the eval metrics (``records.<stage>`` of result.json) and one ranked group for the RM
metrics (``records.rm``). The sum over all units gives the trial's value (what the stage writes to result.json and
the cell shows); the sum over a resample of units gives a bootstrap replicate of the same statistic. So corpus
BLEU is resampled as corpus BLEU (sacrebleu's paired bootstrap does the same), and RM accuracy counts a tie as 1/2
pair-weighted everywhere.

Names follow the one namespace of docs/architecture.md ("Metric names"). Eval metrics exist once per policy stage
in :data:`POLICY_STAGES`. The alignment methods are registered with :func:`register_method`, which the stage graph
(rlhf_ablate/run/graph.py) calls once per method: this module owns the metric specs, the graph owns the method list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .reward import RM_REDUCERS, rm_unit_stats
from .text import bleu_from_stats, chrf_from_stats

# Alignment methods after SFT, in the order tables show them, filled by register_method (called by
# rlhf_ablate/run/graph.py for each method it declares). Lists that grow in place, so importers see every method.
METHODS: list[str] = []
# Every policy whose answers to the held-out prompts are evaluated: the base model, SFT, then each method.
POLICY_STAGES: list[str] = ["base", "sft"]
STAGE_TITLES = {"rm": "reward model", "base": "base model", "sft": "SFT"}


def stage_title(stage: str) -> str:
    return STAGE_TITLES.get(stage, stage.upper())


@dataclass(frozen=True)
class MetricSpec:
    name: str                          # "ppo/bleu"
    label: str                         # column header without the stage: "BLEU"
    higher_is_better: Optional[bool]   # None: no better direction (no arrow, never bold)
    fmt: str = ".3f"
    scale: str = ""                    # "0-100", "0-1", "RM score units", ...
    definition: str = ""               # one or two sentences, shown in docs/metrics.md and the table legends
    source: Optional[str] = None       # "rm" or "eval": which records compute it; None: only the trial's number
    reduce: Optional[Callable[[np.ndarray], float]] = None   # summed unit statistics -> value
    setting: Optional[str] = None      # metric_meta key that must agree across averaged trials
    rm_scale: bool = False             # in the reward model's own units: comparable only under one RM
    in_table: bool = True

    @property
    def arrow(self) -> str:
        return {True: "↑", False: "↓", None: ""}[self.higher_is_better]

    @property
    def stage(self) -> str:
        return self.name.split("/", 1)[0] if "/" in self.name else ""

    @property
    def suffix(self) -> str:
        return self.name.split("/", 1)[1] if "/" in self.name else self.name

    @property
    def tested(self) -> bool:
        return self.higher_is_better is not None

    @property
    def test_statistic(self) -> str:
        """What the significance test of this metric compares (docs/metrics.md, table legends)."""
        if not self.tested:
            return "not tested (no better direction)"
        what = f"the per-seed difference of the trial's {self.label}"
        if self.source is not None:
            what += " (the same reducer over the same records as the cell)"
        if self.rm_scale:
            what += "; only between rows scored by the same reward model (raw RM units)"
        return "best vs every other value, seeds as blocks (pooled residual variance), of " + what


# ---------------------------------------------------------------------------------------------------------
# Eval metrics: per-prompt statistics from records.<stage>
# ---------------------------------------------------------------------------------------------------------
_BLEU_N, _CHRF_N = 10, 18   # sacrebleu's per-sentence statistics: BLEU [sys, ref, correct_1..4, total_1..4]; chrF2
EVAL_COLUMNS = ("n", "rouge1", "rouge2", "rougeL", "reward", "kl_to_ref", "response_len", "has_eos",
                *(f"bleu_{i}" for i in range(_BLEU_N)), *(f"chrf_{i}" for i in range(_CHRF_N)))
_E = {c: i for i, c in enumerate(EVAL_COLUMNS)}
_BLEU0, _CHRF0 = _E["bleu_0"], _E["chrf_0"]


def _num(x) -> float:
    """A record field as a float (has_eos is a bool); anything else, or a missing field, is NaN."""
    return float(x) if isinstance(x, (int, float)) else math.nan


def eval_unit_stats(records: Sequence[Mapping]) -> np.ndarray:
    """(prompts x len(EVAL_COLUMNS)): one row per eval record; a field the record lacks is NaN, so a metric
    that needs it is NaN rather than a made-up number (old result files have no BLEU statistics)."""
    out = np.full((len(records), len(EVAL_COLUMNS)), math.nan)
    for i, r in enumerate(records):
        out[i, _E["n"]] = 1.0
        for c in ("rouge1", "rouge2", "rougeL", "reward", "kl_to_ref", "response_len", "has_eos"):
            out[i, _E[c]] = _num(r.get(c))
        for key, start, n in (("bleu_stats", _BLEU0, _BLEU_N), ("chrf_stats", _CHRF0, _CHRF_N)):
            v = r.get(key)
            if isinstance(v, list) and len(v) == n:
                out[i, start:start + n] = [_num(x) for x in v]
    return out


def _mean_of(col: str) -> Callable[[np.ndarray], float]:
    """Mean of a per-prompt field. Works on one summed vector and, row-wise, on a (resamples x columns) matrix,
    so a bootstrap can reduce every resample at once."""
    j, n = _E[col], _E["n"]

    def reduce(v: np.ndarray):
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(v[..., n] > 0, v[..., j] / np.where(v[..., n] > 0, v[..., n], 1.0), math.nan)
        return float(out) if np.ndim(out) == 0 else out
    reduce.vectorized = True  # type: ignore[attr-defined]
    return reduce


def _from_stats(fn, start: int, n: int) -> Callable[[np.ndarray], float]:
    def reduce(v: np.ndarray) -> float:
        s = v[start:start + n]
        return fn(s) if np.isfinite(s).all() and v[_E["n"]] > 0 else math.nan
    return reduce


_ROUGE_DEF = ("F1 of {what} with the reference, per prompt (sentence-level; rouge_score with a Korean tokenizer), "
              "averaged over prompts.")
# suffix, label, higher_is_better, fmt, scale, definition, reduce, setting, rm_scale, methods only
_EVAL = [
    ("rouge1", "ROUGE-1", True, ".3f", "0-1", _ROUGE_DEF.format(what="unigram overlap"),
     _mean_of("rouge1"), "rouge_tokenizer", False, False),
    ("rouge2", "ROUGE-2", True, ".3f", "0-1", _ROUGE_DEF.format(what="bigram overlap"),
     _mean_of("rouge2"), "rouge_tokenizer", False, False),
    ("rougeL", "ROUGE-L", True, ".3f", "0-1", _ROUGE_DEF.format(what="the longest common subsequence"),
     _mean_of("rougeL"), "rouge_tokenizer", False, False),
    ("bleu", "BLEU", True, ".2f", "0-100",
     "Corpus BLEU (sacrebleu, 4-grams, exp smoothing) over all prompts: n-gram counts are summed over prompts "
     "before the precisions are taken, so it is not a mean of sentence BLEU.",
     _from_stats(bleu_from_stats, _BLEU0, _BLEU_N), "bleu_signature", False, False),
    ("chrf", "chrF", True, ".2f", "0-100",
     "Corpus chrF2 (sacrebleu, character 6-grams, whitespace ignored), statistics summed over prompts.",
     _from_stats(chrf_from_stats, _CHRF0, _CHRF_N), "chrf_signature", False, False),
    ("reward_mean", "RM reward", True, ".3f", "RM score units",
     "Mean score that the trial's reward model gives the greedy answers. Raw RM units: comparable only between "
     "rows scored by the same reward model.", _mean_of("reward"), None, True, False),
    ("kl_to_ref", "KL to ref", False, ".3f", "nats per answer",
     "KL(policy || SFT reference) summed over the tokens of one sampled (temperature 1) answer per prompt, "
     "averaged over prompts; the price paid for reward (Gao et al. 2022).", _mean_of("kl_to_ref"), None, False,
     True),
    ("response_len", "length", None, ".1f", "tokens", "Mean greedy answer length in tokens of the policy's "
     "tokenizer.", _mean_of("response_len"), None, False, False),
    ("eos_frac", "EOS", None, ".2f", "0-1", "Fraction of greedy answers that ended with EOS within the length "
     "cap.", _mean_of("has_eos"), None, False, False),
]

# ---------------------------------------------------------------------------------------------------------
# Reward-model metrics: per-group statistics from records.rm (rlhf_ablate/metrics/reward.py)
# ---------------------------------------------------------------------------------------------------------
# suffix, label, higher_is_better, fmt, scale, definition, rm_scale, in_table
_RM = [
    ("chosen_mean", "chosen mean", None, ".3f", "RM score units",
     "Mean score of the better answer over every (better, worse) pair of the held-out ranked groups.", True, True),
    ("rejected_mean", "rejected mean", None, ".3f", "RM score units",
     "Mean score of the worse answer over the same pairs.", True, True),
    ("separation_margin", "margin", True, ".3f", "RM score units",
     "chosen mean - rejected mean (mean pair margin). Raw RM units: each RM has its own scale, so it is tested "
     "only between rows that share one reward model.", True, True),
    ("margin_standardized", "std. margin", True, ".3f", "standard deviations",
     "Mean pair margin divided by the pooled within-prompt standard deviation of the scores: unchanged by "
     "rescaling an RM's scores, so it compares reward models.", False, True),
    ("margin_length_corrected", "len-corr. margin", True, ".3f", "RM score units",
     "Mean pair margin after removing the within-prompt linear effect of answer length (one least-squares slope "
     "of score on length, prompt means removed). Raw RM units.", True, True),
    ("pairwise_accuracy", "accuracy", True, ".3f", "0-1",
     "Fraction of (better, worse) pairs the RM orders correctly, pair-weighted; a tie (equal scores) counts 1/2.",
     False, True),
    ("prob_margin_gt_0", "P(margin>0)", True, ".3f", "0-1", "Fraction of pairs with margin strictly above 0 "
     "(a tie counts 0).", False, False),
    ("prob_margin_gt_0.5", "P(margin>0.5)", True, ".3f", "0-1", "Fraction of pairs with margin above 0.5 RM "
     "units (depends on the RM's scale).", True, False),
    ("margin_std", "margin std", None, ".3f", "RM score units", "Population standard deviation of the pair "
     "margins.", True, False),
    ("kendall_tau", "Kendall tau", True, ".3f", "-1..1",
     "Kendall tau-b of the scores against the human ranking inside each prompt, macro-averaged over prompts "
     "where it is defined.", False, True),
    ("spearman_rho", "Spearman rho", True, ".3f", "-1..1",
     "Spearman rho of the scores against the human ranking inside each prompt, macro-averaged.", False, False),
    ("length_bias", "length bias", None, ".3f", "-1..1",
     "Spearman correlation of score and answer length (NFC characters) inside each prompt, macro-averaged over "
     "prompts: > 0 means the RM prefers the longer answer to the same prompt. Within-prompt, so a constant per "
     "prompt changes nothing. Near 0 is best, so it has no arrow.", False, True),
]

_REGISTRY: list[MetricSpec] = []   # every spec in registration order (the order of table columns)
REGISTRY: dict[str, MetricSpec] = {}
ORDER: dict[str, int] = {}

# The compare stage (rlhf_ablate/stages/compare.py): one number per trial, so tested over seeds like any cell.
_JUDGE_DEF = ("Win rate (wins + ties / 2) / n of the policy's greedy eval answers against {who}'s, prompt by prompt, "
              "judged as eval.judge says (default: the trial's own RM, which favours the policy it trained; "
              "metric_meta.compare says which judge). Wilson 95% bounds in _ci_low/_ci_high.")

# Names a trial reports that are not table metrics: confidence bounds, counts, training losses (docs/architecture.md,
# "Metric names"). Known, so config checks accept them; not shown in the tables. Methods add theirs on registration.
AUXILIARY_SUFFIXES: dict[str, tuple[str, ...]] = {
    "rm": ("kendall_tau_ci_low", "kendall_tau_ci_high", "kendall_tau_dropped", "spearman_rho_ci_low",
           "spearman_rho_ci_high", "spearman_rho_dropped", "length_bias_dropped", "n_groups", "n_pairs",
           "n_answers", "train_pairs"),
    "sft": ("train_loss_first", "train_loss_last", "train_examples"),
    # The gold RM of ppo.gold=rm_gold, on the RM eval groups (rlhf_ablate/stages/rm.py: train_gold_rm).
    "rm_gold": ("pairwise_accuracy", "kendall_tau", "separation_margin", "train_pairs"),
}
# What the compare stage reports for every method beside its win rates.
_COMPARE_AUX = (tuple(f"{x}_vs_{o}" for o in ("sft", "base") for x in ("judge_win", "judge_tie", "judge_loss", "judge_n"))
                + tuple(f"winrate_vs_{o}_ci_{b}" for o in ("sft", "base") for b in ("low", "high")))
# Per-step training stats of a method (PPO's rlhf_ablate/ppo/loop.py), named exactly: a misspelled scheduler metric
# must not pass. Filled by register_method.
STEP_METRICS: list[str] = []
TRAINING_STAT_PREFIXES = ("objective/", "policy/", "val/", "loss/", "time/", "time_", "lr", "train_", "steps")


def _policy_specs(stage: str, method: bool) -> list[MetricSpec]:
    """The eval metrics of one policy stage, and for a method its compare-stage win rates; embedding similarity."""
    out = [MetricSpec(f"{stage}/{suffix}", label, hib, fmt, scale, d, "eval", reduce, setting, raw)
           for suffix, label, hib, fmt, scale, d, reduce, setting, raw, methods_only in _EVAL
           if method or not methods_only]  # SFT is its own reference (KL 0); the base model has none
    if method:
        out += [MetricSpec(f"{stage}/winrate_vs_{o}", f"win vs {o.upper() if o == 'sft' else o}", True, ".3f", "0-1",
                           _JUDGE_DEF.format(who=who)) for o, who in (("sft", "the SFT model"), ("base", "the base model"))]
    out += [MetricSpec(f"{stage}/emb_{n}", f"emb. {n}", hib, ".3f", "", f"Mean {what} of each greedy answer's "
                       f"mean-pooled embedding (eval.embedding_model) to its reference's.", in_table=True)
            for n, hib, what in (("cosine", True, "cosine similarity"), ("euclidean", False, "Euclidean distance"),
                                 ("pearson", True, "Pearson correlation"))]
    return out


def _add(specs: Sequence[MetricSpec]) -> None:
    for m in specs:
        _REGISTRY.append(m)
        REGISTRY[m.name] = m
        ORDER[m.name] = len(ORDER)


def register_method(name: str, title: str, *, auxiliary: Sequence[str] = (), step_metrics: Sequence[str] = ()) -> None:
    """Declare an alignment method's metrics: its eval metrics and win rates (``<name>/rougeL``, ...), the auxiliary
    numbers its training stage writes (``auxiliary``: suffixes) and its per-step stats (``step_metrics``: suffixes,
    reported as ``<name>/<suffix>``). Called by the stage graph (rlhf_ablate/run/graph.py), once per method."""
    if name in METHODS or name in ("rm", "base", "sft"):
        raise ValueError(f"metric registry: method {name!r} is registered already")
    METHODS.append(name)
    POLICY_STAGES.append(name)
    STAGE_TITLES[name] = title
    _add(_policy_specs(name, method=True))
    AUXILIARY_SUFFIXES[name] = _COMPARE_AUX + tuple(auxiliary)
    STEP_METRICS.extend(f"{name}/{k}" for k in step_metrics)


_add([MetricSpec(f"rm/{suffix}", label, hib, fmt, scale, definition, "rm", RM_REDUCERS[suffix], None, raw, table)
      for suffix, label, hib, fmt, scale, definition, raw, table in _RM])
for _stage in POLICY_STAGES:
    _add(_policy_specs(_stage, method=False))

# The built-in methods' metrics. Their stages are declared in rlhf_ablate/run/graph.py, which refuses to start if
# the two disagree; a method added from outside registers its metrics through the graph (graph.register_method).
# PPO's per-step stats (rlhf_ablate/ppo/loop.py) are named exactly, so that a misspelled scheduler metric is refused.
PPO_STEP_SUFFIXES = (
    "episodes", "lr", "objective/kl", "objective/entropy", "objective/scores", "objective/scores_normalized",
    "objective/non_score_reward", "objective/rlhf_reward", "objective/kl_coef", "objective/eos_frac",
    "objective/stopped_frac", "objective/empty_frac", "objective/response_len", "policy/clipfrac",
    "policy/approx_kl", "val/clipfrac", "val/ratio", "val/ratio_var", "loss/policy", "loss/value", "grad_norm",
    "time/generate", "time/score", "time/update",
    # The probe set, every ppo.gold_every steps (rlhf_ablate/ppo/overopt.py; docs/metrics.md, "Over-optimization").
    "gold/score", "gold/score_se", "gold/proxy", "gold/spearman", "gold/kendall", "gold/kl", "gold/response_len",
    "gold/overoptimized")
# What PPO's stage writes about the alarm (rlhf_ablate/ppo/loop.py: overoptimization.json).
PPO_OVEROPT_AUX = ("overopt_onset_step", "overopt_peak_step", "overopt_stopped", "gold_score_first", "gold_score_peak",
                   "gold_score_last")
_ONLINE_AUX = ("train_reward_first", "train_reward_last", "train_prompts")
register_method("ppo", "PPO", auxiliary=("steps", "time_generate", "time_score", "time_update", *PPO_OVEROPT_AUX),
                step_metrics=PPO_STEP_SUFFIXES)
register_method("dpo", "DPO", auxiliary=("train_loss_last", "train_pairs"))
register_method("grpo", "GRPO", auxiliary=_ONLINE_AUX)
register_method("rloo", "RLOO", auxiliary=_ONLINE_AUX)
BUILTIN_METHODS = tuple(METHODS)


def spec_for(name: str) -> MetricSpec:
    """The registered spec, or a neutral one (raw name, no direction) for a metric we do not know."""
    return REGISTRY.get(name) or MetricSpec(name, name, None, ".4g", definition="not in the metric registry")


def known_metric(name: str) -> bool:
    """True for every name a trial can report: registered metrics, their auxiliary numbers, and the per-step
    training stats of an alignment method (``ppo/objective/scores``). For config checks ("did you mean")."""
    if name in REGISTRY:
        return True
    stage, _, rest = name.partition("/")
    if rest in AUXILIARY_SUFFIXES.get(stage, ()):
        return True
    # Per-step stats are named exactly (a misspelled scheduler metric must not pass); timings and counters by prefix.
    return name in STEP_METRICS or (stage in METHODS and rest.startswith(("time/", "time_", "lr", "train_",
                                                                           "steps")))


def all_metric_names() -> list[str]:
    """Every registered metric name, the auxiliary ones and PPO's per-step stats (for "did you mean")."""
    return list(dict.fromkeys(list(REGISTRY) + [f"{s}/{x}" for s, xs in AUXILIARY_SUFFIXES.items() for x in xs]
                              + STEP_METRICS))


def stage_specs(stage: str, *, table_only: bool = True) -> list[MetricSpec]:
    """The stage's metrics in registry order (the columns of its table)."""
    return [m for m in _REGISTRY if m.stage == stage and (m.in_table or not table_only)]


def unit_stats(source: str, records: Sequence[Mapping]) -> np.ndarray:
    """Per-unit sufficient statistics of ``records.rm`` (source "rm") or of an eval stage's records ("eval")."""
    if source == "rm":
        return rm_unit_stats(records)
    if source == "eval":
        return eval_unit_stats(records)
    raise ValueError(f"unknown metric source {source!r}")


def reduce_units(spec: MetricSpec, stats: np.ndarray) -> float:
    """The metric over the units (rows) of ``stats``: the reducer of their column sums."""
    if spec.reduce is None or len(stats) == 0:
        return math.nan
    v = spec.reduce(stats.sum(axis=0))
    return float(v) if v is not None else math.nan


def compute_stage_metrics(stage: str, records: Sequence[Mapping]) -> dict[str, float]:
    """Every registered metric of ``stage`` from its records: what the eval stage writes to metrics.json."""
    specs = [m for m in _REGISTRY if m.stage == stage and m.source is not None]
    if not specs or not records:
        return {}
    stats = unit_stats(specs[0].source, records)
    return {m.name: reduce_units(m, stats) for m in specs}

