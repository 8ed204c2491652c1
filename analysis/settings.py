"""What the report tests: the primary metric of each table and the family the 5% holds for (issue 18).

Defaults live here; a sweep file overrides them in its ``analysis:`` block (rlhf_ablate/config/sweep.py). The
report finds the sweep file through RUN_DIR/sweep.json (``path``); a run without one, or whose sweep file has
moved, uses the defaults and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# The question each table answers: the one column that can be bold at 5% per table.
#  - rm: Kendall tau against the human rankings (scale-free, so it compares reward models of different runs);
#  - sft and aligned (the alignment method's eval table): ROUGE-L against the references.
DEFAULT_PRIMARY = {"rm": "kendall_tau", "sft": "rougeL", "aligned": "rougeL"}
FAMILIES = ("table", "report")


@dataclass(frozen=True)
class AnalysisSettings:
    primary: dict = field(default_factory=lambda: dict(DEFAULT_PRIMARY))
    family: str = "table"
    source: str = "defaults"   # where they came from, for the report

    def primary_for(self, table: str) -> Optional[str]:
        return self.primary.get(table)


def table_kind(stage: str) -> str:
    """rm, sft, aligned (any alignment method), or the stage itself (base: never tested)."""
    from rlhf_ablate.metrics.registry import METHODS

    return "aligned" if stage in METHODS or stage == "aligned" else stage


def load_settings(run_dir: str | Path, problems: Optional[list[str]] = None) -> AnalysisSettings:
    from rlhf_ablate.config.sweep import parse_analysis, read_sweep
    from rlhf_ablate.errors import RlhfAblateError

    sweep_json = Path(run_dir) / "sweep.json"
    if not sweep_json.is_file():
        return AnalysisSettings()
    try:
        path = json.loads(sweep_json.read_text(encoding="utf-8")).get("path")
    except (OSError, ValueError, AttributeError):
        return AnalysisSettings()
    if not path or not Path(path).is_file():
        if problems is not None and path:
            problems.append(f"sweep.json names the sweep file {path}, which is not there: the report uses the "
                            "default analysis settings (primary metrics, family).")
        return AnalysisSettings()
    try:
        raw = read_sweep(path).get("analysis") or {}
        spec = parse_analysis(raw, str(path))
    except RlhfAblateError as e:
        if problems is not None:
            problems.append(f"analysis settings of {path} not used ({e}); the report uses the defaults.")
        return AnalysisSettings()
    if not raw:
        return AnalysisSettings()
    return AnalysisSettings({**DEFAULT_PRIMARY, **dict(spec.primary)}, spec.family, f"`analysis:` of {path}")
