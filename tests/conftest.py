"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """Point $RLHF_ABLATE_CACHE at one session temp dir, so the built-in tiny models (whose build pretrains them for
    ~20 s on 2 idle cores, minutes on busy ones) are built once per test session, never in the user's home cache.
    Restored at the end of the session."""
    d = tmp_path_factory.mktemp("rlhf_ablate_cache")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest-xdist (the README's `-n 2`) every worker has its own session, so its own stage caches, but the
        # built-in models are shared through one directory of the run: the build is atomic and under a file lock
        # (rlhf_ablate/models/builtin.py: ensure_builtin), so the second worker waits for the first build.
        shared = tmp_path_factory.getbasetemp().parent / "builtin-shared"
        shared.mkdir(exist_ok=True)
        (d / "builtin").symlink_to(shared, target_is_directory=True)
    old = os.environ.get("RLHF_ABLATE_CACHE")
    os.environ["RLHF_ABLATE_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("RLHF_ABLATE_CACHE", None)
    else:
        os.environ["RLHF_ABLATE_CACHE"] = old


class ArchTrials:
    """Random-init models of the families our users run (rlhf_ablate/models/families.py), cut to 2 layers, a test
    width and the built-in tokenizer's vocabulary, saved as local model directories with a deliberately hostile
    generation_config.json (sampling must ignore it); and tiny SFT -> RM -> PPO -> eval trials on them, memoised, on
    one stage cache. Used by tests/test_architectures.py and tests/test_ppo_loop.py."""

    # What a hub checkpoint's generation_config.json may carry; none of it may reach PPO's sampler.
    HOSTILE_GENERATION = dict(do_sample=True, temperature=0.5, top_k=3, top_p=0.5, repetition_penalty=1.8,
                              no_repeat_ngram_size=2)
    # Every stage for real, minimal: 1 SFT and 1 RM step, one PPO step of 8 rollouts (micro-batches of 4 for
    # generation and scoring, 2 per backward), 4 eval prompts.
    TRIAL = {"sft.max_steps": 1, "rm.max_steps": 1, "sft.batch_size": 4, "rm.batch_size": 4,
             "data.max_sft": 8, "data.max_rm_groups": 4, "data.max_ppo_prompts": 8, "data.max_eval": 4,
             "model.max_length": 96, "ppo.total_episodes": 8, "ppo.rollout_batch_size": 8,
             "ppo.mini_batch_size": 4, "ppo.grad_accum": 2, "ppo.rollout_micro_batch_size": 4,
             "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 8, "ppo.max_prompt_length": 40,
             "eval.max_new_tokens": 6}

    def __init__(self, root):
        from rlhf_ablate.run.cache import StageCache

        self.root = root
        self.cache = StageCache(root / "stages")
        self.dirs: dict[str, str] = {}
        self._done: dict[str, dict] = {}

    def model_dir(self, family: str) -> str:
        if family not in self.dirs:
            import torch
            from transformers import AutoModelForCausalLM, GenerationConfig

            from rlhf_ablate.config import ModelConfig
            from rlhf_ablate.models import ensure_builtin, load_tokenizer
            from rlhf_ablate.models.builtin import BUILTIN_VOCAB_SIZE
            from rlhf_ablate.models.families import family_config

            tok = load_tokenizer(ModelConfig(), ensure_builtin("tiny-llama"))
            ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            cfg = family_config(family, layers=2, vocab_size=BUILTIN_VOCAB_SIZE, small=True, **ids)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            model.generation_config = GenerationConfig(**self.HOSTILE_GENERATION, **ids)
            out = self.root / "models" / family
            model.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
            self.dirs[family] = str(out)
        return self.dirs[family]

    def config(self, family: str, quantization: str, **overrides):
        from rlhf_ablate.config import TrialConfig

        return TrialConfig().replace(**{**self.TRIAL, "model.base_model": self.model_dir(family),
                                        "model.quantization": quantization, **overrides})

    def run(self, family: str, quantization: str, **overrides) -> dict:
        from rlhf_ablate.run.trial import run_trial

        cfg = self.config(family, quantization, **overrides)
        if cfg.trial_id not in self._done:
            self._done[cfg.trial_id] = run_trial(cfg, self.root / "runs", cache=self.cache)
        return self._done[cfg.trial_id]

    def stage_dir(self, result: dict, stage: str):
        return self.cache.path(stage, result["timings"][stage]["key"])

    def ppo_models(self, family: str, result: dict, **overrides):
        """(config, PPOModels) on the SFT and RM of ``result`` (an unquantized trial of ``family``), with the fresh
        adapters' random init (LoRA A) seeded, so two calls build the same roles."""
        import torch

        from rlhf_ablate.ppo.roles import PPOModels

        cfg = self.config(family, "none", **overrides)
        torch.manual_seed(0)
        return cfg, PPOModels(cfg, self.stage_dir(result, "sft"), self.stage_dir(result, "rm"))


@pytest.fixture(scope="session")
def arch_trials(builtin_cache, tmp_path_factory) -> ArchTrials:
    return ArchTrials(tmp_path_factory.mktemp("arch"))
