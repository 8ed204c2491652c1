"""DPO stage, the alternative to RM + PPO: TRL DPOTrainer on the same pairs, starting from the merged SFT model.
With LoRA the reference is the SFT model itself (TRL keeps a frozen copy of the zero-initialised adapter), so the
eval stage measures KL to the same reference as for PPO."""

from __future__ import annotations

from pathlib import Path

from .. import models
from ..config import TrialConfig
from ..data.prompting import format_prompt, normalize
from ..files import write_json
from ..runtime import seed_everything
from .common import log_history, restore_trainable_dtype, save_trained_policy, train_args


def train_dpo(cfg: TrialConfig, data, sft_dir: Path, out: Path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    seed_everything(cfg.seed)
    sft_path = str(sft_dir / "model")
    tok = models.load_tokenizer(cfg.model, sft_path)
    quantized = cfg.model.quantization != "none" and cfg.dpo.lora_rank > 0
    # Loaded by path: for a full fine-tune TRL reloads the reference from model.config._name_or_path (docs/stack.md).
    model = models.load_causal_lm(cfg.model, sft_path, quantize=quantized)
    model = models.prepare_for_training(model, cfg.dpo.lora_rank, cfg.dpo.lora_alpha, cfg.dpo.lora_dropout,
                                        "CAUSAL_LM", quantized)
    rows = [{"prompt": format_prompt(p.prompt), "chosen": normalize(p.chosen), "rejected": normalize(p.rejected)}
            for g in data.rm_train for p in g.pairs()]
    d = cfg.dpo
    args = DPOConfig(**train_args(d, out / "trainer", cfg.seed, cfg.model),
                     beta=d.beta, max_length=cfg.model.max_length)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    restore_trainable_dtype(trainer.model, cfg.model)
    trainer.train()
    history = log_history(trainer)
    save_trained_policy(trainer.model, tok, out, cfg.dpo.lora_rank)
    write_json(out / "history.json", history)
    last = [h for h in history if "loss" in h]
    write_json(out / "metrics.json", {"dpo/train_loss_last": last[-1]["loss"] if last else None,
                                      "dpo/train_pairs": len(rows)})
    import shutil

    shutil.rmtree(out / "trainer", ignore_errors=True)
