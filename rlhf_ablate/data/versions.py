"""Data versions: named lists of cleaning filters. v1 = as read, v2 = every filter; users add their own.

Importable without torch (the config validator imports FILTERS to check ``data.custom_versions``).

A filter is ``f(records, kind, opts) -> FilterResult`` over one split (kind: sft, rm, ppo, eval; ``opts``: the
per-stage choices of :class:`Options`). Filters run in the order the version lists them (FILTERS order for v2), and
each reports the rows it dropped with the reason, so the cleaning report can say "dedup_exact dropped 12 SFT rows"
and show a few of them for every rule and split (``data prepare`` prints them: a user judges a rule by its victims).

What a rule looks at, per record type:
- SFT examples: the completion (`garbage` also checks the prompt: a non-Korean or dumped prompt makes the row
  useless).
- PPO prompts: the prompt.
- Ranked groups: answer-level rules (evasive, garbage, length_outliers) drop a group only when a dirty answer is
  ranked ABOVE a clean one, e.g. the best answer is an "AI 언어 모델이므로 답변드릴 수 없습니다" refusal. A dirty
  answer ranked below the clean ones is kept: truncated, looping or English answers are exactly the negatives a
  reward model must learn to score low, and dropping them would also remove the long dispreferred answers that
  keep the reward model from learning "longer is better". Prompt-level rules (garbage prompt) drop the group.

The Korean-specific choices (what counts as Korean text, a dumped record, an evasive answer: rlhf_ablate/data/
textrules.py; a length outlier: here) are explained at each rule; tests/test_data.py holds realistic Korean cases
for each, written for this project.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from .dedup import NEAR_DUP_THRESHOLD, near_duplicates
from .readers import normalize_text
from .records import PromptExample, RankedGroup, SFTExample
from .textrules import (EVASIVE_PATTERNS, MIN_KOREAN, dumped_record, evasive_reason, foreign, hangul_ratio,
                        is_evasive, is_foreign, is_loop, korean_share, korean_words)

__all__ = ["FILTERS", "BUILTIN_VERSIONS", "Options", "FilterResult", "apply_filters", "version_filters",
           "is_evasive", "is_loop", "is_foreign", "dumped_record", "korean_share", "hangul_ratio",
           "length_bounds", "n_tokens", "NEAR_DUP_THRESHOLD", "EVASIVE_PATTERNS"]


@dataclass(frozen=True)
class Options:
    """Per-stage choices of the filters (DataConfig ``evasive_sft`` / ``evasive_rm``; "auto" resolved by the
    caller from the RM data's format, rlhf_ablate/data/__init__.py)."""

    evasive_sft: str = "drop"            # drop | keep
    evasive_rm: str = "drop_preferred"   # drop_preferred | keep


@dataclass
class FilterResult:
    kept: list
    dropped: int = 0
    changed: int = 0  # rows rewritten in place (nfc)
    examples: list = field(default_factory=list)  # (record, reason) of every dropped row

    @classmethod
    def of(cls, kept: list, gone: list) -> "FilterResult":
        return cls(kept, len(gone), 0, gone)


# ---------------------------------------------------------------------------------------------------------
# Field views
# ---------------------------------------------------------------------------------------------------------

def _answers(rec) -> list[str]:
    if isinstance(rec, SFTExample):
        return [rec.completion]
    if isinstance(rec, RankedGroup):
        return list(rec.answers)
    return [rec.prompt]  # PromptExample: the prompt is the text under test


Why = Callable[[str], Optional[str]]  # a reason when the text is dirty, else None


def _group_reason(g: RankedGroup, why: Why) -> Optional[str]:
    """A reason when some dirty answer is ranked strictly above some clean answer (see module docstring)."""
    reasons = [why(a) for a in g.answers]
    dirty = [(r, i) for i, (r, w) in enumerate(zip(g.ranks, reasons)) if w]
    if not dirty:
        return None
    clean = [r for r, w in zip(g.ranks, reasons) if not w]
    best_rank, i = min(dirty)
    if clean and best_rank >= max(clean):
        return None
    tail = "every answer is dirty" if not clean else f"ranked above a clean answer (rank {max(clean)})"
    return f"rank-{best_rank} answer: {reasons[i]}; {tail}"


def _drop_dirty(records: list, why: Why, prompt_why: Optional[Why] = None) -> FilterResult:
    kept, gone = [], []
    for rec in records:
        reason = None
        if prompt_why is not None and not isinstance(rec, PromptExample):
            reason = prompt_why(rec.prompt)
            reason = f"prompt: {reason}" if reason else None
        if reason is None:
            if isinstance(rec, RankedGroup):
                reason = _group_reason(rec, why)
            else:
                reason = next((w for w in map(why, _answers(rec)) if w), None)
        (gone.append((rec, reason)) if reason else kept.append(rec))
    return FilterResult.of(kept, gone)


# ---------------------------------------------------------------------------------------------------------
# nfc
# ---------------------------------------------------------------------------------------------------------

def nfc(records: list, kind: str, opts: Options = Options()) -> FilterResult:
    """NFC + whitespace normalisation of every text field (readers.normalize_text). Drops nothing.

    Run it first: afterwards NFD copies and whitespace variants of a row are exact duplicates for dedup_exact.
    """
    out, changed = [], 0
    for rec in records:
        if isinstance(rec, SFTExample):
            new = replace(rec, prompt=normalize_text(rec.prompt), completion=normalize_text(rec.completion))
        elif isinstance(rec, RankedGroup):
            new = replace(rec, prompt=normalize_text(rec.prompt),
                          answers=tuple(normalize_text(a) for a in rec.answers))
        else:
            ref = normalize_text(rec.reference) if rec.reference is not None else None
            new = replace(rec, prompt=normalize_text(rec.prompt), reference=ref)
        changed += new != rec
        out.append(new)
    return FilterResult(out, 0, changed)


# ---------------------------------------------------------------------------------------------------------
# Duplicates
# ---------------------------------------------------------------------------------------------------------

def dedup_text(rec) -> str:
    """The text two records are compared by: prompt and answer(s), normalised."""
    if isinstance(rec, SFTExample):
        return normalize_text(rec.prompt) + "\n" + normalize_text(rec.completion)
    if isinstance(rec, RankedGroup):
        # ranks included: the same answers ranked differently are a labelling conflict, not a duplicate
        body = sorted(zip(rec.ranks, (normalize_text(a) for a in rec.answers)))
        return normalize_text(rec.prompt) + "\n" + "\n".join(f"{r}\t{a}" for r, a in body)
    return normalize_text(rec.prompt)


_dedup_text = dedup_text  # the name tests and stats used before it became public


def dedup_exact(records: list, kind: str, opts: Options = Options()) -> FilterResult:
    """Drop rows whose normalised text equals an earlier row's (first occurrence kept, file order)."""
    first: dict[str, str] = {}
    kept, gone = [], []
    for rec in records:
        key = dedup_text(rec)
        if key in first:
            gone.append((rec, "copy of an earlier row" + (f" ({first[key]})" if first[key] != rec.data_id else "")))
        else:
            first[key] = rec.data_id
            kept.append(rec)
    return FilterResult.of(kept, gone)


def dedup_near(records: list, kind: str, opts: Options = Options()) -> FilterResult:
    """Drop rows whose text is a near duplicate (3-gram Jaccard >= NEAR_DUP_THRESHOLD, rlhf_ablate/data/dedup.py)
    of an earlier kept row.

    Near duplicates (a prompt with one particle changed, a copy with a typo fixed) inflate some prompts' weight
    and leak between train and eval; exact copies are dedup_exact's job, so this runs after it.
    """
    drop = near_duplicates([dedup_text(r) for r in records])
    gone = [(records[j], f"near copy (Jaccard {jac:.2f}) of an earlier row"
             + (f" ({records[i].data_id})" if records[i].data_id != records[j].data_id else ""))
            for j, (i, jac) in sorted(drop.items())]
    return FilterResult.of([r for k, r in enumerate(records) if k not in drop], gone)


# ---------------------------------------------------------------------------------------------------------
# Length outliers
# ---------------------------------------------------------------------------------------------------------

LENGTH_Q = 0.95          # the bound starts from the 95th (and 5th) percentile of the split's lengths
LENGTH_FACTOR = {"prompt": 7.0, "answer": 4.0}  # how many times beyond it a row must lie to be an outlier
LENGTH_MIN_HI = 32       # a row of up to 32 whitespace tokens is never too long


def n_tokens(text: str) -> int:
    """Whitespace tokens (Korean eojeol): model-independent, so versions do not depend on the tokenizer."""
    return len(text.split())


def _quantile(sorted_xs: list, q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, max(0, int(round(q * (len(sorted_xs) - 1)))))]


def length_bounds(lengths: list[int], prompts: bool = False) -> tuple[float, float]:
    """Bounds on token counts: ``hi = max(32, F * q95)`` and, for answers, ``lo = q05 / F``, with F = 7 for prompts
    and 4 for answers.

    Why not median +- k MAD (the earlier rule): a split's lengths have a long genuine tail. KoChatGPT's PPO prompts
    are mostly 1-15-eojeol chat and QA turns, with spoken requests of 30-70 eojeol ("예 고 차를 하나 매입할려고
    하는데요 ..."); a bound from the core of the distribution called those outliers (issue 11). The 95th percentile
    already sits in that tail, so the bound scales with it, and only rows several times longer than the longest 5 %
    go: pasted documents, several answers run together. Prompts get the wider factor because requests vary more in
    length than answers to them do. The 95th percentile moves only when over 5 % of a split are outliers.
    Checked against the bundled sample (pasted SFT answers of 100+ tokens against a q95 of 16, pasted RM answers of
    108+ against 19, pasted PPO prompts of 59+ against 7: all dropped) and KoChatGPT's PPO prompts (q95 about 11-13
    eojeol in the parts we read, so requests up to 77-91 eojeol stay); tests/test_data.py holds a split of that
    shape."""
    xs = sorted(lengths)
    f = LENGTH_FACTOR["prompt" if prompts else "answer"]
    hi = max(LENGTH_MIN_HI, f * _quantile(xs, LENGTH_Q))
    lo = 0.0 if prompts else _quantile(xs, 1 - LENGTH_Q) / f
    return lo, hi


def length_outliers(records: list, kind: str, opts: Options = Options()) -> FilterResult:
    """Drop rows whose answer (SFT completion, ranked answer, PPO prompt) is far outside the split's lengths.

    Outliers are mostly pasted documents, concatenated answers or one-word stubs; a handful of them dominate the
    token budget of a batch (and, truncated at model.max_length, teach answers that never end). Prompts have no
    lower bound: "간식 추천" or "사랑꾼" are whole requests.
    """
    lengths = [n_tokens(a) for r in records for a in _answers(r)]
    if len(lengths) < 5:
        return FilterResult(list(records))
    lo, hi = length_bounds(lengths, prompts=kind == "ppo")

    def why(a: str) -> Optional[str]:
        n = n_tokens(a)
        return None if lo <= n <= hi else f"{n} tokens, outside [{lo:.1f}, {hi:.1f}]"

    return _drop_dirty(records, why)


# ---------------------------------------------------------------------------------------------------------
# Evasive / boilerplate answers
# ---------------------------------------------------------------------------------------------------------

def evasive(records: list, kind: str, opts: Options = Options()) -> FilterResult:
    """Where a refusal is dirt, per stage (``data.evasive_sft``, ``data.evasive_rm``):

    - SFT targets (``drop``, the default): a dodge as the target teaches the policy to dodge.
    - Ranked groups (``drop_preferred``): drop a group whose refusal outranks a real answer. Right for helpfulness
      rankings such as KoChatGPT's, ranked by source model (ChatGPT first), where a ChatGPT refusal of a harmless
      question sits on top. ``keep``: harmlessness data, where refusing a harmful request IS the preferred answer
      (Anthropic HH-RLHF, Bai et al. 2022); ``auto`` picks ``keep`` for HH transcripts and ``drop_preferred``
      otherwise. A refusal ranked below a real answer is kept either way: it is a good negative.
    - PPO prompts and eval: nothing to judge.
    """
    if (kind == "sft" and opts.evasive_sft == "drop") or (kind == "rm" and opts.evasive_rm == "drop_preferred"):
        return _drop_dirty(records, evasive_reason)
    return FilterResult(list(records))


# ---------------------------------------------------------------------------------------------------------
# Garbage: not Korean, dumped records, repetition loops
# ---------------------------------------------------------------------------------------------------------

def garbage(records: list, kind: str, opts: Options = Options()) -> FilterResult:
    """Drop rows whose answer (or prompt) is a repetition loop, holds a dumped record, or (in a Korean split, one
    where most texts are Korean, so English data is safe) is not Korean."""
    info: dict[str, tuple[Optional[float], bool]] = {}

    def words(text: str) -> tuple[Optional[float], bool]:
        if text not in info:
            info[text] = korean_words(text)
        return info[text]

    shares = [s for r in records for a in _answers(r) if (s := words(a)[0]) is not None]
    korean = bool(shares) and statistics.median(shares) >= MIN_KOREAN

    def why(text: str) -> Optional[str]:
        frag = dumped_record(text)
        if frag:
            return f"dumped record ('{frag}')"
        if korean and foreign(*words(text)):
            return f"not Korean (Hangul in {words(text)[0]:.0%} of the words)"
        return "repetition loop" if is_loop(text) else None

    def prompt_why(text: str) -> Optional[str]:
        frag = dumped_record(text)
        if frag:
            return f"dumped record ('{frag}')"
        return "not Korean" if korean and foreign(*words(text)) else None

    return _drop_dirty(records, why, prompt_why)


# ---------------------------------------------------------------------------------------------------------
# Registry and versions
# ---------------------------------------------------------------------------------------------------------

FILTERS: dict[str, Callable[..., FilterResult]] = {
    "nfc": nfc,
    "dedup_exact": dedup_exact,
    "dedup_near": dedup_near,
    "length_outliers": length_outliers,
    "evasive": evasive,
    "garbage": garbage,
}

BUILTIN_VERSIONS: dict[str, list[str]] = {"v1": [], "v2": list(FILTERS)}


def version_filters(version: str, custom_versions: dict | None = None) -> list[str]:
    """The ordered filter names of a version (custom versions may not shadow v1/v2)."""
    from ..errors import DataError

    if version in BUILTIN_VERSIONS:
        return list(BUILTIN_VERSIONS[version])
    custom = custom_versions or {}
    if version not in custom:
        raise DataError(f"data.version {version!r} is neither v1, v2 nor in data.custom_versions "
                        f"({', '.join(sorted(custom)) or 'none defined'}).")
    unknown = [f for f in custom[version] if f not in FILTERS]
    if unknown:
        raise DataError(f"data.custom_versions.{version} names unknown filters {unknown}; known: {', '.join(FILTERS)}.")
    return list(custom[version])


def apply_filters(records: list, kind: str, names: list[str], opts: Options = Options()
                  ) -> tuple[list, dict[str, int], dict[str, int], dict[str, list]]:
    """Run filters in order. Returns (kept, dropped per rule, changed per rule, (record, reason) dropped per rule)."""
    dropped, changed, examples = {}, {}, {}
    for name in names:
        res = FILTERS[name](records, kind, opts)
        records = res.kept
        dropped[name] = res.dropped
        examples[name] = res.examples
        if res.changed:
            changed[name] = res.changed
    return records, dropped, changed, examples
