"""Eval stages: a policy (the base model, SFT, PPO or DPO) answers the held-out prompts.

- text metrics of greedy answers against the references, with Korean-correct tokenization (rlhf_ablate/metrics/text.py);
- ``reward_mean``: the trained RM's score of those answers;
- ``kl_to_ref``: KL(policy || SFT reference) per response, estimated on one sampled (temperature 1) answer per
  prompt, since a KL is an expectation under the policy's own samples, which greedy answers are not;
- ``response_len`` in tokens.
Every number is also kept per prompt (records), so that analysis can pair trials prompt by prompt, and the stage's
metrics are computed from those records by the metric registry (rlhf_ablate/metrics/registry.py), the same
reducers the tables use.

The base model is evaluated in two cached steps (rlhf_ablate/run/trial.py): :func:`generate_base` (its greedy
answers depend on the model, the data and the eval settings only, so one artifact serves every seed and every
reward model) and :func:`score_base` (the trial's RM scores those answers: per trial, and cheap).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import metrics
from ..config import TrialConfig
from ..files import read_json, write_json
from ..metrics.registry import compute_stage_metrics
from ..runtime import seed_everything
from ..models import (eval_mode, generate, load_causal_lm, load_policy, load_rm, load_tokenizer, position_ids,
                      resolve_base, score_texts, seq_cls_scorer)
from ..ppo.rollout import build_batch, response_logprobs


def _ref_logits(policy, ref, ids, attn):
    if ref is None:
        return None
    if ref == "disable_adapter":
        with policy.disable_adapter():
            return policy(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits.float()
    return ref(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).logits.float()


def evaluate_policy(cfg: TrialConfig, data, stage: str, sft_dir: Path, rm_dir: Path, policy_dir: Path | None,
                    out: Path) -> None:
    seed_everything(cfg.seed)
    policy, ref, tok = load_policy(cfg, sft_dir, policy_dir)
    examples = list(data.eval)
    prompts = [e.prompt for e in examples]
    e = cfg.eval
    greedy = generate(policy, tok, prompts, max_new_tokens=e.max_new_tokens, do_sample=e.do_sample)
    preds = [g["text"] for g in greedy]
    tm = metrics.text_metrics(preds, [x.reference or "" for x in examples], rouge_tokenizer=e.rouge_tokenizer,
                              bleu_tokenize=e.bleu_tokenize)
    rm_model, rm_tok = load_rm(cfg, rm_dir, sft_dir)
    rewards = score_texts(seq_cls_scorer(rm_model), rm_tok, prompts, preds, cfg.model.max_length)
    del rm_model

    kls = [0.0] * len(prompts)
    if ref is not None:
        torch.manual_seed(cfg.seed + 1)
        sampled = generate(policy, tok, prompts, max_new_tokens=e.max_new_tokens, do_sample=True)
        dev = next(policy.parameters()).device
        with eval_mode(policy), torch.no_grad():
            for i in range(0, len(prompts), 16):
                b = build_batch(tok, prompts[i:i + 16], sampled[i:i + 16], dev)
                lp = response_logprobs(policy(input_ids=b["ids"], attention_mask=b["attn"],
                                              position_ids=position_ids(b["attn"])).logits.float(), b, 1.0)
                rlp = response_logprobs(_ref_logits(policy, ref, b["ids"], b["attn"]), b, 1.0)
                kls[i:i + 16] = ((lp - rlp) * b["rmask"]).sum(1).tolist()
    records = []
    for x, g, r, rw, kl in zip(examples, greedy, tm.records, rewards, kls):
        records.append({"data_id": x.data_id, "prompt": x.prompt, "reference": x.reference, "generation": g["text"],
                        **r, "reward": rw, "response_len": len(g["ids"]), "has_eos": g["has_eos"],
                        "kl_to_ref": kl})
    write_json(out / "metrics.json", compute_stage_metrics(stage, records))
    write_json(out / "records.json", records)
    write_json(out / "meta.json", tm.meta)


def generate_base(cfg: TrialConfig, data, out: Path) -> None:
    """The base model's greedy answers to the held-out prompts and their text metrics (no RM, no seed: greedy
    decoding of one fixed model), loaded the way SFT loads its base (4-bit when the model config says so)."""
    seed_everything(0)
    base = resolve_base(cfg.model)
    tok = load_tokenizer(cfg.model, base)
    model = load_causal_lm(cfg.model, base, quantize=cfg.model.quantization != "none")
    examples = list(data.eval)
    e = cfg.eval
    greedy = generate(model, tok, [x.prompt for x in examples], max_new_tokens=e.max_new_tokens,
                      do_sample=e.do_sample)
    tm = metrics.text_metrics([g["text"] for g in greedy], [x.reference or "" for x in examples],
                              rouge_tokenizer=e.rouge_tokenizer, bleu_tokenize=e.bleu_tokenize)
    records = [{"data_id": x.data_id, "prompt": x.prompt, "reference": x.reference, "generation": g["text"], **r,
                "response_len": len(g["ids"]), "has_eos": g["has_eos"]}
               for x, g, r in zip(examples, greedy, tm.records)]
    write_json(out / "records.json", records)
    write_json(out / "meta.json", tm.meta)


def score_base(cfg: TrialConfig, sft_dir: Path, rm_dir: Path, base_dir: Path, out: Path) -> None:
    """The trial's RM scores the base model's answers; writes the ``base/`` metrics and records."""
    records = read_json(base_dir / "records.json")
    rm_model, rm_tok = load_rm(cfg, rm_dir, sft_dir)
    rewards = score_texts(seq_cls_scorer(rm_model), rm_tok, [r["prompt"] for r in records],
                          [r["generation"] for r in records], cfg.model.max_length)
    records = [{**r, "reward": rw} for r, rw in zip(records, rewards)]
    write_json(out / "metrics.json", compute_stage_metrics("base", records))
    write_json(out / "records.json", records)
    write_json(out / "meta.json", read_json(base_dir / "meta.json"))
