"""Sizes read from a model config (no weights loaded), and the estimate of a trial's peak GPU memory that the
launchers pack trials by (rlhf_ablate/launch/resources.py)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

from ..config import BUILTIN_MODELS, ModelConfig, PPOConfig
from ..config.overopt import uses_ensemble, uses_gold_rm
from .builtin import _builtin_model_config
from .loading import _explain_load_errors, _hub_kwargs, compute_dtype, resolve_base, trains_in_4bit
from .lora import _is_linear_like, lora_target_modules, wants_gradient_checkpointing

# ---- Sizes read from a model config ---------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a base model, read from its config (no weights loaded)."""

    params: int              # all parameters (tied weights counted once)
    quantizable: int         # parameters of Linear/Conv1D layers bitsandbytes converts (not embeddings/head)
    lora_dims: int           # sum of (in + out) over the LoRA target layers: LoRA params = rank * lora_dims
    hidden: int
    layers: int
    heads: int
    kv_dim: int              # kv heads * head dim (GQA shrinks the KV cache)
    vocab: int
    intermediate: int = 0    # MLP width
    q_dim: int = 0           # heads * head dim (Gemma-2: 2048 for a hidden size of 2304)
    largest_linear: int = 0  # parameters of the largest quantizable matrix (dequantized whole for each 4-bit matmul)
    model_type: str = ""     # picks the activation coefficients (ACTIVATION_BYTES)
    softcap: bool = False    # final-logit softcapping (Gemma-2): one more [tokens, vocab] tensor in the head
    untied_head: int = 0     # parameters of an LM head not tied to the input embeddings (a reward model has none)


def _load_config(cfg: ModelConfig) -> Any:
    name = cfg.base_model.strip()
    if name in BUILTIN_MODELS:
        return _builtin_model_config(name)
    from transformers import AutoConfig

    src = resolve_base(cfg)
    with _explain_load_errors(src, cfg, "config"):
        return AutoConfig.from_pretrained(src, **_hub_kwargs(cfg, src))


@functools.lru_cache(maxsize=32)
def _shape_cached(cfg: ModelConfig) -> ModelShape:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _load_config(cfg)
    with init_empty_weights():  # meta tensors: shapes without memory
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    # transformers 5 ties input and output embeddings when weights are loaded, not in from_config; tie here so
    # a tied head is counted once (parameters() deduplicates shared tensors).
    model.tie_weights()
    params = sum(p.numel() for p in model.parameters())
    out_emb = model.get_output_embeddings()
    inp_emb = model.get_input_embeddings()
    untied = (out_emb.weight.numel() if out_emb is not None and inp_emb is not None
              and out_emb.weight is not inp_emb.weight else 0)
    targets = set(lora_target_modules(model))
    quantizable = lora_dims = largest = 0
    for name, m in model.named_modules():
        if _is_linear_like(m) and m is not out_emb:
            quantizable += m.weight.numel()
            largest = max(largest, m.weight.numel())
            if name.rsplit(".", 1)[-1] in targets:
                lora_dims += sum(m.weight.shape)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    return ModelShape(params=params, quantizable=quantizable, lora_dims=lora_dims, hidden=hidden, layers=layers,
                      heads=heads, kv_dim=kv_heads * head_dim, vocab=text.vocab_size, intermediate=inter,
                      q_dim=heads * head_dim, largest_linear=largest, model_type=getattr(text, "model_type", ""),
                      softcap=getattr(text, "final_logit_softcapping", None) is not None, untied_head=untied)


# ---- The PPO plan: what the loop does and the estimate assumes (one function, so the two cannot drift apart)

# Float32 bytes of one [chunk, vocab] log-softmax slice (ppo.math.token_logprobs): 64 MiB is 130 positions of a
# 128k vocabulary, and the whole response of a tiny model's batch in one chunk.
LOGPROB_CHUNK_BYTES = 64 * 2 ** 20


@dataclass(frozen=True)
class PPOPlan:
    """How PPO runs a trial's batches (rlhf_ablate/ppo/loop.py) and what :func:`estimate_stage_bytes` models."""

    gradient_checkpointing: bool  # non-reentrant, on the shared base (models/lora.py: wants_gradient_checkpointing)
    rollout_micro: int            # prompts per generate call and per scoring pass
    train_micro: int              # rollouts per forward/backward in the PPO epochs
    prompt_len: int               # query tokens at most (ppo.max_prompt_length; longer prompts lose their start)
    response_len: int             # ppo.max_new_tokens
    logprob_chunk: int            # response positions per float32 log-softmax chunk


def ppo_plan(p: PPOConfig, params: int, vocab: int) -> PPOPlan:
    """The PPO plan of ``ppo`` settings for a base of ``params`` parameters (as the config counts them) and a
    vocabulary of ``vocab``."""
    return PPOPlan(gradient_checkpointing=wants_gradient_checkpointing(params),
                   rollout_micro=min(p.rollout_micro_batch_size, p.rollout_batch_size),
                   train_micro=max(1, p.mini_batch_size // p.grad_accum),
                   prompt_len=p.max_prompt_length, response_len=p.max_new_tokens,
                   logprob_chunk=max(1, LOGPROB_CHUNK_BYTES // (4 * vocab)))


def model_shape(cfg: ModelConfig) -> ModelShape:
    return _shape_cached(cfg)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the base causal LM, from its config alone (built-ins: their config; hub ids and directories:
    AutoConfig on meta tensors, which needs the config locally or online)."""
    return model_shape(cfg).params




# ---- The memory estimate (what the packer in rlhf_ablate/launch/resources.py reads; benchmarks/bench_memory.py
# measures it against the truth)

GIB = 1024 ** 3
CUDA_OVERHEAD_GIB = 0.5   # CUDA context and cuBLAS workspace: outside torch's allocator, so not in the stage sums
FRAGMENTATION = 1.15      # PyTorch caching-allocator slack on top of live tensors (GPU only)

# Bytes autograd keeps per token and per decoder layer when LoRA adapters train on a frozen base, for a compute
# dtype of 4 (fp32) or 2 (bf16/fp16 under autocast) bytes: coefficients of (hidden, intermediate, q_dim, kv_dim),
# and per attention head per key position (eager attention keeps the [heads, T, T] scores: Gemma-2's attention
# softcapping has no SDPA kernel). Fitted to exact counts, not guessed: the tensors saved for backward
# (torch.autograd.graph.saved_tensors_hooks, parameters excluded), two-layer minus one-layer models of each family
# at hidden 256/512, intermediate 1024/2048, 8/16 heads and T 64/128, in fp32 and under bf16 autocast;
# tests/test_architectures.py re-counts one width per family and dtype against them. Under bf16 the hidden-size
# coefficient stays high because the norms compute in fp32 (LlamaRMSNorm upcasts its input).
ACTIVATION_BYTES: dict[str, dict[int, tuple[float, float, float, float, float]]] = {
    "llama": {4: (16, 16, 16, 4, 0), 2: (18.7, 8.3, 9.4, 2.4, 0)},   # also qwen2, mistral, kanana (Llama-like)
    "gemma2": {4: (24, 16, 15, 4, 8), 2: (26.8, 8.3, 7.4, 1.8, 8.1)},
    "gpt2": {4: (40, 20, 0, 0, 0), 2: (22.7, 10.2, 0, 0, 0)},          # q and kv widths equal hidden: folded in
}
# While one layer's backward runs, its gradient temporaries come on top of its saved activations (calibrated by
# benchmarks/bench_memory.py, see there).
BACKWARD_TRANSIENT = 0.5
# TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py) projects tiles of at most 4096 tokens x 32768 vocabulary
# entries; its CPU fallback keeps about three more float32 tiles alive (z, exp, and their product), a GPU one, and
# its backward casts the weight slice of a tile to float32 on the CPU (torch's addmm with out_dtype is CUDA-only).
TRL_TILE_TOKENS, TRL_TILE_VOCAB = 4096, 32768


# Rows per pass of eval's greedy answers and of every no-grad RM scoring pass (eval, score_base, compare, the RM
# stage's held-out scoring): stages/evaluate.py, stages/compare.py and stages/rm.py pass them, the estimate reads them.
EVAL_GENERATE_MICRO = 16
EVAL_SCORE_MICRO = 16


def _family(shape: ModelShape) -> str:
    return shape.model_type if shape.model_type in ACTIVATION_BYTES else "llama"


def _layer_act(shape: ModelShape, w: int, T: int) -> float:
    """Saved activation bytes of one decoder layer, per token, at sequence length T."""
    c_h, c_i, c_q, c_kv, c_att = ACTIVATION_BYTES[_family(shape)][4 if w == 4 else 2]
    return (c_h * shape.hidden + c_i * shape.intermediate + c_q * shape.q_dim + c_kv * shape.kv_dim
            + c_att * shape.heads * T + w * T)  # w * T: the per-layer copy of the padding mask


def _train_act(shape: ModelShape, w: int, b: int, T: int, gc: bool) -> float:
    """Activations of a training forward/backward of b sequences of T tokens. Checkpointing keeps each layer's input
    (b T h w) and recomputes one layer at a time; without it every layer keeps its activations. Either way one layer's
    backward temporaries come on top, and the embedding output and final norm keep two more hidden-size tensors."""
    return sum(_train_act_parts(shape, w, b, T, gc))


def _train_act_parts(shape: ModelShape, w: int, b: int, T: int, gc: bool) -> tuple[float, float]:
    """:func:`_train_act` as (kept, layer): what stays alive from the forward until the backward reaches the layers
    (every layer's activations, or with checkpointing only each layer's input; the embedding output and final norm),
    and what comes on top while one layer's backward runs (with checkpointing its recomputed activations, and its
    gradient temporaries). The LM head's backward comes before the layers', so the head's tensors and ``layer`` are
    never alive together (:func:`_ppo_bytes`)."""
    tokens = b * T
    layer = _layer_act(shape, w, T)
    kept = shape.layers * shape.hidden * w if gc else shape.layers * layer
    step = layer + BACKWARD_TRANSIENT * layer if gc else BACKWARD_TRANSIENT * layer
    return tokens * (kept + 2 * shape.hidden * w), tokens * step


def _fwd_transient(shape: ModelShape, w: int, b: int, T: int) -> float:
    """Peak of a no-grad forward over b x T tokens: one layer's live intermediates (MLP gate, up and their product,
    the residual and normed streams, q, k, v and the attention output), plus eager attention's scores (in the compute
    dtype, their softmax in fp32 and, under bf16, its cast back; benchmarks/bench_memory_slopes.py)."""
    att = shape.heads * T * (2 * w + (0 if w == 4 else 4)) if _family(shape) == "gemma2" else 0
    return b * T * (w * (3 * shape.intermediate + 3 * shape.hidden + 2 * shape.q_dim + 2 * shape.kv_dim) + att)


def _weights(shape: ModelShape, quantized: bool, double_quant: bool, w: int) -> float:
    """4-bit: Q * (0.5 + scales) + (P - Q) * w, scales = 4/64 bytes per weight (fp32 absmax per 64-block) or about
    1/64 with double quantization; the embeddings, LM head and norms stay in the compute dtype (nothing upcast,
    models/lora.py: freeze_for_kbit_training). Unquantized: P * w."""
    if not quantized:
        return shape.params * w
    scales = (1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64
    return shape.quantizable * (0.5 + scales) + (shape.params - shape.quantizable) * w


def target_dtype(model_cfg: ModelConfig, device: str = "cuda") -> str:
    """The compute dtype a trial picks on ``device`` (models/loading.py: compute_dtype): for ``"cuda"``, this
    machine's GPU when it has one (``auto`` is fp32 on a pre-Ampere card, bf16 from Ampere on), else a bf16-capable
    GPU (a sweep's driver may have none); for ``"cpu"``, fp32 unless set."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return compute_dtype(model_cfg)
    return compute_dtype(model_cfg, device)


class Parts:
    """The terms every stage's estimate is made of, for one trial on one device (``device="cuda"``: what a GPU trial
    allocates through torch, ``auto`` resolved by :func:`target_dtype`; ``device="cpu"``: what the same trial holds on
    a CPU, ``auto`` = fp32, TRL's CPU head fallback, which benchmarks/bench_memory.py compares against the process's
    peak). ``dtype`` names the compute dtype instead (``"float32"`` for a pre-Ampere GPU seen from a driver without
    one).

    A stage's estimator (declared with the stage in rlhf_ablate/run/graph.py) returns its components in bytes; the
    graph adds ``peak`` = their sum (PPO: the resident part plus its largest phase). The settings come from where the
    stages read them: ``model.max_length`` and the stage batch sizes, :func:`ppo_plan`, the 4-bit rule
    (models/loading.py: trains_in_4bit) and models/lora.py: wants_gradient_checkpointing."""

    def __init__(self, cfg: Any, device: str = "cuda", dtype: Optional[str] = None):
        self.cfg = cfg
        self.shape = model_shape(cfg.model)
        self.dtype = dtype or target_dtype(cfg.model, device)
        self.w = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        self.cpu = device == "cpu"
        self.gc = wants_gradient_checkpointing(self.shape.params)

    def quantized(self, lora_rank: int) -> bool:
        return trains_in_4bit(self.cfg.model, lora_rank)

    def weights(self, q: bool) -> float:
        return _weights(self.shape, q, self.cfg.model.double_quant, self.w)

    def rm_weights(self, q: bool) -> float:
        """A sequence-classification model: no LM head, a one-output score head."""
        return self.weights(q) - self.shape.untied_head * self.w

    def dequant(self, q: bool) -> float:
        """bitsandbytes dequantizes a whole weight for each 4-bit matmul."""
        return self.shape.largest_linear * self.w if q else 0.0

    def trl_trainable(self, rank: int) -> float:
        """Weight, gradient and two AdamW moments, all in the compute dtype: the TRL stages keep trainable weights
        there (stages/common.py: restore_trainable_dtype), LoRA or a full fine-tune alike."""
        return (self.shape.params if rank == 0 else rank * self.shape.lora_dims) * 4 * self.w

    def trl_head(self, tokens: int) -> float:
        """TRL's fused LM head over ``tokens``. On the CPU, the backward's fp32 accumulation (_addmm_fp32) casts each
        [tile vocabulary, hidden] slice of the head weight to float32 as well."""
        V, h, w, cpu = self.shape.vocab, self.shape.hidden, self.w, self.cpu
        tile = min(tokens, TRL_TILE_TOKENS) * min(V, TRL_TILE_VOCAB)
        return tokens * h * (w + 4) + tile * (w + (12 if cpu else 0)) + (min(V, TRL_TILE_VOCAB) * h * 4 if cpu else 0)

    def train_act(self, b: int, T: int, gc: Any = None) -> float:
        return _train_act(self.shape, self.w, b, T, self.gc if gc is None else gc)

    def fwd(self, b: int, T: int) -> float:
        return _fwd_transient(self.shape, self.w, b, T)

    def kv_cache(self, b: int, T: int) -> float:
        return b * T * 2 * self.shape.kv_dim * self.w * self.shape.layers

    def trl_stage(self, section: Any, b: int, T: int, *, head: bool = True, extra_weights: float = 0.0,
                  seq_cls: bool = False) -> dict[str, float]:
        """A TRL-trained stage (stages/common.py): its model (4-bit by the rule), trainable state, training
        activations of ``b`` sequences of ``T`` tokens, TRL's fused head (causal LMs) and a 4-bit dequantized
        weight."""
        q = self.quantized(section.lora_rank)
        out = {"weights": (self.rm_weights(q) if seq_cls else self.weights(q)) + extra_weights,
               "trainable": self.trl_trainable(section.lora_rank), "activations": self.train_act(b, T)}
        if head:
            out["lm_head"] = self.trl_head(b * T)
        out["dequant"] = self.dequant(q)
        return out


def sft_bytes(cfg: Any, parts: Parts) -> dict[str, float]:
    return parts.trl_stage(cfg.sft, cfg.sft.batch_size, cfg.model.max_length)


def rm_bytes(cfg: Any, parts: Parts) -> dict[str, float]:
    """Chosen and rejected in one batch; a sequence-classification model has no LM head. After training, the stage
    scores its held-out groups :data:`EVAL_SCORE_MICRO` at a time without grad (stages/rm.py: evaluate_rm): the larger
    of that and the training activations."""
    out = parts.trl_stage(cfg.rm, 2 * cfg.rm.batch_size, cfg.model.max_length, head=False, seq_cls=True)
    out["activations"] = max(out["activations"], parts.fwd(EVAL_SCORE_MICRO, cfg.model.max_length))
    return out


def dpo_bytes(cfg: Any, parts: Parts) -> dict[str, float]:
    d = cfg.dpo
    # a full fine-tune keeps a frozen reference copy beside the policy (TRL reloads it from the SFT path)
    return parts.trl_stage(d, 2 * d.batch_size, cfg.model.max_length,
                           extra_weights=parts.weights(False) if d.lora_rank == 0 else 0.0)


def online_rl_bytes(cfg: Any, parts: Parts) -> dict[str, float]:
    """GRPO/RLOO: TRL owns the policy (rlhf_ablate/stages/online_rl.py): the policy with its adapters, the trial's RM
    as a second copy of the base (reward.type rm), batch_size sampled answers of (prompt + max_new_tokens) tokens
    trained at once through TRL's fused head, and their generation's KV cache. Not measured by
    benchmarks/bench_memory.py, so the packer's margin matters more here."""
    o = getattr(cfg, cfg.method)
    b, T = o.batch_size, cfg.ppo.max_prompt_length + o.max_new_tokens
    rm_copy = parts.rm_weights(parts.quantized(cfg.rm.lora_rank)) if cfg.reward.type == "rm" else 0.0
    ref = parts.weights(False) if o.lora_rank == 0 and o.beta > 0 else 0.0
    return {**parts.trl_stage(o, b, T, extra_weights=rm_copy + ref), "kv_cache": parts.kv_cache(b, T)}


def eval_bytes(cfg: Any, parts: Parts, *, generate: bool = True, rm: bool = True,
               kl_rank: Optional[int] = None) -> dict[str, float]:
    """An eval stage (stages/evaluate.py), phase by phase in the order it runs, the policy resident throughout:

    - ``generate``: the policy on its base (4-bit when the model config quantizes) answers greedily,
      :data:`EVAL_GENERATE_MICRO` prompts at a time (``ppo.max_prompt_length`` + ``eval.max_new_tokens``);
    - ``rm``: the trial's RM is loaded beside it, scores the answers :data:`EVAL_SCORE_MICRO` at a time at
      ``model.max_length``, and is freed (its weights are part of this phase only);
    - ``kl_rank`` (a method's LoRA rank; None: no KL pass): the KL pass samples and scores ``ppo.rollout_micro_batch_
      size`` prompts at a time with response-only, chunked log-probs, against a reference that is the base with
      adapters off, or with a full fine-tune (rank 0) a separate copy, loaded with the policy."""
    s, w = parts.shape, parts.w
    p = ppo_plan(cfg.ppo, s.params, s.vocab)
    P, R = p.prompt_len, cfg.eval.max_new_tokens
    out: dict[str, float] = {}
    phases = {"generation": 0.0, "scoring": 0.0, "kl": 0.0}
    if generate:
        out["weights"] = parts.weights(cfg.model.quantization != "none") + (parts.weights(False) if kl_rank == 0
                                                                             else 0.0)
        phases["generation"] = _gen_phase(s, w, EVAL_GENERATE_MICRO, P, R)
    if rm:
        phases["scoring"] = (parts.rm_weights(parts.quantized(cfg.rm.lora_rank))
                             + _fwd_transient(s, w, EVAL_SCORE_MICRO, cfg.model.max_length))
    if kl_rank is not None:
        m = p.rollout_micro
        phases["kl"] = max(_gen_phase(s, w, m, P, R), _score_phase(s, w, m, P + R, R, p.logprob_chunk))
    out.update({f"phase:{k}": v for k, v in phases.items()})
    out["largest_phase"] = max(phases.values())
    return out


def compare_bytes(cfg: Any, parts: Parts) -> dict[str, float]:
    """The compare stage scores answers with an independent RM (``eval.judge_rm_from``) or not at all (the trial's
    own RM scores are in the eval records; an API judge runs elsewhere): that RM and a scoring forward of 16."""
    if not (cfg.eval.judge == "rm" and cfg.eval.judge_rm_from):
        return {}
    return {"weights": parts.rm_weights(parts.quantized(cfg.rm.lora_rank)),
            "activations": parts.fwd(EVAL_SCORE_MICRO, cfg.model.max_length)}


def ppo_bytes(cfg: Any, parts: Parts) -> dict[str, float]:
    out = _ppo_bytes(cfg, parts.shape, parts.w, parts.weights, parts.rm_weights, parts.dequant)
    extra = extra_reward_models(cfg)
    if extra:
        # The ensemble's other members and the gold RM (rlhf_ablate/ppo/roles.py): frozen fp32 adapters on the shared
        # base when the trial's RM is one, else models of their own, like the trial's RM.
        rm_shared = cfg.ppo.lora_rank > 0 and cfg.rm.lora_rank > 0 and cfg.rm.init_from == "sft"
        one = (cfg.rm.lora_rank * parts.shape.lora_dims * 4 if rm_shared
               else parts.rm_weights(cfg.model.quantization != "none" and cfg.rm.lora_rank > 0))
        out["extra_rewards"] = extra * one
    return out


def extra_reward_models(cfg: Any) -> int:
    """Reward models PPO holds besides the trial's RM: rm.ensemble_size - 1 members, and the gold RM
    (config/overopt.py: uses_ensemble, uses_gold_rm)."""
    return (cfg.rm.ensemble_size - 1 if uses_ensemble(cfg) else 0) + int(uses_gold_rm(cfg))


def with_peak(components: dict[str, float]) -> dict[str, float]:
    """``components`` plus ``peak``: the sum of what is alive at once (``phase:*`` entries are the parts of
    ``largest_phase``, not added again)."""
    return {**components, "peak": sum(v for k, v in components.items() if not k.startswith("phase:"))}


def _gen_phase(shape: ModelShape, w: int, b: int, P: int, R: int) -> float:
    """``generate`` of b prompts of P tokens and R new ones: the KV cache of P + R positions (and one layer's copy as it
    grows), plus the larger of the prompt's forward (one layer's intermediates) and a step's float32 next-token
    scores, processed scores and probabilities, which come after the last layer and are never alive with it."""
    kv = b * (P + R) * 2 * shape.kv_dim * w * (shape.layers + 1)
    return kv + max(_fwd_transient(shape, w, b, P), b * shape.vocab * (w + 12))


def _score_phase(shape: ModelShape, w: int, b: int, T: int, R: int, chunk_rows: int) -> float:
    """A no-grad pass over b sequences of T tokens that keeps logits for the last R positions (ppo/roles.py:
    logprobs): the larger of one layer's forward and what exists after the last layer, never alive together: the
    final hidden states and the response logits in the compute dtype, then the larger of Gemma-2's softcapping
    (a second logits tensor while it computes) and two float32 chunks of ``chunk_rows`` positions."""
    chunk = min(chunk_rows, b * R) * shape.vocab * 4
    logits = b * R * shape.vocab * w
    head = b * T * shape.hidden * w + logits + max(logits if shape.softcap else 0, 2 * chunk)
    return max(_fwd_transient(shape, w, b, T), head)


def _ppo_bytes(cfg: Any, shape: ModelShape, w: int, weights: Any, rm_weights: Any, dequant: Any) -> dict[str, float]:
    """PPO: the resident part (the shared base, policy and value adapters with AdamW state, the frozen reward adapter,
    the rollout's tensors) plus the largest of its three phases (rlhf_ablate/ppo/loop.py), each the largest moment
    inside it (tensors that are never alive together are not added):

    - generation, ``plan.rollout_micro`` prompts at a time (:func:`_gen_phase`);
    - scoring, the same micro-batches without grad (:func:`_score_phase`);
    - the update, ``plan.train_micro`` rollouts per forward/backward: what the forward keeps for the backward
      (checkpointed when the plan says so) plus the larger of the head's moment (the response logits and their
      gradient, with softcapping its saved tanh, two float32 chunks; slopes fitted in bench_memory_slopes.py) and
      one layer's backward, which starts after the head's tensors are freed; and a 4-bit matmul's dequantized weight.
    Policy and value never hold graphs at the same time, so the update is one role's pass.
    """
    p = cfg.ppo
    quantized = cfg.model.quantization != "none"
    plan = ppo_plan(p, shape.params, shape.vocab)
    V, R = shape.vocab, plan.response_len
    T = plan.prompt_len + R
    lora_fp32 = p.lora_rank * shape.lora_dims * 4
    rm_shared = p.lora_rank > 0 and cfg.rm.lora_rank > 0 and cfg.rm.init_from == "sft"
    out: dict[str, float] = {}
    if p.lora_rank > 0:
        q = quantized
        out["weights"] = weights(q)
        out["trainable"] = 2 * 4 * lora_fp32  # policy and value: fp32 weight, gradient, two AdamW moments
        out["reward"] = cfg.rm.lora_rank * shape.lora_dims * 4 if rm_shared else rm_weights(q and cfg.rm.lora_rank > 0)
    else:
        q = False
        out["weights"] = 2 * weights(False)  # the reference and the value model beside the policy
        out["trainable"] = 2 * shape.params * 3 * w  # policy and value: gradient and two AdamW moments
        out["reward"] = rm_weights(quantized and cfg.rm.lora_rank > 0)
    B = p.rollout_batch_size
    out["rollout"] = B * T * 8 * 2 + B * R * 4 * 8  # ids and mask (int64), ~8 float32 [B, R] tensors
    b = plan.rollout_micro
    gen = _gen_phase(shape, w, b, plan.prompt_len, R)
    score = _score_phase(shape, w, b, T, R, plan.logprob_chunk)
    bt = plan.train_micro
    cap = 1 if shape.softcap else 0
    chunk = min(plan.logprob_chunk, bt * R) * V * 4
    kept, layer = _train_act_parts(shape, w, bt, T, plan.gradient_checkpointing)
    update = kept + max(bt * R * V * w * (2 + cap) + 2 * chunk, layer) + dequant(q)
    out["phase:generation"], out["phase:scoring"], out["phase:update"] = gen, score, update
    out["largest_phase"] = max(gen, score, update)
    return out
