"""Verifiable rewards (RLVR): does an answer match the reference answer? 1.0 or 0.0, no model.

Korean answers vary in spacing and sentence-final punctuation ("서울입니다." vs "서울 입니다"), so both sides are
compared after NFC, whitespace removal and trailing punctuation removal, and case folding for Latin script.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Optional

_SPACE = re.compile(r"\s+")
_TRAILING = re.compile(r"[.!?。．！？~…,、]+$")


def canonical(text: str) -> str:
    """NFC, case-folded, without whitespace or trailing punctuation: the form both sides are compared in."""
    t = unicodedata.normalize("NFC", text or "").casefold()
    return _TRAILING.sub("", _SPACE.sub("", t))


def extract(text: str, pattern: str) -> Optional[str]:
    """The first group of ``pattern`` in ``text`` (the whole match if it has no group), or None."""
    m = re.search(pattern, unicodedata.normalize("NFC", text or ""))
    if m is None:
        return None
    return m.group(1) if m.groups() else m.group(0)


def verifiable_reward(answer: str, reference: str, match: str = "contains", pattern: Optional[str] = None) -> float:
    """1.0 if ``answer`` matches ``reference``, else 0.0.

    - ``exact``: the canonical answer equals the canonical reference;
    - ``contains``: the canonical reference occurs in the canonical answer;
    - ``regex``: ``pattern`` extracts the answer's final answer (first group), compared with the reference; when
      the reference also matches ``pattern`` (a full worked solution), its extraction is compared instead.
    An empty reference never matches."""
    ref = canonical(reference)
    if not ref:
        return 0.0
    if match == "exact":
        return float(canonical(answer) == ref)
    if match == "contains":
        return float(ref in canonical(answer))
    if match == "regex":
        if not pattern:
            raise ValueError("match='regex' needs a pattern")
        got = extract(answer, pattern)
        want = extract(reference, pattern)
        return float(got is not None and canonical(got) == (canonical(want) if want is not None else ref))
    raise ValueError(f"unknown match {match!r}: exact, contains or regex")
