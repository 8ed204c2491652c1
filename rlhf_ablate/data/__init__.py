"""Korean preference data: readers, canonical records, versions (cleaning), splits, stats.

``load_data(cfg.data)`` is the one entry point of the stages: it reads the four files (SFT pairs, ranked groups,
PPO prompts, held-out eval prompts), splits the ranked groups into RM train/eval by a stable hash of their id,
removes eval prompts from every training split, cleans the training splits with the filters of
``data.version``, applies the ``max_*`` caps and returns a :class:`DataBundle` with a content fingerprint (the
stage cache keys on it) and a report of every row dropped, by rule and split.

Evaluation splits do not change with the version, so that a v1-vs-v2 table compares models on the same test:
- ``rm_eval`` is always cleaned with every filter (v2): its labels are the yardstick, and a rank-1 refusal or a
  rank-1 English answer would score a correct reward model as wrong;
- ``eval`` (held-out prompts with references) is only NFC/whitespace normalised; it is the user's benchmark.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .readers import ReadResult, read_file, read_table
from .records import PreferencePair, PromptExample, RankedGroup, SFTExample, pairs
from .sources import SAMPLE_DIR, check_source, resolve_tables
from .splits import cap, is_eval, prompt_key, remove_eval_prompts, split_groups
from .splits import unit_hash
from .versions import BUILTIN_VERSIONS, FILTERS, Options, apply_filters, version_filters

__all__ = ["DataBundle", "load_data", "check_source", "corpus_texts", "pairs", "read_sources", "SAMPLE_DIR",
           "SFTExample", "RankedGroup", "PreferencePair", "PromptExample", "FILTERS", "BUILTIN_VERSIONS"]

SPLITS = ("sft_train", "rm_train", "rm_eval", "ppo_prompts", "eval")
DROP_SAMPLES = 3  # dropped rows shown per rule and split in the cleaning report


@dataclass(frozen=True)
class DataBundle:
    sft_train: list
    rm_train: list
    rm_eval: list
    ppo_prompts: list
    eval: list
    version: str
    fingerprint: str
    report: dict = field(default_factory=dict, compare=False)


def read_sources(cfg) -> tuple[dict[str, ReadResult | None], dict[str, str]]:
    """Read the raw (v1) tables of `cfg` (a DataConfig; rlhf_ablate/data/sources.py says where each comes from).
    SFT, PPO and eval are optional (None when absent); RM data is required. Returns (results, where each came
    from)."""
    tables, notes = resolve_tables(cfg)
    if tables["rm"] is None:
        raise DataError(f"data.source {cfg.source}: no RM data (ranked answers or chosen/rejected pairs) among "
                        f"{', '.join(notes.get(k, k) for k in tables if tables[k] is not None) or 'its tables'}; "
                        f"set data.rm_file.")
    out: dict[str, ReadResult | None] = {}
    for kind, t in tables.items():
        out[kind] = None if t is None else read_table(t, kind, cfg.format, cfg.skip_bad_rows, cfg.columns)
    return out, notes


def load_data(cfg) -> DataBundle:
    """DataConfig -> DataBundle (see the module docstring for the order of steps)."""
    filters = version_filters(cfg.version, cfg.custom_versions)
    raw, notes = read_sources(cfg)
    report: dict[str, Any] = {
        "version": cfg.version, "filters": filters, "source": cfg.source,
        "files": {k: (r.summary() if r else None) for k, r in raw.items()},
        "bad_rows": sum(r.bad_rows for r in raw.values() if r),
        "tables": notes,
    }
    if raw["sft"] is not None:
        sft = raw["sft"].records
        report["sft_source"] = "file"
    else:
        # Preference data alone (an HH-RLHF directory, a Hub dataset of pairs): SFT on the preferred answers, as
        # DPO's authors do before preference training (Rafailov et al. 2023, sec. 6, "Preferred-FT").
        sft = [SFTExample(g.data_id, g.prompt, g.best) for g in raw["rm"].records]
        report["sft_source"] = "rank-1 answers of the RM data"
    if raw["eval"] is not None:
        ev = raw["eval"].records
        report["eval_source"] = "file"
    else:  # no eval file (KoChatGPT ships none): hold out SFT examples by the same stable hash
        ev = [PromptExample(x.data_id, x.prompt, x.completion) for x in sft
              if is_eval(x.data_id, cfg.eval_fraction, cfg.split_seed)]
        report["eval_source"] = "held out from the SFT file"
    rm_train, rm_eval = split_groups(raw["rm"].records, cfg.eval_fraction, cfg.split_seed)
    eval_prompts = {prompt_key(x.prompt) for x in list(rm_eval) + list(ev)}

    counts = {s: {} for s in SPLITS}
    overlap = {}
    splits = {"sft_train": sft, "rm_train": rm_train}
    if raw["ppo"] is not None:
        splits["ppo_prompts"] = raw["ppo"].records
        report["ppo_source"] = "file"
    for name in list(splits):
        counts[name]["read"] = len(splits[name])
        splits[name], overlap[name] = remove_eval_prompts(splits[name], eval_prompts)
        counts[name]["after_eval_overlap"] = len(splits[name])
    if raw["ppo"] is None:  # KoChatGPT's own PPO file is the SFT prompts; do the same, after the eval removal
        splits["ppo_prompts"] = [PromptExample(x.data_id, x.prompt, x.completion) for x in splits["sft_train"]]
        report["ppo_source"] = "prompts of the SFT file"
        counts["ppo_prompts"]["read"] = counts["ppo_prompts"]["after_eval_overlap"] = len(splits["ppo_prompts"])
        overlap["ppo_prompts"] = 0
    report["eval_overlap_removed"] = overlap

    dropped: dict[str, dict[str, int]] = {f: {} for f in FILTERS}
    changed: dict[str, dict[str, int]] = {}
    samples: dict[str, dict[str, list]] = {}
    opts = filter_options(cfg, raw["rm"].format)
    report["filter_options"] = {"evasive_sft": opts.evasive_sft, "evasive_rm": opts.evasive_rm}

    def clean(name: str, records: list, kind: str, names: list[str]) -> list:
        kept, d, c, ex = apply_filters(records, kind, names, opts)
        for rule, n in d.items():
            dropped[rule][name] = n
            if ex[rule]:
                samples.setdefault(rule, {})[name] = drop_samples(ex[rule], cfg.split_seed)
        for rule, n in c.items():
            changed.setdefault(rule, {})[name] = n
        return kept

    kinds = {"sft_train": "sft", "rm_train": "rm", "ppo_prompts": "ppo"}
    for name, kind in kinds.items():
        splits[name] = clean(name, splits[name], kind, filters)
    counts["rm_eval"]["read"] = len(rm_eval)
    splits["rm_eval"] = clean("rm_eval", rm_eval, "rm", BUILTIN_VERSIONS["v2"])
    counts["eval"]["read"] = len(ev)
    splits["eval"] = clean("eval", ev, "eval", ["nfc"])
    for name in SPLITS:
        counts[name]["after_cleaning"] = len(splits[name])

    caps = {"sft_train": cfg.max_sft, "rm_train": cfg.max_rm_groups, "ppo_prompts": cfg.max_ppo_prompts,
            "eval": cfg.max_eval}
    for name, n in caps.items():
        splits[name] = cap(splits[name], n, cfg.split_seed)
    for name in SPLITS:
        counts[name]["final"] = len(splits[name])

    report["dropped"] = {rule: per for rule, per in dropped.items() if per}
    report["changed"] = changed
    report["dropped_examples"] = samples
    report["counts"] = counts
    report["split"] = {"eval_fraction": cfg.eval_fraction, "split_seed": cfg.split_seed,
                       "rm_eval_cleaning": "v2 (all filters, every version)", "eval_cleaning": "nfc only"}
    return DataBundle(version=cfg.version, fingerprint=fingerprint(splits), report=report,
                      **{name: splits[name] for name in SPLITS})


def filter_options(cfg, rm_format: str) -> Options:
    """The filters' per-stage choices; ``evasive_rm: auto`` keeps refusals for HH-RLHF transcripts (harmlessness
    data prefers them) and drops groups with a preferred refusal otherwise (rlhf_ablate/data/versions.py: evasive)."""
    rm = cfg.evasive_rm
    if rm == "auto":
        rm = "keep" if rm_format == "hh" else "drop_preferred"
    return Options(evasive_sft=cfg.evasive_sft, evasive_rm=rm)


def _short(text: str, n: int = 100) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[:n - 1] + "…"


def drop_samples(gone: list, seed: int, k: int = DROP_SAMPLES) -> list[dict]:
    """A few dropped rows of one rule and split, for a user to judge the rule by: the k with the smallest id hash
    (spread over the file, the same rows whatever else changed), in file order."""
    order = sorted(range(len(gone)), key=lambda i: (unit_hash(str(gone[i][0].data_id), seed + 2), i))[:k]
    out = []
    for i in sorted(order):
        rec, why = gone[i]
        row = {"data_id": rec.data_id, "prompt": _short(rec.prompt), "why": why}
        if isinstance(rec, SFTExample):
            row["answer"] = _short(rec.completion)
        out.append(row)
    return out


def fingerprint(splits: dict[str, list]) -> str:
    """sha256 of the canonical records of every split (names, order and all fields)."""
    canon = {name: [vars(r) for r in splits[name]] for name in SPLITS}  # = asdict for these flat records, 10x faster
    blob = json.dumps(canon, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _sample_texts(kinds: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for kind in kinds:
        for rec in read_file(SAMPLE_DIR / f"{kind}.jsonl", kind).records:
            out.append(rec.prompt)
            if isinstance(rec, SFTExample):
                out.append(rec.completion)
            elif isinstance(rec, RankedGroup):
                out.extend(rec.answers)
            elif rec.reference is not None:
                out.append(rec.reference)
    return out


def corpus_texts() -> list[str]:
    """Every string of the bundled sample as read (v1, dirt included): the tiny tokenizer is trained on it, so it
    must cover NFD jamo, English and every Hangul syllable a v1 or v2 trial can meet."""
    return _sample_texts(("sft", "rm", "ppo", "eval"))


def pretrain_texts() -> list[str]:
    """Raw Korean documents for pretraining the built-in tiny models: every prompt and answer of the bundled SFT,
    RM and PPO files, without the prompt template (so SFT still has the format to teach) and without the held-out
    eval file (so eval references are never seen before eval)."""
    return _sample_texts(("sft", "rm", "ppo"))
