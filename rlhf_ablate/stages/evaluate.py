"""Eval stages: a policy (the base model, SFT, PPO or DPO) answers the held-out prompts.

- text metrics of greedy answers against the references, with Korean-correct tokenization (rlhf_ablate/metrics/text.py);
- ``reward_mean``: the trained RM's score of those answers;
- ``kl_to_ref``: KL(policy || SFT reference) per response, estimated on one sampled (temperature 1) answer per
  prompt, since a KL is an expectation under the policy's own samples, which greedy answers are not;
- ``response_len`` in tokens.
Every number is also kept per prompt (records), so that analysis can pair trials prompt by prompt, and the stage's
metrics are computed from those records by the metric registry (rlhf_ablate/metrics/registry.py), the same
reducers the tables use.

Each micro-batched pass (greedy generation, RM scoring, the KL pass) reruns with half its micro-batch after an
out-of-memory error (rlhf_ablate/runtime.py: adapt_micro_batch); no pass accumulates, so the numbers are the same.

The base model is evaluated in two cached steps (rlhf_ablate/run/trial.py): :func:`generate_base` (its greedy
answers depend on the model, the data and the eval settings only, so one artifact serves every seed and every
reward model) and :func:`score_base` (the trial's RM scores those answers: per trial, and cheap).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .. import metrics
from ..config import TrialConfig
from ..files import read_json, write_json
from ..metrics.registry import compute_stage_metrics
from ..ppo.math import token_logprobs
from ..ppo.rollout import build_batch
# eval's greedy answers and RM scoring: rows per pass, as the memory estimate reads them (memory.eval_bytes)
from ..models.memory import EVAL_GENERATE_MICRO, EVAL_SCORE_MICRO
from ..runtime import adapt_micro_batch, release_memory, seed_everything, stage_hooks
from ..models import (autocast, eval_mode, generate, load_causal_lm, load_policy, load_rm, load_tokenizer,
                      position_ids, ppo_plan, model_shape, resolve_base, sampling_for, score_texts, seq_cls_scorer)


def _response_logprobs(model, b: dict, chunk: int, cfg: TrialConfig) -> torch.Tensor:
    """Log-probs of the response tokens only: logits for the R predicting positions (``logits_to_keep``), reduced in
    float32 chunks, as PPO scores a rollout (ppo/roles.py: PPOModels.logprobs), never a rows x sequence x vocabulary
    float32 tensor."""
    T, R = b["ids"].shape[1], b["resp"].shape[1]
    keep = torch.arange(T - R - 1, T - 1, device=b["ids"].device)
    with autocast(cfg.model):
        logits = model(input_ids=b["ids"], attention_mask=b["attn"], position_ids=position_ids(b["attn"]),
                       use_cache=False, logits_to_keep=keep).logits
    return token_logprobs(logits, b["resp"], 1.0, chunk)[0]


def kl_to_reference(cfg: TrialConfig, policy, ref, tok, prompts: list[str], micro: int | None = None) -> list[float]:
    """KL(policy || reference) per prompt, summed over the tokens of one temperature-1 sample (a KL is an expectation
    under the policy's own samples). Sampled and scored ``ppo.rollout_micro_batch_size`` prompts at a time with the
    response-only, chunked log-probs of PPO's scoring, so eval stays inside the memory PPO's plan allows (``micro``:
    fewer prompts at a time, after an out-of-memory error)."""
    shape = model_shape(cfg.model)
    plan = ppo_plan(cfg.ppo, shape.params, shape.vocab)
    if micro is not None:
        plan = dataclasses.replace(plan, rollout_micro=micro)
    torch.manual_seed(cfg.seed + 1)
    sampled = generate(policy, tok, prompts, **sampling_for(cfg, "eval_kl").kwargs(), batch_size=plan.rollout_micro)
    return _sample_kls(cfg, policy, ref, tok, prompts, sampled, plan)


def _sample_kls(cfg: TrialConfig, policy, ref, tok, prompts: list[str], sampled: list[dict], plan) -> list[float]:
    """:func:`kl_to_reference`'s passes over the policy's samples ``sampled``: per prompt, the summed log-ratio."""
    dev = next(policy.parameters()).device
    kls: list[float] = []
    with eval_mode(policy), torch.no_grad():
        for i in range(0, len(prompts), plan.rollout_micro):
            b = build_batch(tok, prompts[i:i + plan.rollout_micro], sampled[i:i + plan.rollout_micro], dev)
            lp = _response_logprobs(policy, b, plan.logprob_chunk, cfg)
            if ref == "disable_adapter":
                with policy.disable_adapter():
                    rlp = _response_logprobs(policy, b, plan.logprob_chunk, cfg)
            else:
                rlp = _response_logprobs(ref, b, plan.logprob_chunk, cfg)
            kls.extend(((lp - rlp) * b["rmask"]).sum(1).tolist())
    return kls


def evaluate_policy(cfg: TrialConfig, data, stage: str, sft_dir: Path, rm_dir: Path, policy_dir: Path | None,
                    out: Path) -> None:
    seed_everything(cfg.seed)
    policy, ref, tok = load_policy(cfg, sft_dir, policy_dir)
    # the memory probe (run/probe.py) measures from here to the end of the KL pass, the RM's load included
    stage_hooks().model_ready(*(m for m in (policy, ref) if isinstance(m, torch.nn.Module)))
    examples = list(data.eval)
    prompts = [x.prompt for x in examples]
    name = f"eval_{stage}"
    greedy = adapt_micro_batch(name, EVAL_GENERATE_MICRO, lambda m: generate(
        policy, tok, prompts, **sampling_for(cfg, "eval").kwargs(), batch_size=m), phase="generation")
    tm, rewards = _text_and_rewards(cfg, name, examples, greedy, sft_dir, rm_dir)
    if ref is None:
        kls = [0.0] * len(prompts)
    else:
        shape = model_shape(cfg.model)
        kls = adapt_micro_batch(name, ppo_plan(cfg.ppo, shape.params, shape.vocab).rollout_micro,
                                lambda m: kl_to_reference(cfg, policy, ref, tok, prompts, m), phase="kl")
    stage_hooks().trained()
    _write_eval(stage, examples, greedy, tm, rewards, kls, out)


def _text_and_rewards(cfg: TrialConfig, name: str, examples: list, greedy: list[dict], sft_dir: Path, rm_dir: Path):
    """The greedy answers' text metrics against the references, and the trial's RM's scores of them."""
    prompts, preds = [x.prompt for x in examples], [g["text"] for g in greedy]
    tm = metrics.text_metrics(preds, [x.reference or "" for x in examples], rouge_tokenizer=cfg.eval.rouge_tokenizer,
                              bleu_tokenize=cfg.eval.bleu_tokenize)
    rm_model, rm_tok = load_rm(cfg, rm_dir, sft_dir)
    scorer = seq_cls_scorer(rm_model)
    rewards = adapt_micro_batch(name, EVAL_SCORE_MICRO, lambda m: score_texts(
        scorer, rm_tok, prompts, preds, cfg.model.max_length, batch_size=m), phase="scoring")
    del rm_model, scorer
    release_memory()  # the RM is part of the scoring phase only (memory.eval_bytes)
    return tm, rewards


def _write_eval(stage: str, examples: list, greedy: list[dict], tm, rewards: list, kls: list, out: Path) -> None:
    records = []
    for x, g, r, rw, kl in zip(examples, greedy, tm.records, rewards, kls):
        records.append({"data_id": x.data_id, "prompt": x.prompt, "reference": x.reference, "generation": g["text"],
                        **r, "reward": rw, "response_len": len(g["ids"]), "has_eos": g["has_eos"],
                        "kl_to_ref": kl})
    write_json(out / "metrics.json", compute_stage_metrics(stage, records))
    write_json(out / "records.json", records)
    write_json(out / "meta.json", tm.meta)


def evaluate_policies(cfgs: list[TrialConfig], data, stage: str, sft_dir: Path, rm_dirs: list[Path],
                      policy_dirs: list[Path], outs: list[Path]) -> None:
    """:func:`evaluate_policy` for a trial group's members (rlhf_ablate/run/groups.py: build_eval_group), whose
    policies are LoRA adapters on one SFT base (their PPO stages trained together): their greedy answers in one
    batched generation, their KL samples in another (each member's rows through its own adapter, sampled from its own
    stream, seeded as alone: models/generation.py: generate_segments), then per member its RM's scores and the KL
    passes. Each member's artifact equals its solo eval up to float rounding of the wider batches."""
    from ..models.generation import generate_segments

    seed_everything(cfgs[0].seed)
    policy, ref, tok = load_policy(cfgs[0], sft_dir, policy_dirs[0])
    names = ["default"] + [f"member_{k}" for k in range(1, len(cfgs))]
    for adapter, d in zip(names[1:], policy_dirs[1:]):
        policy.load_adapter(str(d / "adapter"), adapter_name=adapter)
    stage_hooks().model_ready(policy)
    examples = list(data.eval)
    prompts = [x.prompt for x in examples]
    e, name = sampling_for(cfgs[0], "eval"), f"eval_{stage}"
    shape = model_shape(cfgs[0].model)
    plan = ppo_plan(cfgs[0].ppo, shape.params, shape.vocab)
    dev = next(policy.parameters()).device

    def batched(s, generators, micro):
        return generate_segments(policy, tok, [prompts] * len(cfgs), names, generators, batch_size=micro,
                                 max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, temperature=s.temperature,
                                 max_prompt_length=s.max_prompt_length)
    greedy = adapt_micro_batch(name, EVAL_GENERATE_MICRO, lambda m: batched(e, [None] * len(cfgs), m),
                               phase="generation")
    sampled = adapt_micro_batch(name, plan.rollout_micro, lambda m: batched(
        sampling_for(cfgs[0], "eval_kl"), [_stream(c.seed + 1, dev) for c in cfgs], m), phase="kl")
    for cfg, rm_dir, mine, samples, adapter, out in zip(cfgs, rm_dirs, greedy, sampled, names, outs):
        policy.set_adapter(adapter)
        tm, rewards = _text_and_rewards(cfg, name, examples, mine, sft_dir, rm_dir)
        kls = adapt_micro_batch(name, plan.rollout_micro, lambda m: _sample_kls(
            cfg, policy, ref, tok, prompts, samples, dataclasses.replace(plan, rollout_micro=m)), phase="kl")
        _write_eval(stage, examples, mine, tm, rewards, kls, out)
    stage_hooks().trained()


def _stream(seed: int, dev: torch.device) -> torch.Generator:
    """The random stream ``torch.manual_seed(seed)`` starts on the device the sampler draws on."""
    return torch.Generator(device=dev).manual_seed(seed)


def generate_base(cfg: TrialConfig, data, out: Path) -> None:
    """The base model's greedy answers to the held-out prompts and their text metrics (no RM, no seed: greedy
    decoding of one fixed model), loaded the way SFT loads its base (4-bit when the model config says so)."""
    seed_everything(0)
    base = resolve_base(cfg.model)
    tok = load_tokenizer(cfg.model, base)
    model = load_causal_lm(cfg.model, base, quantize=cfg.model.quantization != "none")
    examples = list(data.eval)
    e = cfg.eval
    greedy = adapt_micro_batch("eval_base", EVAL_GENERATE_MICRO, lambda m: generate(
        model, tok, [x.prompt for x in examples], **sampling_for(cfg, "eval").kwargs(), batch_size=m),
        phase="generation")
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
    scorer = seq_cls_scorer(rm_model)
    rewards = adapt_micro_batch("score_base", EVAL_SCORE_MICRO, lambda m: score_texts(
        scorer, rm_tok, [r["prompt"] for r in records], [r["generation"] for r in records], cfg.model.max_length,
        batch_size=m), phase="scoring")
    records = [{**r, "reward": rw} for r, rw in zip(records, rewards)]
    write_json(out / "metrics.json", compute_stage_metrics("base", records))
    write_json(out / "records.json", records)
    write_json(out / "meta.json", read_json(base_dir / "meta.json"))
