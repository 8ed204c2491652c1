"""Trial groups (``resources.group_size``): which trials' PPO stages train together on one base, and the build that
trains them (the loop is rlhf_ablate/ppo/group.py; docs/architecture.md, "Trial groups").

**Who groups.** PPO trials with a LoRA policy whose PPO stage starts from the same SFT model (the same model, data
and sft sections, seed and thread count: so the same SFT stage key), with RMs that are LoRA adapters trained from it
(each member scores with its own; a member whose RM is not built yet when the group starts trains alone) or the same
RM otherwise (:func:`own_rm`), and whose PPO shapes are equal
(:data:`SHAPE`: batch sizes, epochs, lengths, rank and alpha, so that their rollouts and micro-batches line up row
for row). They differ in what a PPO sweep varies: ``kl_coef``, learning rate and schedule, clipping, GAE, the KL
controller, reward normalisation. Alone: other methods (TRL trains them), rank 0 (a full fine-tune), PPO with the
over-optimization probe or an ensemble reward, float16. A sweep's trials of one group key are cut, in index order,
into groups of K = ``resources.group_size`` (``auto``: the largest K up to :data:`MAX_AUTO` whose estimated memory
fits the smallest GPU with the packing margin, on a machine without GPUs :data:`MAX_AUTO`;
rlhf_ablate/launch/resources.py: auto_group_size).

**How a group runs, on every launcher.** Each member is still its own trial (its id, result.json, W&B run, stage
keys). The first member to reach its PPO stage builds it: it takes, without waiting, the stage-cache locks of the
other members whose PPO artifact is not built (a member whose lock another process holds stays out), trains them
all in one loop, and commits each member's artifact under that member's own key (``StageCache.commit``) before
releasing its lock. The other members' trials find their PPO stage in the cache (after waiting on the lock if they
got there meanwhile); the first member to reach its PPO eval stage then evaluates the members whose PPO is built
in one batched eval (:func:`build_eval_group`), so the others find their eval in the cache too. A member that failed
in the group leaves ``<key>.group-failed.json`` beside its lock; its own trial records that failure once instead of
training alone (a later run retries it). A builder killed mid-way commits nothing: on resume the members build again, and finished
stages stay. On SLURM one array task runs one group's members one after another (rlhf_ablate/launch/slurm.py:
task_trials, run_tasks).

**A member's steps reach its own trial, and a stop reaches the group** (ASHA, and every launcher's progress and W&B).
While it trains, the builder appends each other member's step events to ``<key>.group-steps.jsonl`` beside that
member's lock; the member's trial, waiting for its PPO stage, reports them as its own steps as they come
(:func:`follow`), and the ones it has not reported yet from the artifact's history once the stage is committed
(:func:`replay`), so every member reports each of its steps once, live or late. When a scheduler stops a member
(Ray Tune raises ``SystemExit`` inside the report of the step it judged), the member's trial leaves
``<key>.group-stop.json`` and ends as ``stopped`` at that step; the builder takes the member out of the group at its
next step and commits nothing for it. When the builder's own trial is stopped, the builder takes itself out the same
way, trains the others to the end and commits them, and only then ends its trial as ``stopped``: its worker stays
busy (and keeps its resources) until then (rlhf_ablate/launch/tune.py waits for it, :func:`building`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import TrialConfig
from ..errors import TrialFailed
from ..files import LockBusy, config_hash, file_lock, write_json

MAX_AUTO = 8
SHAPE = ("rollout_batch_size", "rollout_micro_batch_size", "mini_batch_size", "grad_accum", "ppo_epochs",
         "max_new_tokens", "max_prompt_length", "total_episodes", "lora_rank", "lora_alpha", "temperature",
         "generation_backend")
FAILED = ".group-failed.json"   # beside the member's lock: its failure in a group
STEPS = ".group-steps.jsonl"    # beside the member's lock: its step events while a group trains it
STOP = ".group-stop.json"       # beside the member's lock: its trial was stopped (by a scheduler)
POLL_S = 0.2                    # how often a waiting member looks for new steps
_building = threading.Event()   # set while this process trains a group (launch/tune.py waits for it)


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


def own_rm(cfg: TrialConfig) -> bool:
    """Whether the trial's RM can be a frozen adapter on a group's shared base (an adapter trained from the SFT
    model): then members with different RMs group, each scoring with its own."""
    return cfg.rm.init_from == "sft" and cfg.rm.lora_rank > 0


def group_key(cfg: TrialConfig, threads: int) -> Optional[str]:
    """Trials with one key can train together (module docstring); None: the trial stays alone."""
    if alone_reason(cfg) is not None:
        return None
    c = cfg.to_dict()
    return config_hash({"model": c["model"], "data": c["data"], "sft": c["sft"], "seed": cfg.seed,
                        "rm": "adapter" if own_rm(cfg) else c["rm"], "threads": threads,
                        "ppo": {k: c["ppo"][k] for k in SHAPE}})[:16]


def group_size(spec: Any) -> int:
    """K for the sweep: ``resources.group_size`` as the launcher resolved it (``auto`` becomes a number in
    rlhf_ablate/launch/resources.py: resolve_group_size, on the driver, so every member agrees; unresolved it is 1).
    """
    g = spec.resources.group_size
    return 1 if g == "auto" else int(g)


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


def _beside(cache: Any, key: str, suffix: str) -> Path:
    return cache.lock_path("ppo", key).with_name(f"{key}{suffix}")  # beside the member's lock


def building() -> bool:
    """Whether this process is training a trial group now (a stopped builder's trial ends when the group does)."""
    return _building.is_set()


def follow(cache: Any, key: str, emit: Callable[[dict], None]) -> int:
    """Report the steps a group builder in another process trains for this member (``<key>.group-steps.jsonl``) as
    they come, until the stage is committed or no builder trains it; returns how many were reported. A stop raised by
    ``emit`` (``SystemExit``: a scheduler stopped the trial) is left in ``<key>.group-stop.json`` for the builder."""
    steps = _beside(cache, key, STEPS)
    sent = polls = 0
    while not cache.is_complete("ppo", key):
        try:
            text = steps.read_text(encoding="utf-8")
        except FileNotFoundError:
            return sent  # nobody trains it in a group (now): the stage cache's lock decides who builds it
        lines = text.split("\n")[:-1]  # whole lines only: the builder may be writing the last one
        for line in lines[sent:]:
            _emit_or_stop(cache, key, emit, json.loads(line))
            sent += 1
        polls += 1
        if polls % 10 == 0 and not _held(cache.lock_path("ppo", key)):
            return sent  # a builder killed mid-way left its steps file: nobody trains it now
        time.sleep(POLL_S)
    return sent


def _held(lock: Path) -> bool:
    try:
        with file_lock(lock, timeout=0):
            return False
    except LockBusy:
        return True


def replay(history: list[dict], sent: int, emit: Callable[[dict], None]) -> None:
    """Report a group-trained member's steps from its committed history that :func:`follow` did not report live."""
    from ..ppo.loop import step_event

    for row in history[sent:]:
        emit(step_event(row, len(history)))


def _emit_or_stop(cache: Any, key: str, emit: Callable[[dict], None], event: dict) -> None:
    try:
        emit(event)
    except SystemExit:
        write_json(_beside(cache, key, STOP), {"step": event["step"]})
        raise


def _failure_path(cache: Any, key: str) -> Path:
    return _beside(cache, key, FAILED)


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
    """The PPO stage of ``c``'s trial and of the members of its group (``c.group``: (trial id, config, stage keys))
    that nobody has built or is building and whose RM is built, in one loop (rlhf_ablate/ppo/group.py).
    ``solo(c, out)`` builds it alone when no other member is left; ``promises(cfg)``: the files a member's artifact
    must hold."""
    from ..ppo.group import train_ppo_group

    cache = c.cache
    with contextlib.ExitStack() as locks:
        # a member whose RM is not built stays out: its own trial trains it, then its PPO (alone or in a group)
        claimed = _claim(cache, locks, "ppo", "ppo", c.group, needs=("rm",))
        if not claimed:
            return solo(c, out)
        keys = [k["ppo"] for _, _, k in claimed]
        staging = [cache.staging("ppo", key) for key in keys]
        own: list[SystemExit] = []  # the builder's own trial stopped by its scheduler
        for key in keys:
            _beside(cache, key, STOP).unlink(missing_ok=True)  # from an earlier run: not for this group
            _beside(cache, key, STEPS).write_text("", encoding="utf-8")
        _building.set()
        try:
            ids = [c.cfg.trial_id] + [tid for tid, _, _ in claimed]
            c.on_step({"stage": "ppo", "event": "group", "members": len(ids)})
            failures, stopped = train_ppo_group(
                [c.cfg] + [m for _, m, _ in claimed], c.data, c.dirs["sft"],
                [c.dirs["rm"]] + [cache.path("rm", k["rm"]) for _, _, k in claimed], [out] + staging,
                [_own_steps(c.on_step, own)] + [_step_writer(_beside(cache, key, STEPS)) for key in keys],
                lambda k: bool(own) if k == 0 else _take_stop(cache, keys[k - 1]))
            for i, ((_, mcfg, _), key, d) in enumerate(zip(claimed, keys, staging), 1):
                if i in failures:
                    write_json(_failure_path(cache, key), {"error": failures[i], "builder": ids[0]})
                elif i not in stopped:
                    write_json(d / "group.json", {"members": ids, "member": i, "builder": ids[0]})
                    cache.commit("ppo", key, d, promises(mcfg))
        finally:
            _building.clear()
            for key in keys:
                _beside(cache, key, STEPS).unlink(missing_ok=True)
            for d in staging:
                shutil.rmtree(d, ignore_errors=True)
    if own:
        raise own[0]
    if 0 in failures:
        raise TrialFailed(failures[0])
    write_json(out / "group.json", {"members": ids, "member": 0, "builder": ids[0]})


def build_eval_group(c: Any, out: Path, solo: Any, promises: tuple) -> None:
    """The PPO eval stage of ``c``'s trial and of its group's members whose PPO artifact is built and whose eval
    nobody has built or is building, in one batched eval (rlhf_ablate/stages/evaluate.py: evaluate_policies); each
    member's artifact is committed under its own eval key. ``solo(c, out)`` evaluates alone when no member is left."""
    from ..stages.evaluate import evaluate_policies

    cache = c.cache
    with contextlib.ExitStack() as locks:
        claimed = _claim(cache, locks, "eval", "eval_ppo", c.group, needs=("rm", "ppo"))
        if not claimed:
            return solo(c, out)
        staging = [cache.staging("eval", k["eval_ppo"]) for _, _, k in claimed]
        try:
            evaluate_policies([c.cfg] + [m for _, m, _ in claimed], c.data, "ppo", c.dirs["sft"],
                              [c.dirs["rm"]] + [cache.path("rm", k["rm"]) for _, _, k in claimed],
                              [c.dirs["ppo"]] + [cache.path("ppo", k["ppo"]) for _, _, k in claimed],
                              [out] + staging)
            for (_, _, k), d in zip(claimed, staging):
                cache.commit("eval", k["eval_ppo"], d, promises)
        finally:
            for d in staging:
                shutil.rmtree(d, ignore_errors=True)


def _claim(cache: Any, locks: contextlib.ExitStack, bucket: str, stage: str, group: list,
           needs: tuple[str, ...]) -> list:
    """The members (trial id, config, stage keys) whose ``stage`` nobody has built or is building and whose
    ``needs`` stages are built, their cache locks taken into ``locks`` without waiting."""
    claimed = []
    for tid, mcfg, k in group:
        key = k[stage]
        if cache.is_complete(bucket, key) or not all(cache.is_complete(s, k[s]) for s in needs):
            continue
        try:
            locks.enter_context(file_lock(cache.lock_path(bucket, key), timeout=0))
        except LockBusy:
            continue  # its own trial (or another group) is building it
        if not cache.is_complete(bucket, key):
            claimed.append((tid, mcfg, k))
    return claimed


def _own_steps(on_step: Callable[[dict], None], stopped: list) -> Callable[[dict], None]:
    """The builder's own step reports; a stop of its trial (``SystemExit`` from the report) is kept in ``stopped``
    and ends nothing but its own membership (module docstring)."""
    def report(event: dict) -> None:
        if stopped:
            return  # stopped: a stopped trial reports nothing more (Ray would wait for the driver forever)
        try:
            on_step(event)
        except SystemExit as e:
            stopped.append(e)
    return report


def _step_writer(path: Path) -> Callable[[dict], None]:
    def write(event: dict) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
    return write


def _take_stop(cache: Any, key: str) -> bool:
    path = _beside(cache, key, STOP)
    if not path.is_file():
        return False
    path.unlink(missing_ok=True)
    return True
