"""Trial configuration: one small frozen dataclass per stage, nested in :class:`TrialConfig`.

Defaults live here and only here; YAML files and CLI overrides hold changes, written as dotted keys
(``ppo.kl_coef=0.05``) with one syntax everywhere. Loading validates everything and fails loudly:
unknown keys get a "did you mean", type errors name the dotted key and the file, and rules that span fields
(for example a full fine-tune on a 4-bit base) say how to fix the problem.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from ..data.readers import FORMATS, OUR_FIELDS, is_our_field
from ..data.versions import FILTERS
from ..errors import ConfigError
from ..files import config_hash
from . import fields
from .fields import build_dataclass, flatten, help_field as _f, suggest
from .overopt import EnsembleParams, GoldParams, validate_overoptimization

# Bump when a default below changes meaning, so trial ids (which hash the full config) move with it.
# 2: the stage configs share their LoRA and training parts (DPO and RM gained weight_decay/warmup_ratio), and ids
#    hash rlhf_ablate.files.canonical_json.
# 3: data.columns, data.evasive_sft/evasive_rm; v2's garbage, length_outliers and evasive rules changed meaning.
# 4: model.compute_dtype defaults to "auto" (bf16 on a GPU that supports it, fp32 on the CPU); PPO's AdamW weight
#    decay is 0 (torch's default 0.01 before), prompts are cut to ppo.max_prompt_length, dropout is off in every
#    PPO role, rollouts stop at the template's next-turn header, and the value model starts from the reward model
#    only when rank and alpha both match.
CONFIG_VERSION = 4

BUILTIN_MODELS = ("tiny-llama", "tiny-gpt2")
SEED_MAX = 2**32 - 1  # numpy.random.seed accepts [0, 2**32 - 1]; a trial seeds numpy, torch and random alike


@dataclass(frozen=True)
class ModelConfig:
    base_model: str = _f("tiny-llama", "Built-in tiny model (tiny-llama, tiny-gpt2), a hub id or a local path.")
    quantization: Literal["none", "nf4", "fp4"] = _f(
        "nf4", "Load the frozen base in 4-bit through bitsandbytes (nf4 or fp4), or 'none'.")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Compute dtype of 4-bit layers and of unquantized weights; 'auto' = bfloat16 on a GPU that supports "
                "it (with autocast and TF32), float32 on the CPU (rlhf_ablate/models/loading.py: compute_dtype).")
    double_quant: bool = _f(True, "bitsandbytes nested quantization of the 4-bit scales.")
    trust_remote_code: bool = _f(False, "Allow model code from the hub. Off unless you ask for it.")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) to pin.")
    max_length: int = _f(192, "Maximum tokens of prompt + answer seen in training.")


@dataclass(frozen=True)
class DataConfig:
    source: str = _f("ko_sample", "'ko_sample' (bundled Korean data), a directory of data files, one data file "
                     "(JSON, Parquet, CSV), a save_to_disk directory or a Hub dataset id (org/name).")
    format: Literal[("auto", *FORMATS)] = _f(  # the readers' table (data/readers.py) is the one list
        "auto", "Reader for the files in `source`; 'auto' detects it per file from the fields of the first row.")
    columns: dict = _f({}, "Your column names mapped onto ours, our name -> yours (LLaMA-Factory's 'columns'), e.g. "
                       "{prompt: instruction, completion: output}.")
    sft_file: Optional[str] = _f(None, "SFT file relative to `source` (or a split name of a dataset source).")
    rm_file: Optional[str] = _f(None, "Ranked-group or preference-pair file relative to `source` (or a split name).")
    ppo_file: Optional[str] = _f(None, "PPO prompt file relative to `source` (or a split name).")
    eval_file: Optional[str] = _f(None, "Held-out prompts with references relative to `source` (or a split name).")
    version: str = _f("v1", "Data version: v1 (as read), v2 (cleaned) or a name from `custom_versions`.")
    custom_versions: dict = _f({}, "Your own versions: name -> list of cleaning filters (see `data stats`).")
    eval_fraction: float = _f(0.2, "Fraction of RM groups held out for RM eval (split by stable prompt id).")
    split_seed: int = _f(0, "Seed of the stable train/eval split. Independent of the trial seed.")
    skip_bad_rows: bool = _f(False, "Skip and count malformed rows instead of stopping at the first one.")
    evasive_sft: Literal["drop", "keep"] = _f(
        "drop", "v2's evasive rule on SFT targets: drop refusals and AI self-references, or keep them.")
    evasive_rm: Literal["auto", "drop_preferred", "keep"] = _f(
        "auto", "v2's evasive rule on ranked groups: drop a group whose refusal outranks a real answer "
        "(helpfulness data), keep (harmlessness data, where refusing is preferred), or auto (keep for HH-RLHF "
        "transcripts, drop_preferred otherwise).")
    max_sft: int = _f(0, "Use at most this many SFT examples (0 = all).")
    max_rm_groups: int = _f(0, "Use at most this many RM training groups (0 = all).")
    max_ppo_prompts: int = _f(0, "Use at most this many PPO prompts (0 = all).")
    max_eval: int = _f(0, "Use at most this many eval prompts (0 = all).")


# ---- parts the stage configs share: one declaration each, stage-specific defaults overridden below -----------

@dataclass(frozen=True)
class LoraParams:
    lora_rank: int = _f(8, "LoRA rank; 0 means a full fine-tune (needs model.quantization=none).")
    lora_alpha: int = _f(0, "LoRA alpha; 0 means 2 * lora_rank.")


@dataclass(frozen=True)
class TrainParams:
    """What a TRL-trained stage (SFT, RM, DPO) is optimised with (rlhf_ablate/stages/common.py: trl_args)."""

    lora_dropout: float = _f(0.0, "LoRA dropout.")
    learning_rate: float = _f(3e-3, "Peak learning rate.")
    epochs: float = _f(3.0, "Training epochs.")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (-1 = use epochs).")
    batch_size: int = _f(16, "Per-device batch size (pairs, for RM and DPO).")
    grad_accum: int = _f(1, "Gradient accumulation steps.")
    warmup_ratio: float = _f(0.05, "Linear warmup fraction.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")


@dataclass(frozen=True)
class SFTConfig(TrainParams, LoraParams):
    pass


@dataclass(frozen=True)
class RMConfig(EnsembleParams, TrainParams, LoraParams):
    init_from: Literal["sft", "base"] = _f(
        "sft", "Start the RM from the SFT model (shares PPO's base) or from the raw base model.")
    center_rewards_coefficient: float = _f(0.0, "TRL's auxiliary loss that centres rewards on zero.")


@dataclass(frozen=True)
class PPOConfig(GoldParams, LoraParams):
    lora_rank: int = _f(8, "Rank of the policy and value adapters; 0 = full copies (small models only).")
    # 5e-4 and kl_coef 0.1: at 1e-3 / 0.05 one seed in two of the tiny default trial collapsed into a repetition
    # loop that the RM over-scores (eval reward fell from 3.65 to 1.42); at 5e-4 / 0.1 both seeds rose (4.32 -> 5.53,
    # 3.65 -> 5.09). Measured with the bundled data, tiny-llama, nf4.
    learning_rate: float = _f(5e-4, "Learning rate of policy and value.")
    total_episodes: int = _f(256, "Prompts rolled out in total (episodes).")
    rollout_batch_size: int = _f(32, "Prompts per rollout (one PPO step).")
    mini_batch_size: int = _f(16, "Rollouts per minibatch in the PPO epochs (one optimizer step each).")
    grad_accum: int = _f(1, "Gradient accumulation steps per minibatch: each forward/backward pass sees "
                            "mini_batch_size / grad_accum rollouts.")
    rollout_micro_batch_size: int = _f(32, "Prompts per generation and per scoring pass (policy, reference, value, "
                                           "reward); the rollout batch is processed in chunks of this many.")
    max_prompt_length: int = _f(128, "Prompt tokens kept in rollouts; longer prompts lose their beginning (the "
                                     "template's answer cue at the end is kept).")
    generation_backend: Literal["eager", "compiled"] = _f("eager", "Decoding of rollouts and eval answers: eager "
        "(transformers' generate) or compiled (static KV cache, torch.compile'd step: rlhf_ablate/models/decoding.py).")
    weight_decay: float = _f(0.0, "AdamW weight decay of the policy and value adapters.")
    lr_schedule: Literal["constant", "linear"] = _f(
        "constant", "Learning rate over the PPO steps: constant, or linear decay to 0 (cleanrl's anneal_lr).")
    ppo_epochs: int = _f(2, "Optimisation epochs over each rollout batch.")
    max_new_tokens: int = _f(32, "Response length cap during rollouts.")
    temperature: float = _f(1.0, "Sampling temperature of rollouts (N+ details: 1.0).")
    kl_coef: float = _f(0.1, "Per-token KL penalty coefficient (beta). Initial value if adaptive_kl.")
    adaptive_kl: bool = _f(False, "Ziegler et al. adaptive KL controller towards `kl_target`.")
    kl_target: float = _f(6.0, "Target KL (nats per response) of the adaptive controller.")
    kl_horizon: int = _f(10000, "Horizon (episodes) of the adaptive controller.")
    kl_estimator: Literal["k1", "k3"] = _f("k1", "Per-token KL estimator in the penalty (Schulman's k1 or k3).")
    gamma: float = _f(1.0, "Discount.")
    lam: float = _f(0.95, "GAE lambda.")
    cliprange: float = _f(0.2, "Policy ratio clip.")
    cliprange_value: float = _f(0.2, "Value clip.")
    vf_coef: float = _f(0.1, "Value loss coefficient.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    reward_norm: bool = _f(True, "Normalise RM scores by the SFT policy's reward mean/std (N+ details).")
    whiten_rewards: bool = _f(False, "Whiten per-token rewards before GAE.")
    missing_eos_penalty: float = _f(1.0, "Subtracted from the score of responses without EOS (0 = off).")
    kl_stop: float = _f(50.0, "End the trial as diverged when the mean KL (nats) exceeds this.")


@dataclass(frozen=True)
class DPOConfig(TrainParams, LoraParams):
    beta: float = _f(0.1, "DPO beta.")
    learning_rate: float = _f(1e-3, "Peak learning rate.")
    epochs: float = _f(2.0, "Training epochs over the pairs.")


@dataclass(frozen=True)
class OnlineRLParams(TrainParams, LoraParams):
    """GRPO and RLOO through TRL's trainers: k sampled answers per prompt, scored by the reward (`reward.type`)."""

    learning_rate: float = _f(5e-4, "Peak learning rate.")
    epochs: float = _f(1.0, "Passes over the PPO prompts.")
    batch_size: int = _f(16, "Sampled answers per optimizer micro-batch (a multiple of num_generations).")
    num_generations: int = _f(4, "Answers sampled per prompt (the group the advantages are computed within).")
    max_new_tokens: int = _f(32, "Answer length cap during sampling.")
    temperature: float = _f(1.0, "Sampling temperature.")
    beta: float = _f(0.1, "KL coefficient towards the SFT reference (0 = no reference model).")


@dataclass(frozen=True)
class GRPOConfig(OnlineRLParams):
    pass


@dataclass(frozen=True)
class RLOOConfig(OnlineRLParams):
    pass


@dataclass(frozen=True)
class RewardConfig:
    type: Literal["rm", "verifiable"] = _f(
        "rm", "Reward of GRPO/RLOO: the trial's trained RM, or a verifiable check against the reference answer.")
    match: Literal["exact", "contains", "regex"] = _f(
        "contains", "Verifiable check: the answer equals the reference, contains it, or `pattern` extracts it.")
    pattern: Optional[str] = _f(
        None, "Regex for match=regex: its first group (or whole match) in the answer is compared with the reference.")


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = _f(48, "Generation length cap for eval answers.")
    do_sample: bool = _f(False, "Sample eval answers (False = greedy, deterministic).")
    rouge_tokenizer: Literal["kiwi", "char"] = _f(
        "kiwi", "Korean tokenization of ROUGE: kiwi morphemes or NFC characters.")
    bleu_tokenize: Literal["char", "ko-mecab", "13a"] = _f("char", "sacrebleu tokenizer for BLEU.")
    num_samples_logged: int = _f(8, "Sample generations kept in result.json and logged to W&B.")
    judge: Literal["none", "rm", "api"] = _f(
        "rm", "Win rate of the aligned policy against SFT (and base): judged by an RM, or an OpenAI-compatible API.")
    judge_rm_from: Optional[str] = _f(
        None, "judge=rm with an independent RM: a trial directory (RUN/trials/<id>) or an RM artifact directory. "
              "Unset: the trial's own RM, which favours its own policy.")
    judge_url: Optional[str] = _f(None, "judge=api: base URL of an OpenAI-compatible endpoint, e.g. "
                                        "http://localhost:8000/v1 (vLLM, Ollama or a hosted API).")
    judge_model: Optional[str] = _f(None, "judge=api: the model name sent to the endpoint.")
    judge_api_key_env: str = _f("JUDGE_API_KEY", "judge=api: environment variable holding the API key (the key "
                                                 "itself never goes into a config, log or result).")
    judge_prompt: Optional[str] = _f(None, "judge=api: a file with your own judging prompt ({question}, "
                                           "{answer_a}, {answer_b}); unset: the built-in Korean prompt.")
    judge_timeout: float = _f(30.0, "judge=api: seconds per request.")
    judge_retries: int = _f(2, "judge=api: retries per request after a timeout or server error.")
    judge_max_prompts: int = _f(100, "Judge at most this many eval prompts (0 = all).")
    embedding_model: Optional[str] = _f(
        None, "Encoder (local path or hub id) for embedding similarity of answers to references; unset = off.")


# Each alignment method's own config section (``ppo.*``, ``dpo.*``, ...). The built-in ones are fields of
# TrialConfig below; a method added through the stage graph (rlhf_ablate/run/graph.py: register_method) adds its
# section with :func:`register_method_config`. Every rule and list that spans methods reads this table.
METHOD_CONFIGS: dict[str, type] = {}
# Sections added after start-up: hashed into a trial id only by trials of that method, so registering a method
# never moves the ids of the trials that do not use it.
_EXTENSION_METHODS: set[str] = set()


@dataclass(frozen=True)
class TrialConfig:
    seed: int = _f(0, "Trial seed: sampling, init, data order. Splits use data.split_seed instead.")
    method: str = _f(
        "ppo", "Alignment stage after SFT: PPO (ours, with the RM), DPO, GRPO or RLOO (TRL's trainers), or a method "
               "added through the stage graph (rlhf_ablate/run/graph.py).")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- derived views -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flat dotted keys, the form used in result.json, W&B config and Ray Tune."""
        return flatten(self.to_dict())

    @property
    def trial_id(self) -> str:
        """Stable id: a hash of the full config (defaults included) and CONFIG_VERSION. The section of a method
        registered after start-up counts only for trials of that method."""
        d = {k: v for k, v in self.to_dict().items() if k not in _EXTENSION_METHODS or k == self.method}
        return "t" + config_hash({"config_version": CONFIG_VERSION, **d})[:10]

    def method_config(self) -> Any:
        """The config section of the trial's method (``cfg.ppo`` for PPO)."""
        return getattr(self, self.method)

    def replace(self, **dotted: Any) -> "TrialConfig":
        return build_trial_config(apply_overrides(self.to_dict(), dotted, "<replace>"), "<replace>")


METHOD_CONFIGS.update(ppo=PPOConfig, dpo=DPOConfig, grpo=GRPOConfig, rloo=RLOOConfig)


def register_method_config(name: str, cls: type) -> None:
    """Give TrialConfig a section ``name`` of type ``cls`` (a frozen dataclass with the LoRA part, LoraParams), for a
    method declared in the stage graph. The one TrialConfig class gains the field in place, so every module that
    imported it sees the section; dotted keys (``name.key``), validation, flat() and the sweep files follow."""
    if not name.isidentifier() or name in {f.name for f in dataclasses.fields(TrialConfig)}:
        raise ValueError(f"method {name!r}: not a new identifier (taken: {', '.join(METHOD_CONFIGS)})")
    if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen and issubclass(cls, LoraParams)):
        raise ValueError(f"method {name!r}: its config must be a frozen dataclass that includes LoraParams "
                         f"(lora_rank, lora_alpha), like DPOConfig")
    grown = dataclasses.make_dataclass("TrialConfig", [(name, cls, field(default_factory=cls))],
                                       bases=(TrialConfig,), frozen=True)
    for attr in ("__init__", "__repr__", "__eq__", "__hash__", "__dataclass_fields__", "__match_args__"):
        setattr(TrialConfig, attr, getattr(grown, attr))
    TrialConfig.__annotations__[name] = cls
    METHOD_CONFIGS[name] = cls
    _EXTENSION_METHODS.add(name)


def all_keys() -> list[str]:
    """Every valid dotted key of a trial, for "did you mean" suggestions and docs."""
    return fields.all_keys(TrialConfig)


def apply_overrides(base: dict, overrides: Mapping[str, Any], source: str) -> dict:
    """Dotted-key overrides on a nested trial dict (a copy); unknown keys raise ConfigError naming ``source``."""
    return fields.apply_overrides(base, overrides, source, TrialConfig)


def build_trial_config(d: Mapping[str, Any], source: str) -> TrialConfig:
    """Nested dict -> validated TrialConfig. Raises ConfigError naming the dotted key and `source`."""
    cfg = build_dataclass(TrialConfig, d, source)
    validate(cfg, source)
    return cfg


def trial_config_from_overrides(overrides: Mapping[str, Any], source: str = "<overrides>") -> TrialConfig:
    return build_trial_config(apply_overrides(TrialConfig().to_dict(), overrides, source), source)


# ---------------------------------------------------------------------------------------------------------
# Value rules and cross-field rules
# ---------------------------------------------------------------------------------------------------------

def validate(cfg: TrialConfig, source: str) -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: '{key}' {msg}")

    if not 0 <= cfg.seed <= SEED_MAX:
        bad("seed", f"must lie in [0, 2**32 - 1] (numpy's seed range), got {cfg.seed}.")

    if cfg.method not in METHOD_CONFIGS:
        bad("method", f"is {cfg.method!r}, which is not a method.{suggest(cfg.method, list(METHOD_CONFIGS))} "
            f"Methods: {', '.join(METHOD_CONFIGS)}.")
    for stage in ("sft", "rm", *METHOD_CONFIGS):
        sc = getattr(cfg, stage)
        if sc.lora_rank < 0:
            bad(f"{stage}.lora_rank", f"must be >= 0 (0 = full fine-tune), got {sc.lora_rank}.")
        if sc.lora_alpha < 0:
            bad(f"{stage}.lora_alpha", f"must be >= 0 (0 = 2 * rank), got {sc.lora_alpha}.")
        if getattr(sc, "learning_rate", 1.0) <= 0:  # the rules of the shared parts, where a section has them
            bad(f"{stage}.learning_rate", f"must be > 0, got {sc.learning_rate}.")
        for name in ("batch_size", "grad_accum"):
            if getattr(sc, name, 1) < 1:
                bad(f"{stage}.{name}", f"must be >= 1, got {getattr(sc, name)}.")
        if getattr(sc, "epochs", 1.0) <= 0 and getattr(sc, "max_steps", -1) <= 0:
            bad(f"{stage}.epochs", "must be > 0 (or set max_steps > 0).")
    p = cfg.ppo
    if p.kl_coef < 0:
        bad("ppo.kl_coef", f"must be >= 0, got {p.kl_coef}.")
    for name in ("total_episodes", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                 "rollout_micro_batch_size", "max_prompt_length"):
        if getattr(p, name) < 1:
            bad(f"ppo.{name}", f"must be >= 1, got {getattr(p, name)}.")
    if p.rollout_batch_size % p.mini_batch_size:
        bad("ppo.mini_batch_size", f"({p.mini_batch_size}) must divide ppo.rollout_batch_size ({p.rollout_batch_size})")
    if p.mini_batch_size % p.grad_accum:
        bad("ppo.grad_accum", f"({p.grad_accum}) must divide ppo.mini_batch_size ({p.mini_batch_size}), so that "
            f"every forward/backward pass sees the same number of rollouts.")
    if p.weight_decay < 0:
        bad("ppo.weight_decay", f"must be >= 0, got {p.weight_decay}.")
    if p.temperature <= 0:
        bad("ppo.temperature", f"must be > 0, got {p.temperature}.")
    if not 0 <= p.gamma <= 1 or not 0 <= p.lam <= 1:
        bad("ppo.gamma", "and ppo.lam must lie in [0, 1].")
    if p.cliprange <= 0 or p.cliprange_value <= 0:
        bad("ppo.cliprange", "and ppo.cliprange_value must be > 0.")
    validate_overoptimization(cfg, source)
    if cfg.dpo.beta <= 0:
        bad("dpo.beta", f"must be > 0, got {cfg.dpo.beta}.")
    if cfg.model.max_length < 16:
        bad("model.max_length", f"must be >= 16, got {cfg.model.max_length}.")
    if cfg.eval.max_new_tokens < 1:
        bad("eval.max_new_tokens", f"must be >= 1, got {cfg.eval.max_new_tokens}.")
    d = cfg.data
    if not 0 < d.eval_fraction < 1:
        bad("data.eval_fraction", f"must lie strictly between 0 and 1, got {d.eval_fraction}.")
    for name in ("max_sft", "max_rm_groups", "max_ppo_prompts", "max_eval"):
        if getattr(d, name) < 0:
            bad(f"data.{name}", f"must be >= 0 (0 = all), got {getattr(d, name)}.")
    known_versions = {"v1", "v2", *d.custom_versions}
    if d.version not in known_versions:
        bad("data.version", f"is {d.version!r}, which is neither v1, v2 nor defined in data.custom_versions "
            f"({', '.join(sorted(d.custom_versions)) or 'none defined'}).")
    if not d.source.strip():
        bad("data.source", "must not be empty (use 'ko_sample' for the bundled data).")
    for kind in ("sft", "rm", "ppo", "eval"):
        if getattr(d, f"{kind}_file") is not None and not getattr(d, f"{kind}_file").strip():
            bad(f"data.{kind}_file", "must not be empty (leave it unset to use the default names).")
    _validate_columns(d.columns, source)
    for name, filters in d.custom_versions.items():
        if not isinstance(filters, list) or not all(isinstance(x, str) for x in filters):
            bad(f"data.custom_versions.{name}", "must be a list of filter names.")
        for flt in filters:
            if flt not in FILTERS:
                bad(f"data.custom_versions.{name}", f"names unknown filter {flt!r}.{suggest(flt, list(FILTERS))} "
                    f"Known filters: {', '.join(FILTERS)}.")
    if cfg.model.base_model.strip() == "":
        bad("model.base_model", "must not be empty.")

    for m in ("grpo", "rloo"):
        o = getattr(cfg, m)
        if o.num_generations < 2:
            bad(f"{m}.num_generations", f"must be >= 2 (advantages compare answers to the same prompt), got "
                f"{o.num_generations}.")
        if o.batch_size % o.num_generations:
            bad(f"{m}.batch_size", f"({o.batch_size}) must be a multiple of {m}.num_generations "
                f"({o.num_generations}).")
        if o.max_new_tokens < 1 or o.temperature <= 0 or o.beta < 0:
            bad(f"{m}.max_new_tokens", f"must be >= 1, with {m}.temperature > 0 and {m}.beta >= 0.")
    if cfg.reward.type == "verifiable" and cfg.method not in ("grpo", "rloo"):
        bad("reward.type", f"'verifiable' rewards train GRPO or RLOO; method is {cfg.method!r}. Set method=grpo or "
            f"method=rloo, or reward.type=rm.")
    if cfg.reward.match == "regex":
        import re

        if not cfg.reward.pattern:
            bad("reward.pattern", "must be set when reward.match is 'regex'.")
        try:
            re.compile(cfg.reward.pattern)
        except re.error as e:
            bad("reward.pattern", f"is not a valid regular expression: {e}.")
    e = cfg.eval
    if e.judge == "api" and not (e.judge_url and e.judge_model):
        bad("eval.judge_url", "and eval.judge_model must be set when eval.judge is 'api'.")
    if e.judge_timeout <= 0 or e.judge_retries < 0 or e.judge_max_prompts < 0:
        bad("eval.judge_timeout", "must be > 0, with eval.judge_retries >= 0 and eval.judge_max_prompts >= 0.")

    # Cross-field: a full fine-tune cannot train on a 4-bit base (bitsandbytes 4-bit weights are frozen).
    if cfg.model.quantization != "none":
        full = [s for s in ("sft", "rm", cfg.method) if getattr(cfg, s).lora_rank == 0]
        if full:
            keys = ", ".join(f"{s}.lora_rank=0" for s in full)
            raise ConfigError(
                f"{source}: infeasible combination: {keys} (full fine-tune) with model.quantization="
                f"{cfg.model.quantization!r}. 4-bit weights cannot be trained. Set model.quantization=none for "
                f"rank-0 trials (in a sweep: an `overrides` entry with when: {{{full[0]}.lora_rank: 0}} and "
                f"set: {{model.quantization: none}}), or use a LoRA rank > 0.")


def _validate_columns(columns: dict, source: str) -> None:
    """data.columns: our field name -> the user's column name, each of ours at most once from distinct columns."""
    ours = list(OUR_FIELDS) + ["completion_0", "answer01", "rank01"]
    seen: dict[str, str] = {}
    for k, v in columns.items():
        if not isinstance(k, str) or not is_our_field(k):
            raise ConfigError(f"{source}: 'data.columns' maps onto {k!r}, which is not one of our fields "
                              f"({', '.join(OUR_FIELDS)}, completion_N, answerNN, rankNN).{suggest(str(k), ours)}")
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{source}: 'data.columns.{k}' must be the name of your column (a string), got {v!r}.")
        if v in seen:
            raise ConfigError(f"{source}: 'data.columns' maps both '{seen[v]}' and '{k}' from column '{v}'.")
        seen[v] = k


def help_table() -> str:
    """Markdown table of every key, its default and help text (used by the README)."""
    return fields.help_table(TrialConfig)
