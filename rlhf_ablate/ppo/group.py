"""Trial groups: K PPO trials that start from the same SFT model and RM train together on one base, in one loop.

The most expensive sweeps vary PPO alone (``kl_coef``, learning rate, clipping) over seeds. Their trials share the
SFT model and the RM through the stage cache; grouped, they also share the base model in memory and its forward
passes: each step generates the rollouts of every member in one batched generation, scores them in batched passes
and runs the update's forward and backward over the members' aligned micro-batches, each row through its own
member's adapters (rlhf_ablate/models/lora.py: route_rows). docs/architecture.md, "Trial groups", has the rules.

A member is still a trial (rlhf_ablate/run/groups.py builds the group inside one member's PPO stage and commits each
member's artifact under its own stage key; it also carries a member's steps to its trial and a scheduler's stop
back). Here each member keeps what its solo run keeps
(rlhf_ablate/ppo/loop.py): its policy and value adapters and value head, optimizer, learning-rate schedule, KL
controller, reward normaliser, prompt order and minibatch shuffles (its own generator, seeded as solo) and the random
stream its rollouts sample from (the global stream's state after its solo construction: PPOModels.add_member). The
members' PPO shapes are equal (batch sizes, epochs, lengths, rank; run/groups.py: group_key), so their rollouts,
minibatches and micro-batches line up row for row. A member that fails (a non-finite loss, a KL blow-up) leaves the
group with its error; the others go on.

On the CPU in fp32 a member's first rollout is its solo run's (tokens equal, log-probs within rounding: the batch is
wider); tests/test_groups.py checks it, and that gradients reach only the member's own adapters.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import TrialConfig
from ..errors import TrialFailed
from ..files import write_json
from ..models import enable_tf32, route_rows
from ..models.generation import generate_segments, last_token_index, sampling_for
from ..runtime import seed_everything, stage_hooks
from . import math as ppo_math
from .loop import (advantages_and_returns, kl_blow_up, kl_rewards, learning_rate, loss_not_finite, next_prompts,
                   pass_stats, step_event, step_row, write_artifact)
from .roles import PPOModels
from .rollout import build_batch


def adapters(k: int) -> tuple[str, str]:
    """Member ``k``'s policy and value adapter names (member 0 keeps the solo names)."""
    return ("policy", "value") if k == 0 else (f"policy_{k}", f"value_{k}")


@dataclasses.dataclass
class Member:
    """One trial of the group and everything its solo loop would keep."""

    k: int
    cfg: TrialConfig
    out: Path
    on_step: Optional[Callable[[dict], None]]
    head: torch.nn.Linear
    stream: torch.Generator
    g: torch.Generator
    prompts: list[str]
    reward: str = "reward"          # its RM's role in PPOModels (roles.add_member)
    optimizer: torch.optim.Optimizer = None
    kl_ctl: object = None
    normalizer: object = None
    order: list[int] = dataclasses.field(default_factory=list)
    history: list[dict] = dataclasses.field(default_factory=list)
    error: Optional[str] = None
    times: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0])
    params: list = dataclasses.field(default_factory=list)

    @property
    def names(self) -> tuple[str, str]:
        return adapters(self.k)


def train_ppo_group(cfgs: list[TrialConfig], data, sft_dir: Path, rm_dirs: list[Path], outs: list[Path],
                    on_steps: list[Optional[Callable[[dict], None]]],
                    stop: Callable[[int], bool] = lambda k: False) -> tuple[dict[int, str], set[int]]:
    """Train every member; member ``k`` writes its artifact (adapter, history.json, metrics.json, ppo_info.json)
    into ``outs[k]`` and is rewarded by the RM in ``rm_dirs[k]``. ``stop(k)``, asked before each step: member ``k``'s
    trial was stopped (by a scheduler), so it leaves the group. Returns ``({k: error}, stopped)``: the members that failed and the members that were stopped
    (their directories are left incomplete)."""
    enable_tf32()
    seed_everything(cfgs[0].seed)
    roles = PPOModels(cfgs[0], sft_dir, rm_dirs[0])
    if not roles.shared:
        raise TrialFailed("ppo: a trial group needs ppo.lora_rank > 0 (run/groups.py keeps rank 0 trials alone)")
    dev = next(roles.model.parameters()).device
    members = [_member(0, cfgs[0], outs[0], on_steps[0], (roles.value_head, "reward"), data)]
    for k, cfg in enumerate(cfgs[1:], 1):
        seed_everything(cfg.seed)
        members.append(_member(k, cfg, outs[k], on_steps[k], roles.add_member(k, rm_dirs[k]), data))
    stage_hooks().model_ready(*roles.all_models())
    named = dict(roles.model.named_parameters())
    for m in members:
        p = m.cfg.ppo
        m.params = [v for n, v in named.items() if any(f".{a}." in n for a in m.names)] + list(m.head.parameters())
        m.optimizer = torch.optim.AdamW(m.params, lr=p.learning_rate, eps=1e-5, weight_decay=p.weight_decay)
        m.kl_ctl = (ppo_math.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
                    else ppo_math.FixedKLController(p.kl_coef))
    p0 = cfgs[0].ppo
    n_steps = max(1, p0.total_episodes // p0.rollout_batch_size)
    sampling = sampling_for(cfgs[0], "rollout")
    stopped: set[int] = set()
    for step in range(1, n_steps + 1):
        stopped.update(m.k for m in members if m.error is None and m.k not in stopped and stop(m.k))
        live = [m for m in members if m.error is None and m.k not in stopped]
        if not live:
            break
        t0 = time.perf_counter()
        batch_prompts = []
        for m in live:
            for group in m.optimizer.param_groups:
                group["lr"] = learning_rate(m.cfg.ppo, step, n_steps)
            picked, m.order = next_prompts(m.order, len(m.prompts), p0.rollout_batch_size, m.g)
            batch_prompts.append([m.prompts[i] for i in picked])
        responses = generate_segments(roles.model, roles.tokenizer, batch_prompts, [m.names[0] for m in live],
                                      [m.stream for m in live], max_new_tokens=sampling.max_new_tokens,
                                      do_sample=True, temperature=sampling.temperature,
                                      batch_size=roles.plan.rollout_micro,
                                      max_prompt_length=sampling.max_prompt_length)
        b = build_batch(roles.tokenizer, [x for ps in batch_prompts for x in ps], [r for rs in responses for r in rs],
                        dev)
        t1 = time.perf_counter()
        sc = _score(roles, live, b, p0.temperature)
        t2 = time.perf_counter()
        n = p0.rollout_batch_size
        per: list[dict] = []
        for j, m in enumerate(live):
            rows = slice(j * n, (j + 1) * n)
            per.append(_advantages(m, {k: v[rows] for k, v in sc.items()},
                                   {k: (v[rows] if torch.is_tensor(v) and v.dim() else v) for k, v in b.items()}))
        stats = _update(roles, live, b, sc, per, step)
        t3 = time.perf_counter()
        for j, m in enumerate(live):
            _finish_step(m, step, n_steps, per[j], stats[j], (t1 - t0, t2 - t1, t3 - t2))
    stage_hooks().trained()
    stopped.update(m.k for m in members if m.error is None and m.k not in stopped and stop(m.k))
    failures = {}
    for m in members:
        if m.error is not None:
            failures[m.k] = m.error
            continue
        if m.k in stopped:
            continue
        write_artifact(m.out, roles, m.cfg.ppo, m.history, m.normalizer, m.times, m.names[0],
                       info={"group": {"size": len(members), "member": m.k}})
    return failures, stopped


def _member(k: int, cfg: TrialConfig, out: Path, on_step, head_and_reward: tuple, data) -> Member:
    # Where the solo run's rollouts start sampling: the global stream of the device the sampler draws on.
    head, reward = head_and_reward
    dev = head.weight.device
    if dev.type == "cuda":
        stream = torch.Generator(device=dev).set_state(torch.cuda.get_rng_state(dev))
    else:
        stream = torch.Generator().set_state(torch.get_rng_state())
    prompts = [x.prompt for x in data.ppo_prompts]
    if not prompts:
        raise TrialFailed("ppo: the data has no PPO prompts")
    return Member(k, cfg, out, on_step, head, stream, torch.Generator().manual_seed(cfg.seed), prompts, reward)


def _row_names(live: list[Member], n: int, role: int) -> list[str]:
    return [m.names[role] for m in live for _ in range(n)]


@torch.no_grad()
def _score(roles: PPOModels, live: list[Member], b: dict, temperature: float) -> dict:
    """The four no-grad passes (rlhf_ablate/ppo/rollout.py: score_batch) over the members' rows, K x
    ``plan.rollout_micro`` rows per pass, the policy and value passes routed per member."""
    n_all, R = b["ids"].shape[0], b["resp"].shape[1]
    n = n_all // len(live)
    micro = roles.plan.rollout_micro * len(live)
    pol, val = _row_names(live, n, 0), _row_names(live, n, 1)
    out: dict[str, list[torch.Tensor]] = {"old_logprobs": [], "ref_logprobs": [], "old_values": [], "raw_scores": []}
    for s in range(0, n_all, micro):
        ids, attn, resp = (b[k][s:s + micro] for k in ("ids", "attn", "resp"))
        with route_rows(roles.model, pol[s:s + micro]):
            out["old_logprobs"].append(roles.logprobs("policy", ids, attn, resp, temperature)[0])
        out["ref_logprobs"].append(roles.logprobs("ref", ids, attn, resp, temperature)[0])
        out["old_values"].append(_values(roles, live, ids, attn, R, val[s:s + micro], s, n))
        out["raw_scores"].append(_rewards(roles, live, ids, attn, s, n))
    return {k: torch.cat(v) for k, v in out.items()}


def _blocks(live: list[Member], first: int, count: int, n: int):
    """(member, row slice within the pass) for each member whose rows (``n`` per member, in member order) fall in
    rows ``first .. first + count`` of the group's batch."""
    for j in range(first // n, (first + count - 1) // n + 1):
        yield live[j], slice(max(j * n - first, 0), min((j + 1) * n - first, count))


def _rewards(roles: PPOModels, live: list[Member], ids, attn, first: int, n: int) -> torch.Tensor:
    """Each row's raw score from its member's RM: the trial RM's pass when every member has it, else each row through
    its member's reward adapter (routed) and score head, read at the last non-pad token (PPOModels.scores)."""
    if all(m.reward == "reward" for m in live):
        return roles.proxy_scores(ids, attn)
    blocks = list(_blocks(live, first, len(ids), n))
    with route_rows(roles.model, [m.reward for m, rows in blocks for _ in range(rows.start, rows.stop)]):
        h = roles._hidden(roles.model, ids, attn)
    idx = last_token_index(ids, roles.pad_id)
    out = []
    for m, rows in blocks:
        head = roles.reward_head if m.reward == "reward" else roles.extra_heads[m.reward]
        r = torch.arange(rows.start, rows.stop, device=ids.device)
        out.append(head(h[r, idx[rows]].to(head.weight.dtype)).squeeze(-1).float())
    return torch.cat(out)


def _values(roles: PPOModels, live: list[Member], ids, attn, R: int, names: list[str], first: int, n: int):
    """Values of rows ``first ..`` of the group's batch (``n`` rows per member, in member order) through each row's
    member's value adapter and value head."""
    roles._use("value")
    with route_rows(roles.model, names):
        h = roles._hidden(roles.model, ids, attn)
    T = ids.shape[1]
    h = h[:, T - R - 1:T - 1]
    out = []
    for m, rows in _blocks(live, first, len(ids), n):  # the members whose rows this pass holds
        out.append(m.head(h[rows].to(m.head.weight.dtype)).squeeze(-1).float())
    return torch.cat(out)


def _advantages(m: Member, sc: dict, b: dict) -> dict:
    """The member's rewards, GAE and whitening on its own rows (loop.py, between scoring and the update)."""
    p = m.cfg.ppo
    raw = sc["raw_scores"]
    if m.normalizer is None and p.reward_norm:
        m.normalizer = ppo_math.RewardNormalizer(raw)
    scores, rewards, kl = kl_rewards(p, m.kl_ctl.value, m.normalizer, raw, b, sc)
    mask = b["rmask"]
    out = {"raw": raw, "scores": scores, "kl": kl, "mask": mask, "b": b, "train": bool(mask.sum() >= 2)}
    if out["train"]:
        adv, ret = advantages_and_returns(p, rewards, sc["old_values"], mask)
        out.update(adv=adv, ret=ret, old_lp=sc["old_logprobs"], old_v=sc["old_values"])
    return out


def _update(roles: PPOModels, live: list[Member], b: dict, sc: dict, per: list[dict], step: int) -> list[list[dict]]:
    """PPO epochs over minibatches for every member at once: minibatch ``j`` of each member (its own shuffle) in
    micro-batches of ``plan.train_micro`` rows per member, one routed forward/backward for the policy (the sum of the
    members' losses: each member's rows reach only its adapters) and one for the value, then each member's own
    gradient clipping and optimizer step (loop.py: ppo_update)."""
    p0 = live[0].cfg.ppo
    n, micro = p0.rollout_batch_size, roles.plan.train_micro
    stats: list[list[dict]] = [[] for _ in live]
    training = [j for j, m in enumerate(live) if per[j]["train"]]
    for m in live:
        m.optimizer.zero_grad(set_to_none=True)
    for epoch in range(p0.ppo_epochs):
        perms = {j: torch.randperm(n, generator=live[j].g) for j in training}
        for start in range(0, n, p0.mini_batch_size):
            before = [len(x) for x in stats]
            for ms in range(0, p0.mini_batch_size, micro):
                parts = [(j, perms[j][start:start + p0.mini_batch_size][ms:ms + micro]) for j in training]
                parts = [(j, idx) for j, idx in parts if len(idx) and per[j]["mask"][idx].sum() > 0
                         and live[j].error is None]
                if parts:
                    _micro(roles, live, b, per, parts, len(perms[parts[0][0]][start:start + p0.mini_batch_size]),
                           step, {"epoch": epoch, "minibatch": start // p0.mini_batch_size}, stats)
            for j in training:
                m = live[j]
                if m.error is not None or len(stats[j]) == before[j]:  # no pass of this minibatch ran
                    m.optimizer.zero_grad(set_to_none=True)
                    continue
                stats[j][-1]["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(m.params, m.cfg.ppo.max_grad_norm))
                m.optimizer.step()
                m.optimizer.zero_grad(set_to_none=True)
    return stats


def _micro(roles: PPOModels, live: list[Member], b: dict, per: list[dict], parts: list, mb_len: int, step: int,
           where: dict, stats: list[list[dict]]) -> None:
    n = live[0].cfg.ppo.rollout_batch_size
    rows = torch.cat([idx + j * n for j, idx in parts]).to(b["ids"].device)
    ids, attn, resp = b["ids"][rows], b["attn"][rows], b["resp"][rows]
    R = resp.shape[1]
    spans, s = [], 0
    for j, idx in parts:
        spans.append((j, idx.to(rows.device), slice(s, s + len(idx))))
        s += len(idx)
    with route_rows(roles.model, [live[j].names[0] for j, idx in parts for _ in idx]):
        lp, ent = roles.logprobs("policy", ids, attn, resp, live[0].cfg.ppo.temperature, with_entropy=True)
        total, pg = 0.0, {}
        for j, idx, sl in spans:
            q = per[j]
            loss, st = ppo_math.policy_loss(lp[sl], q["old_lp"][idx], q["adv"][idx], q["mask"][idx],
                                            live[j].cfg.ppo.cliprange)
            if _failed(live[j], loss, "policy", step):
                continue
            total = total + loss * (len(idx) / mb_len)
            pg[j] = (loss, st)
        if torch.is_tensor(total):
            total.backward()
    del lp
    roles._use("value")
    with route_rows(roles.model, [live[j].names[1] for j, idx in parts for _ in idx]):
        h = roles._hidden(roles.model, ids, attn)
        T = ids.shape[1]
        h = h[:, T - R - 1:T - 1]
        total, vf = 0.0, {}
        for j, idx, sl in spans:
            if j not in pg:
                continue
            q, head = per[j], live[j].head
            v = head(h[sl].to(head.weight.dtype)).squeeze(-1).float()
            loss, clipfrac = ppo_math.value_loss(v, q["old_v"][idx], q["ret"][idx], q["mask"][idx],
                                                 live[j].cfg.ppo.cliprange_value)
            if _failed(live[j], loss, "value", step):
                continue
            total = total + loss * (live[j].cfg.ppo.vf_coef * len(idx) / mb_len)
            vf[j] = (loss, clipfrac)
        if torch.is_tensor(total):
            total.backward()
    roles._use("policy")
    for j, idx, sl in spans:
        if j not in vf:
            continue
        (pg_loss, st), (vf_loss, vf_clip) = pg[j], vf[j]
        stats[j].append(pass_stats(where, pg_loss, st, vf_loss, vf_clip, ent[sl].detach(), per[j]["mask"][idx]))


def _failed(m: Member, loss: torch.Tensor, which: str, step: int) -> bool:
    if torch.isfinite(loss):
        return False
    m.error = f"{loss_not_finite(which, loss, step)} (in a trial group; the other members went on)"
    return True


def _finish_step(m: Member, step: int, n_steps: int, q: dict, stats: list[dict], times: tuple) -> None:
    if m.error is not None:
        return
    p = m.cfg.ppo
    row = step_row(p, step, learning_rate(p, step, n_steps), m.kl_ctl, q["raw"], q["scores"], q["kl"], q["b"], times,
                   stats)
    mean_kl = row["objective/kl"]
    m.history.append(row)
    if m.on_step is not None:
        m.on_step(step_event(row, n_steps))
    if not math.isfinite(mean_kl) or mean_kl > p.kl_stop:
        m.error = kl_blow_up(step, mean_kl, p.kl_stop)
        write_json(m.out / "history.json", m.history)
        return
    m.kl_ctl.update(mean_kl, p.rollout_batch_size)
    m.times = [a + t for a, t in zip(m.times, times)]
