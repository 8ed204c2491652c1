"""Reward-model stage: TRL RewardTrainer on every (better, worse) pair of the ranked groups, then the rm/*
metrics on held-out groups: means and separation margin, pairwise accuracy, per-prompt Kendall tau-b and Spearman
rho against the human ranking, and the score-length correlation (our users' RMs were biased toward length)."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import metrics, models
from ..config import TrialConfig
from ..prompting import format_prompt, normalize
from .common import (eval_mode, log_history, read_json, restore_trainable_dtype, score_texts, seed_everything,
                     trl_common_args, write_json)


def rm_base_path(cfg: TrialConfig, sft_dir: Path | None) -> str:
    """The RM starts from the merged SFT model (shares PPO's base) or from the raw base model."""
    if cfg.rm.init_from == "sft":
        assert sft_dir is not None, "rm.init_from=sft needs the SFT artifact"
        return str(sft_dir / "model")
    return models.resolve_base(cfg.model)


def train_rm(cfg: TrialConfig, data, sft_dir: Path | None, out: Path) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    seed_everything(cfg.seed)
    base = rm_base_path(cfg, sft_dir)
    tok = models.load_tokenizer(cfg.model, base)
    quantized = cfg.model.quantization != "none" and cfg.rm.lora_rank > 0
    model = models.load_seq_cls(cfg.model, base, quantize=quantized)
    model = models.prepare_for_training(model, cfg.rm.lora_rank, cfg.rm.lora_alpha, cfg.rm.lora_dropout,
                                        "SEQ_CLS", quantized)
    rows = [{"prompt": format_prompt(p.prompt), "chosen": normalize(p.chosen), "rejected": normalize(p.rejected)}
            for g in data.rm_train for p in g.pairs()]
    r = cfg.rm
    args = RewardConfig(**trl_common_args(out / "trainer", cfg.seed, lr=r.learning_rate, epochs=r.epochs,
                                          max_steps=r.max_steps, batch_size=r.batch_size, grad_accum=r.grad_accum,
                                          warmup_ratio=r.warmup_ratio),
                        max_length=cfg.model.max_length,
                        center_rewards_coefficient=r.center_rewards_coefficient or None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    restore_trainable_dtype(trainer.model, cfg.model.compute_dtype)
    trainer.train()
    trained = trainer.model
    kind = "adapter" if cfg.rm.lora_rank > 0 else "model"
    trained.save_pretrained(out / kind)
    tok.save_pretrained(out / kind)
    write_json(out / "rm_info.json", {"kind": kind, "init_from": cfg.rm.init_from,
                                      "train_pairs": len(rows)})
    write_json(out / "history.json", log_history(trainer))
    m, records = evaluate_rm(cfg, trained, tok, data.rm_eval)
    m["rm/train_pairs"] = len(rows)
    write_json(out / "metrics.json", m)
    write_json(out / "records.json", records)
    import shutil

    shutil.rmtree(out / "trainer", ignore_errors=True)


def seq_cls_scorer(model):
    """A (input_ids, attention_mask) -> scores function for a transformers/peft sequence-classification model."""
    dev = next(model.parameters()).device

    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with eval_mode(model):
            out = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev))
        return out.logits.squeeze(-1).float()

    return score


def evaluate_rm(cfg: TrialConfig, model, tok, groups) -> tuple[dict, list[dict]]:
    score = seq_cls_scorer(model)
    prompts = [g.prompt for g in groups for _ in g.answers]
    answers = [a for g in groups for a in g.answers]
    flat = score_texts(score, tok, prompts, answers, cfg.model.max_length)
    out_groups, i = [], 0
    for g in groups:
        s = flat[i:i + len(g.answers)]
        i += len(g.answers)
        # Length in NFC characters (Hangul syllables), comparable across tokenizers and models.
        out_groups.append((s, list(g.ranks), [len(normalize(a)) for a in g.answers]))
    return metrics.rm_metrics(out_groups, seed=cfg.seed), metrics.rm_group_records(out_groups,
                                                                                  [g.data_id for g in groups])


def load_rm(cfg: TrialConfig, rm_dir: Path, sft_dir: Path | None):
    """(model, tokenizer) of a trained RM artifact, ready to score. Paths are rebuilt from the upstream artifact
    dirs rather than stored, so a cache directory can be moved or shared between machines."""
    info = read_json(rm_dir / "rm_info.json")
    if info["kind"] == "model":
        path = str(rm_dir / "model")
        return models.load_seq_cls(cfg.model, path, quantize=False), models.load_tokenizer(cfg.model, path)
    from peft import PeftModel

    base = models.load_seq_cls(cfg.model, rm_base_path(cfg, sft_dir), quantize=cfg.model.quantization != "none")
    model = PeftModel.from_pretrained(base, str(rm_dir / "adapter"))
    return model, models.load_tokenizer(cfg.model, str(rm_dir / "adapter"))
