"""Rollout batches: left-padded query + right-padded response, and the no-grad scoring passes over them.

The query ids are the ones the sampler saw (``generate`` returns them, after truncation to ``ppo.max_prompt_length``),
so every scoring pass and the update run on exactly the sampled sequences. Scoring runs in micro-batches of
``plan.rollout_micro`` rows, with the same global padding as the update, so that the log-probs computed here and at
the first minibatch of the update are the same numbers (ratio exactly 1).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

import torch

from ..data.prompting import format_prompt
from ..models import left_pad
from ..runtime import adapt_micro_batch

T = TypeVar("T")


def build_batch(tokenizer, prompts: list[str], responses: list[dict], device) -> dict:
    """Left-padded query + right-padded response, with the response mask (1 up to and including EOS).

    The query is ``response["query"]`` (the ids the sampler saw) when present, else the formatted prompt. An empty
    response has no valid position: it is scored (the RM reads the prompt's last token) but nothing is trained on
    it, rather than training the policy on a padding token it never sampled."""
    pad = tokenizer.pad_token_id
    queries = [r["query"] if "query" in r else tokenizer(format_prompt(p))["input_ids"]
               for p, r in zip(prompts, responses)]
    q_ids, q_attn = left_pad(queries, pad)
    R = max(1, max(len(r["ids"]) for r in responses))
    resp = torch.full((len(responses), R), pad, dtype=torch.long)
    rmask = torch.zeros((len(responses), R), dtype=torch.long)
    for i, r in enumerate(responses):
        if r["ids"]:
            resp[i, :len(r["ids"])] = torch.tensor(r["ids"])
            rmask[i, :len(r["ids"])] = 1
    ids = torch.cat([q_ids, resp], 1).to(device)
    attn = torch.cat([q_attn, rmask], 1).to(device)
    flag = lambda k: torch.tensor([bool(r.get(k, False)) for r in responses], device=device)  # noqa: E731
    return {"ids": ids, "attn": attn, "P": q_ids.shape[1], "resp": resp.to(device), "rmask": rmask.to(device),
            "has_eos": flag("has_eos"), "stopped": flag("stopped")}


@torch.no_grad()
def score_batch(roles, b: dict, temperature: float) -> dict:
    """The four no-grad passes over a rollout batch, ``roles.plan.rollout_micro`` rows at a time: the policy's and
    the reference's log-probs of the response tokens, the values of the positions predicting them, the reward PPO
    optimises (``roles.proxy_scores``)."""
    n, R = b["ids"].shape[0], b["resp"].shape[1]
    out: dict[str, list[torch.Tensor]] = {"old_logprobs": [], "ref_logprobs": [], "old_values": [], "raw_scores": []}
    for s in range(0, n, roles.plan.rollout_micro):
        ids, attn, resp = (b[k][s:s + roles.plan.rollout_micro] for k in ("ids", "attn", "resp"))
        out["old_logprobs"].append(roles.logprobs("policy", ids, attn, resp, temperature)[0])
        out["ref_logprobs"].append(roles.logprobs("ref", ids, attn, resp, temperature)[0])
        out["old_values"].append(roles.values(ids, attn, n_last=R))
        out["raw_scores"].append(roles.proxy_scores(ids, attn))  # ppo.reward: the RM, or the ensemble combined
    return {k: torch.cat(v) for k, v in out.items()}


def rollout_adaptive(roles, phase: str, run: Callable[[], T]) -> T:
    """``run()`` (generation or scoring, ``roles.plan.rollout_micro`` rows at a time), rerun with half the rollout
    micro-batch after an out-of-memory error (rlhf_ablate/runtime.py: adapt_micro_batch)."""
    def attempt(micro: int) -> T:
        roles.plan = dataclasses.replace(roles.plan, rollout_micro=micro)
        return run()

    return adapt_micro_batch("ppo", roles.plan.rollout_micro, attempt, phase=phase)
