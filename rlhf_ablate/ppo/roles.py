"""The four PPO roles on ONE shared base model (docs/architecture.md, "PPO").

Our users' PPO ran out of memory with actor, critic, reference and reward model loaded as four models. Here the
merged SFT model is loaded once (4-bit when configured) and carries three LoRA adapters:

- ``policy``: trainable, starts at zero (so the policy starts exactly at the SFT model);
- ``value``: trainable, with its own value head; initialised from the reward adapter and score head when rank and
  alpha both match (N+ details: initialise the value model from the reward model);
- ``reward``: the RM stage's adapter, loaded frozen, with its score head;
- the reference is the base with adapters disabled, i.e. the SFT model.

More reward models (the over-optimization alarm, rlhf_ablate/ppo/overopt.py): the other members of an RM ensemble
(``reward_1``, ...) and a gold RM (``gold``) are frozen adapters with score heads on the same base, like ``reward``,
or models of their own when ``reward`` is one. :meth:`PPOModels.proxy_scores` is the reward PPO optimises
(``ppo.reward``), :meth:`PPOModels.scores` any one reward model's.

Rank 0 (full fine-tune) keeps separate copies (policy, reference, value, reward); it is meant for small models. A
reward model that was not trained on the SFT base (``rm.init_from=base``, or a full-rank RM) is loaded as its own
model, since its adapter would not fit this base.

Sampling and training see the same distribution (issue 9): dropout is 0 in every role, for good; log-probs come
through the model's own forward (``logits_to_keep`` on the response positions), so final-logit softcapping (Gemma-2)
and any logit scaling apply exactly as in generation; the models stay in train mode so that gradient checkpointing
(non-reentrant, when the plan asks for it) acts in the update.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .. import models
from ..config import TrialConfig
from ..errors import TrialFailed
from ..files import read_json
from ..models import (autocast, disable_dropout, enable_gradient_checkpointing, freeze_for_kbit_training, generate,
                      sampling_for,
                      last_token_index, load_rm, logical_param_count, position_ids, ppo_plan)
from . import math as ppo_math
from .overopt import combine_rewards


def _body(model: nn.Module) -> nn.Module:
    """The transformer body (``model.model`` for Llama/Gemma, ``model.transformer`` for GPT-2) under any peft
    wrapping. LoRA layers are injected in place, so calling the body runs the active adapter."""
    from peft import PeftModel

    hf = model.get_base_model() if isinstance(model, PeftModel) else model
    return hf.base_model  # transformers: getattr(self, self.base_model_prefix)


class PPOModels:
    """The four roles behind one interface. ``shared`` tells whether they sit on one base (counted by tests);
    ``plan`` is the PPO plan (rlhf_ablate/models/memory.py: ppo_plan) the loop and the memory estimate share."""

    def __init__(self, cfg: TrialConfig, sft_dir: Path, rm_dir: Path, extra_rms: Optional[dict[str, Path]] = None):
        """``extra_rms``: more reward models by role name (``reward_1``..., ``gold``), each an RM artifact dir."""
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
        self.value_from_reward = False
        self.trained_adapters: tuple[str, ...] = ("policy", "value")   # kept trainable by _use (a group adds its own)
        self._trained_params: Optional[list] = None
        hidden_of = lambda m: m.config.get_text_config().hidden_size  # noqa: E731
        self.reward_head: nn.Linear | None = None
        self.member_rms = {str(Path(rm_dir).resolve()): "reward"}  # a trial group's RMs: dir -> reward role

        base = models.load_causal_lm(cfg.model, sft_path, quantize=quantized and self.shared)
        self.plan = ppo_plan(cfg.ppo, logical_param_count(base), base.get_output_embeddings().weight.shape[0])
        if self.shared:
            from peft import get_peft_model

            freeze_for_kbit_training(base)
            if self.plan.gradient_checkpointing:
                enable_gradient_checkpointing(base)
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
                if self._same_adapter_shape("reward", "value"):  # N+ details: value model initialised from the RM
                    self._copy_adapter("reward", "value")
                    self.value_head.weight.data.copy_(score_w)
                    self.value_from_reward = True
            self.ref_model = None
            self.value_model = None
        else:
            self.model = base
            self.ref_model = models.load_causal_lm(cfg.model, sft_path, quantize=False).requires_grad_(False)
            self.value_model = models.load_causal_lm(cfg.model, sft_path, quantize=False)
            if self.plan.gradient_checkpointing:
                enable_gradient_checkpointing(self.model)
                enable_gradient_checkpointing(self.value_model)
            self.value_head = nn.Linear(hidden_of(self.model), 1, bias=True)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        if not self.reward_shared:
            self.rm_model, _ = load_rm(cfg, rm_dir, sft_dir)
            self.rm_model.requires_grad_(False)
        # The other reward models: adapters on the shared base when the trial's RM is one, else models of their own.
        self.extra_heads: dict[str, nn.Linear] = {}
        self.extra_models: dict[str, nn.Module] = {}
        for name, d in (extra_rms or {}).items():
            if self.reward_shared and read_json(d / "rm_info.json")["kind"] == "adapter":
                head = nn.Linear(hidden_of(base), 1, bias=False)
                head.weight.data.copy_(self._load_reward_adapter(d / "adapter", name))
                self.extra_heads[name] = head.requires_grad_(False)
            else:
                self.extra_models[name] = load_rm(cfg, d, sft_dir)[0].requires_grad_(False)
        self.proxy_members = ["reward", *sorted(n for n in (extra_rms or {}) if n.startswith("reward_"))]
        dev = next(self.model.parameters()).device
        for head in self.extra_heads.values():
            head.to(dev)
        self.value_head.to(dev)
        if self.reward_head is not None:
            self.reward_head.to(dev)
        for m in self.all_models():
            disable_dropout(m)
        self.train(True)

    def all_models(self) -> list[nn.Module]:
        return [m for m in (self.model, self.ref_model, self.value_model, getattr(self, "rm_model", None),
                            *getattr(self, "extra_models", {}).values()) if m is not None]

    # ---- adapters -----------------------------------------------------------------------------------------
    def _load_reward_adapter(self, adapter_dir: Path, name: str = "reward") -> torch.Tensor:
        """Add the RM's LoRA as adapter ``name`` and return its score-head weight. The RM was a
        *ForSequenceClassification with the same body, so its LoRA keys match this causal LM's body exactly."""
        import json

        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        lcfg = LoraConfig(r=acfg["r"], lora_alpha=acfg["lora_alpha"], target_modules=acfg["target_modules"],
                          lora_dropout=0.0, fan_in_fan_out=acfg.get("fan_in_fan_out", False), bias="none",
                          task_type="CAUSAL_LM")
        self.model.add_adapter(name, lcfg)
        sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
        score = [k for k in sd if ".score." in k or k.endswith("score.weight")]
        if not score:
            raise TrialFailed(f"reward adapter {adapter_dir} has no score head weights (keys: {list(sd)[:5]}...)")
        score_w = sd[score[0]]
        lora = {k: v for k, v in sd.items() if "lora_" in k}
        res = set_peft_model_state_dict(self.model, lora, adapter_name=name)
        unexpected = getattr(res, "unexpected_keys", [])
        if unexpected:
            raise TrialFailed(f"reward adapter keys do not match the policy base: {unexpected[:3]}")
        for n, p in self.model.named_parameters():
            if f".{name}." in n:
                p.requires_grad_(False)
        return score_w.float()

    def _same_adapter_shape(self, a: str, b: str) -> bool:
        """Copying adapter ``a`` into ``b`` reproduces ``a``'s function only when rank, alpha (the LoRA scale is
        alpha / rank) and the target modules all match."""
        ca, cb = self.model.peft_config[a], self.model.peft_config[b]
        return ca.r == cb.r and ca.lora_alpha == cb.lora_alpha and set(ca.target_modules) == set(cb.target_modules)

    def _copy_adapter(self, src: str, dst: str) -> None:
        params = dict(self.model.named_parameters())
        for n, p in params.items():
            if f".{dst}." in n and "lora_" in n:
                p.data.copy_(params[n.replace(f".{dst}.", f".{src}.")].data)

    def _use(self, adapter: str) -> None:
        # peft's set_adapter also flips requires_grad (only the active adapter trainable); we keep policy and value
        # (and a trial group's other members' policies and values) trainable ourselves, since each is used in its
        # own forward pass.
        self.model.set_adapter(adapter)
        if self._trained_params is None:  # found once per set of trained adapters (add_member resets it)
            self._trained_params = [p for n, p in self.model.named_parameters()
                                    if any(f".{a}." in n for a in self.trained_adapters)]
        for p in self._trained_params:
            p.requires_grad_(True)

    def add_member(self, k: int, rm_dir: Path) -> tuple[nn.Linear, str]:
        """A trial group's member ``k`` >= 1 (rlhf_ablate/ppo/group.py): its policy and value adapters
        (``policy_k``, ``value_k``) and value head on this shared base, made with the random draws the trial's own
        :class:`PPOModels` makes after its seed (policy, value, value head, then the reward adapter and head), so
        that its LoRA initialisation and the random stream its rollouts start from are the solo run's. Returns the
        value head and the member's reward role: ``reward`` when its RM (``rm_dir``) is this trial's, else a frozen
        adapter ``rm_k`` with its score head, shared by the members with that RM."""
        if not self.shared:
            raise ValueError("PPOModels.add_member: a trial group needs LoRA adapters on a shared base (lora_rank > 0)")
        pol, val = f"policy_{k}", f"value_{k}"
        lcfg = self.model.peft_config["policy"]
        self.model.add_adapter(pol, lcfg)
        self.model.add_adapter(val, lcfg)
        hidden = self.model.config.get_text_config().hidden_size
        head = nn.Linear(hidden, 1, bias=True)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        dev = next(self.model.parameters()).device
        reward = self.member_rms.get(str(Path(rm_dir).resolve()), "reward" if not self.reward_shared else None)
        if self.reward_shared:
            tmp = f"rm_{k}" if reward is None else f"reward_copy_{k}"
            score_w = self._load_reward_adapter(rm_dir / "adapter", tmp)
            score = nn.Linear(hidden, 1, bias=False)  # the solo run's reward head: its draws, then the RM's weights
            score.weight.data.copy_(score_w)
            if self._same_adapter_shape(tmp, val):
                self._copy_adapter(tmp, val)
                head.weight.data.copy_(score_w)
            if reward is None:  # an RM no member had: kept, frozen, with its score head
                self.extra_heads[tmp] = score.requires_grad_(False).to(dev)
                self.member_rms[str(Path(rm_dir).resolve())] = reward = tmp
            else:
                self.model.delete_adapter(tmp)
        self.trained_adapters = (*self.trained_adapters, pol, val)
        self._trained_params = None
        disable_dropout(self.model)
        self._use("policy")
        return head.to(dev), reward

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.shared:
            ps = [p for n, p in self.model.named_parameters() if ".policy." in n or ".value." in n]
        else:
            ps = list(self.model.parameters()) + list(self.value_model.parameters())
        return ps + list(self.value_head.parameters())

    # ---- the four roles -------------------------------------------------------------------------------------
    def _logits(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int | torch.Tensor = 0):
        """Logits through the model's own forward (softcapping, scaling), for the positions in ``keep`` (0: all)."""
        with autocast(self.cfg.model):
            return model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                         logits_to_keep=keep).logits

    def _hidden(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfg.model):
            return _body(model)(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                use_cache=False).last_hidden_state

    def _policy_model(self) -> nn.Module:
        if self.shared:
            self._use("policy")
        return self.model

    def policy_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full ``[B, T, V]`` float32 logits (tests and diagnostics; PPO itself uses :meth:`logprobs`)."""
        return self._logits(self._policy_model(), ids, mask).float()

    @torch.no_grad()
    def ref_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.shared:
            with self.model.disable_adapter():
                return self._logits(self.model, ids, mask).float()
        return self._logits(self.ref_model, ids, mask).float()

    def logprobs(self, role: str, ids: torch.Tensor, mask: torch.Tensor, resp: torch.Tensor, temperature: float,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropy) of the response tokens ``resp [b, R]``, which fill the last R columns of ``ids``,
        under the policy or the reference (``role``). Logits are made for the R predicting positions only, and
        reduced in float32 chunks of ``plan.logprob_chunk`` positions (ppo.math.token_logprobs)."""
        R = resp.shape[1]
        T = ids.shape[1]
        keep = torch.arange(T - R - 1, T - 1, device=ids.device)
        if role == "policy":
            logits = self._logits(self._policy_model(), ids, mask, keep)
        elif role == "ref" and self.shared:
            with self.model.disable_adapter():
                logits = self._logits(self.model, ids, mask, keep)
        elif role == "ref":
            logits = self._logits(self.ref_model, ids, mask, keep)
        else:
            raise ValueError(f"PPOModels.logprobs: role must be 'policy' or 'ref', got {role!r}")
        return ppo_math.token_logprobs(logits, resp, temperature, self.plan.logprob_chunk, with_entropy)

    def values(self, ids: torch.Tensor, mask: torch.Tensor, n_last: int = 0) -> torch.Tensor:
        """Value estimates ``[B, T]`` (or of the positions predicting the last ``n_last`` tokens, ``[B, n_last]``)."""
        if self.shared:
            self._use("value")
            h = self._hidden(self.model, ids, mask)
        else:
            h = self._hidden(self.value_model, ids, mask)
        if n_last:
            T = ids.shape[1]
            h = h[:, T - n_last - 1:T - 1]
        return self.value_head(h.to(self.value_head.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def scores(self, ids: torch.Tensor, mask: torch.Tensor, name: str = "reward") -> torch.Tensor:
        """A reward model's score (the trial's RM, or ``name`` of ``extra_rms``) read at the last non-pad token,
        the rule of *ForSequenceClassification."""
        idx = last_token_index(ids, self.pad_id)
        rows = torch.arange(ids.shape[0], device=ids.device)
        head = self.reward_head if name == "reward" else self.extra_heads.get(name)
        if head is not None:
            self._use(name)
            h = self._hidden(self.model, ids, mask)
            out = head(h[rows, idx].to(head.weight.dtype)).squeeze(-1)
            self._use("policy")
            return out.float()
        model = self.rm_model if name == "reward" else self.extra_models[name]
        with autocast(self.cfg.model):
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
        return out.logits.squeeze(-1).float()

    @torch.no_grad()
    def proxy_scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The reward PPO optimises: the trial's RM (``ppo.reward=single``) or the ensemble's raw scores combined
        (rlhf_ablate/ppo/overopt.py: combine_rewards)."""
        if self.cfg.ppo.reward == "single":
            return self.scores(ids, mask)
        members = torch.stack([self.scores(ids, mask, n) for n in self.proxy_members])
        return combine_rewards(members, self.cfg.ppo.reward)

    def generate(self, prompts: list[str], max_new_tokens: Optional[int] = None, temperature: Optional[float] = None,
                 return_logprobs: bool = False) -> list[dict]:
        """The rollout's sampling (models/generation.py: sampling_for(cfg, "rollout"); ``max_new_tokens`` and
        ``temperature`` replace its values when given), ``plan.rollout_micro`` prompts per generate call."""
        s = sampling_for(self.cfg, "rollout")
        s = dataclasses.replace(s, max_new_tokens=max_new_tokens or s.max_new_tokens,
                                temperature=s.temperature if temperature is None else temperature)
        model = self._policy_model()
        with autocast(self.cfg.model):
            return generate(model, self.tokenizer, prompts, **s.kwargs(), batch_size=self.plan.rollout_micro,
                            return_logprobs=return_logprobs)

    def train(self, mode: bool = True) -> None:
        """Train mode for the trained roles (gradient checkpointing acts only in train mode). Dropout is 0 either
        way (generation.disable_dropout), so sampling, scoring and the update compute the same function."""
        for m in (self.model, self.value_model, self.value_head):
            if m is not None:
                m.train(mode)

    def policy_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the policy's trainable weights (its adapter, or the whole model at rank 0): the checkpoint
        ``ppo.stop_on_overoptimization`` goes back to."""
        named = self.model.named_parameters()
        return {n: p.detach().to("cpu", copy=True) for n, p in named if not self.shared or ".policy." in n}

    def load_policy_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v.to(params[n].device))

    def save_policy(self, out: Path, adapter: str = "policy") -> None:
        """The policy's artifact (``adapter``: a trial group member's policy adapter, saved as a solo run's)."""
        if self.shared:
            # peft writes a non-default adapter into a sub-folder named after it; keep the artifact layout flat.
            self.model.save_pretrained(str(out / "_adapters"), selected_adapters=[adapter])
            (out / "_adapters" / adapter).rename(out / "adapter")
            shutil.rmtree(out / "_adapters")
            self.tokenizer.save_pretrained(str(out / "adapter"))
        else:
            self.model.save_pretrained(str(out / "model"), safe_serialization=True)
            self.tokenizer.save_pretrained(str(out / "model"))
