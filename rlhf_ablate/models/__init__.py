"""Base models: the built-in tiny models, loading (4-bit or not) and precision, LoRA and merging, generation and
scoring, stage artifacts loaded back as models, and the memory estimate with the PPO plan it shares with the loop.
See docs/architecture.md, "Layers"."""

from .artifacts import load_policy, load_rm, rm_base_path, seq_cls_scorer
from .builtin import corpus_texts, ensure_builtin
from .generation import (NEXT_TURN_HEADER, Sampling, cut_at_header, disable_dropout, sampling_for, encode_prompts, eval_mode, generate, last_token_index,
                         left_pad, position_ids, score_texts)
from .loading import (autocast, bnb_config, compute_dtype, enable_tf32, gpu_supports_bf16, is_quantized,
                      load_causal_lm, load_seq_cls, load_tokenizer, resolve_base, torch_dtype, trains_in_4bit)
from .lora import (enable_gradient_checkpointing, freeze_for_kbit_training, logical_param_count, lora_target_modules,
                   make_lora_config, merge_and_save, prepare_for_training, route_rows, wants_gradient_checkpointing)
from .memory import ModelShape, PPOPlan, model_shape, param_count, ppo_plan

__all__ = ["ModelShape", "NEXT_TURN_HEADER", "PPOPlan", "Sampling", "cut_at_header", "sampling_for", "autocast", "bnb_config", "compute_dtype", "corpus_texts",
           "disable_dropout", "enable_gradient_checkpointing", "enable_tf32", "encode_prompts", "ensure_builtin",
           "eval_mode", "freeze_for_kbit_training", "generate", "gpu_supports_bf16",
           "is_quantized", "last_token_index", "left_pad", "load_causal_lm", "load_policy", "load_rm", "load_seq_cls",
           "load_tokenizer", "logical_param_count", "lora_target_modules", "make_lora_config", "merge_and_save",
           "model_shape", "param_count", "position_ids", "ppo_plan", "prepare_for_training", "resolve_base",
           "rm_base_path", "route_rows", "score_texts", "seq_cls_scorer", "torch_dtype", "trains_in_4bit",
           "wants_gradient_checkpointing"]
