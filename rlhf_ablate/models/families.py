"""Configs of the model families our users run, to build random-init stand-ins offline (no weights downloaded).

The tests (tests/test_architectures.py) cut them to a couple of layers and a small width and vocabulary; the memory
benchmark (benchmarks/bench_memory.py) keeps them width-true (hidden size, heads, KV heads, intermediate size and
vocabulary of the real model) with a few layers, and extrapolates per layer. Values are those of the models'
published ``config.json`` files on the Hugging Face hub; only the fields that shape memory and numerics are set.
"""

from __future__ import annotations

from typing import Any

# model_type -> the published config of each family's representative (hub id in the comment).
FAMILIES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B; Kanana-1.5-2.1B has the same Llama architecture (GQA, SwiGLU, RoPE).
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-3.1-8B; kakaocorp/kanana-1.5-8b-base is this shape.
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # google/gemma-2-2b: final-logit and attention-logit softcapping, alternating sliding/global attention.
    "gemma-2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                       tie_word_embeddings=True, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                       query_pre_attn_scalar=256, sliding_window=4096, max_position_embeddings=8192),
    # Qwen/Qwen2.5-1.5B: biased q/k/v projections, tied embeddings.
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rms_norm_eps=1e-6),
    # skt/kogpt2-base-v2: GPT-2 base with a Korean vocabulary; dropout 0.1 in embeddings, attention and residuals.
    "kogpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=51200, n_positions=1024,
                   embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1, tie_word_embeddings=True),
}

# A width small enough for CPU tests: every architectural feature of the family kept (GQA ratio, softcapping,
# biases, dropout), the sizes cut.
_SMALL = {"llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16),
          "gemma2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, query_pre_attn_scalar=16, sliding_window=16),
          "qwen2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
          "gpt2": dict(n_embd=64, n_head=4)}


def family_config(family: str, *, layers: int | None = None, vocab_size: int | None = None, small: bool = False,
                  **ids: int) -> Any:
    """A transformers config of ``family`` (a key of :data:`FAMILIES`), optionally cut to ``layers`` layers, another
    vocabulary size (to match a local tokenizer) and, with ``small``, a test-sized width. ``ids`` sets special-token
    ids (pad_token_id, bos_token_id, eos_token_id)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    kw = dict(FAMILIES[family])
    model_type = kw.pop("model_type")
    if small:
        kw.update(_SMALL[model_type])
    if layers is not None:
        kw["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    if vocab_size is not None:
        kw["vocab_size"] = vocab_size
    cfg = AutoConfig.for_model(model_type, **kw, **ids)
    if model_type == "gemma2":  # alternate sliding and global attention, as the full model does, at any depth
        cfg.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(cfg.num_hidden_layers)]
    return cfg
