"""The ``compiled`` generation backend (``ppo.generation_backend: compiled``): a static KV cache and a compiled
one-token decode step, token for token what ``model.generate`` samples.

Why not ``generate(cache_implementation="static")``: transformers 5 compiles the decode step inside ``generate``
only when the model's quantizer says it can be compiled (``GenerationMixin._valid_auto_compile_criteria``), and
bitsandbytes' 4-bit quantizer says no (``HfQuantizer.is_compileable`` is False), so on our 4-bit base with LoRA
adapters it would silently decode eagerly over a static cache. Here the step is compiled by us:

- **prefill** (eager): the whole left-padded prompt in one forward, its keys and values written into a
  :class:`transformers.StaticCache` of ``prompt width + max_new_tokens`` positions;
- **decode** (``torch.compile``): one token per row per call. Every call has the same shapes (input ``[b, 1]``, a
  ``[b, cache length]`` attention mask, the cache's fixed tensors), so the step compiles once per batch size and
  cache length and runs without Python between kernels (on a GPU, ``mode="reduce-overhead"``: CUDA graphs).
  Each call gets a fresh cache, freed after it as the memory estimate's generation phase assumes
  (rlhf_ablate/models/memory.py); its tensors are marked static-address without a guard (transformers does so), so a
  new cache costs a CUDA-graph re-recording, not a recompile. The CUDA-graph memory pool is not in the estimate:
  no GPU has measured this backend yet.

The sampling around it is ``generate``'s own (transformers/generation/utils.py, ``_sample``): float32 next-token
logits, the temperature warper when the temperature is not 1 (top-k 0, top-p 1, no penalties: the
:func:`rlhf_ablate.models.generation.generation_config` setup), ``softmax`` then ``torch.multinomial`` (or
``argmax``), finished rows padded, and transformers' own stopping criteria (max length, EOS, the next-turn stop
string). One multinomial call per step over the same rows consumes the random stream exactly as ``generate`` does,
so at the same seed both backends draw the same tokens (tests/test_decoding.py checks it, greedy and sampled, on the
built-in model with a LoRA adapter); logits differ only by float rounding of the compiled kernels, which would have
to move a draw across a bucket boundary to change a token.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

from ..errors import ModelError

BACKENDS = ("eager", "compiled")

_compiled: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_available: list[Optional[str]] = []


def compile_unavailable() -> Optional[str]:
    """None when ``torch.compile`` builds and runs a function on this machine (inductor needs a C++ compiler on the
    CPU, Triton on a GPU), else why not. Checked once per process on a two-line function."""
    if not _available:
        try:
            fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2 + 1, dynamic=False)
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            x = torch.arange(8, dtype=torch.float32, device=dev)
            ok = torch.allclose(fn(x), torch.nn.functional.silu(x) * 2 + 1)
            _available.append(None if ok else "a compiled test function gave wrong numbers")
        except Exception as e:  # noqa: BLE001 - any failure to build means: not available here, and why
            _available.append(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return _available[0]


def _require_compile() -> None:
    why = compile_unavailable()
    if why is not None:
        raise ModelError(f"ppo.generation_backend=compiled: torch.compile cannot build code on this machine ({why}). "
                         f"Set ppo.generation_backend=eager, or install what torch.compile needs (a C++ compiler "
                         f"for the CPU, Triton for a GPU).")


def _inner(model: Any) -> Any:
    """The transformers model under any peft wrapping (LoRA layers are injected in place, so it runs the active
    adapter)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _step_fn(hf: Any) -> Any:
    fn = _compiled.get(hf)
    if fn is None:
        mode = "reduce-overhead" if next(hf.parameters()).device.type == "cuda" else None

        def step(input_ids, attention_mask, position_ids, cache):
            return hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True).logits[:, -1]

        fn = torch.compile(step, mode=mode, dynamic=False)
        _compiled[hf] = fn
    return fn


def _stopping(tokenizer: Any, gcfg: Any, max_length: int) -> Any:
    from transformers import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList, StopStringCriteria

    crit = [MaxLengthCriteria(max_length=max_length)]
    if gcfg.stop_strings:
        crit.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=gcfg.stop_strings))
    if gcfg.eos_token_id is not None:
        crit.append(EosTokenCriteria(eos_token_id=gcfg.eos_token_id))
    return StoppingCriteriaList(crit)


@torch.no_grad()
def static_decode(model: Any, tokenizer: Any, ids: torch.Tensor, attn: torch.Tensor, gcfg: Any,
                  streamer: Any = None, max_prompt_length: Optional[int] = None) -> tuple[torch.Tensor, list]:
    """``(sequences, scores)`` as ``model.generate(input_ids=ids, attention_mask=attn, generation_config=gcfg)``
    returns them (``scores``: the processed float32 next-token scores per step, kept only when
    ``gcfg.output_scores``). ``gcfg`` is :func:`rlhf_ablate.models.generation.generation_config`'s.

    The cache holds ``max_prompt_length + max_new_tokens`` positions whatever the width of this batch's prompts,
    so every batch of one size reuses one compiled step (the slots past the prompt are masked until written)."""
    from transformers import StaticCache

    _require_compile()
    hf = _inner(model)
    B, P = ids.shape
    max_length = P + gcfg.max_new_tokens
    cache_len = max(P, max_prompt_length or 0) + gcfg.max_new_tokens
    cache = StaticCache(config=hf.config, max_cache_len=cache_len)
    stopping = _stopping(tokenizer, gcfg, max_length)
    pad = torch.tensor(gcfg.pad_token_id if gcfg.pad_token_id is not None else 0, device=ids.device)
    temperature = float(gcfg.temperature) if gcfg.do_sample else 1.0
    # generate's positions: the count of real tokens before each one (left padding ignored).
    pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)
    mask = torch.zeros((B, cache_len), dtype=attn.dtype, device=ids.device)
    mask[:, :P] = attn
    if streamer is not None:
        streamer.put(ids.cpu())
    logits = hf(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                use_cache=True).logits[:, -1]
    step = _step_fn(hf)
    seqs, scores = ids, []
    unfinished = torch.ones(B, dtype=torch.long, device=ids.device)
    last_pos = pos[:, -1:]
    while True:
        logits = logits.to(copy=True, dtype=torch.float32)
        if temperature != 1.0:
            logits = logits / temperature  # transformers' TemperatureLogitsWarper
        if gcfg.output_scores:
            scores.append(logits)
        if gcfg.do_sample:
            nxt = torch.multinomial(torch.nn.functional.softmax(logits, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = torch.argmax(logits, dim=-1)
        nxt = nxt * unfinished + pad * (1 - unfinished)
        seqs = torch.cat([seqs, nxt[:, None]], dim=-1)
        unfinished = unfinished & ~stopping(seqs, None)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if unfinished.max() == 0:
            break
        t = seqs.shape[1] - 1  # the cache slot of the token just chosen
        mask[:, t] = 1
        last_pos = last_pos + 1
        try:
            logits = step(nxt[:, None], mask, last_pos, cache)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a compile failure is named after the setting that asked for it
            if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise ModelError(f"ppo.generation_backend=compiled: torch.compile failed on the decode step of "
                                 f"{type(hf).__name__} ({type(e).__name__}: {' '.join(str(e).split())[:300]}). "
                                 f"Set ppo.generation_backend=eager.") from e
            raise
    if streamer is not None:
        streamer.end()
    return seqs, scores


@torch.no_grad()
def segmented_decode(model: Any, tokenizer: Any, ids: torch.Tensor, attn: torch.Tensor, gcfg: Any,
                     segments: list[tuple[int, int, Optional[torch.Generator]]]) -> torch.Tensor:
    """Eager decoding of a batch whose rows belong to independent samplers (trial groups, rlhf_ablate/ppo/group.py):
    ``segments`` are ``(first row, end row, generator)``. Each segment is sampled as ``model.generate`` would sample
    it alone from its generator's state: one ``torch.multinomial`` per step over the segment's rows, drawn only while
    one of them is unfinished (``generate`` stops its loop there, so a segment that finished first draws nothing
    more), at most ``max_new_tokens`` tokens, transformers' EOS and stop-string criteria per row. The rows share
    the forward passes (one KV cache); a row that finished is padded. Returns the sequences (prompt columns first),
    as ``generate`` does for the whole batch. ``generator=None``: the global random stream."""
    from transformers import DynamicCache

    hf = _inner(model)
    B = ids.shape[0]
    stopping = _stopping(tokenizer, gcfg, ids.shape[1] + gcfg.max_new_tokens)
    pad = torch.tensor(gcfg.pad_token_id if gcfg.pad_token_id is not None else 0, device=ids.device)
    temperature = float(gcfg.temperature) if gcfg.do_sample else 1.0
    pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)
    cache = DynamicCache(config=hf.config)
    logits = hf(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                use_cache=True).logits[:, -1]
    seqs, mask, last_pos = ids, attn, pos[:, -1:]
    unfinished = torch.ones(B, dtype=torch.long, device=ids.device)
    for _ in range(gcfg.max_new_tokens):
        logits = logits.to(copy=True, dtype=torch.float32)
        if temperature != 1.0:
            logits = logits / temperature
        nxt = torch.full((B,), int(pad), dtype=torch.long, device=ids.device)
        for a, b, gen in segments:
            if unfinished[a:b].max() == 0:
                continue
            if gcfg.do_sample:
                probs = torch.nn.functional.softmax(logits[a:b], dim=-1)
                nxt[a:b] = torch.multinomial(probs, num_samples=1, generator=gen).squeeze(1)
            else:
                nxt[a:b] = torch.argmax(logits[a:b], dim=-1)
        nxt = nxt * unfinished + pad * (1 - unfinished)
        seqs = torch.cat([seqs, nxt[:, None]], dim=-1)
        unfinished = unfinished & ~stopping(seqs, None)
        if unfinished.max() == 0 or seqs.shape[1] - ids.shape[1] >= gcfg.max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        last_pos = last_pos + 1
        logits = hf(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos, past_key_values=cache,
                    use_cache=True).logits[:, -1]
    return seqs
