"""What the stages share: seeding, thread count, TRL arguments that are right on CPU and GPU, trainer logs."""

from __future__ import annotations

from pathlib import Path

import torch


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


def train_args(p, output_dir: Path, seed: int, model_cfg) -> dict:
    """:func:`trl_common_args` from a stage's shared training part (config.schema.TrainParams) and the trial's
    ``model`` config (its compute dtype)."""
    from ..models import compute_dtype

    return trl_common_args(output_dir, seed, lr=p.learning_rate, epochs=p.epochs, max_steps=p.max_steps,
                           batch_size=p.batch_size, grad_accum=p.grad_accum, dtype=compute_dtype(model_cfg),
                           warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay)


def save_trained_policy(model, tok, out: Path, lora_rank: int) -> None:
    """A TRL-trained policy as the artifact models/artifacts.py loads back: its LoRA adapter in ``out/adapter`` (the
    base is the SFT model), or with ``lora_rank`` 0 the whole model in ``out/model``; the tokenizer beside it."""
    if lora_rank > 0:
        model.save_pretrained(str(out / "adapter"), selected_adapters=["default"])
        tok.save_pretrained(str(out / "adapter"))
    else:
        model.save_pretrained(str(out / "model"), safe_serialization=True)
        tok.save_pretrained(str(out / "model"))


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
