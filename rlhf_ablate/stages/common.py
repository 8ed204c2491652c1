"""What every stage shares: seeding, TRL arguments for CPU/GPU, batched generation and sequence scoring.

Stages format text only through :mod:`rlhf_ablate.prompting`, so SFT, the reward model, PPO and eval all see the
same prompt + answer + EOS layout (TRL's SFT and Reward trainers append EOS to plain-text completions; we do the
same when we score or roll out).
"""

from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..prompting import format_prompt, normalize


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1, default=_json_default), encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def trl_common_args(output_dir: Path, seed: int, *, lr: float, epochs: float, max_steps: int, batch_size: int,
                    grad_accum: int, warmup_ratio: float = 0.0, weight_decay: float = 0.0) -> dict:
    """TRL config arguments that are right on a laptop CPU and on a GPU alike.

    FACTS: every TRL config defaults bf16 on (an error on CPU), gradient checkpointing on and logging every 10 steps.
    """
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir), seed=seed, data_seed=seed, learning_rate=lr, num_train_epochs=epochs,
        max_steps=max_steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        warmup_steps=warmup_ratio, weight_decay=weight_decay, lr_scheduler_type="linear",
        bf16=on_gpu and torch.cuda.is_bf16_supported(), fp16=False, use_cpu=not on_gpu,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=True,
    )


def log_history(trainer) -> list[dict]:
    return [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in trainer.state.log_history]


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
             temperature: float = 1.0, batch_size: int = 16) -> list[dict]:
    """Batched generation from raw prompts (formatted here). Returns, per prompt, the response token ids (up to and
    including EOS when the model stopped), the decoded text (without EOS) and whether it ended with EOS."""
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
                eos_token_id=tokenizer.eos_token_id, use_cache=True)
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


def set_threads() -> None:
    """Respect OMP_NUM_THREADS (Ray sets 1 for a 1-CPU trial); otherwise let torch use the machine."""
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit():
        torch.set_num_threads(int(n))


def restore_trainable_dtype(model, compute_dtype: str) -> None:
    """Undo TRL's cast of trainable parameters to bf16 on quantized models.

    TRL 1.16's trainers cast every trainable parameter of a 4-bit model to bf16 (QLoRA's recommendation). LoRA layers
    cast their input, but a trained head (the RM's score head, saved via modules_to_save) does not, so a float32
    compute dtype fails with "expected m1 and m2 to have the same dtype". We keep trainable weights in
    model.compute_dtype, which the user chose (bf16 on a GPU, float32 on a CPU where bf16 matmuls are slow)."""
    dtype = getattr(torch, compute_dtype)
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
