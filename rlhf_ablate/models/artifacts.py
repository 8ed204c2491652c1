"""Loading the artifacts that stages write (docs/architecture.md, "Artifact directories") back as models.

An artifact directory holds ``model/`` (full weights) or ``adapter/`` (a LoRA on the stage's base); the base is
rebuilt from the upstream artifact dirs rather than stored, so a cache directory can be moved or shared between
machines. PPO and eval both load reward models and policies through here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrialConfig
from ..files import read_json
from .generation import eval_mode
from .loading import load_causal_lm, load_seq_cls, load_tokenizer, resolve_base


def rm_base_path(cfg: TrialConfig, sft_dir: Path | None) -> str:
    """The RM starts from the merged SFT model (shares PPO's base) or from the raw base model."""
    if cfg.rm.init_from == "sft":
        assert sft_dir is not None, "rm.init_from=sft needs the SFT artifact"
        return str(sft_dir / "model")
    return resolve_base(cfg.model)


def seq_cls_scorer(model):
    """A (input_ids, attention_mask) -> scores function for a transformers/peft sequence-classification model."""
    dev = next(model.parameters()).device

    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with eval_mode(model):
            out = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev))
        return out.logits.squeeze(-1).float()

    return score


def load_rm(cfg: TrialConfig, rm_dir: Path, sft_dir: Path | None):
    """(model, tokenizer) of a trained RM artifact, ready to score. Paths are rebuilt from the upstream artifact
    dirs rather than stored, so a cache directory can be moved or shared between machines."""
    info = read_json(rm_dir / "rm_info.json")
    if info["kind"] == "model":
        path = str(rm_dir / "model")
        return load_seq_cls(cfg.model, path, quantize=False), load_tokenizer(cfg.model, path)
    from peft import PeftModel

    base = load_seq_cls(cfg.model, rm_base_path(cfg, sft_dir), quantize=cfg.model.quantization != "none")
    model = PeftModel.from_pretrained(base, str(rm_dir / "adapter"))
    return model, load_tokenizer(cfg.model, str(rm_dir / "adapter"))


def load_policy(cfg: TrialConfig, sft_dir: Path, policy_dir: Path | None):
    """(policy, reference-context) for eval: adapters on the merged SFT base (reference = adapters disabled), a
    full model (reference = the SFT model), or the SFT model itself (policy_dir None)."""
    sft_path = str(sft_dir / "model")
    quantized = cfg.model.quantization != "none"
    tok = load_tokenizer(cfg.model, sft_path)
    if policy_dir is None:
        return load_causal_lm(cfg.model, sft_path, quantize=quantized), None, tok
    if (policy_dir / "adapter").exists():
        from peft import PeftModel

        base = load_causal_lm(cfg.model, sft_path, quantize=quantized)
        return PeftModel.from_pretrained(base, str(policy_dir / "adapter")), "disable_adapter", tok
    ref = load_causal_lm(cfg.model, sft_path, quantize=False)
    return load_causal_lm(cfg.model, str(policy_dir / "model"), quantize=False), ref, tok
