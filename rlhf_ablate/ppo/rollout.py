"""Rollout batches: left-padded prompt + right-padded response, and the log-probs of the response tokens."""

from __future__ import annotations

import torch

from ..data.prompting import format_prompt
from . import math as ppo_math


def build_batch(tokenizer, prompts: list[str], responses: list[dict], device) -> dict:
    """Left-padded query + right-padded response, with the response mask (1 up to and including EOS)."""
    pad = tokenizer.pad_token_id
    tokenizer.padding_side = "left"
    q = tokenizer([format_prompt(p) for p in prompts], return_tensors="pt", padding=True)
    R = max(1, max(len(r["ids"]) for r in responses))
    resp = torch.full((len(responses), R), pad, dtype=torch.long)
    rmask = torch.zeros((len(responses), R), dtype=torch.long)
    for i, r in enumerate(responses):
        if r["ids"]:
            resp[i, :len(r["ids"])] = torch.tensor(r["ids"])
            rmask[i, :len(r["ids"])] = 1
        else:  # an empty response still needs one valid position to hold the score
            rmask[i, 0] = 1
    ids = torch.cat([q["input_ids"], resp], 1).to(device)
    attn = torch.cat([q["attention_mask"], rmask], 1).to(device)
    return {"ids": ids, "attn": attn, "P": q["input_ids"].shape[1], "resp": resp.to(device),
            "rmask": rmask.to(device), "has_eos": torch.tensor([r["has_eos"] for r in responses], device=device)}


def response_logprobs(logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens: logits at position t predict token t+1 (N+ details: divide by the
    sampling temperature so the log-probs are those of the distribution actually sampled from)."""
    P, R = batch["P"], batch["resp"].shape[1]
    lg = logits[:, P - 1:P + R - 1] / temperature
    return ppo_math.logprobs_from_logits(lg, batch["resp"])


