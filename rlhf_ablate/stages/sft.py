"""SFT stage: TRL SFTTrainer on prompt/completion pairs with the prompt masked, LoRA or full, 4-bit when
configured. The artifact is the *merged* model, so that later stages (RM, PPO, DPO) start from it and PPO's
reference is simply "the base with adapters disabled"."""

from __future__ import annotations

from pathlib import Path

from .. import models
from ..config import TrialConfig
from ..data.prompting import format_prompt, normalize
from ..files import write_json
from ..runtime import seed_everything
from .common import TRAINER_DIR, adaptive_trl_stage, clean_up, fit, load_for_training, train_args


def train_sft(cfg: TrialConfig, data, out: Path) -> None:
    adaptive_trl_stage("sft", cfg.sft, out, lambda b, ga: _train_sft(cfg, data, out, (b, ga)))


def _train_sft(cfg: TrialConfig, data, out: Path, micro: tuple[int, int]) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    seed_everything(cfg.seed)
    model, tok = load_for_training(cfg, cfg.sft, models.resolve_base(cfg.model))
    # EOS is appended by TRL to plain-text completions: the model learns to stop, which PPO's
    # missing-EOS penalty relies on.
    rows = [{"prompt": format_prompt(e.prompt), "completion": normalize(e.completion)} for e in data.sft_train]
    args = SFTConfig(**train_args(cfg.sft, out / TRAINER_DIR, cfg.seed, cfg.model, micro),
                     max_length=cfg.model.max_length, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    history = fit(trainer, cfg)
    models.merge_and_save(trainer.model, out / "model", cfg.model)
    tok.save_pretrained(out / "model")
    losses = [h["loss"] for h in history if "loss" in h]
    write_json(out / "history.json", history)
    write_json(out / "metrics.json", {"sft/train_loss_first": losses[0] if losses else None,
                                      "sft/train_loss_last": losses[-1] if losses else None,
                                      "sft/train_examples": len(rows)})
    clean_up(out)
