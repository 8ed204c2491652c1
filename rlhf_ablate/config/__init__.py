"""Configuration: what a trial computes (:mod:`.schema`), how sweep files expand into trials (:mod:`.sweep`), and
the validation engine both use (:mod:`.fields`). See docs/architecture.md, "Configuration"."""

from .fields import flatten, parse_cli_overrides, suggest
from .schema import (BUILTIN_MODELS, CONFIG_VERSION, DataConfig, DPOConfig, EvalConfig, ModelConfig, PPOConfig,
                     RMConfig, SFTConfig, TrialConfig, all_keys, apply_overrides, build_trial_config, help_table,
                     trial_config_from_overrides, validate)

__all__ = ["BUILTIN_MODELS", "CONFIG_VERSION", "DataConfig", "DPOConfig", "EvalConfig", "ModelConfig", "PPOConfig",
           "RMConfig", "SFTConfig", "TrialConfig", "all_keys", "apply_overrides", "build_trial_config", "flatten",
           "help_table", "parse_cli_overrides", "suggest", "trial_config_from_overrides", "validate"]
