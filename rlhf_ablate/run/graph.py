"""The trial's stage graph, declared once (issue 17): every stage a trial can run, with its cache bucket, its
upstream stages, the configuration its key hashes, its build function, the artifact files it promises, its memory
estimate and what it contributes to result.json. Everything that needs to know the stages reads this table:

- the cache keys and the run order of a trial (:func:`stage_keys`, :func:`trial_stages`; rlhf_ablate/run/trial.py);
- the memory estimate the launchers pack trials by (:func:`estimate_stage_bytes`, :func:`estimate_trial_memory_gb`);
- the memory probe's stage list (rlhf_ablate/run/probe.py), chat's and the CLI's ``--stage`` choices
  (:func:`policy_stages`), the metric registry's method list and the trial config's method sections.

A method is one :class:`Method` entry: its config class (the ``<name>.*`` keys), its training function, whether
the trial's reward model is upstream of it, its memory estimate and the metric names its training writes.
:func:`register_method` adds one from outside the package (tests/test_graph.py registers a toy method and runs a
sweep with it); the built-in methods below go through the same function.

Stage names are the keys of result.json's ``timings``: ``sft``, ``rm``, ``eval_base`` (the base model's answers,
shared by every seed and RM), ``score_base`` (the trial's RM scores them), ``eval_sft``, the method's name, then
``eval_<method>`` and ``compare``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import METHOD_CONFIGS, TrialConfig, register_method_config
from ..config.overopt import uses_ensemble, uses_gold_rm
from ..config.schema import DPOConfig, GRPOConfig, PPOConfig, RLOOConfig
from ..metrics import registry
from ..models import memory

Build = Callable[["Ctx", Path], None]


@dataclass
class Ctx:
    """What a stage's build function gets: the trial config, its data, the artifact directories of the stages that
    ran before it in this trial (by stage name), and the per-step callback (PPO's progress)."""

    cfg: TrialConfig
    data: Any
    dirs: dict[str, Path] = field(default_factory=dict)
    on_step: Callable[[dict], None] = lambda _e: None
    cache: Any = None                            # the trial's StageCache (a trial group commits its members there)
    keys: dict[str, str] = field(default_factory=dict)   # the trial's stage keys
    group: list = field(default_factory=list)    # its trial group's other members: (id, config, stage keys)


@dataclass(frozen=True)
class Stage:
    """One node of a trial's graph."""

    name: str                                    # the stage in a trial (result.json timings, chat, the probe)
    bucket: str                                  # the stage cache's directory (several eval stages share "eval")
    upstream: Callable[[TrialConfig], tuple[str, ...]]   # stages whose keys enter this key, in order
    payload: Callable[[TrialConfig], dict]       # the configuration the key hashes, besides the upstream keys
    build: Build
    promises: Callable[[TrialConfig], tuple[str, ...]]   # files the artifact must hold (relative paths)
    memory: Optional[Callable[[TrialConfig, memory.Parts], dict]]   # its peak by component; None: no model loaded
    per_trial: bool = True       # the key includes the model, seed, data and thread count (eval_base: no seed)
    trains: bool = False         # trains a model (marks its training with runtime.stage_hooks; the probe measures it)
    when: Callable[[TrialConfig], bool] = lambda _cfg: True
    records_as: Optional[str] = None             # result.json records.<name> from its records.json
    history: bool = False                        # result.json history.<name> from its history.json


@dataclass(frozen=True)
class Method:
    """An alignment method after SFT: one entry adds its config section, its training and eval stages, its memory
    estimate and its metric names."""

    name: str
    title: str                                   # "PPO": table titles, docs
    config: type                                 # frozen dataclass with the LoRA part (config.schema.LoraParams)
    train: Callable[[Ctx, Path], None]           # the training stage's build function
    memory: Optional[Callable[[TrialConfig, memory.Parts], dict]]   # required: a method without one is refused
    uses_rm: Callable[[TrialConfig], bool] = lambda _cfg: True   # the trial's RM is upstream of training
    payload: Callable[[TrialConfig], dict] = lambda _cfg: {}     # more configuration its key hashes
    extra_upstream: Callable[[TrialConfig], tuple[str, ...]] = lambda _cfg: ()   # more stages its training reads
    auxiliary: tuple[str, ...] = ()              # metric suffixes its training writes to metrics.json
    step_metrics: tuple[str, ...] = ()           # per-step stats it reports (``<name>/<suffix>``)


METHODS: dict[str, Method] = {}


def _common(cfg: TrialConfig) -> dict:
    return {"model": dataclasses.asdict(cfg.model), "seed": cfg.seed}


def _section(name: str) -> Callable[[TrialConfig], dict]:
    return lambda cfg: {name: dataclasses.asdict(getattr(cfg, name))}


def _rm_payload(role: str) -> Callable[[TrialConfig], dict]:
    """An RM stage's key: the rm section without the keys that only another RM stage reads (so the trial's RM is
    shared by every rm.ensemble_size and rm.gold_max_steps)."""
    skip = {"trial": ("ensemble_size", "gold_max_steps"), "gold": ("ensemble_size",),
            "ensemble": ("gold_max_steps",)}[role]

    def payload(cfg: TrialConfig) -> dict:
        rm = {k: v for k, v in dataclasses.asdict(cfg.rm).items() if k not in skip}
        return {"rm": rm} if role == "trial" else {"rm": rm, "role": role}
    return payload


def _eval_payload(policy: str) -> Callable[[TrialConfig], dict]:
    """An eval stage's key: the eval section, the prompt cut and, when not the default eager, the decoding backend
    (``ppo.generation_backend``: eval decodes with it; eager keys stay as they were before the backend existed)."""
    def payload(cfg: TrialConfig) -> dict:
        backend = cfg.ppo.generation_backend
        return {"eval": dataclasses.asdict(cfg.eval), "policy": policy, "max_prompt_length": cfg.ppo.max_prompt_length,
                **({"generation_backend": backend} if backend != "eager" else {})}
    return payload


def _weights_of(rank_of: Callable[[TrialConfig], int]) -> Callable[[TrialConfig], tuple[str, ...]]:
    """A trained model's promised files: a LoRA adapter, or the whole model for a full fine-tune."""
    return lambda cfg: (("adapter/adapter_config.json", "adapter/adapter_model.safetensors") if rank_of(cfg) > 0
                        else ("model/config.json", "model/model.safetensors"))


def _method_rank(cfg: TrialConfig) -> int:
    return cfg.method_config().lora_rank


def _wants_compare(cfg: TrialConfig) -> bool:
    """The compare stage (win rates, embedding similarity) runs when it has something to compute."""
    return cfg.eval.judge != "none" or bool(cfg.eval.embedding_model)


# ---- the stages every trial shares, before and after its method ---------------------------------------------

def _build_sft(c: Ctx, out: Path) -> None:
    from ..stages.sft import train_sft

    train_sft(c.cfg, c.data, out)


def _build_rm(c: Ctx, out: Path) -> None:
    from ..stages.rm import train_rm

    train_rm(c.cfg, c.data, c.dirs["sft"] if c.cfg.rm.init_from == "sft" else None, out)


def _build_rm_gold(c: Ctx, out: Path) -> None:
    from ..stages.rm import train_gold_rm

    train_gold_rm(c.cfg, c.data, c.dirs["sft"] if c.cfg.rm.init_from == "sft" else None, out)


def _build_rm_ensemble(c: Ctx, out: Path) -> None:
    from ..stages.rm import train_rm_ensemble

    train_rm_ensemble(c.cfg, c.data, c.dirs["sft"] if c.cfg.rm.init_from == "sft" else None, out)


def _ensemble_promises(cfg: TrialConfig) -> tuple[str, ...]:
    files = _weights_of(lambda c: c.rm.lora_rank)(cfg) + ("rm_info.json",)
    return ("ensemble.json",) + tuple(f"members/{k}/{f}" for k in range(1, cfg.rm.ensemble_size) for f in files)


def _build_eval_base(c: Ctx, out: Path) -> None:
    from ..stages.evaluate import generate_base

    generate_base(c.cfg, c.data, out)


def _build_score_base(c: Ctx, out: Path) -> None:
    from ..stages.evaluate import score_base

    score_base(c.cfg, c.dirs["sft"], c.dirs["rm"], c.dirs["eval_base"], out)


def _build_eval(policy: str) -> Build:
    def alone(c: Ctx, out: Path) -> None:
        from ..stages.evaluate import evaluate_policy

        evaluate_policy(c.cfg, c.data, policy, c.dirs["sft"], c.dirs["rm"], c.dirs.get(policy), out)

    def build(c: Ctx, out: Path) -> None:
        if policy == "ppo" and c.group and c.cache is not None and c.cache.enabled and not c.cfg.eval.do_sample:
            from .groups import build_eval_group  # a trial group's evals in one batched pass (greedy answers)

            return build_eval_group(c, out, alone, _EVAL_FILES)
        alone(c, out)
    return build


def _build_compare(c: Ctx, out: Path) -> None:
    from ..stages.compare import compare

    m = c.cfg.method
    compare(c.cfg, {"base": c.dirs["score_base"], "sft": c.dirs["eval_sft"], m: c.dirs["eval_" + m]}, out)


_EVAL_FILES = ("metrics.json", "records.json", "meta.json")
BEFORE = (
    Stage("sft", "sft", lambda cfg: (), _section("sft"), _build_sft,
          lambda cfg: ("model/config.json", "model/model.safetensors", "metrics.json", "history.json"),
          memory.sft_bytes, trains=True, history=True),
    Stage("rm", "rm", lambda cfg: ("sft",) if cfg.rm.init_from == "sft" else (), _rm_payload("trial"), _build_rm,
          lambda cfg: _weights_of(lambda c: c.rm.lora_rank)(cfg) + ("rm_info.json", "metrics.json", "records.json"),
          memory.rm_bytes, trains=True, records_as="rm", history=True),
    # Over-optimization (rlhf_ablate/ppo/overopt.py): a gold RM on a disjoint fold of the preference data, and the
    # other members of an RM ensemble (other seeds, same pairs). One RM trained at a time: the RM's memory.
    Stage("rm_gold", "rm", lambda cfg: ("sft",) if cfg.rm.init_from == "sft" else (),
          _rm_payload("gold"), _build_rm_gold,
          lambda cfg: _weights_of(lambda c: c.rm.lora_rank)(cfg) + ("rm_info.json", "metrics.json"),
          memory.rm_bytes, trains=True, when=uses_gold_rm),  # only when PPO reads it
    Stage("rm_ensemble", "rm", lambda cfg: ("sft",) if cfg.rm.init_from == "sft" else (),
          _rm_payload("ensemble"), _build_rm_ensemble, _ensemble_promises,
          memory.rm_bytes, trains=True, when=uses_ensemble),
    # The base model's greedy answers depend on the model, data and eval settings only (no seed): one artifact per
    # model and data; the trial's RM scores them in a small stage of its own.
    Stage("eval_base", "eval", lambda cfg: (), _eval_payload("base"), _build_eval_base,
          lambda cfg: ("records.json", "meta.json"), lambda cfg, parts: memory.eval_bytes(cfg, parts, rm=False),
          per_trial=False),
    Stage("score_base", "eval", lambda cfg: ("eval_base", "rm", "sft"), lambda cfg: {"policy": "base"},
          _build_score_base, lambda cfg: _EVAL_FILES, lambda cfg, parts: memory.eval_bytes(cfg, parts, generate=False),
          records_as="base"),
    Stage("eval_sft", "eval", lambda cfg: ("sft", "rm"), _eval_payload("sft"), _build_eval("sft"),
          lambda cfg: _EVAL_FILES, memory.eval_bytes, records_as="sft"),
)


def _method_stages(m: Method) -> tuple[Stage, ...]:
    train = Stage(m.name, m.name, lambda cfg: (("sft", "rm") if m.uses_rm(cfg) else ("sft",)) + m.extra_upstream(cfg),
                  lambda cfg: {**_section(m.name)(cfg), **m.payload(cfg)}, m.train,
                  lambda cfg: _weights_of(_method_rank)(cfg) + ("metrics.json",), m.memory, trains=True,
                  history=True)
    ev = Stage("eval_" + m.name, "eval", lambda cfg: (m.name, "rm", "sft"), _eval_payload(m.name),
               _build_eval(m.name), lambda cfg: _EVAL_FILES,
               lambda cfg, parts: memory.eval_bytes(cfg, parts, kl_rank=_method_rank(cfg)), records_as=m.name)
    return train, ev


COMPARE = Stage("compare", "compare", lambda cfg: ("score_base", "eval_sft", "eval_" + cfg.method),
                lambda cfg: {"eval": dataclasses.asdict(cfg.eval)}, _build_compare,
                lambda cfg: ("metrics.json", "records.json", "meta.json"), memory.compare_bytes,
                when=_wants_compare, records_as="judge")


def register_method(m: Method, *, builtin: bool = False) -> Method:
    """Add an alignment method to the graph, the trial config (``m.config`` as the ``<name>.*`` section) and the
    metric registry. Refused with a clear error: a name that exists, or a method without a memory estimate (the
    launchers pack trials by it; it is never guessed from another method)."""
    if m.name in METHODS:
        raise ValueError(f"stage graph: method {m.name!r} is registered already")
    if m.memory is None:
        raise ValueError(f"stage graph: method {m.name!r} has no memory estimate. Give Method(memory=...) a function "
                         f"(cfg, parts) -> bytes by component (rlhf_ablate/models/memory.py: Parts has the terms); "
                         f"the launchers pack trials on GPUs by it.")
    if builtin:
        if m.name not in registry.BUILTIN_METHODS or METHOD_CONFIGS.get(m.name) is not m.config:
            raise RuntimeError(f"stage graph: built-in method {m.name!r} must be declared in the metric registry "
                               f"(BUILTIN_METHODS) and as a TrialConfig section of type {m.config.__name__}")
    else:
        register_method_config(m.name, m.config)
        registry.register_method(m.name, m.title, auxiliary=m.auxiliary, step_metrics=m.step_metrics)
    METHODS[m.name] = m
    return m


def _train_ppo(c: Ctx, out: Path) -> None:
    if c.cache is not None and c.cache.enabled and "ppo" in c.keys:  # a trial group (rlhf_ablate/run/groups.py)
        from .groups import build_group, take_failure

        failure = take_failure(c.cache, c.keys["ppo"])
        if failure is not None:
            from ..errors import TrialFailed

            raise TrialFailed(failure)
        if c.group:
            return build_group(c, out, _train_ppo_alone, lambda cfg: _weights_of(_method_rank)(cfg) + ("metrics.json",))
    _train_ppo_alone(c, out)


def _train_ppo_alone(c: Ctx, out: Path) -> None:
    from ..stages.ppo import train_ppo

    extra = {name: c.dirs[name] for name in _ppo_reward_stages(c.cfg)}
    train_ppo(c.cfg, c.data, c.dirs["sft"], c.dirs["rm"], out, on_step=c.on_step, extra_rm_dirs=extra)


def _ppo_reward_stages(cfg: TrialConfig) -> tuple[str, ...]:
    """The reward stages PPO reads besides the trial's RM: the ensemble's other members, the gold RM."""
    return tuple(s for s, on in (("rm_ensemble", uses_ensemble(cfg)), ("rm_gold", uses_gold_rm(cfg))) if on)


def _train_dpo(c: Ctx, out: Path) -> None:
    from ..stages.dpo import train_dpo

    train_dpo(c.cfg, c.data, c.dirs["sft"], out)


def _train_online(c: Ctx, out: Path) -> None:
    from ..stages.online_rl import train_online_rl

    train_online_rl(c.cfg, c.data, c.dirs["sft"], c.dirs.get("rm"), out)


_reward_payload = lambda cfg: {"reward": dataclasses.asdict(cfg.reward)}  # noqa: E731
_reward_from_rm = lambda cfg: cfg.reward.type == "rm"  # noqa: E731

# The built-in methods. Their config sections are fields of TrialConfig and their metric names are declared in the
# metric registry (layers below this one, which every reader of metrics imports without the graph); registering
# them here checks that the three agree.
for _m in (Method("ppo", "PPO", PPOConfig, _train_ppo, memory.ppo_bytes, extra_upstream=_ppo_reward_stages),
           Method("dpo", "DPO", DPOConfig, _train_dpo, memory.dpo_bytes, uses_rm=lambda _cfg: False),
           Method("grpo", "GRPO", GRPOConfig, _train_online, memory.online_rl_bytes, uses_rm=_reward_from_rm,
                  payload=_reward_payload),
           Method("rloo", "RLOO", RLOOConfig, _train_online, memory.online_rl_bytes, uses_rm=_reward_from_rm,
                  payload=_reward_payload)):
    register_method(_m, builtin=True)


# ---- what the rest of the code reads ------------------------------------------------------------------------

def trial_stages(cfg: TrialConfig) -> list[Stage]:
    """The stages of ``cfg``'s trial in run order (each after its upstream stages)."""
    if cfg.method not in METHODS:
        raise ValueError(f"stage graph: no method {cfg.method!r} (methods: {', '.join(METHODS)})")
    return [s for s in (*BEFORE, *_method_stages(METHODS[cfg.method]), COMPARE) if s.when(cfg)]


def stage_keys(cfg: TrialConfig, cache: Any, data_fp: str, threads: int = 1) -> dict[str, str]:
    """Each stage's cache key: its own configuration, its upstream stages' keys and (for per-trial stages) the model,
    seed, data fingerprint and torch thread count; the cache adds the code version. So a kl_coef sweep shares SFT and
    RM, and a changed SFT setting invalidates everything after. The thread count is in the key because it changes the
    rounding: one key always means one set of numbers (rlhf_ablate/runtime.py)."""
    keys: dict[str, str] = {}
    for s in trial_stages(cfg):
        payload = {**s.payload(cfg), "upstream": [keys[u] for u in s.upstream(cfg)]}
        if s.per_trial:
            payload.update(_common(cfg), data=data_fp, threads=threads)
        else:
            payload.update(model=dataclasses.asdict(cfg.model), data=data_fp)
        keys[s.name] = cache.key(s.bucket, payload)
    return keys


def policy_stages() -> list[str]:
    """Every policy a trial can answer with: the base model, SFT, then each method (chat's ``--stage`` choices)."""
    return ["base", "sft", *METHODS]


def estimate_stage_bytes(cfg: TrialConfig, device: str = "cuda",
                         dtype: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Peak memory of each stage of the trial that loads a model, in bytes by component, with ``peak``
    (models/memory.py: Parts and the estimators the stages declare). Stages run one after another and free their
    models (rlhf_ablate/run/trial.py releases memory between stages), so a trial's peak is its largest stage.
    ``dtype``: the compute dtype of the target device (default: what ``model.compute_dtype`` resolves to there,
    models/memory.py: target_dtype; ``"float32"`` for ``auto`` on a pre-Ampere GPU)."""
    parts = memory.Parts(cfg, device, dtype)
    out = {}
    for s in trial_stages(cfg):
        comp = s.memory(cfg, parts) if s.memory is not None else {}
        if comp:
            out[s.name] = memory.with_peak(comp)
    return out


def estimate_trial_memory_gb(cfg: TrialConfig, dtype: Optional[str] = None) -> float:
    """Estimated peak GPU memory of one trial, in GiB, used to pack trials on GPUs and refuse impossible ones:
    ``FRAGMENTATION * max(stage peaks) + CUDA_OVERHEAD_GIB``, every stage (eval and compare included) in ``dtype``
    (see :func:`estimate_stage_bytes`)."""
    stages = estimate_stage_bytes(cfg, "cuda", dtype)
    return memory.FRAGMENTATION * max(st["peak"] for st in stages.values()) / memory.GIB + memory.CUDA_OVERHEAD_GIB


# ---- methods from outside the package --------------------------------------------------------------------------

PLUGINS_ENV = "RLHF_ABLATE_PLUGINS"


def load_plugins() -> None:
    """Import the modules named in ``$RLHF_ABLATE_PLUGINS`` (comma-separated, importable from ``sys.path``), which
    register their methods with :func:`register_method`. Every process that runs or reads trials imports this module,
    and so the plugins: the CLI, a Ray worker (the variable is passed on), a SLURM task."""
    import importlib

    from ..errors import ConfigError

    for name in (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",")):
        if name and name not in sys.modules:
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise ConfigError(f"${PLUGINS_ENV}: cannot import {name!r} ({e}); it must be a module on the Python "
                                  f"path that registers methods (rlhf_ablate/run/graph.py: register_method).") from e


load_plugins()

