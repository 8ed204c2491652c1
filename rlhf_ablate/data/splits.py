"""The stable RM train/eval split and the removal of eval prompts from training.

The split is a function of ``data_id`` and ``data.split_seed`` only (a hash, not a shuffle), so a prompt lands on
the same side in every data version, whatever other rows a version drops, and in every trial seed. Rows that share
a prompt but not an id (duplicates with their own ``id`` fields) could still land on both sides, so after the
split every training row whose normalised prompt equals an eval prompt is removed, in SFT, RM and PPO alike.
"""

from __future__ import annotations

import hashlib

from .readers import normalize_text


def unit_hash(data_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from (seed, data_id): stable across runs, machines and Python versions."""
    h = hashlib.sha256(f"{seed}:{data_id}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def is_eval(data_id: str, eval_fraction: float, seed: int) -> bool:
    return unit_hash(data_id, seed) < eval_fraction


def split_groups(groups: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval) by data_id hash; order within each side is the file order."""
    train, ev = [], []
    for g in groups:
        (ev if is_eval(g.data_id, eval_fraction, seed) else train).append(g)
    return train, ev


def prompt_key(prompt: str) -> str:
    return normalize_text(prompt)


def remove_eval_prompts(records: list, eval_prompts: set[str]) -> tuple[list, int]:
    """Drop records whose normalised prompt is an eval prompt. Returns (kept, dropped)."""
    kept = [r for r in records if prompt_key(r.prompt) not in eval_prompts]
    return kept, len(records) - len(kept)


def cap(records: list, n: int, seed: int) -> list:
    """At most n records (0 = all): the n with the smallest id hash, kept in file order.

    Hash order rather than "the first n" so that a cap samples every topic of a file sorted by topic, and the same
    ids survive whichever version dropped other rows.
    """
    if n <= 0 or len(records) <= n:
        return list(records)
    chosen = set(sorted(range(len(records)), key=lambda i: (unit_hash(records[i].data_id, seed + 1), i))[:n])
    return [r for i, r in enumerate(records) if i in chosen]


# Salts of the folds below, so that they are independent of the train/eval split and of the caps.
PROBE_SALT, GOLD_FOLD_SALT = 7919, 104729


def hold_out_probe(records: list, n: int, seed: int) -> tuple[list, list]:
    """(kept, probe): the ``n`` records with the smallest id hash (salted) are PPO's gold probe set, the rest its
    training prompts, each in file order. A function of ``data_id`` and ``data.split_seed`` only, so every trial
    seed and every PPO setting of a sweep probes the same prompts. At least one record is always kept."""
    n = min(n, len(records) - 1)
    if n <= 0:
        return list(records), []
    chosen = set(sorted(range(len(records)), key=lambda i: (unit_hash(records[i].data_id, seed + PROBE_SALT), i))[:n])
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def gold_fold(groups: list, fraction: float, seed: int) -> tuple[list, list]:
    """(proxy, gold): RM training groups split by a salted id hash, ``fraction`` of them for the gold RM, so the
    gold RM of ``rm.gold=disjoint`` never sees a pair the trial's RM was trained on."""
    proxy, gold = [], []
    for g in groups:
        (gold if unit_hash(g.data_id, seed + GOLD_FOLD_SALT) < fraction else proxy).append(g)
    return proxy, gold
