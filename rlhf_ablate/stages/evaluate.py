"""Eval stage: a policy (SFT, PPO or DPO) answers the held-out prompts.

- text metrics of greedy answers against the references, with Korean-correct tokenization (metrics.py);
- ``reward_mean``: the trained RM's score of those answers;
- ``kl_to_ref``: KL(policy || SFT reference) per response, estimated on one sampled (temperature 1) answer per
  prompt, since a KL is an expectation under the policy's own samples, which greedy answers are not;
- ``response_len`` in tokens.
Every number is also kept per prompt (records), so that analysis can pair trials prompt by prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import metrics, models
from ..config import TrialConfig
from .common import eval_mode, generate, score_texts, seed_everything, write_json
from .ppo import _position_ids, build_batch, response_logprobs
from .rm import load_rm, seq_cls_scorer


def load_policy(cfg: TrialConfig, sft_dir: Path, policy_dir: Path | None):
    """(policy, reference-context) for eval: adapters on the merged SFT base (reference = adapters disabled), a
    full model (reference = the SFT model), or the SFT model itself (policy_dir None)."""
    sft_path = str(sft_dir / "model")
    quantized = cfg.model.quantization != "none"
    tok = models.load_tokenizer(cfg.model, sft_path)
    if policy_dir is None:
        return models.load_causal_lm(cfg.model, sft_path, quantize=quantized), None, tok
    if (policy_dir / "adapter").exists():
        from peft import PeftModel

        base = models.load_causal_lm(cfg.model, sft_path, quantize=quantized)
        return PeftModel.from_pretrained(base, str(policy_dir / "adapter")), "disable_adapter", tok
    ref = models.load_causal_lm(cfg.model, sft_path, quantize=False)
    return models.load_causal_lm(cfg.model, str(policy_dir / "model"), quantize=False), ref, tok


def _ref_logits(policy, ref, ids, attn):
    if ref is None:
        return None
    if ref == "disable_adapter":
        with policy.disable_adapter():
            return policy(input_ids=ids, attention_mask=attn, position_ids=_position_ids(attn)).logits.float()
    return ref(input_ids=ids, attention_mask=attn, position_ids=_position_ids(attn)).logits.float()


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
                                              position_ids=_position_ids(b["attn"])).logits.float(), b, 1.0)
                rlp = response_logprobs(_ref_logits(policy, ref, b["ids"], b["attn"]), b, 1.0)
                kls[i:i + 16] = ((lp - rlp) * b["rmask"]).sum(1).tolist()
    p = f"{stage}/"
    records = []
    for x, g, r, rw, kl in zip(examples, greedy, tm.records, rewards, kls):
        records.append({"data_id": x.data_id, "prompt": x.prompt, "reference": x.reference, "generation": g["text"],
                        **r, "reward": rw, "response_len": len(g["ids"]), "has_eos": g["has_eos"],
                        "kl_to_ref": kl})
    n = max(1, len(records))
    m = {**tm.as_metrics(p),
         p + "reward_mean": sum(rewards) / n,
         p + "kl_to_ref": sum(kls) / n,
         p + "response_len": sum(len(g["ids"]) for g in greedy) / n,
         p + "eos_frac": sum(g["has_eos"] for g in greedy) / n}
    write_json(out / "metrics.json", m)
    write_json(out / "records.json", records)
    write_json(out / "meta.json", tm.meta)
