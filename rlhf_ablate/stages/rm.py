"""Reward-model stage: TRL RewardTrainer on every (better, worse) pair of the ranked groups, then the rm/*
metrics on held-out groups: means and separation margin, pairwise accuracy, per-prompt Kendall tau-b and Spearman
rho against the human ranking, and the score-length correlation (our users' RMs were biased toward length)."""

from __future__ import annotations

from pathlib import Path

from .. import metrics
from ..config import TrialConfig
from ..data.prompting import format_prompt, normalize
from ..files import write_json
from ..runtime import seed_everything
from ..models import rm_base_path, score_texts, seq_cls_scorer
from ..models.memory import EVAL_SCORE_MICRO
from .common import TRAINER_DIR, adaptive_trl_stage, clean_up, fit, load_for_training, save_trained, train_args


def train_rm(cfg: TrialConfig, data, sft_dir: Path | None, out: Path) -> None:
    adaptive_trl_stage("rm", cfg.rm, out, lambda b, ga: _train_rm(cfg, data, sft_dir, out, (b, ga)))


def _train_rm(cfg: TrialConfig, data, sft_dir: Path | None, out: Path, micro: tuple[int, int]) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    seed_everything(cfg.seed)
    model, tok = load_for_training(cfg, cfg.rm, rm_base_path(cfg, sft_dir), "SEQ_CLS")
    rows = [{"prompt": format_prompt(p.prompt), "chosen": normalize(p.chosen), "rejected": normalize(p.rejected)}
            for g in data.rm_train for p in g.pairs()]
    r = cfg.rm
    args = RewardConfig(**train_args(r, out / TRAINER_DIR, cfg.seed, cfg.model, micro),
                        max_length=cfg.model.max_length,
                        center_rewards_coefficient=r.center_rewards_coefficient or None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    history = fit(trainer, cfg)
    kind = save_trained(trainer.model, tok, out, cfg.rm.lora_rank)
    write_json(out / "rm_info.json", {"kind": kind, "init_from": cfg.rm.init_from, "train_pairs": len(rows)})
    write_json(out / "history.json", history)
    m, records = evaluate_rm(cfg, trainer.model, tok, data.rm_eval)
    m["rm/train_pairs"] = len(rows)
    write_json(out / "metrics.json", m)
    write_json(out / "records.json", records)
    clean_up(out)


def evaluate_rm(cfg: TrialConfig, model, tok, groups) -> tuple[dict, list[dict]]:
    score = seq_cls_scorer(model)
    prompts = [g.prompt for g in groups for _ in g.answers]
    answers = [a for g in groups for a in g.answers]
    flat = score_texts(score, tok, prompts, answers, cfg.model.max_length, batch_size=EVAL_SCORE_MICRO)
    out_groups, i = [], 0
    for g in groups:
        s = flat[i:i + len(g.answers)]
        i += len(g.answers)
        # Length in NFC characters (Hangul syllables), comparable across tokenizers and models.
        out_groups.append((s, list(g.ranks), [len(normalize(a)) for a in g.answers]))
    return metrics.rm_metrics(out_groups, seed=cfg.seed), metrics.rm_group_records(out_groups,
                                                                                  [g.data_id for g in groups])


