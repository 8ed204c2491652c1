"""What the analysis knows about each metric: label, direction, number format, tables, per-example source.

Modelled on lm-evaluation-harness, where every metric declares its aggregation and ``higher_is_better``: the
direction decides the arrow in a column header and which value can be bold. ``None`` means "no better direction"
(a raw score whose scale is arbitrary, a length, a correlation that should be near zero); such columns get no
arrow and no bold.

Names follow the one namespace of docs/architecture.md ("Metric names"). A metric that a result.json carries but this
registry does not know still appears in the "everything" tables, with its raw name and no direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

# Table kinds (which metric set a swept axis gets).
RM = "rm"        # LoRA rank: what the reward model learned
KL = "kl"        # PPO kl_coef: generation quality against the KL budget
DATA = "data"    # data version: SFT and PPO text metrics and RM metrics
ALL = "all"      # base model, method and any axis we have no special set for: everything present


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str
    higher_is_better: Optional[bool]
    fmt: str = ".3f"
    tables: frozenset = frozenset({ALL})
    # Where the paired test finds per-example values: ("ppo", "bleu") reads records.ppo[*]["bleu"];
    # ("rm", "<group metric>") computes one value per ranked group from records.rm (see rm_group_value).
    record: Optional[tuple[str, str]] = None
    note: str = ""

    @property
    def arrow(self) -> str:
        return {True: "↑", False: "↓", None: ""}[self.higher_is_better]

    @property
    def stage(self) -> str:
        return self.name.split("/", 1)[0] if "/" in self.name else ""


def _rm(name: str, label: str, hib: Optional[bool], tables: Iterable[str], group: Optional[str] = None,
        fmt: str = ".3f", note: str = "") -> MetricSpec:
    return MetricSpec(f"rm/{name}", label, hib, fmt, frozenset(tables) | {ALL},
                      ("rm", group) if group else None, note)


_REGISTRY: list[MetricSpec] = [
    # Reward model, on held-out ranked groups. chosen/rejected means are on the RM's own scale, which differs
    # between reward models, so they carry no direction; the margin and the rank agreement do.
    _rm("chosen_mean", "RM chosen mean", None, [RM]),
    _rm("rejected_mean", "RM rejected mean", None, [RM]),
    _rm("separation_margin", "RM separation margin", True, [RM, DATA], group="margin"),
    _rm("margin_std", "RM margin std", None, [RM]),
    _rm("pairwise_accuracy", "RM pairwise accuracy", True, [RM, DATA], group="accuracy"),
    _rm("prob_margin_gt_0", "RM P(margin>0)", True, [], group="accuracy"),
    _rm("prob_margin_gt_0.5", "RM P(margin>0.5)", True, [], group="margin_gt_0.5"),
    _rm("kendall_tau", "RM Kendall tau", True, [RM, DATA], group="kendall_tau"),
    _rm("spearman_rho", "RM Spearman rho", True, [], group="spearman_rho"),
    # Closer to zero is better (no length bias), which is neither "higher" nor "lower".
    _rm("length_corr", "RM length corr", None, [RM], note="reward vs answer length; near 0 = no length bias"),
]

_TEXT = [
    # (suffix, label, higher_is_better, fmt, record field)
    ("bleu", "BLEU", True, ".2f", "bleu"),
    ("rouge1", "ROUGE-1", True, ".3f", "rouge1"),
    ("rouge2", "ROUGE-2", True, ".3f", "rouge2"),
    ("rougeL", "ROUGE-L", True, ".3f", "rougeL"),
    ("chrf", "chrF", True, ".2f", "chrf"),
    ("reward_mean", "RM reward", True, ".3f", "reward"),
    # KL to the reference is the price paid for reward (Gao et al. 2022 plot reward against sqrt(KL)).
    ("kl_to_ref", "KL to ref", False, ".3f", "kl_to_ref"),
    ("response_len", "response len", None, ".1f", "response_len"),
]
for _stage in ("sft", "ppo", "dpo"):
    for _suffix, _label, _hib, _fmt, _field in _TEXT:
        _tables = {ALL}
        if _stage in ("ppo", "dpo") and _suffix in ("bleu", "rouge1", "rougeL", "chrf", "reward_mean", "kl_to_ref",
                                                    "response_len"):
            _tables.add(KL)
        if _suffix in ("bleu", "rouge1", "rougeL", "chrf") or (_stage != "sft" and _suffix == "reward_mean"):
            _tables.add(DATA)
        _REGISTRY.append(MetricSpec(f"{_stage}/{_suffix}", f"{_stage.upper()} {_label}", _hib, _fmt,
                                    frozenset(_tables), (_stage, _field)))

REGISTRY: dict[str, MetricSpec] = {m.name: m for m in _REGISTRY}
ORDER: dict[str, int] = {m.name: i for i, m in enumerate(_REGISTRY)}


def spec_for(name: str) -> MetricSpec:
    """The registered spec, or a neutral one (raw name, no direction) for a metric we do not know."""
    return REGISTRY.get(name) or MetricSpec(name, name, None, ".4g", frozenset({ALL}))


def table_kind(axis: str) -> str:
    """Which metric set a swept axis gets (the tables our users publish, see docs/architecture.md)."""
    a = axis.lower()
    if "kl_coef" in a or "kl_target" in a or "adaptive_kl" in a:
        return KL
    if "lora_rank" in a and not a.startswith("ppo.") and not a.startswith("dpo."):
        # LoRA rank of SFT/RM (or the tied axis over all stages): the RM table of chosen/rejected/margin/tau.
        return RM
    if a in ("ppo.lora_rank", "dpo.lora_rank"):
        return KL
    if a.startswith("data.version") or a == "data":
        return DATA
    return ALL


def metrics_for(kinds: Iterable[str], present: Iterable[str]) -> list[MetricSpec]:
    """Registered metrics of the given table kinds that appear in ``present``, in registry order; for ALL also
    every unknown metric present (sorted by name after the known ones)."""
    kinds = set(kinds)
    present = set(present)
    chosen = [m for m in _REGISTRY if m.name in present and m.tables & kinds]
    if ALL in kinds:
        chosen += [spec_for(n) for n in sorted(present - set(REGISTRY))]
    return chosen


# ---------------------------------------------------------------------------------------------------------
# One value per ranked group, for the paired test of RM metrics (records.rm, see docs/architecture.md).
# ---------------------------------------------------------------------------------------------------------
def _pair_margins(scores: Sequence[float], ranks: Sequence[int]) -> list[float]:
    """score(better) - score(worse) for every pair with different ranks (rank 1 = best), the pairs RankedGroup
    .pairs() yields."""
    out = []
    for i in range(len(scores)):
        for j in range(len(scores)):
            if ranks[i] < ranks[j]:
                out.append(float(scores[i]) - float(scores[j]))
    return out


def _tau(scores: Sequence[float], ranks: Sequence[int]) -> float:
    from scipy.stats import kendalltau

    # Rank 1 = best, so correlate scores with minus the ranks (docs/stack.md, "Korean text metrics").
    return float(kendalltau(scores, [-r for r in ranks]).statistic)


def _rho(scores: Sequence[float], ranks: Sequence[int]) -> float:
    from scipy.stats import spearmanr

    if len(scores) < 2 or len(set(scores)) < 2 or len(set(ranks)) < 2:
        return math.nan
    return float(spearmanr(scores, [-r for r in ranks]).statistic)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


_GROUP_FUNCS: dict[str, Callable[[Mapping], float]] = {
    "margin": lambda r: _mean(_pair_margins(r["scores"], r["ranks"])),
    "accuracy": lambda r: _mean([1.0 if m > 0 else 0.0 for m in _pair_margins(r["scores"], r["ranks"])]),
    "margin_gt_0.5": lambda r: _mean([1.0 if m > 0.5 else 0.0 for m in _pair_margins(r["scores"], r["ranks"])]),
    "kendall_tau": lambda r: (float(r["kendall_tau"]) if isinstance(r.get("kendall_tau"), (int, float))
                              else _tau(r["scores"], r["ranks"])),
    "spearman_rho": lambda r: _rho(r["scores"], r["ranks"]),
}


def rm_group_value(group_metric: str, rec: Mapping) -> float:
    """The per-group value of an RM metric (NaN when the group cannot give one, e.g. all ranks tied)."""
    try:
        v = _GROUP_FUNCS[group_metric](rec)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return math.nan
    return float(v) if v is not None else math.nan


# ---------------------------------------------------------------------------------------------------------
# The whole metric namespace, for validating the metric a sweep's search or scheduler names (config/sweep.py):
# the registered metrics above, PPO's per-step training stats (rlhf_ablate/ppo/loop.py, also in result.json
# history) and its final numbers, and the eval stages' end-of-sequence share (rlhf_ablate/stages/evaluate.py).
# ---------------------------------------------------------------------------------------------------------
PPO_STEP_METRICS = tuple(f"ppo/{k}" for k in (
    "objective/kl", "objective/entropy", "objective/scores", "objective/scores_normalized", "objective/rlhf_reward",
    "objective/kl_coef", "objective/eos_frac", "objective/response_len", "policy/clipfrac", "policy/approx_kl",
    "val/clipfrac", "loss/policy", "loss/value"))
_OTHER_METRICS = PPO_STEP_METRICS + (
    "sft/eos_frac", "ppo/eos_frac", "dpo/eos_frac", "sft/train_loss_first", "sft/train_loss_last",
    "dpo/train_loss_last", "rm/kendall_tau_ci_low", "rm/kendall_tau_ci_high", "rm/spearman_rho_ci_low",
    "rm/spearman_rho_ci_high")


def metric_names() -> list[str]:
    """Every metric name a trial reports (for "did you mean" suggestions)."""
    return list(REGISTRY) + [m for m in _OTHER_METRICS if m not in REGISTRY]


def known_metric(name: str) -> bool:
    return name in REGISTRY or name in _OTHER_METRICS
