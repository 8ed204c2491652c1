"""Win rates of one policy's answers against another's, prompt by prompt: win, tie and loss rates with a CI.

Each prompt gets an outcome in [0, 1] (1 = the policy's answer is better, 0.5 = a tie, 0 = worse). The win rate is
the mean outcome, (wins + ties / 2) / n, and its 95% interval is Wilson's score interval at that rate (Wilson
1927), which stays inside [0, 1] and does not collapse to a point at 0% or 100% as the normal interval does.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

Z95 = 1.959963984540054


def outcome_from_scores(policy: float, other: float, tol: float = 1e-6) -> float:
    """1.0 if the policy's score is higher by more than ``tol``, 0.0 if lower, 0.5 otherwise."""
    if policy > other + tol:
        return 1.0
    if other > policy + tol:
        return 0.0
    return 0.5


def outcome_from_verdicts(policy_first: Optional[str], policy_second: Optional[str]) -> Optional[float]:
    """A position-debiased outcome from two judge verdicts ("A", "B" or "tie"): once with the policy's answer as A,
    once as B. The policy wins only if it wins on balance over both orders; a split verdict is a tie. None when a
    verdict is missing."""
    if policy_first is None or policy_second is None:
        return None
    first = {"A": 1.0, "B": 0.0, "tie": 0.5}[policy_first]
    second = {"B": 1.0, "A": 0.0, "tie": 0.5}[policy_second]
    mean = (first + second) / 2
    return 1.0 if mean > 0.5 else 0.0 if mean < 0.5 else 0.5


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    if n == 0:
        return (math.nan, math.nan)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize_outcomes(outcomes: Sequence[Optional[float]]) -> dict:
    """win/tie/loss rates, the win rate with its 95% CI, and how many prompts were judged (None = not judged)."""
    judged = [o for o in outcomes if o is not None]
    n = len(judged)
    if n == 0:
        return {"n": 0, "missing": len(outcomes), "win": None, "tie": None, "loss": None, "win_rate": None,
                "ci_low": None, "ci_high": None}
    win, tie = sum(o == 1.0 for o in judged), sum(o == 0.5 for o in judged)
    rate = (win + tie / 2) / n
    lo, hi = wilson(rate, n)
    return {"n": n, "missing": len(outcomes) - n, "win": win / n, "tie": tie / n, "loss": (n - win - tie) / n,
            "win_rate": rate, "ci_low": lo, "ci_high": hi}
