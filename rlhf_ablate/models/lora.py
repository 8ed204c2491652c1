"""LoRA on any of our users' architectures: target modules, adapter configs, k-bit preparation, and merging an
adapter back into a full-precision model (also from a 4-bit base)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

from ..config import ModelConfig
from ..errors import ModelError
from .loading import _explain_load_errors, _hub_kwargs, is_quantized, torch_dtype, load_tokenizer

# ---------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text",
                                "qwen2", "qwen3", "phi3", "exaone", "kanana")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
_HEAD_NAMES = ("lm_head", "score", "classifier", "v_head", "value_head")


def _is_linear_like(module: Any) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))  # bnb Linear4bit subclasses nn.Linear


def lora_target_modules(model: Any) -> list[str]:
    """LoRA target module names for the model's architecture.

    Llama-like models (llama, gemma, mistral, qwen, ...): the attention and MLP projections. GPT-2: c_attn, c_proj
    (attention and MLP output), c_fc. Anything else: every Linear / Conv1D layer except the output head and
    classification heads.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LORA_TARGETS:
        return list(LORA_TARGETS[model_type])
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if _is_linear_like(module) and module is not out_emb and leaf not in _HEAD_NAMES and leaf != "base_layer":
            names.add(leaf)
    if not names:
        raise ModelError(f"model has no Linear or Conv1D layers LoRA could target (model_type={model_type!r}).")
    return sorted(names)


def _targets_conv1d(model: Any, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())


def make_lora_config(rank: int, alpha: int, dropout: float, task_type: str, model: Any) -> Any:
    """peft LoraConfig. alpha 0 means 2 * rank. task_type 'CAUSAL_LM' or 'SEQ_CLS'; with SEQ_CLS, peft adds the
    `score`/`classifier` head to modules_to_save, so the head is trained fully and saved with the adapter.
    fan_in_fan_out is set for GPT-2's Conv1D layers (weight stored as (in, out)); a 4-bit GPT-2 has them converted
    to Linear4bit by transformers, which needs it off."""
    from peft import LoraConfig

    if rank < 1:
        raise ModelError(f"LoRA rank must be >= 1 for an adapter, got {rank}; rank 0 is a full fine-tune.")
    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ModelError(f"LoRA task_type must be 'CAUSAL_LM' or 'SEQ_CLS', got {task_type!r}.")
    targets = lora_target_modules(model)
    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=targets,
                      fan_in_fan_out=_targets_conv1d(model, targets), bias="none", task_type=task_type)


# Below this many parameters, gradient checkpointing costs more time than the memory it saves is worth.
GRADIENT_CHECKPOINTING_MIN_PARAMS = 100_000_000


def logical_param_count(model: Any) -> int:
    """Parameters as the config counts them: a bitsandbytes 4-bit weight packs two values per byte, so its
    ``numel()`` is half the layer's size; its ``quant_state.shape`` is the real one. Shared (tied) tensors once."""
    import math

    n = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None) if type(p).__name__ == "Params4bit" else None
        n += math.prod(qs.shape) if qs is not None else p.numel()
    return n


def wants_gradient_checkpointing(model_or_count: Any) -> bool:
    """The one rule for gradient checkpointing: the TRL stages (prepare_for_training), PPO's roles and the memory
    estimate (rlhf_ablate/models/memory.py) all ask this, with the parameter count of the model's config."""
    n = model_or_count if isinstance(model_or_count, int) else logical_param_count(model_or_count)
    return n >= GRADIENT_CHECKPOINTING_MIN_PARAMS


def enable_gradient_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers' ``activation_checkpointing``,
    docs/stack.md "transformers 5"). Non-reentrant checkpointing needs no ``enable_input_require_grads`` trick for
    frozen bases, tolerates inputs that do not require grad, and recomputes a layer with whatever LoRA adapter is
    active at backward time, so PPO runs each adapter's backward right after its own forward (rlhf_ablate/ppo/loop.py).
    Checkpointing acts only in train mode: PPO's roles stay in train mode with dropout at 0 (generation.disable_dropout)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def freeze_for_kbit_training(model: Any) -> Any:
    """What peft's ``prepare_model_for_kbit_training`` does that a 4-bit LoRA run needs, without what it should not do.

    peft freezes the base (kept here), then casts every fp16/bf16 parameter to fp32: the embeddings, the LM head and
    the norms (issue 9: for an 8B model with a 128k vocabulary that is 2 GB of embeddings and 2 GB of head in fp32
    instead of bf16, for no gain under autocast). Those stay in the compute dtype here; the LoRA weights are fp32
    anyway (peft's ``autocast_adapter_dtype``), and RMSNorm computes its statistics in fp32 internally."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare_for_training(model: Any, rank: int, alpha: int, dropout: float, task_type: str,
                         quantized: Optional[bool] = None) -> Any:
    """rank > 0: a peft model with fresh LoRA adapters on a frozen base (4-bit or not, nothing upcast).
    rank 0: the model itself with every parameter trainable (a full fine-tune), refused on a 4-bit model.
    Gradient checkpointing (non-reentrant) when :func:`wants_gradient_checkpointing` says so."""
    quantized = is_quantized(model) if quantized is None else quantized
    gc = wants_gradient_checkpointing(model)
    if rank == 0:
        if quantized:
            raise ModelError("lora_rank=0 (full fine-tune) on a 4-bit model: bitsandbytes 4-bit weights cannot be "
                             "trained. Set model.quantization=none for rank-0 trials, or use a LoRA rank > 0.")
        for p in model.parameters():
            p.requires_grad_(True)
        if gc:
            enable_gradient_checkpointing(model)
        return model
    from peft import get_peft_model

    freeze_for_kbit_training(model)
    if gc:
        enable_gradient_checkpointing(model)
    return get_peft_model(model, make_lora_config(rank, alpha, dropout, task_type, model))


# ---------------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------------

def merge_and_save(model: Any, out_dir: str | os.PathLike, cfg: ModelConfig, *, tokenizer: Any = None,
                   base_path: Optional[str] = None) -> str:
    """Save a full-precision model (adapters merged) plus tokenizer as safetensors in `out_dir`; return it.

    - peft model on an unquantized base: ``merge_and_unload()`` (this merges in place: the peft model passed in is
      consumed).
    - peft model on a 4-bit base: peft's own merge into Linear4bit would re-quantize W + BA and lose the update's
      precision, so instead the base is reloaded unquantized from `base_path` (default: the path the base was
      loaded from), every 4-bit weight is replaced by its dequantized value (the weights the adapter was trained
      against, in cfg.compute_dtype), and the adapter is merged there. The result computes what the 4-bit peft model
      computed, up to float rounding; a later stage may load it 4-bit again (re-quantizing W_dq + BA).
    - a plain (rank-0) model: saved as is.
    The saved config carries no quantization_config, so loading the directory gives what `cfg` asks for.
    """
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        inner = model.get_base_model()
        src = base_path or inner.config._name_or_path
        merged = _merge_quantized(model, inner, src, cfg) if is_quantized(inner) else model.merge_and_unload()
    else:
        if is_quantized(model):
            raise ModelError("merge_and_save got a 4-bit model without adapters: there is nothing trained to save; "
                             "pass the peft model, or load the base with model.quantization=none.")
        merged, src = model, base_path or model.config._name_or_path
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.save_pretrained(out, safe_serialization=True)
    (tokenizer if tokenizer is not None else load_tokenizer(cfg, src)).save_pretrained(out)
    return str(out)


def _dequantize_4bit(module: Any) -> Any:
    """The weight of a bitsandbytes Linear4bit as a dense (out, in) tensor.

    Trap (bitsandbytes 0.50, CPUs with AVX512-BF16): the first forward in eval mode without grad repacks the 4-bit
    weight in place into a CPU-specific layout (`packing_format_for_cpu`, bf16 absmax), after which
    `dequantize_4bit` (and so peft's `dequantize_bnb_weight` and peft's own merge) returns garbage. bitsandbytes
    undoes the packing itself before saving a state dict (`Linear4bit._save_to_state_dict`); we do the same, in
    place, and its next eval forward packs again.
    """
    import bitsandbytes as bnb

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return bnb.functional.dequantize_4bit(w.data, w.quant_state)


def _merge_quantized(peft_model: Any, inner: Any, src: str, cfg: ModelConfig) -> Any:
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D

    dtype = torch_dtype(cfg)
    extra = {"num_labels": inner.config.num_labels} if hasattr(inner, "score") or hasattr(inner, "classifier") else {}
    with _explain_load_errors(src, cfg, "unquantized base for merging"):
        fresh = type(inner).from_pretrained(src, dtype=dtype, use_safetensors=True, **_hub_kwargs(cfg, src), **extra)
    fresh.config.pad_token_id = inner.config.pad_token_id
    with torch.no_grad():
        for name, module in inner.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                target = fresh.get_submodule(name.removesuffix(".base_layer"))
                w = _dequantize_4bit(module).to(device="cpu", dtype=dtype)
                # transformers converts GPT-2's Conv1D (weight (in, out)) into Linear4bit (weight (out, in)).
                target.weight.copy_(w.T if isinstance(target, Conv1D) else w)
    adapter = peft_model.active_adapter
    lcfg = copy.deepcopy(peft_model.peft_config[adapter])
    lcfg.fan_in_fan_out = _targets_conv1d(fresh, list(lcfg.target_modules))
    lcfg.inference_mode = True
    fresh_peft = get_peft_model(fresh, lcfg)
    state = {k: v.detach().to("cpu", dtype) for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()}
    result = set_peft_model_state_dict(fresh_peft, state)
    if result.unexpected_keys:
        raise ModelError(f"merge_and_save: adapter weights did not fit the reloaded base {src!r} "
                         f"(unexpected keys: {result.unexpected_keys[:5]}).")
    return fresh_peft.merge_and_unload()




# ---------------------------------------------------------------------------------------------------------
# Rows through different adapters in one batch (trial groups, rlhf_ablate/ppo/group.py)
# ---------------------------------------------------------------------------------------------------------

class route_rows:
    """``with route_rows(peft_model, names):`` every LoRA layer runs row ``i`` of its input through adapter
    ``names[i]`` (``"__base__"``: no adapter, the reference), forward and backward alike. Rows of one adapter must be
    contiguous (a trial group lays its members' rows out that way).

    peft mixes adapters in one batch only for inference (``model(..., adapter_names=...)``, refused in training
    mode), removes its hooks when the forward returns (before a non-reentrant gradient checkpoint recomputes the
    layers in the backward), and gathers each adapter's rows with index lists: in the backward every gather becomes a
    scatter into a full-size zero tensor, K of them per layer for K adapters (measured: a group of 6 updated 1.2x
    slower than its members alone on the CPU). Here each LoRA layer computes its base output with the adapters off,
    then a forward hook adds ``cat_k(B_k(A_k(x_k)) * scale_k)`` over the row blocks ``x_k = x.split(...)`` (one split
    and one concatenation, whose backward is one concatenation and one split). The hooks stay until the block ends,
    so forward, the checkpoints' recomputation and backward all route alike: keep the backward inside the block. A
    row's output is the base layer's plus only its adapter's term, so a row's loss sends gradient to its own adapter
    alone (tests/test_groups.py checks it). Dropout must be 0 (it is in every PPO role)."""

    def __init__(self, model: Any, names: list[str]):
        self.model, self.handles, self.saved = model, [], []
        self.blocks: list[tuple[str, int]] = []  # (adapter, rows) in order
        for n in names:
            if self.blocks and self.blocks[-1][0] == n:
                self.blocks[-1] = (n, self.blocks[-1][1] + 1)
            else:
                self.blocks.append((n, 1))
        if len({n for n, _ in self.blocks}) != len(self.blocks):
            raise ValueError("route_rows: each adapter's rows must be contiguous")

    def _hook(self, module: Any, args: tuple, output: Any) -> Any:
        import torch

        x = args[0]
        if not any(name in module.lora_A for name, _ in self.blocks):  # "__base__" rows only: the base output
            return output
        parts = []
        for (name, _), chunk in zip(self.blocks, x.split([k for _, k in self.blocks])):
            if name == "__base__" or name not in module.lora_A:
                parts.append(output.new_zeros((chunk.shape[0], *output.shape[1:])))
                continue
            a, b = module.lora_A[name], module.lora_B[name]
            parts.append((b(a(chunk.to(a.weight.dtype))) * module.scaling[name]).to(output.dtype))
        return output + torch.cat(parts)

    def __enter__(self) -> "route_rows":
        from peft.tuners.lora import LoraLayer

        layers = getattr(self.model, "_route_rows_layers", None)
        if layers is None:  # walking every module per pass costs more than a tiny model's forward
            layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
            self.model._route_rows_layers = layers
        for m in layers:
            self.saved.append((m, m._disable_adapters))
            m._disable_adapters = True  # the base output; the hook adds each block's adapter
            self.handles.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for m, flag in self.saved:
            m._disable_adapters = flag
        self.handles.clear()
        self.saved.clear()
