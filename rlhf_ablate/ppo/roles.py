"""The four PPO roles on ONE shared base model (docs/architecture.md, "PPO").

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
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn

from .. import models
from ..config import TrialConfig
from ..errors import TrialFailed
from ..files import read_json
from ..models import generate, last_token_index, load_rm, position_ids


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
        return _body(model)(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
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
        out = self.rm_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
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


