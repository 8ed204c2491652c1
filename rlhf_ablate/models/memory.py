"""Sizes read from a model config (no weights loaded), and the estimate of a trial's peak GPU memory that the
launchers pack trials by (rlhf_ablate/launch/resources.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ..config import BUILTIN_MODELS, ModelConfig
from .builtin import _builtin_model_config
from .loading import _explain_load_errors, _hub_kwargs, resolve_base
from .lora import _is_linear_like, lora_target_modules, wants_gradient_checkpointing

# ---------------------------------------------------------------------------------------------------------
# Sizes and memory
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a base model, read from its config (no weights loaded)."""

    params: int              # all parameters (tied weights counted once)
    quantizable: int         # parameters of Linear/Conv1D layers bitsandbytes converts (not embeddings/head)
    lora_dims: int           # sum of (in + out) over the LoRA target layers: LoRA params = rank * lora_dims
    hidden: int
    layers: int
    heads: int
    kv_dim: int              # kv heads * head dim (GQA shrinks the KV cache)
    vocab: int


def _load_config(cfg: ModelConfig) -> Any:
    name = cfg.base_model.strip()
    if name in BUILTIN_MODELS:
        return _builtin_model_config(name)
    from transformers import AutoConfig

    src = resolve_base(cfg)
    with _explain_load_errors(src, cfg, "config"):
        return AutoConfig.from_pretrained(src, **_hub_kwargs(cfg, src))


@functools.lru_cache(maxsize=32)
def _shape_cached(cfg: ModelConfig) -> ModelShape:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _load_config(cfg)
    with init_empty_weights():  # meta tensors: shapes without memory
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    # transformers 5 ties input and output embeddings when weights are loaded, not in from_config; tie here so
    # a tied head is counted once (parameters() deduplicates shared tensors).
    model.tie_weights()
    params = sum(p.numel() for p in model.parameters())
    out_emb = model.get_output_embeddings()
    targets = set(lora_target_modules(model))
    quantizable = lora_dims = 0
    for name, m in model.named_modules():
        if _is_linear_like(m) and m is not out_emb:
            quantizable += m.weight.numel()
            if name.rsplit(".", 1)[-1] in targets:
                lora_dims += sum(m.weight.shape)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    return ModelShape(params=params, quantizable=quantizable, lora_dims=lora_dims, hidden=hidden, layers=layers,
                      heads=heads, kv_dim=kv_heads * head_dim, vocab=text.vocab_size)


def model_shape(cfg: ModelConfig) -> ModelShape:
    return _shape_cached(cfg)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the base causal LM, from its config alone (built-ins: their config; hub ids and directories:
    AutoConfig on meta tensors, which needs the config locally or online)."""
    return model_shape(cfg).params


GIB = 1024 ** 3
CUDA_OVERHEAD_GIB = 0.5   # CUDA context, cuBLAS workspace, allocator
FRAGMENTATION = 1.15      # PyTorch caching-allocator slack on top of live tensors


def estimate_trial_memory_gb(trial_cfg: Any) -> float:
    """Estimated peak GPU memory of one trial, in GiB, used to pack trials on GPUs and refuse impossible ones.

    The stages of a trial run one after another and free their models, so the peak is the largest stage::

        peak = FRAGMENTATION * max(SFT, RM, PPO or DPO) + CUDA_OVERHEAD_GIB

    with, for P parameters of which Q sit in quantizable Linear layers, compute-dtype width w (4 fp32, 2 bf16/fp16):

    - weights W:  4-bit: Q * (0.5 + scales) + (P - Q) * w, scales = 4/64 bytes per weight (fp32 absmax per
      64-block) or ~1/64 with double quantization; unquantized: P * w.
    - LoRA of rank r: r * sum(in + out) over target layers trainable parameters, each 16 bytes (fp32 weight,
      gradient and two Adam moments). A full fine-tune (r = 0): 4 * w bytes per parameter (weight, gradient,
      two Adam moments, in the parameter dtype).
    - activations for batch b and length s (Korthikanti et al. 2022, "Reducing Activation Recomputation",
      eq. 1, scaled from 16-bit to w): b * s * h * L * (34 + 5 * heads * s / h) * w / 2; with gradient
      checkpointing (models >= GRADIENT_CHECKPOINTING_MIN_PARAMS) only the layer inputs b * s * h * L * w plus one
      layer's activations are kept.
    - LM logits: b * s * V * 4 bytes * 3 (fp32 logits, log-softmax, gradient); not for the reward model.

    Stages: SFT = W + LoRA(sft) + act(sft.batch_size) + logits. RM = W + LoRA(rm) + act(2 * rm.batch_size) (chosen
    and rejected). PPO with LoRA: ONE shared base W, policy and value adapters trained (2 * LoRA(ppo)), the reward
    adapter frozen, policy and value forward/backward on ppo.mini_batch_size, logits, and the rollout KV cache
    rollout_batch_size * s * L * 2 * kv_dim * w. PPO with rank 0: separate copies, policy and value trained
    (2 * full) plus reference and reward weights (2 * W). DPO: W + LoRA(dpo) + act(2 * batch) + logits (LoRA's
    reference is the base with adapters off; rank 0 adds a reference copy W). s = model.max_length throughout.
    """
    cfg = trial_cfg
    shape = model_shape(cfg.model)
    w = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.compute_dtype]
    P, Q = shape.params, shape.quantizable
    s = cfg.model.max_length
    if cfg.model.quantization != "none":
        scales = (1 / 64 + 4 / (64 * 256)) if cfg.model.double_quant else 4 / 64
        weights = Q * (0.5 + scales) + (P - Q) * w
    else:
        weights = P * w
    gc = wants_gradient_checkpointing(P)

    def trainable(rank: int) -> float:
        return rank * shape.lora_dims * 16 if rank > 0 else P * 4 * w

    def act(b: int) -> float:
        per_layer = b * s * shape.hidden * (34 + 5 * shape.heads * s / shape.hidden) * w / 2
        if gc:
            return b * s * shape.hidden * shape.layers * w + per_layer
        return per_layer * shape.layers

    def logits(b: int) -> float:
        return b * s * shape.vocab * 4 * 3

    stages = {
        "sft": weights + trainable(cfg.sft.lora_rank) + act(cfg.sft.batch_size) + logits(cfg.sft.batch_size),
        "rm": weights + trainable(cfg.rm.lora_rank) + act(2 * cfg.rm.batch_size),
    }
    if cfg.method == "ppo":
        p = cfg.ppo
        kv = p.rollout_batch_size * s * shape.layers * 2 * shape.kv_dim * w
        common = 2 * act(p.mini_batch_size) + logits(p.mini_batch_size) + kv
        if p.lora_rank > 0:
            frozen_rm = cfg.rm.lora_rank * shape.lora_dims * w if cfg.rm.lora_rank > 0 else weights
            stages["ppo"] = weights + 2 * trainable(p.lora_rank) + frozen_rm + common
        else:
            stages["ppo"] = 2 * trainable(0) + 2 * weights + common
    else:
        d = cfg.dpo
        ref = weights if d.lora_rank == 0 else 0
        stages["dpo"] = weights + ref + trainable(d.lora_rank) + act(2 * d.batch_size) + logits(2 * d.batch_size)
    return FRAGMENTATION * max(stages.values()) / GIB + CUDA_OVERHEAD_GIB

