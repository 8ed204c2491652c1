"""Data versions: named lists of cleaning filters. v1 = as read, v2 = every filter; users add their own.

Importable without torch (the config validator imports FILTERS to check ``data.custom_versions``).

A filter is ``f(records, kind) -> FilterResult`` over one split (kind: sft, rm, ppo). Filters run in the order
the version lists them (FILTERS order for v2), and each reports how many rows it dropped, so the cleaning report
can say "dedup_exact dropped 12 SFT rows" for every rule and split.

What a rule looks at, per record type:
- SFT examples: the completion (`garbage` also checks the prompt: a non-Korean prompt makes the row useless).
- PPO prompts: the prompt.
- Ranked groups: answer-level rules (evasive, garbage, length_outliers) drop a group only when a dirty answer is
  ranked ABOVE a clean one, e.g. the best answer is an "AI 언어 모델이므로 답변드릴 수 없습니다" refusal. A dirty
  answer ranked below the clean ones is kept: truncated, looping or English answers are exactly the negatives a
  reward model must learn to score low, and dropping them would also remove the long dispreferred answers that
  keep the reward model from learning "longer is better". Prompt-level rules (garbage prompt) drop the group.
"""

from __future__ import annotations

import math
import re
import statistics
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable

from .readers import normalize_text
from .records import PromptExample, RankedGroup, SFTExample


@dataclass
class FilterResult:
    kept: list
    dropped: int = 0
    changed: int = 0  # rows rewritten in place (nfc)


# ---------------------------------------------------------------------------------------------------------
# Field views
# ---------------------------------------------------------------------------------------------------------

def _answers(rec) -> list[str]:
    if isinstance(rec, SFTExample):
        return [rec.completion]
    if isinstance(rec, RankedGroup):
        return list(rec.answers)
    return [rec.prompt]  # PromptExample: the prompt is the text under test


def _group_is_dirty(g: RankedGroup, dirty: Callable[[str], bool]) -> bool:
    """True when some dirty answer is ranked strictly above some clean answer (see module docstring)."""
    flags = [dirty(a) for a in g.answers]
    best_dirty = min((r for r, f in zip(g.ranks, flags) if f), default=None)
    worst_clean = max((r for r, f in zip(g.ranks, flags) if not f), default=None)
    if best_dirty is None:
        return False
    if worst_clean is None:
        return True  # every answer is dirty: nothing to learn from
    return best_dirty < worst_clean


def _drop_dirty(records: list, dirty: Callable[[str], bool], check_prompt: Callable[[str], bool] | None = None):
    kept, dropped = [], 0
    for rec in records:
        if check_prompt is not None and not isinstance(rec, PromptExample) and check_prompt(rec.prompt):
            bad = True
        elif isinstance(rec, RankedGroup):
            bad = _group_is_dirty(rec, dirty)
        else:
            bad = any(dirty(a) for a in _answers(rec))
        if bad:
            dropped += 1
        else:
            kept.append(rec)
    return FilterResult(kept, dropped)


# ---------------------------------------------------------------------------------------------------------
# nfc
# ---------------------------------------------------------------------------------------------------------

def nfc(records: list, kind: str) -> FilterResult:
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

def _dedup_text(rec) -> str:
    if isinstance(rec, SFTExample):
        return normalize_text(rec.prompt) + "\n" + normalize_text(rec.completion)
    if isinstance(rec, RankedGroup):
        # ranks included: the same answers ranked differently are a labelling conflict, not a duplicate
        body = sorted(zip(rec.ranks, (normalize_text(a) for a in rec.answers)))
        return normalize_text(rec.prompt) + "\n" + "\n".join(f"{r}\t{a}" for r, a in body)
    return normalize_text(rec.prompt)


def dedup_exact(records: list, kind: str) -> FilterResult:
    """Drop rows whose normalised text equals an earlier row's (first occurrence kept, file order)."""
    seen, kept = set(), []
    for rec in records:
        key = _dedup_text(rec)
        if key not in seen:
            seen.add(key)
            kept.append(rec)
    return FilterResult(kept, len(records) - len(kept))


NEAR_DUP_THRESHOLD = 0.85  # char 3-gram Jaccard, spaces removed; short template prompts differing in one noun
# reach ~0.8, spacing variants score 1.0 and a changed final character in a 20-syllable text ~0.9
_NUM_PERM, _BANDS = 32, 8  # MinHash-LSH: P(candidate | J=0.85) = 1 - (1 - 0.85**4)**8 ~ 0.997
_PRIME = (1 << 61) - 1


def shingles(text: str, n: int = 3) -> set[str]:
    """Character n-grams of the normalised, lower-cased text WITHOUT whitespace: Korean spacing (띄어쓰기) varies
    freely between writers ("잘 하는" / "잘하는"), so spacing variants should count as the same text."""
    t = re.sub(r"\s+", "", normalize_text(text).lower())
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _minhash(sh: set[str]) -> tuple[int, ...]:
    hs = [zlib.crc32(s.encode("utf-8")) for s in sh]
    sig = []
    for k in range(_NUM_PERM):  # fixed affine permutations: deterministic across runs and machines
        a, b = 2 * k + 0x9E3779B1, 7919 * k + 1
        sig.append(min((a * h + b) % _PRIME for h in hs))
    return tuple(sig)


def near_duplicate_pairs(texts: list[str], threshold: float = NEAR_DUP_THRESHOLD) -> list[tuple[int, int, float]]:
    """(i, j, jaccard) with i < j for texts whose character 3-gram Jaccard >= threshold.

    MinHash-LSH proposes candidates (so 10k+ rows stay fast); each candidate is then checked with the exact
    Jaccard, so there are no false positives, only rare misses just above the threshold.
    """
    sh = [shingles(t) for t in texts]
    rows = _NUM_PERM // _BANDS
    buckets: dict[tuple, list[int]] = {}
    for i, s in enumerate(sh):
        sig = _minhash(s)
        for b in range(_BANDS):
            buckets.setdefault((b, sig[b * rows:(b + 1) * rows]), []).append(i)
    cands = set()
    for members in buckets.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                cands.add((members[x], members[y]))
    out = []
    for i, j in sorted(cands):
        jac = jaccard(sh[i], sh[j])
        if jac >= threshold:
            out.append((i, j, jac))
    return out


def dedup_near(records: list, kind: str) -> FilterResult:
    """Drop rows whose text is a near duplicate (3-gram Jaccard >= NEAR_DUP_THRESHOLD) of an earlier kept row.

    Near duplicates (a prompt with one particle changed, a copy with a typo fixed) inflate some prompts' weight
    and leak between train and eval; exact copies are dedup_exact's job, so this runs after it.
    """
    drop = set()
    for i, j, _ in near_duplicate_pairs([_dedup_text(r) for r in records]):
        if i not in drop:
            drop.add(j)
    kept = [r for k, r in enumerate(records) if k not in drop]
    return FilterResult(kept, len(drop))


# ---------------------------------------------------------------------------------------------------------
# Length outliers
# ---------------------------------------------------------------------------------------------------------

LENGTH_K = 4.0  # bounds: exp(median(log n) +- 4 * 1.4826 * MAD(log n)), computed per split
LENGTH_MIN_MAD = 0.15  # floor of the log-MAD (about +-15%), so near-uniform template data is not cut at +-1 token


def n_tokens(text: str) -> int:
    """Whitespace tokens (Korean eojeol): model-independent, so versions do not depend on the tokenizer."""
    return len(text.split())


def length_bounds(lengths: list[int], k: float = LENGTH_K) -> tuple[float, float]:
    """Robust bounds on token counts: median +- k * 1.4826 * MAD (MAD scaled to a normal sigma) in log space.

    Log space because answer lengths are right-skewed (roughly log-normal): a symmetric window in tokens would
    be too tight above and too loose below. With k = 4 the window is at least x/÷ 2.4 around the median.
    """
    logs = [math.log(max(1, x)) for x in lengths]
    med = statistics.median(logs)
    mad = max(LENGTH_MIN_MAD, statistics.median(abs(x - med) for x in logs))
    half = k * 1.4826 * mad
    return math.exp(med - half), math.exp(med + half)


def length_outliers(records: list, kind: str) -> FilterResult:
    """Drop rows whose answer (SFT completion, ranked answer, PPO prompt) is far outside the split's lengths.

    Outliers are mostly pasted documents, concatenated answers or one-word stubs; a handful of them dominate the
    token budget of a batch (and, truncated at model.max_length, teach answers that never end).
    """
    lengths = [n_tokens(a) for r in records for a in _answers(r)]
    if len(lengths) < 5:
        return FilterResult(list(records))
    lo, hi = length_bounds(lengths)
    return _drop_dirty(records, lambda a: not lo <= n_tokens(a) <= hi)


# ---------------------------------------------------------------------------------------------------------
# Evasive / boilerplate answers
# ---------------------------------------------------------------------------------------------------------

# Refusals and self-references of ChatGPT-generated Korean data (KoChatGPT's SFT file has many: "저는 인공지능
# 챗봇이며, ...", "죄송합니다. 저는 AI 언어 모델로써 ..."). They teach a policy to dodge questions.
EVASIVE_PATTERNS = [
    r"저는\s*(AI|인공지능|에이아이)",
    r"(AI|인공지능)\s*(언어\s*)?(모델|챗봇|어시스턴트|비서)\s*(이므로|이기\s*때문에|으?로서|으?로써|이라서|이어서|이며)",
    r"답변(을|을\s*해)?\s*드릴\s*수\s*(가\s*)?없",
    r"답변(을|해)?\s*드리기\s*어렵",
    r"죄송(하지만|합니다)[^.!?]{0,30}(수\s*없|어렵)",
    r"as an ai( language model)?",
    r"i('m| am) (sorry|unable)|i cannot (help|answer)",
]
_EVASIVE = re.compile("|".join(f"(?:{p})" for p in EVASIVE_PATTERNS), re.IGNORECASE)


def is_evasive(text: str) -> bool:
    return bool(_EVASIVE.search(normalize_text(text)))


def evasive(records: list, kind: str) -> FilterResult:
    """Drop SFT rows with evasive answers and groups whose evasive answer outranks a real one (PPO: no-op)."""
    if kind == "ppo":
        return FilterResult(list(records))
    return _drop_dirty(records, is_evasive)


# ---------------------------------------------------------------------------------------------------------
# Garbage: too little Hangul, or repetition loops
# ---------------------------------------------------------------------------------------------------------

MIN_HANGUL = 0.5  # share of Hangul syllables among letters when the split is Korean
LOOP_COVER = 0.5  # a repeated n-gram covering >= half of the text is a loop


def hangul_ratio(text: str) -> float:
    letters = [c for c in normalize_text(text) if c.isalpha()]
    if not letters:
        return 0.0
    return sum("\uac00" <= c <= "\ud7a3" for c in letters) / len(letters)


def is_loop(text: str) -> bool:
    """A word n-gram (n = 1..4) repeated 3+ times and covering >= LOOP_COVER of the words, or a character
    n-gram (n = 1..6) repeated 4+ times covering >= 60% of the characters (loops without spaces: "ㅋㅋㅋㅋ").
    Decoding loops of small models and of GPT-3-ada (KoChatGPT's rank-3 answers) look exactly like this."""
    words = normalize_text(text).split()
    if len(words) >= 6:
        for n in range(1, 5):
            grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            _, c = grams.most_common(1)[0]
            if c >= 3 and c * n / len(words) >= LOOP_COVER:
                return True
    chars = re.sub(r"\s+", "", normalize_text(text))
    if len(chars) >= 12:
        for n in range(1, 7):
            grams = Counter(chars[i:i + n] for i in range(0, len(chars) - n + 1))
            _, c = grams.most_common(1)[0]
            if c >= 4 and c * n / len(chars) >= 0.6:
                return True
    return False


def _korean_split(records: list) -> bool:
    """Is Korean expected here? Yes when most answers of the split are mostly Hangul (so English data is safe)."""
    ratios = [hangul_ratio(a) for r in records for a in _answers(r)]
    return bool(ratios) and statistics.median(ratios) >= MIN_HANGUL


def garbage(records: list, kind: str) -> FilterResult:
    """Drop rows whose answer is a repetition loop or (in a Korean split) has too little Hangul."""
    korean = _korean_split(records)

    def dirty(text: str) -> bool:
        return is_loop(text) or (korean and hangul_ratio(text) < MIN_HANGUL)

    return _drop_dirty(records, dirty, check_prompt=lambda p: korean and hangul_ratio(p) < MIN_HANGUL)


# ---------------------------------------------------------------------------------------------------------
# Registry and versions
# ---------------------------------------------------------------------------------------------------------

FILTERS: dict[str, Callable[[list, str], FilterResult]] = {
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


def apply_filters(records: list, kind: str, names: list[str]) -> tuple[list, dict[str, int], dict[str, int]]:
    """Run filters in order. Returns (kept, dropped per rule, changed per rule)."""
    dropped, changed = {}, {}
    for name in names:
        res = FILTERS[name](records, kind)
        records = res.kept
        dropped[name] = res.dropped
        if res.changed:
            changed[name] = res.changed
    return records, dropped, changed
