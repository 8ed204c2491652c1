"""Base models: the built-in tiny models, loading (4-bit or not), LoRA and merging, generation and scoring,
stage artifacts loaded back as models, and the memory estimate. See docs/architecture.md, "Layers"."""

from .artifacts import load_policy, load_rm, rm_base_path, seq_cls_scorer
from .builtin import corpus_texts, ensure_builtin
from .generation import eval_mode, generate, last_token_index, position_ids, score_texts
from .loading import bnb_config, is_quantized, load_causal_lm, load_seq_cls, load_tokenizer, resolve_base
from .lora import lora_target_modules, make_lora_config, merge_and_save, prepare_for_training
from .memory import ModelShape, estimate_trial_memory_gb, model_shape, param_count

__all__ = ["ModelShape", "bnb_config", "corpus_texts", "ensure_builtin", "estimate_trial_memory_gb", "eval_mode",
           "generate", "is_quantized", "last_token_index", "load_causal_lm", "load_policy", "load_rm",
           "load_seq_cls", "load_tokenizer", "lora_target_modules", "make_lora_config", "merge_and_save",
           "model_shape", "param_count", "position_ids", "prepare_for_training", "resolve_base", "rm_base_path", "score_texts",
           "seq_cls_scorer"]
