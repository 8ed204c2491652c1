"""Reward-model stage: TRL RewardTrainer on every (better, worse) pair of the ranked groups, then the rm/*
metrics on held-out groups: means and separation margin, pairwise accuracy, per-prompt Kendall tau-b and Spearman
rho against the human ranking, and the score-length correlation (our users' RMs were biased toward length).

Beside the trial's RM, for the over-optimization alarm (rlhf_ablate/ppo/overopt.py): ``rm.ensemble_size`` - 1 more
RMs on the same pairs with other seeds (:func:`train_rm_ensemble`, ``members/<k>/``), and with ``rm.gold=disjoint``
a gold RM on a fold of the training groups that the others never see (:func:`train_gold_rm`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import metrics
from ..config import TrialConfig
from ..data.prompting import format_prompt, normalize
from ..data.splits import gold_fold
from ..files import write_json
from ..runtime import seed_everything
from ..models import rm_base_path, score_texts, seq_cls_scorer
from ..models.memory import EVAL_SCORE_MICRO
from .common import TRAINER_DIR, adaptive_trl_stage, clean_up, fit, load_for_training, save_trained, train_args


# Seeds of the ensemble members: member k trains with seed + k * MEMBER_SEED_STRIDE (member 0 is the trial's RM);
# the gold RM with seed + GOLD_SEED_OFFSET, so that its score head does not start where the trial's RM's did.
MEMBER_SEED_STRIDE = 1000
GOLD_SEED_OFFSET = 500


def rm_groups(cfg: TrialConfig, data, gold: bool = False) -> list:
    """The ranked groups an RM trains on: every training group, or with ``rm.gold=disjoint`` the proxy fold (the
    trial's RM, the ensemble) or the gold fold (the gold RM); data/splits.py: gold_fold."""
    if cfg.rm.gold == "none":
        return list(data.rm_train)
    proxy, gold_groups = gold_fold(data.rm_train, cfg.rm.gold_fraction, cfg.data.split_seed)
    return gold_groups if gold else proxy


def train_rm(cfg: TrialConfig, data, sft_dir: Path | None, out: Path, *, member: int = 0,
             gold: bool = False) -> None:
    """The trial's RM (``member`` 0), an ensemble member (other seeds), or the gold RM (``gold``: its fold and
    ``rm.gold_max_steps``); restarted with a smaller micro-batch after an out-of-memory error
    (stages/common.py: adaptive_trl_stage)."""
    r = cfg.rm
    if gold and r.gold_max_steps > 0:
        r = dataclasses.replace(r, max_steps=r.gold_max_steps)
    stage = "rm_gold" if gold else ("rm_ensemble" if member else "rm")  # the graph's stage names (run/graph.py)
    adaptive_trl_stage(stage, r, out,
                       lambda b, ga: _train_rm(cfg, r, data, sft_dir, out, (b, ga), member, gold))


def _train_rm(cfg: TrialConfig, r, data, sft_dir: Path | None, out: Path, micro: tuple[int, int], member: int,
              gold: bool) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    seed = cfg.seed + (GOLD_SEED_OFFSET if gold else member * MEMBER_SEED_STRIDE)
    seed_everything(seed)
    model, tok = load_for_training(cfg, r, rm_base_path(cfg, sft_dir), "SEQ_CLS")
    rows = [{"prompt": format_prompt(p.prompt), "chosen": normalize(p.chosen), "rejected": normalize(p.rejected)}
            for g in rm_groups(cfg, data, gold) for p in g.pairs()]
    if not rows:
        from ..errors import TrialFailed

        raise TrialFailed(f"rm: no preference pairs to train on ({'gold' if gold else 'proxy'} fold of "
                          f"{len(data.rm_train)} groups); lower or raise rm.gold_fraction, or use more RM data")
    args = RewardConfig(**train_args(r, out / TRAINER_DIR, seed, cfg.model, micro),
                        max_length=cfg.model.max_length,
                        center_rewards_coefficient=r.center_rewards_coefficient or None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    history = fit(trainer, cfg)
    kind = save_trained(trainer.model, tok, out, r.lora_rank)
    fold = ("gold" if gold else "proxy") if r.gold != "none" else "all"
    write_json(out / "rm_info.json", {"kind": kind, "init_from": r.init_from, "train_pairs": len(rows),
                                      "seed": seed, "fold": fold})
    write_json(out / "history.json", history)
    m, records = evaluate_rm(cfg, trainer.model, tok, data.rm_eval)
    m["rm/train_pairs"] = len(rows)
    if gold:  # its own names, so that it never overwrites the trial's RM's in result.json
        m = {f"rm_gold/{k}": m[f"rm/{k}"] for k in ("pairwise_accuracy", "kendall_tau", "separation_margin",
                                                     "train_pairs")}
    write_json(out / "metrics.json", m)
    write_json(out / "records.json", records)
    clean_up(out)


def train_gold_rm(cfg: TrialConfig, data, sft_dir: Path | None, out: Path) -> None:
    """The gold RM of ``rm.gold=disjoint``: the gold fold, ``rm.gold_max_steps``, its own seed."""
    train_rm(cfg, data, sft_dir, out, gold=True)


def train_rm_ensemble(cfg: TrialConfig, data, sft_dir: Path | None, out: Path) -> None:
    """Members 1..K-1 of ``rm.ensemble_size`` K (the trial's RM is member 0), one after another, each in
    ``members/<k>/`` with the trial's RM's files (its metrics there too, not in the trial's)."""
    for k in range(1, cfg.rm.ensemble_size):
        d = out / "members" / str(k)
        d.mkdir(parents=True)
        train_rm(cfg, data, sft_dir, d, member=k)
    write_json(out / "ensemble.json", {"members": [f"members/{k}" for k in range(1, cfg.rm.ensemble_size)],
                                       "seed_stride": MEMBER_SEED_STRIDE})


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


