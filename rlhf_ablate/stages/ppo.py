"""PPO stage, owned here (TRL removed PPOTrainer in 2026), on ONE shared base model.

Our users' PPO ran out of memory with actor, critic, reference and reward model loaded as four models. Here the
merged SFT model is loaded once (4-bit when configured) and carries three LoRA adapters:

- ``policy``: trainable, starts at zero (so the policy starts exactly at the SFT model);
- ``value``: trainable, with its own value head; initialised from the reward adapter and score head when the
  ranks match (N+ details: initialise the value model from the reward model);
- ``reward``: the RM stage's adapter, loaded frozen, with its score head;
- the reference is the base with adapters disabled, i.e. the SFT model.

Rank 0 (full fine-tune) keeps separate copies (policy, reference, value, reward); it is meant for small models. A
reward model that was not trained on the SFT base (``rm.init_from=base``, or a full-rank RM) is loaded as its own
model, since its adapter would not fit this base.

The loop follows Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", and reads top to bottom:
rollout (temperature 1, KV cache) -> score (reward normalised by the SFT policy's scores, missing-EOS penalty) ->
per-token KL-penalised rewards -> GAE -> PPO epochs over minibatches -> stats. The math is in ppo_math.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from .. import models, ppo_math
from ..config import TrialConfig
from ..errors import TrialFailed
from ..prompting import format_prompt
from .common import generate, last_token_index, read_json, seed_everything, write_json
from .rm import load_rm


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as generate() uses; without them a left-padded forward pass would
    disagree with the log-probs seen during sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _body(model: nn.Module) -> nn.Module:
    """The transformer body (``model.model`` for Llama/Gemma, ``model.transformer`` for GPT-2) under any peft
    wrapping. LoRA layers are injected in place, so calling the body runs the active adapter."""
    from peft import PeftModel

    hf = model.get_base_model() if isinstance(model, PeftModel) else model
    return hf.base_model  # transformers: getattr(self, self.base_model_prefix)


def _lm_head(model: nn.Module) -> nn.Module:
    return model.get_output_embeddings()


class PPOModels:
    """The four roles behind one interface. ``shared`` tells whether they sit on one base (counted by tests)."""

    def __init__(self, cfg: TrialConfig, sft_dir: Path, rm_dir: Path):
        self.cfg = cfg
        sft_path = str(sft_dir / "model")
        rm_info = read_json(rm_dir / "rm_info.json")
        self.tokenizer = models.load_tokenizer(cfg.model, sft_path)
        self.pad_id = self.tokenizer.pad_token_id
        quantized = cfg.model.quantization != "none"
        rank = cfg.ppo.lora_rank
        rm_shareable = rm_info["kind"] == "adapter" and cfg.rm.init_from == "sft"
        self.shared = rank > 0
        self.reward_shared = self.shared and rm_shareable
        hidden_of = lambda m: m.config.get_text_config().hidden_size  # noqa: E731
        self.reward_head: nn.Linear | None = None

        if self.shared:
            from peft import get_peft_model, prepare_model_for_kbit_training

            base = models.load_causal_lm(cfg.model, sft_path, quantize=quantized)
            if quantized:
                base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
            lcfg = models.make_lora_config(rank, cfg.ppo.lora_alpha, 0.0, "CAUSAL_LM", base)
            self.model = get_peft_model(base, lcfg, adapter_name="policy")
            self.model.add_adapter("value", lcfg)
            hidden = hidden_of(base)
            self.value_head = nn.Linear(hidden, 1, bias=True)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            if self.reward_shared:
                score_w = self._load_reward_adapter(rm_dir / "adapter")
                self.reward_head = nn.Linear(hidden, 1, bias=False)
                self.reward_head.weight.data.copy_(score_w)
                self.reward_head.requires_grad_(False)
                if self._adapter_rank("reward") == rank:  # N+ details: value model initialised from the RM
                    self._copy_adapter("reward", "value")
                    self.value_head.weight.data.copy_(score_w)
            self.ref_model = None
            self.value_model = None
        else:
            self.model = models.load_causal_lm(cfg.model, sft_path, quantize=False)
            self.ref_model = models.load_causal_lm(cfg.model, sft_path, quantize=False).requires_grad_(False)
            self.value_model = models.load_causal_lm(cfg.model, sft_path, quantize=False)
            self.value_head = nn.Linear(hidden_of(self.model), 1, bias=True)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        if not self.reward_shared:
            self.rm_model, _ = load_rm(cfg, rm_dir, sft_dir)
            self.rm_model.requires_grad_(False)
        dev = next(self.model.parameters()).device
        self.value_head.to(dev)
        if self.reward_head is not None:
            self.reward_head.to(dev)

    # ---- adapters -----------------------------------------------------------------------------------------
    def _load_reward_adapter(self, adapter_dir: Path) -> torch.Tensor:
        """Add the RM's LoRA as adapter 'reward' and return its score-head weight. The RM was a
        *ForSequenceClassification with the same body, so its LoRA keys match this causal LM's body exactly."""
        import json

        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        lcfg = LoraConfig(r=acfg["r"], lora_alpha=acfg["lora_alpha"], target_modules=acfg["target_modules"],
                          lora_dropout=0.0, fan_in_fan_out=acfg.get("fan_in_fan_out", False), bias="none",
                          task_type="CAUSAL_LM")
        self.model.add_adapter("reward", lcfg)
        sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
        score = [k for k in sd if ".score." in k or k.endswith("score.weight")]
        if not score:
            raise TrialFailed(f"reward adapter {adapter_dir} has no score head weights (keys: {list(sd)[:5]}...)")
        score_w = sd[score[0]]
        lora = {k: v for k, v in sd.items() if "lora_" in k}
        res = set_peft_model_state_dict(self.model, lora, adapter_name="reward")
        unexpected = getattr(res, "unexpected_keys", [])
        if unexpected:
            raise TrialFailed(f"reward adapter keys do not match the policy base: {unexpected[:3]}")
        for n, p in self.model.named_parameters():
            if ".reward." in n:
                p.requires_grad_(False)
        return score_w.float()

    def _adapter_rank(self, name: str) -> int:
        return self.model.peft_config[name].r

    def _copy_adapter(self, src: str, dst: str) -> None:
        params = dict(self.model.named_parameters())
        for n, p in params.items():
            if f".{dst}." in n and "lora_" in n:
                p.data.copy_(params[n.replace(f".{dst}.", f".{src}.")].data)

    def _use(self, adapter: str) -> None:
        # peft's set_adapter also flips requires_grad (only the active adapter trainable); we keep policy and value
        # both trainable ourselves, since each is used in its own forward pass.
        self.model.set_adapter(adapter)
        for n, p in self.model.named_parameters():
            if ".policy." in n or ".value." in n:
                p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.shared:
            ps = [p for n, p in self.model.named_parameters() if ".policy." in n or ".value." in n]
        else:
            ps = list(self.model.parameters()) + list(self.value_model.parameters())
        return ps + list(self.value_head.parameters())

    # ---- the four roles -------------------------------------------------------------------------------------
    def _hidden(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _body(model)(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask),
                            use_cache=False).last_hidden_state

    def policy_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.shared:
            self._use("policy")
        return _lm_head(self.model)(self._hidden(self.model, ids, mask)).float()

    @torch.no_grad()
    def ref_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.shared:
            with self.model.disable_adapter():
                return _lm_head(self.model)(self._hidden(self.model, ids, mask)).float()
        return _lm_head(self.ref_model)(self._hidden(self.ref_model, ids, mask)).float()

    def values(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.shared:
            self._use("value")
            h = self._hidden(self.model, ids, mask)
        else:
            h = self._hidden(self.value_model, ids, mask)
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """RM score read at the last non-pad token, the rule of *ForSequenceClassification."""
        idx = last_token_index(ids, self.pad_id)
        rows = torch.arange(ids.shape[0], device=ids.device)
        if self.reward_shared:
            self._use("reward")
            h = self._hidden(self.model, ids, mask)
            out = self.reward_head(h[rows, idx].to(self.reward_head.weight.dtype)).squeeze(-1)
            self._use("policy")
            return out.float()
        out = self.rm_model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask))
        return out.logits.squeeze(-1).float()

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float) -> list[dict]:
        if self.shared:
            self._use("policy")
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=True,
                        temperature=temperature, batch_size=len(prompts))

    def train(self, mode: bool = True) -> None:
        for m in (self.model, self.value_model, self.value_head):
            if m is not None:
                m.train(mode)

    def save_policy(self, out: Path) -> None:
        if self.shared:
            # peft writes a non-default adapter into a sub-folder named after it; keep the artifact layout flat.
            self.model.save_pretrained(str(out / "_adapters"), selected_adapters=["policy"])
            (out / "_adapters" / "policy").rename(out / "adapter")
            shutil.rmtree(out / "_adapters")
            self.tokenizer.save_pretrained(str(out / "adapter"))
        else:
            self.model.save_pretrained(str(out / "model"), safe_serialization=True)
            self.tokenizer.save_pretrained(str(out / "model"))


def build_batch(tokenizer, prompts: list[str], responses: list[dict], device) -> dict:
    """Left-padded query + right-padded response, with the response mask (1 up to and including EOS)."""
    pad = tokenizer.pad_token_id
    tokenizer.padding_side = "left"
    q = tokenizer([format_prompt(p) for p in prompts], return_tensors="pt", padding=True)
    R = max(1, max(len(r["ids"]) for r in responses))
    resp = torch.full((len(responses), R), pad, dtype=torch.long)
    rmask = torch.zeros((len(responses), R), dtype=torch.long)
    for i, r in enumerate(responses):
        if r["ids"]:
            resp[i, :len(r["ids"])] = torch.tensor(r["ids"])
            rmask[i, :len(r["ids"])] = 1
        else:  # an empty response still needs one valid position to hold the score
            rmask[i, 0] = 1
    ids = torch.cat([q["input_ids"], resp], 1).to(device)
    attn = torch.cat([q["attention_mask"], rmask], 1).to(device)
    return {"ids": ids, "attn": attn, "P": q["input_ids"].shape[1], "resp": resp.to(device),
            "rmask": rmask.to(device), "has_eos": torch.tensor([r["has_eos"] for r in responses], device=device)}


def response_logprobs(logits: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens: logits at position t predict token t+1 (N+ details: divide by the
    sampling temperature so the log-probs are those of the distribution actually sampled from)."""
    P, R = batch["P"], batch["resp"].shape[1]
    lg = logits[:, P - 1:P + R - 1] / temperature
    return ppo_math.logprobs_from_logits(lg, batch["resp"])


def train_ppo(cfg: TrialConfig, data, sft_dir: Path, rm_dir: Path, out: Path,
              on_step: Optional[Callable[[dict], None]] = None) -> None:
    p = cfg.ppo
    seed_everything(cfg.seed)
    roles = PPOModels(cfg, sft_dir, rm_dir)
    tok = roles.tokenizer
    dev = next(roles.model.parameters()).device
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=p.learning_rate, eps=1e-5)
    kl_ctl = (ppo_math.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else ppo_math.FixedKLController(p.kl_coef))
    prompts = [x.prompt for x in data.ppo_prompts]
    if not prompts:
        raise TrialFailed("ppo: the data has no PPO prompts")
    g = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    n_steps = max(1, p.total_episodes // p.rollout_batch_size)
    normalizer = None
    history: list[dict] = []
    t_gen = t_score = t_update = 0.0
    for step in range(1, n_steps + 1):
        # ---- rollout -----------------------------------------------------------------------------------------
        while len(order) < p.rollout_batch_size:
            order += torch.randperm(len(prompts), generator=g).tolist()
        batch_prompts = [prompts[i] for i in order[:p.rollout_batch_size]]
        order = order[p.rollout_batch_size:]
        t0 = time.perf_counter()
        roles.train(False)
        responses = roles.generate(batch_prompts, p.max_new_tokens, p.temperature)
        b = build_batch(tok, batch_prompts, responses, dev)
        t1 = time.perf_counter()
        # ---- score -------------------------------------------------------------------------------------------
        with torch.no_grad():
            old_logprobs = response_logprobs(roles.policy_logits(b["ids"], b["attn"]), b, p.temperature)
            ref_logprobs = response_logprobs(roles.ref_logits(b["ids"], b["attn"]), b, p.temperature)
            P, R = b["P"], b["resp"].shape[1]
            old_values = roles.values(b["ids"], b["attn"])[:, P - 1:P + R - 1]
            raw_scores = roles.scores(b["ids"], b["attn"])
        if normalizer is None:
            # N+ details: normalise the RM by its scores on the initial (SFT) policy's samples, so that one kl_coef
            # means the same thing across reward models of different scale.
            normalizer = ppo_math.RewardNormalizer(raw_scores) if p.reward_norm else None
        scores = normalizer(raw_scores) if normalizer is not None else raw_scores
        scores = ppo_math.missing_eos_penalty(scores, b["has_eos"], p.missing_eos_penalty)
        mask = b["rmask"]
        rewards, kl = ppo_math.per_token_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value,
                                                 p.kl_estimator)
        if p.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo_math.compute_gae(rewards, old_values, mask, p.gamma, p.lam)
        advantages = ppo_math.masked_whiten(advantages, mask)
        t2 = time.perf_counter()
        # ---- PPO epochs over minibatches ---------------------------------------------------------------------
        roles.train(True)
        stats: dict[str, list[float]] = {k: [] for k in ("policy/clipfrac", "policy/approx_kl", "val/clipfrac",
                                                         "loss/policy", "loss/value", "objective/entropy")}
        n = p.rollout_batch_size
        micro = max(1, p.mini_batch_size // p.grad_accum)
        for _epoch in range(p.ppo_epochs):
            perm = torch.randperm(n, generator=g)
            for start in range(0, n, p.mini_batch_size):
                mb = perm[start:start + p.mini_batch_size]
                optimizer.zero_grad(set_to_none=True)
                for ms in range(0, len(mb), micro):
                    idx = mb[ms:ms + micro].to(dev)
                    sub = {"P": P, "resp": b["resp"][idx]}
                    ids, attn, m = b["ids"][idx], b["attn"][idx], mask[idx]
                    logits = roles.policy_logits(ids, attn)
                    new_logprobs = response_logprobs(logits, sub, p.temperature)
                    pg_loss, pg_stats = ppo_math.policy_loss(new_logprobs, old_logprobs[idx], advantages[idx], m,
                                                             p.cliprange)
                    new_values = roles.values(ids, attn)[:, P - 1:P + R - 1]
                    vf_loss, vf_clipfrac = ppo_math.value_loss(new_values, old_values[idx], returns[idx], m,
                                                               p.cliprange_value)
                    loss = (pg_loss + p.vf_coef * vf_loss) * len(idx) / len(mb)
                    if not torch.isfinite(loss):
                        raise TrialFailed(f"ppo: loss became {loss.item()} at step {step} (policy {pg_loss.item()}, "
                                          f"value {vf_loss.item()}); lower ppo.learning_rate or raise ppo.kl_coef")
                    loss.backward()
                    with torch.no_grad():
                        ent = ppo_math.entropy_from_logits(logits[:, P - 1:P + R - 1] / p.temperature)
                        stats["objective/entropy"].append(ppo_math.masked_mean(ent, m).item())
                    stats["policy/clipfrac"].append(float(pg_stats["clipfrac"]))
                    stats["policy/approx_kl"].append(float(pg_stats["approx_kl"]))
                    stats["val/clipfrac"].append(float(vf_clipfrac))
                    stats["loss/policy"].append(pg_loss.item())
                    stats["loss/value"].append(vf_loss.item())
                torch.nn.utils.clip_grad_norm_(roles.trainable_parameters(), p.max_grad_norm)
                optimizer.step()
        t3 = time.perf_counter()
        # ---- stats -------------------------------------------------------------------------------------------
        mean_kl = kl.sum(1).mean().item()
        row = {"step": step, "episodes": step * p.rollout_batch_size,
               "objective/kl": mean_kl,
               "objective/scores": raw_scores.mean().item(),
               "objective/scores_normalized": scores.mean().item(),
               "objective/rlhf_reward": (scores - kl_ctl.value * kl.sum(1)).mean().item(),
               "objective/kl_coef": float(kl_ctl.value),
               "objective/eos_frac": b["has_eos"].float().mean().item(),
               "objective/response_len": mask.sum(1).float().mean().item(),
               "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2}
        row.update({k: sum(v) / len(v) for k, v in stats.items() if v})
        history.append(row)
        if on_step is not None:
            on_step({"stage": "ppo", "step": step, "steps": n_steps,
                     **{f"ppo/{k}": v for k, v in row.items() if k != "step"}})
        if not math.isfinite(mean_kl) or mean_kl > p.kl_stop:
            write_json(out / "history.json", history)
            raise TrialFailed(f"ppo: KL blow-up at step {step}: mean KL {mean_kl:.2f} nats > ppo.kl_stop "
                              f"{p.kl_stop}; raise ppo.kl_coef or lower ppo.learning_rate")
        kl_ctl.update(mean_kl, p.rollout_batch_size)
        t_gen, t_score, t_update = t_gen + t1 - t0, t_score + t2 - t1, t_update + t3 - t2
    roles.save_policy(out)
    write_json(out / "history.json", history)
    write_json(out / "ppo_info.json", {"kind": "adapter" if roles.shared else "model", "shared_base": roles.shared,
                                       "reward_shared": roles.reward_shared,
                                       "reward_norm": normalizer.state() if normalizer is not None else None})
    last = history[-1]
    write_json(out / "metrics.json", {
        "ppo/objective/kl": last["objective/kl"], "ppo/objective/scores": last["objective/scores"],
        "ppo/steps": n_steps, "ppo/time_generate": t_gen, "ppo/time_score": t_score, "ppo/time_update": t_update})
