"""The objects of the comparison tables: trials grouped by their swept axes (one group per configuration, its
seed replicates), the metric context, and the cells, comparisons and tables that analysis/tables.py builds,
analysis/verdicts.py tests and analysis/render.py and analysis/html.py print."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import numpy as np

from rlhf_ablate.metrics.registry import POLICY_STAGES, MetricSpec, unit_stats
from .results import RunResults, TrialResult
from .settings import AnalysisSettings
from .stats import BestTest, PairedTest, Summary


BEST, TIE, NOT_TESTED = "best", "tie", "not_tested"
ALL_VALUES = "all"   # the axis value of a collapsed reference row


# ---------------------------------------------------------------------------------------------------------
# Groups and metric settings
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Trials that share every axis value: the seed replicates of one configuration."""
    key: tuple
    ok: list[TrialResult] = field(default_factory=list)
    failed: list[TrialResult] = field(default_factory=list)
    stopped: list[TrialResult] = field(default_factory=list)

    def by_seed(self) -> dict[Hashable, TrialResult]:
        out: dict[Hashable, TrialResult] = {}
        for t in sorted(self.ok, key=lambda t: t.trial_id):
            if t.seed is not None and t.seed not in out:
                out[t.seed] = t
        return out


@dataclass
class Context:
    run: RunResults
    axes: list[str]
    groups: dict[tuple, Group]
    excluded: dict[str, set[str]] = field(default_factory=dict)   # metric -> trial ids left out (settings)
    settings: dict[str, str] = field(default_factory=dict)        # metric_meta key -> the setting used
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    _units: dict = field(default_factory=dict)   # (trial id, records key) -> unit statistics, computed once

    def units(self, t: TrialResult, key: str, source: str) -> Optional[tuple[dict, np.ndarray]]:
        """(data_id -> row, unit statistics) of a trial's records (None when it has none usable)."""
        ck = (t.trial_id, key)
        if ck not in self._units:
            recs = t.records.get(key)
            out = None
            if isinstance(recs, list):
                recs = [r for r in recs if isinstance(r, dict)]
                try:
                    out = ({str(r.get("data_id")): i for i, r in enumerate(recs)}, unit_stats(source, recs))
                except Exception:  # noqa: BLE001 - malformed records: no floor (the pooled residuals still hold)
                    out = None
            self._units[ck] = out
        return self._units[ck]

    def values(self, g: Group, spec: MetricSpec) -> dict[Hashable, float]:
        """seed -> the trial's value of the metric (what the cell averages and the test pairs)."""
        skip = self.excluded.get(spec.name, set())
        return {s: t.metrics[spec.name] for s, t in g.by_seed().items()
                if spec.name in t.metrics and t.trial_id not in skip}

    def all_values(self, g: Group, spec: MetricSpec) -> list[float]:
        skip = self.excluded.get(spec.name, set())
        return [t.metrics[spec.name] for t in g.ok if spec.name in t.metrics and t.trial_id not in skip]


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (2, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def fmt_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def group_trials(run: RunResults, axes: list[str]) -> dict[tuple, Group]:
    groups: dict[tuple, Group] = {}
    for t in run.trials:
        key = tuple(t.axes.get(a) for a in axes)
        g = groups.setdefault(key, Group(key))
        {"ok": g.ok, "stopped": g.stopped}.get(t.status, g.failed).append(t)
    return dict(sorted(groups.items(), key=lambda kv: tuple(_sort_key(v) for v in kv[0])))


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
ALIGNED = "aligned"   # the pseudo-stage of a table that puts several alignment methods side by side


@dataclass
class Cell:
    summary: Summary
    spec: MetricSpec
    present: bool          # at least one finished trial of the group carries the metric
    mark: str = ""         # BEST | TIE | NOT_TESTED | ""
    test_n: Optional[int] = None   # seeds the column's test used, when fewer than the cell averages


@dataclass
class Comparison:
    metric: MetricSpec
    best: str
    runner_up: str
    best_mean: float
    runner_mean: float
    verdict: str           # "separated" | "tie" | "not tested" | "not tested: different RMs" | ...
    test: Optional[BestTest]
    within_seed: Optional[PairedTest] = None   # one seed only: prompt bootstrap of the corpus statistic
    keys: tuple = ()       # (best cell key, runner-up cell key)
    primary: bool = False  # the table's question (5% per question); else exploratory (Holm over the report)
    notes: list = field(default_factory=list)   # unbalanced seeds, ranking disagreements
    scope_keys: tuple = ()  # every cell key the test covered, scope order


@dataclass
class Table:
    slug: str
    title: str
    layout: str                       # "rows" or "pivot"
    row_axes: list[str]               # ["stage", *axes] for eval tables
    col_axis: Optional[str]           # pivot only
    row_keys: list[tuple]
    col_keys: list                    # metric suffixes (rows) or column-axis values (pivot)
    columns: list[MetricSpec]         # rows: the tested stage's spec per column; pivot: [the metric]
    cells: dict[tuple, Cell]          # (row_key, col_key) -> Cell
    counts: dict[tuple, tuple[int, int, int]]   # (row_key, col_key or None) -> (ok, failed, stopped)
    stage: str = ""                   # the stage whose rows are tested (ALIGNED: several methods)
    reference_rows: set = field(default_factory=set)
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    primary: Optional[str] = None     # suffix of the primary metric (the table's question)
    judge: str = ""                   # who judged the win rates, when the table has any

    @property
    def specs(self) -> list[MetricSpec]:
        """Every spec a cell of the table uses (reference rows use their own stage's), for the legend."""
        seen = {c.spec.name: c.spec for c in self.cells.values() if c.present}
        return sorted(seen.values(), key=lambda s: (self.col_keys.index(s.suffix) if s.suffix in self.col_keys
                                                    else 0, POLICY_STAGES.index(s.stage)
                                                    if s.stage in POLICY_STAGES else -1))

    @property
    def primary_comparison(self) -> Optional[Comparison]:
        return next((c for c in self.comparisons if c.primary), None)
