"""Generation and scoring on any causal LM or reward model, shared by PPO rollouts and eval.

Text is formatted only through rlhf_ablate/data/prompting.py, so SFT, the reward model, PPO and eval all see the
same prompt + answer + EOS layout (TRL's SFT and Reward trainers append EOS to plain-text completions; we do the
same when we score or roll out).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import torch

from ..data.prompting import format_prompt, normalize


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as generate() uses; without them a left-padded forward pass would
    disagree with the log-probs seen during sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextmanager
def eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def batched(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool,
             temperature: float = 1.0, batch_size: int = 16, streamer=None) -> list[dict]:
    """Batched generation from raw prompts (formatted here). Returns, per prompt, the response token ids (up to and
    including EOS when the model stopped), the decoded text (without EOS) and whether it ended with EOS.
    ``streamer`` (a transformers streamer, one prompt at a time) receives the tokens as they come."""
    out = []
    tokenizer.padding_side = "left"  # decoder-only generation needs the prompts right-aligned
    dev = next(model.parameters()).device
    with eval_mode(model):
        for chunk in batched(list(prompts), batch_size):
            enc = tokenizer([format_prompt(p) for p in chunk], return_tensors="pt", padding=True).to(dev)
            seqs = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                temperature=temperature if do_sample else None, top_k=0 if do_sample else None,
                top_p=1.0 if do_sample else None, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, use_cache=True,
                **({"streamer": streamer} if streamer is not None else {}))
            resp = seqs[:, enc["input_ids"].shape[1]:]
            for row in resp.tolist():
                ids = []
                for t in row:
                    ids.append(t)
                    if t == tokenizer.eos_token_id:
                        break
                while ids and ids[-1] == tokenizer.pad_token_id and tokenizer.pad_token_id != tokenizer.eos_token_id:
                    ids.pop()
                has_eos = bool(ids) and ids[-1] == tokenizer.eos_token_id
                text = tokenizer.decode(ids[:-1] if has_eos else ids, skip_special_tokens=True)
                out.append({"ids": ids, "text": normalize(text), "has_eos": has_eos})
    return out


def encode_pairs(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int) -> dict:
    """prompt + answer + EOS, tokenized exactly as TRL's RewardTrainer does (tokenizer(text)), right-padded."""
    tokenizer.padding_side = "right"
    texts = [format_prompt(p) + normalize(a) + tokenizer.eos_token for p, a in zip(prompts, answers)]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Index of the rightmost non-pad token: where a sequence-classification head reads its score (the rule
    transformers' *ForSequenceClassification use), so our shared-base reward head scores exactly like the RM."""
    non_pad = (input_ids != pad_token_id).int()
    idx = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (idx * non_pad).argmax(-1)


@torch.no_grad()
def score_texts(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokenizer, prompts: Sequence[str],
                answers: Sequence[str], max_length: int, batch_size: int = 32) -> list[float]:
    scores: list[float] = []
    for i in range(0, len(prompts), batch_size):
        enc = encode_pairs(tokenizer, prompts[i:i + batch_size], answers[i:i + batch_size], max_length)
        scores.extend(score_fn(enc["input_ids"], enc["attention_mask"]).float().cpu().tolist())
    return scores


