"""Trial groups (``resources.group_size``): which trials' PPO stages train together on one base, and the build that
trains them (the loop is rlhf_ablate/ppo/group.py; docs/architecture.md, "Trial groups").

**Who groups.** PPO trials with a LoRA policy whose PPO stage starts from the same SFT model and RM (the same model,
data, sft and rm sections, seed and thread count: so the same SFT and RM stage keys) and whose PPO shapes are equal
(:data:`SHAPE`: batch sizes, epochs, lengths, rank and alpha, so that their rollouts and micro-batches line up row
for row). They differ in what a PPO sweep varies: ``kl_coef``, learning rate and schedule, clipping, GAE, the KL
controller, reward normalisation. Alone: other methods (TRL trains them), rank 0 (a full fine-tune), PPO with the
over-optimization probe or an ensemble reward, float16. A sweep's trials of one group key are cut, in index order,
into groups of K = ``resources.group_size`` (``auto``: the largest K up to :data:`MAX_AUTO` whose estimated memory
fits the smallest GPU with the packing margin, on a machine without GPUs :data:`MAX_AUTO`;
rlhf_ablate/launch/resources.py: auto_group_size). With an ASHA scheduler
trials stay alone: a stop is decided per Tune trial, and a group's steps run in one member's process.

**How a group runs, on every launcher.** Each member is still its own trial (its id, result.json, W&B run, stage
keys). The first member to reach its PPO stage builds it: it takes, without waiting, the stage-cache locks of the
other members whose PPO artifact is not built (a member whose lock another process holds stays out), trains them
all in one loop, and commits each member's artifact under that member's own key (``StageCache.commit``) before
releasing its lock. The other members' trials find their PPO stage in the cache (after waiting on the lock if they
got there meanwhile) and go on with their eval. A member that failed in the group leaves ``<key>.group-failed.json``
beside its lock; its own trial records that failure once instead of training alone (a later run retries it). A
builder killed mid-way commits nothing: on resume the members build again, and finished stages stay.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from ..config import TrialConfig
from ..errors import TrialFailed
from ..files import LockBusy, config_hash, file_lock, write_json

MAX_AUTO = 8
SHAPE = ("rollout_batch_size", "rollout_micro_batch_size", "mini_batch_size", "grad_accum", "ppo_epochs",
         "max_new_tokens", "max_prompt_length", "total_episodes", "lora_rank", "lora_alpha", "temperature",
         "generation_backend")
FAILED = ".group-failed.json"   # beside the member's lock: its failure in a group


def alone_reason(cfg: TrialConfig) -> Optional[str]:
    """Why the trial's PPO cannot join a group, or None."""
    if cfg.method != "ppo":
        return f"method {cfg.method}"
    p = cfg.ppo
    if p.lora_rank == 0:
        return "ppo.lora_rank=0 (a full fine-tune)"
    if p.gold != "none" or p.reward != "single":
        return "ppo.gold / ppo.reward (the over-optimization probe and ensemble rewards run alone)"
    if cfg.model.compute_dtype == "float16":
        return "model.compute_dtype=float16 (loss scaling)"
    return None


def group_key(cfg: TrialConfig, threads: int) -> Optional[str]:
    """Trials with one key can train together (module docstring); None: the trial stays alone."""
    if alone_reason(cfg) is not None:
        return None
    c = cfg.to_dict()
    return config_hash({"model": c["model"], "data": c["data"], "sft": c["sft"], "rm": c["rm"], "seed": cfg.seed,
                        "threads": threads, "ppo": {k: c["ppo"][k] for k in SHAPE}})[:16]


def group_size(spec: Any) -> int:
    """K for the sweep: ``resources.group_size`` as the launcher resolved it (``auto`` becomes a number in
    rlhf_ablate/launch/resources.py: resolve_group_size, on the driver, so every member agrees; unresolved it is 1);
    1 with a scheduler."""
    g = spec.resources.group_size
    if g == "auto" or spec.scheduler.type != "none":
        return 1
    return int(g)


def buckets(spec: Any, trials: list) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, t in enumerate(trials):
        key = group_key(t.config, spec.resources.cpu)
        out.setdefault(key if key is not None else f"alone-{i}", []).append(i)
    return out


def plan_groups(spec: Any, trials: list, k: Optional[int] = None) -> list[list[Any]]:
    """The sweep's trials cut into groups (lists of trials, in index order; a trial alone is a group of one)."""
    k = group_size(spec) if k is None else k
    groups = []
    for idx in buckets(spec, trials).values():
        for s in range(0, len(idx), max(1, k)):
            groups.append([trials[i] for i in idx[s:s + max(1, k)]])
    return sorted(groups, key=lambda g: g[0].index)


def members_of(spec: Any, trial: Any) -> list[Any]:
    """The other trials of ``trial``'s group in its sweep (empty when it runs alone)."""
    if group_size(spec) == 1 or group_key(trial.config, spec.resources.cpu) is None:
        return []
    from ..config.sweep import expand

    for g in plan_groups(spec, expand(spec)):
        if any(t.trial_id == trial.trial_id for t in g):
            return [t for t in g if t.trial_id != trial.trial_id]
    return []


def _failure_path(cache: Any, key: str) -> Path:
    return cache.lock_path("ppo", key).with_name(f"{key}{FAILED}")  # beside the member's lock


def take_failure(cache: Any, key: str) -> Optional[str]:
    """The failure a group recorded for this PPO stage key, removed as it is read (a later run trains again)."""
    path = _failure_path(cache, key)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    finally:
        path.unlink(missing_ok=True)
    return f"{rec['error']} (trained in a group built by trial {rec['builder']})"


def build_group(c: Any, out: Path, solo: Any, promises: Any) -> None:
    """The PPO stage of ``c``'s trial and of the members of its group (``c.group``: (trial id, config, PPO stage
    key)) that nobody has built or is building, in one loop (rlhf_ablate/ppo/group.py). ``solo(c, out)`` builds it
    alone when no other member is left; ``promises(cfg)``: the files a member's artifact must hold."""
    from ..ppo.group import train_ppo_group

    cache = c.cache
    with contextlib.ExitStack() as locks:
        claimed = []
        for tid, mcfg, key in c.group:
            if cache.is_complete("ppo", key):
                continue
            try:
                locks.enter_context(file_lock(cache.lock_path("ppo", key), timeout=0))
            except LockBusy:
                continue  # its own trial (or another group) is building it
            if not cache.is_complete("ppo", key):
                claimed.append((tid, mcfg, key))
        if not claimed:
            return solo(c, out)
        staging = [cache.staging("ppo", key) for _, _, key in claimed]
        try:
            ids = [c.cfg.trial_id] + [tid for tid, _, _ in claimed]
            c.on_step({"stage": "ppo", "event": "group", "members": len(ids)})
            failures = train_ppo_group([c.cfg] + [m for _, m, _ in claimed], c.data, c.dirs["sft"], c.dirs["rm"],
                                       [out] + staging, [c.on_step] + [None] * len(claimed))
            for i, ((tid, mcfg, key), d) in enumerate(zip(claimed, staging), 1):
                if i in failures:
                    write_json(_failure_path(cache, key), {"error": failures[i], "builder": ids[0]})
                    continue
                write_json(d / "group.json", {"members": ids, "member": i, "builder": ids[0]})
                cache.commit("ppo", key, d, promises(mcfg))
        finally:
            for d in staging:
                shutil.rmtree(d, ignore_errors=True)
    if 0 in failures:
        raise TrialFailed(failures[0])
    write_json(out / "group.json", {"members": ids, "member": 0, "builder": ids[0]})
