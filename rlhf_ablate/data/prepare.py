"""`rlhf_ablate data prepare`: write a data version out cleaned, atomically, in KoChatGPT JSON-lines format.

Errors are :class:`DataError`s that the CLI (rlhf_ablate/cli.py) prints as one paragraph.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from typing import Any

from ..errors import DataError
from . import load_data


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


def prepare(cfg: Any, out: Path, overwrite: bool = False) -> Path:
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
