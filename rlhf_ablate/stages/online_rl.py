"""GRPO and RLOO stages: TRL's GRPOTrainer / RLOOTrainer on the PPO prompts, starting from the merged SFT model.

Both sample ``num_generations`` answers per prompt and compare each answer with the others of its group (GRPO:
group mean and std, Shao et al. 2024, "DeepSeekMath"; RLOO: the leave-one-out mean, Ahmadian et al. 2024, "Back to
Basics"), so neither needs a value model. The reward is either

- ``reward.type: rm``: the trial's trained reward model, the same one PPO optimises and eval scores with; or
- ``reward.type: verifiable``: 1 if the answer matches the prompt's reference answer (rlhf_ablate/metrics/
  verifiable.py), else 0, for math- or QA-style data (RLVR).

What it costs compared with our PPO: TRL's trainers take the policy as their own model, so the RM cannot share its
base the way PPO's roles do (rlhf_ablate/ppo/roles.py). With ``reward.type: rm`` the RM is loaded beside the policy:
one more copy of the (4-bit, when quantized) base in memory. The reference needs no copy: with LoRA, TRL keeps a
frozen copy of the zero-initialised adapter, so the reference is the SFT model, as for PPO and DPO.
"""

from __future__ import annotations

from pathlib import Path

from .. import models
from ..config import TrialConfig
from ..data.prompting import format_prompt, normalize
from ..errors import TrialFailed
from ..files import write_json
from ..metrics.verifiable import verifiable_reward
from ..runtime import seed_everything
from .common import TRAINER_DIR, adaptive_trl_stage, clean_up, fit, load_for_training, save_trained, train_args

METHODS = ("grpo", "rloo")


def reward_prompts(cfg: TrialConfig, data) -> list[dict]:
    """The prompts to train on, as rows with the raw prompt and (for verifiable rewards) the reference answer.

    Verifiable rewards need a reference per prompt: the PPO prompts that carry one, else the SFT examples (a prompt
    with its gold answer). RM rewards use the PPO prompts as PPO does."""
    if cfg.reward.type == "rm":
        rows = [{"raw_prompt": p.prompt, "reference": p.reference or ""} for p in data.ppo_prompts]
    else:
        rows = [{"raw_prompt": p.prompt, "reference": p.reference} for p in data.ppo_prompts if p.reference]
        if not rows:
            rows = [{"raw_prompt": e.prompt, "reference": e.completion} for e in data.sft_train]
    if not rows:
        raise TrialFailed(f"{cfg.method}: the data has no prompts to train on"
                          + (" with reference answers (reward.type=verifiable)" if cfg.reward.type != "rm" else ""))
    return [{"prompt": format_prompt(r["raw_prompt"]), **r} for r in rows]


def make_reward_fn(cfg: TrialConfig, rm_dir: Path, sft_dir: Path):
    """The reward function TRL calls with the batch's prompts, completions and our extra columns."""
    if cfg.reward.type == "verifiable":
        r = cfg.reward

        def verifiable(prompts, completions, reference, **_):
            return [verifiable_reward(answer_text(c), ref, r.match, r.pattern) for c, ref in zip(completions, reference)]

        return verifiable
    rm, rm_tok = models.load_rm(cfg, rm_dir, sft_dir)
    rm.requires_grad_(False)
    score = models.seq_cls_scorer(rm)

    def reward_model(prompts, completions, raw_prompt, **_):
        # The RM scores prompt + answer + EOS through our one template, exactly as in the RM stage and in eval.
        return models.score_texts(score, rm_tok, list(raw_prompt), [answer_text(c) for c in completions],
                                  cfg.model.max_length)

    return reward_model


def trl_sampling_args(cfg: TrialConfig) -> dict:
    """TRL's sampling arguments from the one sampling builder (models/generation.py: sampling_for): the method's
    length cap and temperature, pure temperature sampling (top-k 0, top-p 1) as in PPO's rollouts. TRL calls
    ``generate`` without a tokenizer, so it cannot stop at the template's next-turn header; the reward function
    scores each answer up to the header instead (:func:`answer_text`), as eval and PPO cut it."""
    s = models.sampling_for(cfg, cfg.method)
    return dict(num_generations=getattr(cfg, cfg.method).num_generations, max_completion_length=s.max_new_tokens,
                temperature=s.temperature, top_p=1.0, top_k=0)


def answer_text(completion: str) -> str:
    """A sampled completion up to the template's next-turn header (where a model that keeps going starts the next
    user turn; models/generation.py cuts it the same way), normalised as the RM was trained."""
    cut = completion.find(models.NEXT_TURN_HEADER)
    return normalize(completion if cut < 0 else completion[:cut])


def train_online_rl(cfg: TrialConfig, data, sft_dir: Path, rm_dir: Path, out: Path) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"train_online_rl trains {METHODS}, not {cfg.method!r}")
    adaptive_trl_stage(cfg.method, getattr(cfg, cfg.method), out,
                       lambda b, ga: _train_online_rl(cfg, data, sft_dir, rm_dir, out, (b, ga)))


def _train_online_rl(cfg: TrialConfig, data, sft_dir: Path, rm_dir: Path, out: Path, micro: tuple[int, int]) -> None:
    from datasets import Dataset

    method = cfg.method
    if method == "grpo":
        from trl import GRPOConfig as TrlConfig, GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as TrlConfig, RLOOTrainer as Trainer
    o = getattr(cfg, method)
    seed_everything(cfg.seed)
    # Our loader, not TRL's: it applies the 4-bit fixes of rlhf_ablate/models/loading.py (docs/stack.md).
    model, tok = load_for_training(cfg, o, str(sft_dir / "model"))
    tok.padding_side = "left"  # decoder-only sampling needs right-aligned prompts
    rows = reward_prompts(cfg, data)
    common = train_args(o, out / TRAINER_DIR, cfg.seed, cfg.model, micro)
    common["remove_unused_columns"] = False  # the reward function reads raw_prompt and reference
    args = TrlConfig(**common, **trl_sampling_args(cfg), beta=o.beta, log_completions=False,
                     # The RM rewards of one prompt's group are compared with each other: no global scaling needed.
                     **({"scale_rewards": "group"} if method == "grpo" else {}))
    reward_fn = make_reward_fn(cfg, rm_dir, sft_dir)
    trainer = Trainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tok)
    history = fit(trainer, cfg)
    save_trained(trainer.model, tok, out, o.lora_rank)
    write_json(out / "history.json", history)
    rewards = [h["reward"] for h in history if "reward" in h]
    write_json(out / "metrics.json", {
        f"{method}/train_reward_first": rewards[0] if rewards else None,
        f"{method}/train_reward_last": rewards[-1] if rewards else None,
        f"{method}/train_prompts": len(rows)})
    clean_up(out)
