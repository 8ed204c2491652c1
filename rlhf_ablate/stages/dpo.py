"""DPO stage, the alternative to RM + PPO: TRL DPOTrainer on the same pairs, starting from the merged SFT model.
With LoRA the reference is the SFT model itself (TRL keeps a frozen copy of the zero-initialised adapter), so the
eval stage measures KL to the same reference as for PPO."""

from __future__ import annotations

from pathlib import Path

from ..config import TrialConfig
from ..data.prompting import format_prompt, normalize
from ..files import write_json
from ..runtime import seed_everything
from .common import TRAINER_DIR, adaptive_trl_stage, clean_up, fit, load_for_training, save_trained, train_args


def train_dpo(cfg: TrialConfig, data, sft_dir: Path, out: Path) -> None:
    adaptive_trl_stage("dpo", cfg.dpo, out, lambda b, ga: _train_dpo(cfg, data, sft_dir, out, (b, ga)))


def _train_dpo(cfg: TrialConfig, data, sft_dir: Path, out: Path, micro: tuple[int, int]) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    seed_everything(cfg.seed)
    # Loaded by path: for a full fine-tune TRL reloads the reference from model.config._name_or_path (docs/stack.md).
    model, tok = load_for_training(cfg, cfg.dpo, str(sft_dir / "model"))
    rows = [{"prompt": format_prompt(p.prompt), "chosen": normalize(p.chosen), "rejected": normalize(p.rejected)}
            for g in data.rm_train for p in g.pairs()]
    d = cfg.dpo
    args = DPOConfig(**train_args(d, out / TRAINER_DIR, cfg.seed, cfg.model, micro), beta=d.beta,
                     max_length=cfg.model.max_length)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    history = fit(trainer, cfg)
    save_trained(trainer.model, tok, out, cfg.dpo.lora_rank)
    write_json(out / "history.json", history)
    last = [h for h in history if "loss" in h]
    write_json(out / "metrics.json", {"dpo/train_loss_last": last[-1]["loss"] if last else None,
                                      "dpo/train_pairs": len(rows)})
    clean_up(out)
