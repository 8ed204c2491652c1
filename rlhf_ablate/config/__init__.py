"""Configuration: what a trial computes (:mod:`.schema`), how sweep files expand into trials (:mod:`.sweep`), and
the validation engine both use (:mod:`.fields`). See docs/architecture.md, "Configuration"."""

from .fields import flatten, parse_cli_overrides, suggest
from .schema import (BUILTIN_MODELS, CONFIG_VERSION, METHOD_CONFIGS, DataConfig, DPOConfig, EvalConfig, LoraParams,
                     ModelConfig, PPOConfig, RMConfig, SFTConfig, TrainParams, TrialConfig, all_keys, apply_overrides,
                     build_trial_config, help_table, register_method_config, trial_config_from_overrides, validate)

__all__ = ["BUILTIN_MODELS", "CONFIG_VERSION", "METHOD_CONFIGS", "DataConfig", "DPOConfig", "EvalConfig", "LoraParams",
           "ModelConfig", "PPOConfig", "RMConfig", "SFTConfig", "TrainParams", "TrialConfig", "all_keys",
           "apply_overrides", "build_trial_config", "flatten", "help_table", "parse_cli_overrides",
           "register_method_config", "suggest", "trial_config_from_overrides", "validate"]
