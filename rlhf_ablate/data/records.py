"""Canonical records: the only shapes the rest of rlhf_ablate sees (docs/architecture.md, "Data records").

Every reader turns its file format into these frozen dataclasses, so stages never branch on where data came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SFTExample:
    data_id: str
    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferencePair:
    data_id: str
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class RankedGroup:
    """One prompt with k >= 2 answers and a rank per answer (1 = best; equal ranks are ties)."""

    data_id: str
    prompt: str
    answers: tuple[str, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.answers) != len(self.ranks):
            raise ValueError(f"group {self.data_id}: {len(self.answers)} answers but {len(self.ranks)} ranks")

    def pairs(self) -> list[PreferencePair]:
        """Every (better, worse) pair with different ranks: k(k-1)/2 pairs without ties.

        Using all pairs of a ranking, not only best-vs-rest, is what InstructGPT (Ouyang et al. 2022, sec. 3.5)
        and the KoChatGPT tutorial do; tied answers give no pair because they carry no preference.
        """
        out = []
        order = sorted(range(len(self.answers)), key=lambda i: (self.ranks[i], i))
        for a_pos, i in enumerate(order):
            for j in order[a_pos + 1:]:
                if self.ranks[i] < self.ranks[j]:
                    out.append(PreferencePair(self.data_id, self.prompt, self.answers[i], self.answers[j]))
        return out

    @property
    def best(self) -> str:
        return self.answers[min(range(len(self.answers)), key=lambda i: (self.ranks[i], i))]


@dataclass(frozen=True)
class PromptExample:
    data_id: str
    prompt: str
    reference: Optional[str] = None


def pairs(groups) -> list[PreferencePair]:
    """All preference pairs of a list of ranked groups, group by group (order is deterministic)."""
    return [p for g in groups for p in g.pairs()]
