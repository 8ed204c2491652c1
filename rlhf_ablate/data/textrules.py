"""Text rules of the cleaning filters: is a text evasive, Korean, a dumped record, a repetition loop?

Each works on one text and knows nothing of records or splits; rlhf_ablate/data/versions.py applies them to splits.
The Korean-specific choices are explained at each rule; tests/test_data.py holds realistic Korean cases for each,
written for this project.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Optional

from .readers import normalize_text

# ---------------------------------------------------------------------------------------------------------
# Evasive / boilerplate answers
# ---------------------------------------------------------------------------------------------------------

# Refusals and self-references of ChatGPT-generated Korean data (KoChatGPT's SFT file has many: "저는 인공지능
# 챗봇이며, ...", "죄송합니다. 저는 AI 언어 모델로써 ..."). They teach a policy to dodge questions. An apology alone is
# not evasive: a shop assistant's "죄송하지만 오늘은 배달이 어렵습니다" answers the question, and "I'm sorry that
# you're going through this" is empathy (HH-RLHF's chosen answers are full of it). So the apology patterns need the
# speaker to decline to answer, help or give information.
EVASIVE_PATTERNS = [
    r"저는\s*(AI|인공지능|에이아이|언어\s*모델|챗봇)",
    r"(AI|인공지능)\s*(언어\s*)?(모델|챗봇|어시스턴트|비서)\s*(이므로|이기\s*때문에|으?로서|으?로써|이라서|이어서|이며|입니다)",
    r"답변(을|을\s*해)?\s*드릴\s*수\s*(가\s*)?없",
    r"답변(을|해)?\s*드리기\s*(가\s*)?어렵",
    r"죄송(하지만|합니다)[^.!?]{0,40}(답변|대답|정보를?\s*제공|도와\s*드리|알려\s*드리)[^.!?]{0,12}(수\s*(가\s*)?없|어렵)",
    r"\bas an ai\b( language model)?",
    r"\bi('m| am) (sorry|afraid),? (but )?i (can('|no)?t|cannot|am unable|won't|will not)\b",
    r"\bi('m| am) (unable|not able) to (help|assist|answer|provide|comply)\b",
    r"\bi (cannot|can't|won't|will not) (help|assist|answer|provide|comply) with\b",
]
_EVASIVE = re.compile("|".join(f"(?:{p})" for p in EVASIVE_PATTERNS), re.IGNORECASE)


# Every pattern above contains one of these (lower-cased); a text with none of them skips the regex.
_EVASIVE_KEYS = ("ai", "인공지능", "에이아이", "언어", "챗봇", "답변", "죄송", "sorry", "afraid", "unable", "able to",
                 "cannot", "can't", "won't", "will not")


def evasive_reason(text: str) -> Optional[str]:
    low = text.lower()
    if not any(k in low for k in _EVASIVE_KEYS):
        return None
    m = _EVASIVE.search(normalize_text(text))
    return f"evasive ('{m.group(0)}')" if m else None


def is_evasive(text: str) -> bool:
    return evasive_reason(text) is not None




# ---------------------------------------------------------------------------------------------------------
# Not Korean, dumped records, repetition loops
# ---------------------------------------------------------------------------------------------------------

MIN_KOREAN = 0.5  # share of words with Hangul above which a text is Korean whatever else it holds
MIN_KOREAN_TAIL = 0.2  # ... and the share that suffices when the text ends in a Hangul word (Korean is verb-final)
LOOP_COVER = 0.5  # a repeated n-gram covering >= half of the text is a loop

_HANGUL = re.compile("[\uac00-\ud7a3\u3131-\u318e]")
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)
_URL = re.compile(r"(https?://|www\.)\S+|\S+@\S+\.\w+")


_LETTER_WORD = re.compile(r"\S*[^\W\d_]\S*")  # a whole whitespace-separated word holding a letter
_HANGUL_WORD = re.compile(r"\S*[\uac00-\ud7a3\u3131-\u318e]\S*")


def korean_words(text: str) -> tuple[Optional[float], bool]:
    """(share of the letter words that hold Hangul, or None without letter words; does the last one), with code
    spans, URLs and e-mail addresses taken out. Two regex scans per text: this runs on every answer of a split."""
    t = normalize_text(text)
    if "`" in t:
        t = _CODE.sub(" ", t)
    if "http" in t or "www." in t or "@" in t:
        t = _URL.sub(" ", t)
    letters = _LETTER_WORD.findall(t)
    if not letters:
        return None, False
    return len(_HANGUL_WORD.findall(t)) / len(letters), _HANGUL.search(letters[-1]) is not None


def korean_share(text: str) -> Optional[float]:
    """Share of the words (with at least one letter) that contain Hangul, code spans, URLs and e-mail addresses
    left out; None when no word has a letter.

    Words, not letters: "DDoS가 뭐야" has 4 Latin letters and 3 Hangul syllables, so a letter count called it
    non-Korean, but both of its words carry Hangul ("DDoS가": a particle on a Latin name). Korean questions about
    Latin-script names, acronyms and code are ordinary (31 of the 34 KoChatGPT PPO prompts the letter rule
    dropped, issue 11)."""
    return korean_words(text)[0]


def foreign(share: Optional[float], last_hangul: bool) -> bool:
    return share is not None and share < MIN_KOREAN and not (share >= MIN_KOREAN_TAIL and last_hangul)


def is_foreign(text: str) -> bool:
    """Not Korean: under MIN_KOREAN of the words carry Hangul, unless the text ends in a Hangul word and at least
    MIN_KOREAN_TAIL of them do ("iPhone 15 Pro Max와 Galaxy S24 Ultra 비교해줘": the verb comes last in Korean)."""
    return foreign(*korean_words(text))


def hangul_ratio(text: str) -> float:
    """Share of Hangul syllables among letters (kept for EDA; the garbage rule uses :func:`korean_share`)."""
    letters = [c for c in normalize_text(text) if c.isalpha()]
    if not letters:
        return 0.0
    return sum("\uac00" <= c <= "\ud7a3" for c in letters) / len(letters)


# A record serialised into a text field: a quoted value, a comma, then a quoted key and a colon. KoChatGPT's PPO file
# has prompts such as `오세훈은 ... 몇 위를 하였는가?", 'completion': '저는 인공지능 언어모델이므로, ...` and
# `..., 'token': 257}`: whole SFT rows pasted into the prompt, answer and token count included. The key is a field
# name of the common dataset schemas, or any identifier when the value before it is prose (20+ characters): a short
# value ({'name': '홍길동', 'age': 30}) is more likely a code example in a question. Code spans are left out.
_FIELD_NAMES = (r"prompt|completion(?:_\d+)?|tokens?|ranking|question|answer\d*|chosen|rejected|instruction|input|"
                r"output|response|text|content|role|data_id|label|score|messages")
_DUMPED = re.compile(
    rf"""['"]\s*,\s*['"](?:{_FIELD_NAMES})['"]\s*:"""                     # "...", 'completion':
    rf"""|[{{,]\s*['"](?:{_FIELD_NAMES})['"]\s*:\s*['"\[{{]"""            # {"prompt": "   or   , "text": [
    r"""|[^'"\n]{20}['"]\s*,\s*['"][A-Za-z_]\w{0,30}['"]\s*:\s*['"\[{\d]""",  # prose", 'any_key': '
)


def dumped_record(text: str) -> Optional[str]:
    """The matched fragment when `text` holds a dumped dict / JSON record (see _DUMPED), else None."""
    if ":" not in text or ("'" not in text and '"' not in text):  # every alternative needs a quote and a colon
        return None
    m = _DUMPED.search(_CODE.sub(" ", text) if "`" in text else text)
    return " ".join(m.group(0).split())[-40:] if m else None


def is_loop(text: str) -> bool:
    """A word n-gram (n = 1..4) repeated 3+ times and covering >= LOOP_COVER of the words, or a character
    n-gram (n = 1..6) repeated 4+ times covering >= 60% of the characters (loops without spaces: "ㅋㅋㅋㅋ").
    Decoding loops of small models and of GPT-3-ada (KoChatGPT's rank-3 answers) look exactly like this.

    Every occurrence of an n-gram starts with its first item, so the most frequent single word (character) occurs
    at least as often as any n-gram does; an n for which even that count is too small is skipped without counting
    n-grams (ordinary Korean text skips them all, which keeps v2 fast on 50k rows)."""
    words = normalize_text(text).split()
    if len(words) >= 6:
        top = max(Counter(words).values())
        for n in range(1, 5):
            if top < max(3, LOOP_COVER * len(words) / n):
                continue
            grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            _, c = grams.most_common(1)[0]
            if c >= 3 and c * n / len(words) >= LOOP_COVER:
                return True
    chars = "".join(words)
    if len(chars) >= 12:
        top = max(Counter(chars).values())
        for n in range(1, 7):
            if top < max(4, 0.6 * len(chars) / n):
                continue
            grams = Counter(chars[i:i + n] for i in range(0, len(chars) - n + 1))
            _, c = grams.most_common(1)[0]
            if c >= 4 and c * n / len(chars) >= 0.6:
                return True
    return False
