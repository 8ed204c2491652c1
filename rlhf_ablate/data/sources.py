"""Where a trial's data comes from: ``data.source`` -> one table per kind (sft, rm, ppo, eval).

``data.source`` is one of:

- ``ko_sample``, the bundled Korean sample (rlhf_ablate/data/ko_sample);
- a directory of files. Each kind takes ``data.<kind>_file`` when set (a file or a ``save_to_disk`` directory,
  relative to the source), else the first default name present (:data:`DEFAULT_STEMS` with any extension of
  rlhf_ablate/data/rows.py). A directory with none of these names but ``train.*`` (and ``test.*``) files, the layout
  of Hugging Face dataset repositories such as Anthropic/hh-rlhf, is read as a dataset with those splits;
- one file (JSON, Parquet, CSV), read as a dataset with one split named after the file;
- a ``save_to_disk`` directory (a Dataset, or a DatasetDict with its splits);
- a Hub dataset id ``org/name`` (or ``org/name/folder`` for repositories with one folder per subset, e.g.
  ``Anthropic/hh-rlhf/harmless-base``), loaded with ``datasets.load_dataset``. Offline (HF_HUB_OFFLINE), or when
  the hub does not answer within a few seconds (rlhf_ablate/hub.py), only the local datasets cache is used.

For sources with splits, each kind takes ``data.<kind>_file`` as a split name when set; else the split named like
the kind (sft, rm, ppo, eval); else the ``train`` split (or the only one) serves SFT or RM by the shape of its rows
(ranked answers or chosen/rejected -> RM), and a ``test`` or ``validation`` split serves as the held-out eval prompts
when its rows have a prompt and one reference answer (an HH ``test`` split of preference pairs does not, and is left
out: it is not mistaken for the eval file). A kind without a table is ``None``; rlhf_ablate/data/__init__.py
decides what that means (no SFT file: the rank-1 answers of the RM data).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Optional

from .. import hub
from ..errors import DataError
from .readers import EXPECTED, PARSERS, RowError, detect_format, map_columns, preference_shaped, read_table
from .rows import TABLE_EXTS, Table, dataset_tables, is_saved_dataset, open_path

SAMPLE_DIR = Path(__file__).parent / "ko_sample"
KINDS = ("sft", "rm", "ppo", "eval")
# Default file stems per kind, tried in this order with every extension of TABLE_EXTS: the KoChatGPT release names
# first, then the names `data prepare` writes.
DEFAULT_STEMS = {"sft": ["kochatgpt_1_SFT", "sft"], "rm": ["kochatgpt_2_RM", "rm"],
                 "ppo": ["kochatgpt_3_PPO", "ppo"], "eval": ["eval"]}
SPLIT_NAMES = ("train", "test", "validation")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*(/[\w.\-]+)*$")


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~", ".\\")) or "\\" in s or s in (".", "..")


def hub_id(source: str) -> Optional[tuple[str, Optional[str]]]:
    """``org/name[/folder]`` -> (repo id, folder or None); None when `source` cannot be a Hub dataset id."""
    if _looks_like_path(source) or not _HUB_ID.match(source) or source.endswith(TABLE_EXTS):
        return None
    parts = source.split("/")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


# ---------------------------------------------------------------------------------------------------------
# Sources -> named tables
# ---------------------------------------------------------------------------------------------------------

def _file_by_stem(d: Path, stems: list[str]) -> Optional[Path]:
    for stem in stems:
        for ext in TABLE_EXTS:
            if (d / (stem + ext)).is_file():
                return d / (stem + ext)
        if is_saved_dataset(d / stem):
            return d / stem
    return None


def _tried(kind: str) -> str:
    return ", ".join(f"{s}.*" for s in DEFAULT_STEMS[kind])


def _one(tables: dict[str, Table], path: Path, what: str) -> Table:
    if len(tables) != 1:
        raise DataError(f"{what}: {path} holds the splits {sorted(tables)}; name one, e.g. {path.name}/"
                        f"{sorted(tables)[0]}.")
    return next(iter(tables.values()))


def source_tables(cfg: Any) -> tuple[str, dict[str, Table] | None, Optional[Path]]:
    """(description, named tables or None, directory) of ``cfg.source``: a directory of kind-named files gives
    (desc, None, dir); every other source gives its splits."""
    src = str(cfg.source).strip()
    if src == "ko_sample":
        return "the bundled sample", None, SAMPLE_DIR
    p = Path(src).expanduser()
    if p.is_dir():
        if is_saved_dataset(p):
            return f"save_to_disk dataset {p}", open_path(p), None
        if _file_by_stem(p, [s for stems in DEFAULT_STEMS.values() for s in stems]) is None:
            splits = {name: _file_by_stem(p, [name]) for name in SPLIT_NAMES}
            if any(splits.values()):
                return f"directory {p}", {n: _one(open_path(f), f, "data.source") for n, f in splits.items() if f}, p
        return f"directory {p}", None, p
    if p.is_file():
        return f"file {p}", {p.name.split(".")[0]: _one(open_path(p), p, "data.source")}, None
    hid = None if p.exists() else hub_id(src)
    if hid is None:
        raise DataError(f"data.source: {src} does not exist (resolved to {p.resolve()}). Use 'ko_sample', a "
                        f"directory of data files, a data file, a save_to_disk directory or a Hub dataset id "
                        f"(org/name).")
    return f"Hub dataset {src}", _hub_tables(src, *hid), None


def _hub_tables(src: str, repo: str, folder: Optional[str]) -> dict[str, Table]:
    import datasets

    kw = {"data_dir": folder} if folder else {}
    why = hub.unreachable()
    try:
        if why is None:
            obj = datasets.load_dataset(repo, **kw)
        else:
            if not hub.cached_dataset_dirs(repo):
                raise DataError(
                    f"data.source: {src} is not a local path (resolved to {Path(src).resolve()}) and, as a Hub "
                    f"dataset id, it is not in the local datasets cache ({datasets.config.HF_DATASETS_CACHE}); "
                    f"{why}. Load it once with network (datasets.load_dataset('{repo}')), or give a local path.")
            with hub.cache_only():
                obj = datasets.load_dataset(repo, **kw)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (not found, gated, bad config, cache)
        raise DataError(f"data.source: Hub dataset {src} could not be loaded ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}).") from None
    return dataset_tables(obj, f"Hub dataset {src}")


# ---------------------------------------------------------------------------------------------------------
# Named tables -> one table per kind
# ---------------------------------------------------------------------------------------------------------

def _first_row(table: Table, columns: Optional[dict]) -> Optional[dict]:
    for _loc, row, err in table.rows():
        if err is None and isinstance(row, dict):
            return map_columns(row, columns)
        return None
    return None


def _fits(kind: str, row: Optional[dict], fmt: str) -> bool:
    """Can the first row of a table serve `kind`?"""
    if row is None:
        return False
    chosen = fmt if fmt != "auto" else detect_format(row)
    parser = PARSERS.get((chosen, kind))
    if parser is None:
        return False
    try:
        parser(row)
    except (RowError, ValueError):
        return False
    return True


def resolve_tables(cfg: Any) -> tuple[dict[str, Optional[Table]], dict[str, str]]:
    """The table of each kind (None when the source has none) and a note per kind saying where it came from."""
    desc, splits, d = source_tables(cfg)
    if splits is None:
        return _from_directory(cfg, d)
    chosen: dict[str, Optional[Table]] = {k: None for k in KINDS}
    notes: dict[str, str] = {}
    for kind in KINDS:
        name = getattr(cfg, f"{kind}_file")
        if name:
            if name not in splits:
                close = difflib.get_close_matches(name, list(splits), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise DataError(f"data.{kind}_file: {desc} has no split '{name}' (splits: "
                                f"{', '.join(sorted(splits))}).{hint}")
            chosen[kind], notes[kind] = splits[name], f"split '{name}' (data.{kind}_file)"
        elif kind in splits:
            chosen[kind], notes[kind] = splits[kind], f"split '{kind}'"
    main = "train" if "train" in splits else (next(iter(splits)) if len(splits) == 1 else None)
    if main is not None and splits[main] not in chosen.values():
        row = _first_row(splits[main], cfg.columns)
        if row is None:
            raise DataError(f"{splits[main].label}: the first row is not a readable object; expected "
                            f"{EXPECTED['rm']}, or {EXPECTED['sft']}.")
        kind = "rm" if preference_shaped(row) else "sft"
        if chosen[kind] is None:
            shape = "ranked answers" if kind == "rm" else "one answer per prompt"
            chosen[kind], notes[kind] = splits[main], f"split '{main}' ({shape})"
    for name in ("test", "validation"):
        if chosen["eval"] is None and name in splits and splits[name] not in chosen.values():
            if _fits("eval", _first_row(splits[name], cfg.columns), cfg.format):
                chosen["eval"], notes["eval"] = splits[name], f"split '{name}'"
            else:
                notes[f"unused_{name}"] = (f"split '{name}' not used as eval prompts: its rows have no single "
                                           f"reference answer")
    if chosen["sft"] is None and chosen["rm"] is None:
        raise DataError(f"data.source: {desc} has no SFT or RM data: splits {', '.join(sorted(splits))}; set "
                        f"data.sft_file / data.rm_file to a split name.")
    return chosen, notes


def _from_directory(cfg: Any, d: Path) -> tuple[dict[str, Optional[Table]], dict[str, str]]:
    chosen: dict[str, Optional[Table]] = {}
    notes: dict[str, str] = {}
    for kind in KINDS:
        explicit = getattr(cfg, f"{kind}_file")
        if explicit:
            p = Path(explicit).expanduser()
            p = p if p.is_absolute() else d / p
            if not p.exists():
                raise DataError(f"data.{kind}_file: {p} does not exist.")
            chosen[kind], notes[kind] = _one(open_path(p), p, f"data.{kind}_file"), f"{p.name} (data.{kind}_file)"
            continue
        found = _file_by_stem(d, DEFAULT_STEMS[kind])
        chosen[kind] = None if found is None else _one(open_path(found), found, f"data.{kind}_file")
        if found is not None:
            notes[kind] = found.name
    if chosen["eval"] is None:
        test = _file_by_stem(d, ["test"])
        if test is not None:
            t = _one(open_path(test), test, "data.eval_file")
            if _fits("eval", _first_row(t, cfg.columns), cfg.format):
                chosen["eval"], notes["eval"] = t, test.name
            else:
                notes["unused_test"] = f"{test.name} not used as eval prompts: its rows have no single reference answer"
    if chosen["rm"] is None:
        raise DataError(f"{d}: no RM file; tried {_tried('rm')} (and train.* for a Hugging Face layout). Set "
                        f"data.rm_file.")
    return chosen, notes


# ---------------------------------------------------------------------------------------------------------
# The pre-flight check of `sweep --dry-run`, `sweep` and `trial`
# ---------------------------------------------------------------------------------------------------------

def check_source(cfg: Any, rows: int = 20) -> str:
    """Check that ``cfg`` (a DataConfig) names data that exists and parses, reading only the first `rows` rows of
    each table; raise DataError naming the file and row otherwise. Returns a one-line summary.

    A Hub dataset that the hub can serve is checked by id only (reading rows would download it all)."""
    src = str(cfg.source).strip()
    p = Path(src).expanduser()
    hid = None if (src == "ko_sample" or p.exists()) else hub_id(src)
    if hid is not None and hub.unreachable() is None:
        from huggingface_hub import HfApi

        try:
            HfApi().dataset_info(hid[0], timeout=hub.PROBE_TIMEOUT + 2)
        except Exception as e:  # noqa: BLE001 - not found, gated, no access
            raise DataError(f"data.source: Hub dataset {hid[0]} is not available ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}).") from None
        return f"Hub dataset {src} (found on the hub; rows are read when a trial starts)"
    tables, notes = resolve_tables(cfg)
    parts = []
    for kind, t in tables.items():
        if t is None:
            continue
        r = read_table(t, kind, cfg.format, cfg.skip_bad_rows, cfg.columns, limit=rows)
        parts.append(f"{kind} {notes.get(kind, t.label)} ({r.format})")
    return "; ".join(parts)
