"""`rlhf_ablate data {stats,prepare}`: inspect a data version, or write it out cleaned.

rlhf_ablate/cli.py calls :func:`add_parser` and, for the `data` command, :func:`main`. Errors are
:class:`DataError`s that the top-level CLI prints as one paragraph.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from . import load_data
from .stats import compute_stats, format_stats


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="Data versions: EDA numbers (stats) or cleaned files (prepare).")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{stats,prepare}")
    for name, help_ in (("stats", "Counts, lengths, length-by-rank, duplicates and the cleaning report."),
                        ("prepare", "Write a cleaned version in KoChatGPT JSONL format plus cleaning_report.json.")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--source", default="ko_sample", help="'ko_sample' or a directory of data files.")
        s.add_argument("--version", default="v2" if name == "prepare" else "v1", help="v1, v2 or a custom name.")
        s.add_argument("--format", default="auto", help="auto, kochatgpt, aihub, hf_pref, hh or messages.")
        s.add_argument("--skip-bad-rows", action="store_true", help="Skip and count malformed rows.")
        s.add_argument("--filters", default=None,
                       help="Comma-separated filters defining --version as a custom version, e.g. nfc,dedup_exact.")
        for kind in ("sft", "rm", "ppo", "eval"):
            s.add_argument(f"--{kind}-file", default=None, help=f"{kind} file relative to --source.")
        s.add_argument("--split-seed", type=int, default=0, help="Seed of the stable RM train/eval split.")
        s.add_argument("--eval-fraction", type=float, default=0.2, help="Fraction of RM groups held out.")
        if name == "stats":
            s.add_argument("--json", action="store_true", help="Print the numbers as JSON.")
        else:
            s.add_argument("--out", required=True, help="Output directory (written atomically).")
            s.add_argument("--overwrite", action="store_true", help="Replace --out if it exists.")
    p.set_defaults(func=main)
    return p


def config_from_args(args) -> DataConfig:
    from ..config import build_trial_config

    custom = {}
    if args.filters:
        custom[args.version] = [f.strip() for f in args.filters.split(",") if f.strip()]
    d = {"source": args.source, "format": args.format, "version": args.version, "custom_versions": custom,
         "skip_bad_rows": args.skip_bad_rows, "split_seed": args.split_seed, "eval_fraction": args.eval_fraction}
    for kind in ("sft", "rm", "ppo", "eval"):
        if getattr(args, f"{kind}_file"):
            d[f"{kind}_file"] = getattr(args, f"{kind}_file")
    return build_trial_config({"data": d}, "<command line>").data  # same validation as a sweep file


def main(args) -> int:
    cfg = config_from_args(args)
    if args.data_command == "stats":
        s = compute_stats(load_data(cfg))
        print(json.dumps(s, ensure_ascii=False, indent=2) if args.json else format_stats(s))
        return 0
    out = prepare(cfg, Path(args.out), overwrite=args.overwrite)
    print(f"wrote {cfg.version} of {cfg.source} to {out}")
    return 0


def _jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def kochatgpt_rm_row(g) -> dict:
    """Ranked group -> KoChatGPT row: answers in rank order, so `ranking` (indices best first) is 0..k-1.
    Ties (equal ranks) cannot be written in this format and are refused."""
    if len(set(g.ranks)) != len(g.ranks):
        raise DataError(f"group {g.data_id} has tied ranks {g.ranks}, which the KoChatGPT format cannot hold.")
    order = sorted(range(len(g.answers)), key=lambda i: g.ranks[i])
    row = {"data_id": g.data_id, "prompt": g.prompt}
    for slot, i in enumerate(order):
        row[f"completion_{slot}"] = g.answers[i]
    row["ranking"] = list(range(len(order)))
    return row


def prepare(cfg: DataConfig, out: Path, overwrite: bool = False) -> Path:
    """Write the cleaned version to `out` atomically: everything goes to a temporary sibling directory that is
    renamed into place only when complete, so an error (or a kill) never leaves a half-written `out`.

    The files keep `data_id`, so loading `out` again reproduces the same RM train/eval split."""
    out = out.expanduser().resolve()
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it.")
    bundle = load_data(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _jsonl(tmp / "sft.jsonl", ({"data_id": x.data_id, "prompt": x.prompt, "completion": x.completion}
                                   for x in bundle.sft_train))
        _jsonl(tmp / "rm.jsonl", (kochatgpt_rm_row(g) for g in bundle.rm_train + bundle.rm_eval))
        _jsonl(tmp / "ppo.jsonl", ({"data_id": x.data_id, "prompt": x.prompt} for x in bundle.ppo_prompts))
        _jsonl(tmp / "eval.jsonl", ({"data_id": x.data_id, "prompt": x.prompt, "completion": x.reference}
                                    for x in bundle.eval if x.reference))
        report = dict(bundle.report, fingerprint=bundle.fingerprint)
        (tmp / "cleaning_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2),
                                                  encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
