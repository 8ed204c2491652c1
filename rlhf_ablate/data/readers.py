"""Readers: KoChatGPT, AIHub-style, HF preference, HH-RLHF transcripts and chat `messages` rows -> canonical
records. Where rows come from (JSON arrays and lines, Parquet, CSV, save_to_disk) is rlhf_ablate/data/rows.py; which
file or split serves which stage is rlhf_ablate/data/sources.py.

``data.columns`` maps a user's column names onto ours before anything else looks at a row (our name -> theirs, as
in LLaMA-Factory's ``dataset_info.json`` "columns"), so ``{prompt: instruction, completion: output}`` reads an
Alpaca-style file as KoChatGPT SFT rows.

Malformed rows raise :class:`DataError` naming the file and the row's location (1-based line of a JSON or CSV file,
row number of a Parquet file or dataset). With ``skip_bad_rows=True`` they are skipped, counted and the first
reasons kept, so nothing disappears silently.

The module is one coherent job, hence its length: a parser per (format, kind) and the one loop that applies them to
a table and decides what a bad row is.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from .records import PromptExample, RankedGroup, SFTExample
from .rows import Table, open_path

FORMATS = ("kochatgpt", "aihub", "hf_pref", "hh", "messages")
KINDS = ("sft", "rm", "ppo", "eval")
MAX_REASONS = 5  # bad-row reasons kept in the report; the count is always complete


class RowError(ValueError):
    """A row-level problem; the reader adds file and line and decides whether to raise or skip."""


# ---------------------------------------------------------------------------------------------------------
# Text helpers shared with versions.py and splits.py
# ---------------------------------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\u00a0\u3000]+")
_MANY_NL = re.compile(r"\n{3,}")
_PLAIN = re.compile(r"[\t\r\u00a0\u3000]|  |[^\S\n]\n|\n[^\S\n]|\n\n\n")  # what normalize_text changes, bar NFC


def normalize_text(text: str) -> str:
    """NFC + whitespace normalisation: the form used for ids, dedup and prompt matching.

    NFD-decomposed Hangul (common in text copied from macOS file names) looks identical but compares unequal and
    tokenizes differently; runs of spaces, tabs, NBSP and ideographic spaces become one space, every line is
    trimmed and 3+ newlines become a paragraph break.
    """
    if (("\n" in text and _PLAIN.search(text) is None) or not ("\n" in text or "  " in text or "\t" in text
            or "\r" in text or "\u00a0" in text or "\u3000" in text)) and text.strip() == text \
            and unicodedata.is_normalized("NFC", text):
        return text  # the common case, and every text after the nfc filter: nothing to do
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_WS.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NL.sub("\n\n", "\n".join(lines)).strip()


def prompt_id(prompt: str) -> str:
    """Short stable id of a prompt (sha1 of the normalised text) for rows without their own id."""
    return "p" + hashlib.sha1(normalize_text(prompt).encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------
# Field access with row-level errors
# ---------------------------------------------------------------------------------------------------------

def _text(row: dict, key: str) -> str:
    if key not in row:
        raise RowError(f"missing field '{key}'")
    v = row[key]
    if v is None:
        raise RowError(f"field '{key}' is empty (null)")
    if not isinstance(v, str):
        raise RowError(f"field '{key}' must be a string, got {type(v).__name__}")
    if not v.strip():
        raise RowError(f"field '{key}' is empty")
    return v


def _row_id(row: dict, prompt: str) -> str:
    for key in ("data_id", "id"):
        v = row.get(key)
        if isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip():
            return str(v).strip()
    return prompt_id(prompt)


def _numbered(row: dict, prefix: str) -> list[str]:
    """Fields prefix0, prefix1, ... (or prefix01 ...) in numeric order."""
    pat = re.compile(re.escape(prefix) + r"(\d+)$")
    found = sorted((int(m.group(1)), k) for k in row if (m := pat.match(k)))
    return [k for _, k in found]


def _check_permutation(values: Any, k: int, what: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise RowError(f"'{what}' must be a list of integers, got {values!r}")
    if len(values) != k:
        raise RowError(f"'{what}' has {len(values)} entries but the row has {k} answers")
    base = 0 if min(values) == 0 else 1
    if sorted(values) != list(range(base, base + k)):
        raise RowError(f"'{what}' {values} is not a permutation of {list(range(base, base + k))}")
    return [v - base for v in values]


# ---------------------------------------------------------------------------------------------------------
# Row parsers: (format, kind) -> function(row) -> record
# ---------------------------------------------------------------------------------------------------------

def kochatgpt_sft(row: dict) -> SFTExample | list[SFTExample]:
    """``{prompt, completion}``; or the KoChatGPT variant with ``completion_0..completion_{k-1}``: with a
    ``ranking`` (an RM row used as SFT data) its best answer is the target, without one every completion is a
    target of its own. The examples of one row share its id, so they land on the same side of every split."""
    p = _text(row, "prompt")
    if "completion" in row or not _numbered(row, "completion_"):
        return SFTExample(_row_id(row, p), p, _text(row, "completion"))
    answers = [_text(row, k) for k in _numbered(row, "completion_")]
    rid = _row_id(row, p)
    if "ranking" in row:
        order = _check_permutation(row["ranking"], len(answers), "ranking")
        return SFTExample(rid, p, answers[order[0]])
    return [SFTExample(rid, p, a) for a in answers]


def kochatgpt_rm(row: dict) -> RankedGroup:
    """KoChatGPT ranked group: ``completion_0..completion_{k-1}`` and ``ranking``.

    ``ranking`` lists completion INDICES ordered best first: ``ranking[r]`` is the index of the completion with
    quality position r. So ``[1, 2, 0]`` means completion_1 > completion_2 > completion_0. This is how the file was
    built: kochatgpt_data_230320.ipynb shuffles ``ranking = [0, 1, 2]`` and writes
    ``completion_tmp[ranking[k]] = [chatgpt, davinci, ada][k]``, and the published rows match (row 0:
    ``ranking [1, 2, 0]`` with the ChatGPT answer in completion_1 and the English ada text in completion_0).

    Beware: the tutorial's RM loader (kochatgpt_code_230421.ipynb) reads it the other way round
    (``ranking[i] < ranking[j]`` -> completion_i chosen); both readings agree on [0,1,2], [1,0,2], [0,2,1] and
    [2,1,0], but flip the cyclic permutations [1,2,0] and [2,0,1], about a third of the rows.
    """
    p = _text(row, "prompt")
    keys = _numbered(row, "completion_")
    if len(keys) < 2:
        raise RowError("a ranked group needs at least two fields completion_0, completion_1, ...")
    answers = tuple(_text(row, k) for k in keys)
    if "ranking" not in row:
        raise RowError("missing field 'ranking' (completions without a ranking are the KoChatGPT SFT variant: "
                       "use the file as data.sft_file)")
    order = _check_permutation(row["ranking"], len(answers), "ranking")
    ranks = [0] * len(answers)
    for position, idx in enumerate(order):
        ranks[idx] = position + 1
    return RankedGroup(_row_id(row, p), p, answers, tuple(ranks))


def kochatgpt_ppo(row: dict) -> PromptExample:
    p = _text(row, "prompt")
    ref = row.get("completion")
    return PromptExample(_row_id(row, p), p, ref if isinstance(ref, str) and ref.strip() else None)


def kochatgpt_eval(row: dict) -> PromptExample:
    p = _text(row, "prompt")
    return PromptExample(_row_id(row, p), p, _text(row, "completion"))


def _aihub_answer(row: dict, key: str) -> str:
    """AIHub answers are either a string or an object ``{"contents": ...}``."""
    v = row.get(key)
    if isinstance(v, dict):
        if "contents" not in v:
            raise RowError(f"field '{key}' is an object without 'contents'")
        return _text(v, "contents")
    return _text(row, key)


def aihub_sft(row: dict) -> SFTExample:
    q = _text(row, "question")
    return SFTExample(_row_id(row, q), q, _aihub_answer(row, "answer"))


def aihub_rm(row: dict) -> RankedGroup:
    """AIHub-style ranked group: ``answer01..answerNN`` and ranks.

    Ranks are given per answer, either as ``ranking: [r1, r2, ...]`` (the rank of answer01, answer02, ...; 1 = best,
    0-based lists are shifted) or as fields ``rank01..rankNN`` / an object answer's own ``rank``. Unlike
    KoChatGPT's ``ranking`` these are ranks, not an ordering, because that is how the AIHub RLHF labelling sheets
    record them (one rank cell per answer).
    """
    q = _text(row, "question")
    keys = _numbered(row, "answer")
    if len(keys) < 2:
        raise RowError("a ranked group needs at least two fields answer01, answer02, ...")
    answers = tuple(_aihub_answer(row, k) for k in keys)
    if "ranking" in row:
        ranks = _check_permutation(row["ranking"], len(answers), "ranking")
    else:
        raw = []
        for k in keys:
            r = row.get(k.replace("answer", "rank"))
            if r is None and isinstance(row[k], dict):
                r = row[k].get("rank")
            if r is None:
                raise RowError(f"missing rank of '{k}' (give 'ranking' or '{k.replace('answer', 'rank')}')")
            raw.append(r)
        ranks = _check_permutation(raw, len(answers), "rank fields")
    return RankedGroup(_row_id(row, q), q, answers, tuple(r + 1 for r in ranks))


def aihub_ppo(row: dict) -> PromptExample:
    q = _text(row, "question")
    ref = None
    if "answer" in row:
        ref = _aihub_answer(row, "answer")
    return PromptExample(_row_id(row, q), q, ref)


def aihub_eval(row: dict) -> PromptExample:
    q = _text(row, "question")
    return PromptExample(_row_id(row, q), q, _aihub_answer(row, "answer"))


def hf_pref_rm(row: dict) -> RankedGroup:
    p = _text(row, "prompt")
    return RankedGroup(_row_id(row, p), p, (_text(row, "chosen"), _text(row, "rejected")), (1, 2))


_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_hh(transcript: str, field_name: str) -> tuple[str, str]:
    """An HH-RLHF transcript -> (prefix up to and including the last '\\n\\nAssistant:', final answer)."""
    i = transcript.rfind(_ASSISTANT)
    if i < 0:
        raise RowError(f"field '{field_name}' has no '\\n\\nAssistant:' turn")
    answer = transcript[i + len(_ASSISTANT):].strip()
    if not answer:
        raise RowError(f"field '{field_name}' has an empty final assistant turn")
    return transcript[: i + len(_ASSISTANT)], answer


def hh_prompt_text(prefix: str) -> str:
    """The dialogue before the last assistant turn as prompt text.

    A single human turn becomes its plain text (the prompt template adds its own question header); several turns
    keep their speaker labels, one turn per line, so the context survives.
    """
    body = prefix[: -len(_ASSISTANT)] if prefix.endswith(_ASSISTANT) else prefix
    marks = list(_TURN.finditer(body))
    if not marks:
        return body.strip()
    parts = [(m.group(1), body[m.end(): marks[n + 1].start() if n + 1 < len(marks) else len(body)].strip())
             for n, m in enumerate(marks)]
    if len(parts) == 1 and parts[0][0] == "Human":
        return parts[0][1]
    return "\n".join(f"{who}: {text}" for who, text in parts)


def hh_rm(row: dict) -> RankedGroup:
    """HH-RLHF ``{chosen, rejected}`` full transcripts: the prompt is their shared prefix before the last answer."""
    c_prefix, chosen = split_hh(_text(row, "chosen"), "chosen")
    r_prefix, rejected = split_hh(_text(row, "rejected"), "rejected")
    if c_prefix.strip() != r_prefix.strip():
        raise RowError("'chosen' and 'rejected' transcripts differ before the last assistant turn")
    p = hh_prompt_text(c_prefix)
    if not p:
        raise RowError("the dialogue before the last assistant turn is empty")
    return RankedGroup(_row_id(row, p), p, (chosen, rejected), (1, 2))


def _messages(row: dict) -> tuple[str, str | None]:
    """Chat messages -> (prompt text, final assistant answer or None when the last turn is the user's)."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowError("field 'messages' must be a non-empty list of {role, content}")
    turns = []
    for n, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"messages[{n}] must be an object with string 'role' and 'content'")
        turns.append((m["role"], m["content"]))
    answer = None
    if turns[-1][0] == "assistant":
        answer = turns[-1][1]
        if not answer.strip():
            raise RowError("the last assistant message is empty")
        turns = turns[:-1]
    dialogue = [(r, c.strip()) for r, c in turns if r != "system"]
    if not dialogue or not any(r == "user" for r, _ in dialogue):
        raise RowError("messages hold no user turn before the answer")
    if len(dialogue) == 1:
        prompt = dialogue[0][1]
    else:  # keep multi-turn context, one labelled turn per line (as for HH transcripts)
        prompt = "\n".join(f"{r}: {c}" for r, c in dialogue)
    if not prompt.strip():
        raise RowError("the user turn is empty")
    return prompt, answer


def messages_sft(row: dict) -> SFTExample:
    p, a = _messages(row)
    if a is None:
        raise RowError("the last message must be the assistant's answer")
    return SFTExample(_row_id(row, p), p, a)


def messages_ppo(row: dict) -> PromptExample:
    p, a = _messages(row)
    return PromptExample(_row_id(row, p), p, a)


def messages_eval(row: dict) -> PromptExample:
    p, a = _messages(row)
    if a is None:
        raise RowError("the last message must be the reference answer (role 'assistant')")
    return PromptExample(_row_id(row, p), p, a)


PARSERS: dict[tuple[str, str], Callable[[dict], Any]] = {
    ("kochatgpt", "sft"): kochatgpt_sft,
    ("kochatgpt", "rm"): kochatgpt_rm,
    ("kochatgpt", "ppo"): kochatgpt_ppo,
    ("kochatgpt", "eval"): kochatgpt_eval,
    ("aihub", "sft"): aihub_sft,
    ("aihub", "rm"): aihub_rm,
    ("aihub", "ppo"): aihub_ppo,
    ("aihub", "eval"): aihub_eval,
    ("hf_pref", "rm"): hf_pref_rm,
    ("hh", "rm"): hh_rm,
    ("messages", "sft"): messages_sft,
    ("messages", "ppo"): messages_ppo,
    ("messages", "eval"): messages_eval,
}

EXPECTED = {
    "sft": "KoChatGPT {prompt, completion}, AIHub {question, answer}, or {messages: [...]}",
    "rm": "KoChatGPT {prompt, completion_0, completion_1, ..., ranking}, AIHub {question, answer01, ..., ranking}, "
          "HF {prompt, chosen, rejected} or HH-RLHF transcripts {chosen, rejected}",
    "ppo": "KoChatGPT {prompt}, AIHub {question}, or {messages: [...]}",
    "eval": "KoChatGPT {prompt, completion}, AIHub {question, answer}, or {messages: [..., assistant reference]}",
}


def detect_format(row: Any) -> str | None:
    """The format whose characteristic fields the row has, or None."""
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "question" in keys:
        return "aihub"
    if {"chosen", "rejected"} <= keys:
        return "hf_pref" if "prompt" in keys else "hh"
    if "prompt" in keys:
        return "kochatgpt"
    return None


def preference_shaped(row: dict) -> bool:
    """Does a (column-mapped) row hold ranked answers (RM data) rather than one answer (SFT data)?"""
    fmt = detect_format(row)
    if fmt in ("hf_pref", "hh"):
        return True
    if fmt == "kochatgpt":
        return bool(_numbered(row, "completion_")) and "ranking" in row
    if fmt == "aihub":
        return len(_numbered(row, "answer")) >= 2
    return False


# ---------------------------------------------------------------------------------------------------------
# Column maps
# ---------------------------------------------------------------------------------------------------------

# Our field names, the targets a data.columns entry may name (numbered ones by pattern).
OUR_FIELDS = ("prompt", "completion", "ranking", "question", "answer", "chosen", "rejected", "messages", "data_id",
              "id")
_NUMBERED_FIELD = re.compile(r"^(completion_\d+|answer\d+|rank\d+)$")


def is_our_field(name: str) -> bool:
    return name in OUR_FIELDS or bool(_NUMBERED_FIELD.match(name))


def map_columns(row: dict, columns: dict | None) -> dict:
    """Rename the user's columns to ours (``columns``: our name -> theirs); other columns pass unchanged."""
    if not columns:
        return row
    theirs = set(columns.values())
    out = {k: v for k, v in row.items() if k not in theirs}
    for ours, src in columns.items():
        if src in row:
            out[ours] = row[src]
    return out


# ---------------------------------------------------------------------------------------------------------
# Files and tables
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ReadResult:
    path: str
    kind: str
    format: str
    records: list = field(default_factory=list)
    rows: int = 0
    bad_rows: int = 0
    bad_reasons: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"path": self.path, "format": self.format, "rows": self.rows, "records": len(self.records),
                "bad_rows": self.bad_rows, "bad_examples": list(self.bad_reasons)}


def read_file(path: str | Path, kind: str, fmt: str = "auto", skip_bad_rows: bool = False,
              columns: dict | None = None) -> ReadResult:
    """Read one file (JSON, Parquet, CSV or a save_to_disk Dataset) of `kind` into canonical records."""
    tables = open_path(Path(path))
    if len(tables) != 1:
        raise DataError(f"{path}: holds the splits {sorted(tables)}; name one of them as {path}/SPLIT.")
    return read_table(next(iter(tables.values())), kind, fmt, skip_bad_rows, columns)


def read_table(table: Table, kind: str, fmt: str = "auto", skip_bad_rows: bool = False,
               columns: dict | None = None, limit: int | None = None) -> ReadResult:
    """Read the rows of `table` as `kind` (sft, rm, ppo, eval) records; at most `limit` rows when given (the
    pre-flight check of `sweep --dry-run` reads only the first rows).

    `fmt` = "auto" picks the format from the fields of the first row; every later row must parse in that
    format. A bad row raises DataError naming the table and the row's location, unless `skip_bad_rows`, when it
    is counted."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    label = table.label
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{label}: unknown format {fmt!r}; expected auto or one of {', '.join(FORMATS)}.")
    result = ReadResult(label, kind, fmt)
    parser = None
    for loc, row, err in table.rows():
        result.rows += 1
        try:
            if err is not None:
                raise RowError(err)
            if not isinstance(row, dict):
                raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
            row = map_columns(row, columns)
            if parser is None:
                parser = _choose_parser(label, kind, fmt, row, result, columns)
            rec = parser(row)
            if isinstance(rec, list):
                result.records.extend(rec)
            else:
                result.records.append(rec)
        except RowError as e:
            msg = f"{label}: {loc}: {e}{_column_hint(str(e), columns)}"
            if not skip_bad_rows:
                raise DataError(msg + " (set data.skip_bad_rows=true to skip and count bad rows)") from None
            result.bad_rows += 1
            if len(result.bad_reasons) < MAX_REASONS:
                result.bad_reasons.append(msg)
        if limit is not None and result.rows >= limit:
            break
    if not result.records:
        raise DataError(f"{label}: no usable {kind} rows ({result.rows} rows read, {result.bad_rows} bad).")
    return result


def _column_hint(msg: str, columns: dict | None) -> str:
    m = re.match(r"missing field '([^']+)'", msg)
    if m and columns and m.group(1) in columns:
        return f" (data.columns maps it from column '{columns[m.group(1)]}', which this row lacks)"
    return ""


def _choose_parser(label: str, kind: str, fmt: str, row: dict, result: ReadResult,
                   columns: dict | None) -> Callable[[dict], Any]:
    chosen = fmt if fmt != "auto" else detect_format(row)
    fields = ", ".join(sorted(map(str, row))) or "none"
    if chosen is None:
        missing = [f"{ours} from column '{theirs}'" for ours, theirs in (columns or {}).items() if ours not in row]
        hint = (f" data.columns maps {', '.join(missing)}, which the first row lacks." if missing else
                "" if columns else " Or map your column names onto ours with data.columns, e.g. "
                "{prompt: instruction, completion: output}.")
        raise DataError(f"{label}: cannot tell the format of this {kind} data from the fields of its first row "
                        f"({fields}); expected {EXPECTED[kind]}.{hint}")
    parser = PARSERS.get((chosen, kind))
    if parser is None:
        raise DataError(f"{label}: rows look like format '{chosen}' (fields: {fields}), which cannot be used as "
                        f"{kind} data; expected {EXPECTED[kind]}.")
    result.format = chosen
    return parser
