"""PPO's loop mechanics on a random-init Llama-3.2-shaped model (tests/conftest.py: ArchTrials), on the CPU:

- gradient checkpointing (forced on for the tiny model): layers really are recomputed, the policy's and the value's
  LoRA both get gradients, and the ratio is still exactly 1 at the first minibatch;
- memory: no tensor over the vocabulary is larger than a micro-batch's response positions (the loop never
  materialises a rollout x sequence x vocabulary tensor), and the value pass starts only after the policy's graph
  is gone;
- rollouts: prompts cut from the left to ppo.max_prompt_length, responses cut at the template's next-turn header,
  empty responses trained on nothing;
- the value model starts from the reward model only when rank AND alpha match; the linear learning-rate decay.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*kernels.*")

FAMILY = "llama-3.2-1b"


@pytest.fixture(scope="module")
def llama(arch_trials):
    r = arch_trials.run(FAMILY, "none")
    assert r["status"] == "ok", r["error"]
    return arch_trials, r


def _roles(llama, **overrides):
    at, r = llama
    return at.ppo_models(FAMILY, r, **overrides)


def _rollout(cfg, roles, n: int = 8):
    from rlhf_ablate.data import load_data
    from rlhf_ablate.ppo.rollout import build_batch, score_batch

    prompts = [x.prompt for x in load_data(cfg.data).ppo_prompts][:n]
    torch.manual_seed(0)
    responses = roles.generate(prompts, cfg.ppo.max_new_tokens, cfg.ppo.temperature)
    b = build_batch(roles.tokenizer, prompts, responses, "cpu")
    return responses, b, score_batch(roles, b, cfg.ppo.temperature)


def _update(cfg, roles, b, sc, seed=0):
    from rlhf_ablate.ppo import math as pm
    from rlhf_ablate.ppo.loop import ppo_update

    adv = pm.masked_whiten(torch.randn(b["rmask"].shape, generator=torch.Generator().manual_seed(seed)), b["rmask"])
    opt = torch.optim.AdamW(roles.trainable_parameters(), lr=cfg.ppo.learning_rate)
    return ppo_update(roles, opt, b, sc, adv, sc["old_values"] + 0.5, cfg.ppo, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Gradient checkpointing and memory
# ---------------------------------------------------------------------------------------------------------

def test_checkpointed_update_recomputes_layers_trains_both_adapters_and_keeps_ratio_one(llama, monkeypatch):
    from rlhf_ablate.models import lora

    monkeypatch.setattr(lora, "GRADIENT_CHECKPOINTING_MIN_PARAMS", 0)  # the tiny model gets what an 8B gets
    cfg, roles = _roles(llama)
    assert roles.plan.gradient_checkpointing
    _, b, sc = _rollout(cfg, roles)
    # A pre-hook on the MLP inside the first layer: transformers checkpoints the layer's forward, not its __call__,
    # so a hook on the layer would not see the recompute; and torch stops a recompute early, once every tensor the
    # backward needs is back, which can be inside the MLP (a forward hook, run after it returns, would miss it).
    mlp = roles.model.get_base_model().model.layers[0].mlp
    calls = []
    mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    before = {n: p.detach().clone() for n, p in roles.model.named_parameters() if p.requires_grad}
    stats = _update(cfg, roles, b, sc)
    passes = len(stats)
    # Each pass runs the policy and the value forward once and recomputes both in backward: 4 layer calls per pass.
    assert len(calls) == 4 * passes, (len(calls), passes)
    first = [s for s in stats if s["epoch"] == 0 and s["minibatch"] == 0]
    assert all(s["ratio_min"] == 1.0 == s["ratio_max"] and s["policy/clipfrac"] == 0 for s in first), first
    changed = [n for n, p in roles.model.named_parameters() if n in before and not torch.equal(before[n], p)]
    assert any(".policy." in n for n in changed) and any(".value." in n for n in changed), changed


def test_bf16_step0_ratio_within_the_stated_tolerance(llama):
    """bf16 autocast (on the CPU here; docs/stack.md states the GPU estimate): scored 4 rows at a time, updated 2 at a
    time, the first minibatch's ratio stays within ppo.math's stated bf16 tolerances."""
    from rlhf_ablate.ppo.math import BF16_STEP0_RATIO_MEAN_TOL, bf16_step0_token_bound

    cfg, roles = _roles(llama, **{"model.compute_dtype": "bfloat16"})
    assert (roles.plan.rollout_micro, roles.plan.train_micro) == (4, 2)
    _, b, sc = _rollout(cfg, roles)
    with torch.no_grad():
        zmax = roles.policy_logits(b["ids"], b["attn"]).float().abs().max().item()
    first = [s for s in _update(cfg, roles, b, sc) if s["epoch"] == 0 and s["minibatch"] == 0]
    assert first
    for s in first:
        assert abs(s["ratio_mean"] - 1) <= BF16_STEP0_RATIO_MEAN_TOL, s
        assert max(-math.log(s["ratio_min"]), math.log(s["ratio_max"])) <= bf16_step0_token_bound(zmax), (s, zmax)


def test_no_rollout_sized_vocabulary_tensor_and_one_graph_at_a_time(llama):
    """Every tensor the scoring passes and the update create with the vocabulary as last dimension is at most a
    micro-batch's response positions (micro x R x V), far below rollout x sequence x V; and when a value forward
    starts, nothing the policy pass saved for backward is alive any more (its backward ran first)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from rlhf_ablate.ppo.rollout import score_batch

    cfg, roles = _roles(llama)
    _, b, _ = _rollout(cfg, roles)
    V = roles.model.get_output_embeddings().weight.shape[0]
    sizes: list[int] = []

    weights = {p.untyped_storage().data_ptr() for p in roles.model.parameters()}

    class Track(TorchDispatchMode):  # every new floating tensor whose last dimension is the vocabulary
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V and t.is_floating_point()
                        and t.untyped_storage().data_ptr() not in weights):  # not a view of the (tied) head
                    sizes.append(t.numel())
            return out

    with Track():
        sc = score_batch(roles, b, cfg.ppo.temperature)

    class Box:  # what autograd keeps for backward; dropped when the graph is freed
        def __init__(self, t):
            self.t = t

    alive: weakref.WeakSet = weakref.WeakSet()

    def pack(t):
        box = Box(t)
        alive.add(box)
        return box

    at_value_start: list[int] = []
    values = roles.values

    def values_probe(*a, **k):
        if torch.is_grad_enabled():
            at_value_start.append(len(alive))
        return values(*a, **k)

    roles.values = values_probe
    with Track(), torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        stats = _update(cfg, roles, b, sc)
    B, T, R = b["ids"].shape[0], b["ids"].shape[1], b["resp"].shape[1]
    micro = max(roles.plan.rollout_micro, roles.plan.train_micro)
    assert sizes and max(sizes) <= micro * R * V < B * T * V, (max(sizes), micro, R, V, B, T)
    assert len(at_value_start) == len(stats) and set(at_value_start) == {0}, at_value_start


# ---------------------------------------------------------------------------------------------------------
# Rollouts: truncation, the next-turn header, empty responses
# ---------------------------------------------------------------------------------------------------------

def test_prompts_lose_their_beginning_not_the_answer_cue(llama):
    from rlhf_ablate.data.prompting import format_prompt
    from rlhf_ablate.models import encode_prompts

    cfg, roles = _roles(llama)
    tok = roles.tokenizer
    long = "아주 긴 질문입니다. " * 40 + "마지막 질문은 무엇인가요?"
    (full,) = encode_prompts(tok, [long])
    (cut,) = encode_prompts(tok, [long], max_prompt_length=24)
    assert len(full) > 24 and len(cut) == 24 and cut == full[-24:]  # the built-in tokenizer adds no BOS
    assert tok.decode(cut).endswith(format_prompt("x").split("x")[-1])  # "\n\n### 답변:\n" survives
    responses = roles.generate([long, "짧은 질문"], max_new_tokens=3, temperature=1.0)
    assert len(responses[0]["query"]) == cfg.ppo.max_prompt_length and responses[0]["query"] == full[-40:]


def test_response_is_cut_at_the_next_turn_header():
    from rlhf_ablate.config import ModelConfig
    from rlhf_ablate.models import NEXT_TURN_HEADER, ensure_builtin, load_tokenizer
    from rlhf_ablate.models.generation import _response, generation_config

    tok = load_tokenizer(ModelConfig(), ensure_builtin("tiny-llama"))
    assert NEXT_TURN_HEADER == "### 질문:"
    answer = tok("김치는 배추로 만듭니다.")["input_ids"]
    header = tok("\n\n### 질문:\n다음 질문")["input_ids"]
    pad_eos = [tok.eos_token_id] * 3  # a finished row padded with EOS (pad = eos tokenizers)
    r = _response(tok, [1, 2], answer + header + pad_eos, True, None)
    assert r["stopped"] and not r["has_eos"] and r["text"] == "김치는 배추로 만듭니다."
    assert r["ids"] == answer or tok.decode(r["ids"]).strip() == "김치는 배추로 만듭니다."
    # a response that starts with the header keeps what was sampled (PPO penalises it as a missing EOS)
    r = _response(tok, [1], header, True, None)
    assert not r["stopped"] and not r["has_eos"] and r["ids"] == header and r["text"] == ""
    # EOS ends a response as before; without the header nothing is cut
    r = _response(tok, [1], answer + [tok.eos_token_id], True, None)
    assert r["has_eos"] and not r["stopped"] and r["ids"] == answer + [tok.eos_token_id]
    # generation stops there: the config carries the header as a stop string (transformers' StopStringCriteria)
    from transformers import StopStringCriteria

    gcfg = generation_config(tok, max_new_tokens=4, do_sample=True)
    assert gcfg.stop_strings == [NEXT_TURN_HEADER] and gcfg.top_k == 0 and gcfg.repetition_penalty == 1.0
    stop = StopStringCriteria(tok, gcfg.stop_strings)
    k = next(k for k in range(len(header) + 1) if tok.decode(header[:k]).endswith(NEXT_TURN_HEADER))
    rows = torch.tensor([[5] + answer + header[:k], [5, 5] + answer + header[:k - 1]])  # whole / partial header
    assert stop(rows, None).tolist() == [True, False]


def test_empty_response_is_scored_but_trained_on_nothing(llama):
    from rlhf_ablate.ppo import math as pm
    from rlhf_ablate.ppo.rollout import build_batch, score_batch

    cfg, roles = _roles(llama)
    responses, _, _ = _rollout(cfg, roles, n=4)
    responses[1] = {**responses[1], "ids": [], "has_eos": False, "stopped": False}
    b = build_batch(roles.tokenizer, ["-"] * 4, responses, "cpu")
    assert b["rmask"][1].sum() == 0 and b["rmask"].sum() > 0
    sc = score_batch(roles, b, cfg.ppo.temperature)
    assert torch.isfinite(sc["raw_scores"]).all()
    rewards, kl = pm.per_token_rewards(sc["raw_scores"], sc["old_logprobs"], sc["ref_logprobs"], b["rmask"], 0.1)
    assert (rewards[1] == 0).all()
    stats = _update(cfg, roles, b, sc)
    assert stats and all(math.isfinite(s["loss/policy"]) and math.isfinite(s["loss/value"]) for s in stats)


# ---------------------------------------------------------------------------------------------------------
# Smaller items: value init from the RM, learning-rate decay
# ---------------------------------------------------------------------------------------------------------

def test_value_starts_from_reward_only_when_rank_and_alpha_match(llama):
    cfg, same = _roles(llama)  # ppo and rm: rank 8, alpha 0 = 16
    assert same.value_from_reward
    params = dict(same.model.named_parameters())
    for n, p in params.items():
        if ".value." in n and "lora_" in n:
            assert torch.equal(p, params[n.replace(".value.", ".reward.")])
    _, other = _roles(llama, **{"ppo.lora_alpha": 32})  # same rank, different scale: the copy would be wrong
    assert not other.value_from_reward
    assert all(torch.count_nonzero(p) == 0 for n, p in other.model.named_parameters()
               if ".value." in n and "lora_B" in n)


def test_linear_lr_decay_and_no_weight_decay_by_default(llama):
    from rlhf_ablate.ppo.loop import learning_rate

    cfg = llama[0].config(FAMILY, "none", **{"ppo.lr_schedule": "linear"})
    p = cfg.ppo
    assert p.weight_decay == 0.0
    assert [learning_rate(p, s, 4) for s in (1, 2, 3, 4)] == pytest.approx([p.learning_rate * f for f in
                                                                             (1, 0.75, 0.5, 0.25)])
    const = llama[0].config(FAMILY, "none").ppo
    assert learning_rate(const, 3, 4) == const.learning_rate
    at = llama[0]
    r = at.run(FAMILY, "none", **{"ppo.lr_schedule": "linear", "ppo.total_episodes": 16})
    assert r["status"] == "ok", r["error"]
    assert [h["lr"] for h in r["history"]["ppo"]] == pytest.approx([p.learning_rate, p.learning_rate / 2])
