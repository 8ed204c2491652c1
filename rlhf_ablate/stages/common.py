"""The one recipe of a TRL-trained stage (SFT, RM, DPO, GRPO, RLOO): load the stage's model with the 4-bit rule and
prepare its adapters (:func:`load_for_training`), TRL arguments that are right on CPU and GPU (:func:`train_args`),
train with the dtype fix and the stage hooks (:func:`fit`), save the adapter or the whole model
(:func:`save_trained`), and remove the trainer's scratch directory (:func:`clean_up`). On an out-of-memory error the
stage restarts with half the micro-batch and twice the accumulation (:func:`adaptive_trl_stage`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .. import models
from ..runtime import adapt_micro_batch, stage_hooks

T = TypeVar("T")

TRAINER_DIR = "trainer"   # TRL's output_dir inside the artifact: scratch, removed before the artifact is complete


def load_for_training(cfg, section, path: str, task: str = "CAUSAL_LM"):
    """(model, tokenizer) of a stage that trains ``section`` (its LoRA part: rank, alpha, dropout) on the model at
    ``path``: 4-bit when models.trains_in_4bit says so, adapters (or a full fine-tune) prepared as every stage does
    (models/lora.py: prepare_for_training). ``task``: "CAUSAL_LM" or "SEQ_CLS" (a reward model)."""
    tok = models.load_tokenizer(cfg.model, path)
    quantized = models.trains_in_4bit(cfg.model, section.lora_rank)
    load = models.load_seq_cls if task == "SEQ_CLS" else models.load_causal_lm
    model = load(cfg.model, path, quantize=quantized)
    model = models.prepare_for_training(model, section.lora_rank, section.lora_alpha,
                                        getattr(section, "lora_dropout", 0.0), task, quantized)
    return model, tok


def fit(trainer, cfg) -> list[dict]:
    """Train: trainable weights back in the compute dtype, the stage hooks around training (the memory probe
    measures between them, rlhf_ablate/run/probe.py), and the trainer's numeric log rows."""
    restore_trainable_dtype(trainer.model, cfg.model)
    hooks = stage_hooks()
    hooks.model_ready(trainer.model)
    trainer.train()
    hooks.trained()
    return log_history(trainer)


def clean_up(out: Path) -> None:
    shutil.rmtree(out / TRAINER_DIR, ignore_errors=True)


def adaptive_trl_stage(stage: str, section, out: Path, body: Callable[[int, int], T]) -> T:
    """``body(batch_size, grad_accum)``: a TRL stage run whole with ``per_device_train_batch_size`` and
    ``gradient_accumulation_steps``. It starts with the section's settings; on an out-of-memory error the batch
    halves (to a divisor of ``section.batch_size``), the accumulation grows by the same factor, so the effective
    batch stays ``batch_size * grad_accum``, and the stage restarts from its seed (rlhf_ablate/runtime.py:
    adapt_micro_batch records the retry)."""
    b, ga = section.batch_size, section.grad_accum

    def attempt(micro: int) -> T:
        clean_up(out)  # a failed attempt's trainer scratch
        return body(micro, ga * (b // micro))

    return adapt_micro_batch(stage, b, attempt, total=b)


def trl_common_args(output_dir: Path, seed: int, *, lr: float, epochs: float, max_steps: int, batch_size: int,
                    grad_accum: int, dtype: str, warmup_ratio: float = 0.0, weight_decay: float = 0.0) -> dict:
    """TRL config arguments that are right on a laptop CPU and on a GPU alike.

    docs/stack.md, "TRL": every TRL config defaults bf16 on (an error on CPU), gradient checkpointing on and logging
    every 10 steps. Precision follows the model's resolved compute dtype (``dtype``, rlhf_ablate/models/loading.py:
    compute_dtype: ``auto`` resolved for this machine): bf16 mixed precision (autocast, on the CPU too
    when chosen explicitly) or fp16 on a GPU, and TF32 on a GPU that has it. Gradient checkpointing is enabled on the
    model itself, non-reentrant, by models.prepare_for_training (the one rule the memory estimate also reads), so
    TRL's own switch stays off.
    """
    from ..models import gpu_supports_bf16

    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir), seed=seed, data_seed=seed, learning_rate=lr, num_train_epochs=epochs,
        max_steps=max_steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        warmup_steps=warmup_ratio, weight_decay=weight_decay, lr_scheduler_type="linear",
        # bf16 on the CPU only when asked for (``auto`` never picks it there); fp16 needs a GPU.
        bf16=dtype == "bfloat16", fp16=on_gpu and dtype == "float16", tf32=True if gpu_supports_bf16() else None,
        use_cpu=not on_gpu, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=True,
    )


def train_args(p, output_dir: Path, seed: int, model_cfg, micro: tuple[int, int] | None = None) -> dict:
    """:func:`trl_common_args` from a stage's shared training part (config.schema.TrainParams) and the trial's
    ``model`` config (its compute dtype). ``micro``: (batch size, accumulation) in place of the section's, after an
    out-of-memory retry (:func:`adaptive_trl_stage`)."""
    from ..models import compute_dtype

    batch_size, grad_accum = micro or (p.batch_size, p.grad_accum)
    return trl_common_args(output_dir, seed, lr=p.learning_rate, epochs=p.epochs, max_steps=p.max_steps,
                           batch_size=batch_size, grad_accum=grad_accum, dtype=compute_dtype(model_cfg),
                           warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay)


def saved_kind(lora_rank: int) -> str:
    """Where a trained stage keeps its weights: ``adapter`` (LoRA, on its base) or ``model`` (a full fine-tune)."""
    return "adapter" if lora_rank > 0 else "model"


def save_trained(model, tok, out: Path, lora_rank: int) -> str:
    """A TRL-trained model as the artifact models/artifacts.py loads back: its LoRA adapter in ``out/adapter`` (the
    base is the SFT model, or the RM's base), or with ``lora_rank`` 0 the whole model in ``out/model``; the tokenizer
    beside it. Returns the kind."""
    kind = saved_kind(lora_rank)
    if lora_rank > 0:
        model.save_pretrained(str(out / kind), selected_adapters=["default"])
    else:
        model.save_pretrained(str(out / kind), safe_serialization=True)
    tok.save_pretrained(str(out / kind))
    return kind


def log_history(trainer) -> list[dict]:
    return [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in trainer.state.log_history]


def restore_trainable_dtype(model, model_cfg) -> None:
    """Undo TRL's cast of trainable parameters to bf16 on quantized models.

    TRL 1.16's trainers cast every trainable parameter of a 4-bit model to bf16 (QLoRA's recommendation). LoRA layers
    cast their input, but a trained head (the RM's score head, saved via modules_to_save) does not, so a float32
    compute dtype fails with "expected m1 and m2 to have the same dtype". We keep trainable weights in
    model.compute_dtype (``auto`` resolved for this machine: bf16 on a GPU that has it, float32 on a CPU where bf16
    matmuls are slow)."""
    from ..models import torch_dtype

    dtype = torch_dtype(model_cfg)
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
