"""Whole trials on the built-in tiny model and the bundled Korean data, on CPU: SFT -> RM -> PPO (or DPO) -> eval.

What the trial issue's "Done when" asks, and how each is checked here:
- PPO's four roles (policy, value, reward, reference) sit on ONE base: the base's linear weights have one storage
  per layer, not four (a rank-0 trial, which keeps copies, shows the count can tell the difference);
- the reference log-probs are the SFT model's, and the shared-base reward head scores exactly like the RM stage's
  model, left-padded rollouts included (position_ids);
- learning on the bundled data: held-out RM accuracy and Kendall tau well above chance; PPO raises the RM reward of
  eval generations over the SFT policy; the KL to the reference falls as ppo.kl_coef rises;
- determinism on CPU; the 4-bit path (model.quantization=nf4, the default) runs; DPO runs;
- a failing trial records status failed with error type, message and stage, and leaves nothing half-written in the
  stage cache; result.json follows docs/architecture.md.

The learning trials use the default config (about 21 s per trial on 2 idle cores); every learning threshold below
was checked against measurements at three seeds (values in the comments). Trials are built
lazily and memoised per module, and share one stage cache: the kl_coef trials reuse SFT and RM, as in a sweep.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from rlhf_ablate import models
from rlhf_ablate.run.cache import COMPLETE, StageCache, read_executions
from rlhf_ablate.config import TrialConfig, all_keys
from rlhf_ablate.data.prompting import format_prompt, normalize
from rlhf_ablate.run.graph import stage_keys
from rlhf_ablate.run.trial import read_result, result_path, run_trial

warnings.filterwarnings("ignore", message=".*kernels.*")

# The trial every learning test uses: the defaults (3 SFT and 3 RM epochs, 8 PPO steps of 32 rollouts, 50 eval
# prompts), with kl_coef 0.1, the middle value of the kl_coef sweep below, so that the sweep adds two PPO runs.
# Measured 21 s for a whole default trial on 2 idle cores (SFT 4.7, RM 4.5, PPO 5.2, evals 4.3 s); a shrunk trial
# (1 SFT and 1 RM epoch, 4 PPO steps) saved little and did not raise the greedy eval reward.
SMALL = {"ppo.kl_coef": 0.1}
KL_COEFS = (0.01, 0.1, 1.0)
# Noise allowance between two eval KL estimates (ppo/kl_to_ref: one sampled answer per eval prompt; measured
# per-answer KL std 0.3-0.75 nats). Largest inversion measured between kl_coef 0.01 and 0.1: 0.16 (seed 0).
KL_NOISE = 0.25
# ppo.kl_stop below every possible KL: the first rollout's KL is exactly 0 (the policy adapter starts at zero), so
# a negative threshold forces the KL blow-up path deterministically at step 1.
KL_STOP_TINY = -1.0

# A much smaller trial for the determinism check (run twice, nothing reused): learning does not matter there.
TINY = {
    "sft.max_steps": 3, "rm.max_steps": 3,
    "ppo.total_episodes": 16, "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 4,
    "eval.max_new_tokens": 12, "data.max_eval": 8,
    "data.max_sft": 32, "data.max_rm_groups": 8, "data.max_ppo_prompts": 16,
}


# ---------------------------------------------------------------------------------------------------------
# Fixtures: one stage cache per module, trials memoised by their overrides
# ---------------------------------------------------------------------------------------------------------

class Trials:
    """Runs trials on one shared stage cache and remembers their results (a module-level sweep in miniature)."""

    def __init__(self, root: Path):
        self.root = root
        self.cache = StageCache(root / "stages")
        self.run_dir = root / "runs"
        self._done: dict[str, dict] = {}

    def config(self, **overrides) -> TrialConfig:
        return TrialConfig().replace(**{**SMALL, **overrides})

    def run(self, **overrides) -> dict:
        cfg = self.config(**overrides)
        if cfg.trial_id not in self._done:
            self._done[cfg.trial_id] = run_trial(cfg, self.run_dir, cache=self.cache)
        return self._done[cfg.trial_id]

    def stage_dir(self, result: dict, stage: str) -> Path:
        t = result["timings"][stage]
        return self.cache.path({"eval_sft": "eval", "eval_ppo": "eval", "eval_dpo": "eval", "eval_base": "eval",
                                "score_base": "eval"}.get(stage, stage),
                               t["key"])


@pytest.fixture(scope="module")
def trials(builtin_cache, tmp_path_factory) -> Trials:
    return Trials(tmp_path_factory.mktemp("trials"))


@pytest.fixture(scope="module")
def small(trials) -> dict:
    r = trials.run()
    assert r["status"] == "ok", r["error"]
    return r


@pytest.fixture(scope="module")
def fp32_stages(trials):
    """SFT and RM artifacts of an unquantized trial (a few steps: these tests compare computations, not learning)."""
    from rlhf_ablate.data import load_data
    from rlhf_ablate.stages.rm import train_rm
    from rlhf_ablate.stages.sft import train_sft

    cfg = trials.config(**{"model.quantization": "none", "sft.max_steps": 4, "rm.max_steps": 6})
    data = load_data(cfg.data)
    keys = stage_keys(cfg, trials.cache, data.fingerprint)
    sft = trials.cache.run("sft", keys["sft"], lambda out: train_sft(cfg, data, out)).path
    rm = trials.cache.run("rm", keys["rm"], lambda out: train_rm(cfg, data, sft, out)).path
    return cfg, data, sft, rm


def _stage_dirs_of(trials: Trials, result: dict) -> tuple[Path, Path]:
    return trials.stage_dir(result, "sft"), trials.stage_dir(result, "rm")


def _rm_texts(data, n: int = 8) -> tuple[list[str], list[str]]:
    """(prompt, answer) pairs of held-out RM groups, of varied lengths so that a batch really is padded."""
    pairs = [(g.prompt, a) for g in data.rm_eval for a in g.answers][:n]
    return [p for p, _ in pairs], [a for _, a in pairs]


def _left_padded(tok, prompts: list[str], answers: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + answer + EOS, left-padded as PPO rollouts are (query left-padded, response right after it)."""
    tok.padding_side = "left"
    texts = [format_prompt(p) + normalize(a) + tok.eos_token for p, a in zip(prompts, answers)]
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    assert (enc["attention_mask"] == 0).any(), "the test batch must contain padding"
    return enc["input_ids"], enc["attention_mask"]


def _roles_modules(roles) -> list[torch.nn.Module]:
    """Every model object PPOModels holds (the shared base, or the separate copies of a rank-0 trial)."""
    return [m for m in (roles.model, roles.ref_model, roles.value_model, getattr(roles, "rm_model", None))
            if m is not None]


def _base_linear_weights(module: torch.nn.Module, targets: set[str]) -> list[torch.Tensor]:
    """The weights of the base model's linear layers (the LoRA target projections): a peft LoRA layer's
    ``base_layer`` (a bitsandbytes Linear4bit holding Params4bit when 4-bit), or a plain Linear in a model without
    adapters. LoRA's own lora_A / lora_B matrices, heads and embeddings are not base linear layers."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, m in module.named_modules():
        parts = name.split(".")
        if isinstance(m, LoraLayer) or not isinstance(m, torch.nn.Linear):
            continue
        is_base = parts[-1] in targets or (parts[-1] == "base_layer" and len(parts) > 1 and parts[-2] in targets)
        if is_base:
            out.append(m.weight)
    return out


def _n_base_linear_layers(cfg, sft_dir: Path) -> tuple[int, set[str]]:
    """Linear layers of the merged SFT model loaded alone, and the LoRA target names they go by."""
    alone = models.load_causal_lm(cfg.model, str(sft_dir / "model"), quantize=False)
    targets = set(models.lora_target_modules(alone))
    return len(_base_linear_weights(alone, targets)), targets


def _check_role_outputs(roles, ids: torch.Tensor, attn: torch.Tensor) -> None:
    B, T = ids.shape
    V = roles.model.get_output_embeddings().weight.shape[0]
    with torch.no_grad():
        out = {"policy_logits": roles.policy_logits(ids, attn), "ref_logits": roles.ref_logits(ids, attn),
               "values": roles.values(ids, attn), "scores": roles.scores(ids, attn)}
    shapes = {"policy_logits": (B, T, V), "ref_logits": (B, T, V), "values": (B, T), "scores": (B,)}
    for name, t in out.items():
        assert tuple(t.shape) == shapes[name], (name, tuple(t.shape))
        valid = t if t.dim() == 1 else t[attn.bool()]
        assert torch.isfinite(valid).all(), f"{name} has non-finite values"
    # The policy adapter starts at zero (LoRA B = 0): the policy starts exactly at the reference (the SFT model).
    m = attn.bool()
    torch.testing.assert_close(out["policy_logits"][m], out["ref_logits"][m], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# PPO on one shared base
# ---------------------------------------------------------------------------------------------------------

def test_ppo_roles_share_one_4bit_base(trials, small):
    """4-bit (the default), rank 8: policy, value, reward and reference use one set of Params4bit weights."""
    import bitsandbytes as bnb

    from rlhf_ablate.ppo.roles import PPOModels

    cfg = trials.config()
    assert cfg.model.quantization == "nf4" and cfg.ppo.lora_rank == 8
    sft_dir, rm_dir = _stage_dirs_of(trials, small)
    n_layers, targets = _n_base_linear_layers(cfg, sft_dir)
    roles = PPOModels(cfg, sft_dir, rm_dir)
    assert roles.shared and roles.reward_shared
    weights = [w for m in _roles_modules(roles) for w in _base_linear_weights(m, targets)]
    assert weights and all(isinstance(w, bnb.nn.Params4bit) for w in weights)
    storages = {w.untyped_storage().data_ptr() for w in weights}
    # One storage per linear layer (14 for tiny-llama: 7 projections x 2 layers), not four.
    assert len(weights) == n_layers and len(storages) == n_layers, (len(weights), len(storages), n_layers)
    # ... and every one of those layers carries the three adapters.
    from peft.tuners.lora import LoraLayer

    lora_layers = [m for m in roles.model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == n_layers
    assert all(set(m.lora_A) == {"policy", "value", "reward"} for m in lora_layers)

    prompts, answers = _rm_texts(trials_data(cfg))
    ids, attn = _left_padded(roles.tokenizer, prompts, answers, cfg.model.max_length)
    roles.train(False)
    _check_role_outputs(roles, ids, attn)


def test_storage_count_tells_shared_from_copies(trials, fp32_stages):
    """Unquantized: the rank-8 roles hold one base (base_layer weights), a rank-0 trial four copies. The second
    half shows the counting above can fail."""
    from rlhf_ablate.ppo.roles import PPOModels

    cfg, data, sft_dir, rm_dir = fp32_stages
    n_layers, targets = _n_base_linear_layers(cfg, sft_dir)
    prompts, answers = _rm_texts(data)
    for rank, copies in ((8, 1), (0, 4)):
        roles = PPOModels(cfg.replace(**{"ppo.lora_rank": rank}), sft_dir, rm_dir)
        weights = [w for m in _roles_modules(roles) for w in _base_linear_weights(m, targets)]
        storages = {w.untyped_storage().data_ptr() for w in weights}
        assert len(storages) == copies * n_layers, (rank, len(storages), n_layers)
        ids, attn = _left_padded(roles.tokenizer, prompts, answers, cfg.model.max_length)
        roles.train(False)
        _check_role_outputs(roles, ids, attn)


def trials_data(cfg):
    from rlhf_ablate.data import load_data

    return load_data(cfg.data)


def _stages(trials, small, fp32_stages, quantized: bool):
    """(cfg, data, sft_dir, rm_dir): the default nf4 trial's stages, or the unquantized ones."""
    if not quantized:
        return fp32_stages
    cfg = trials.config()
    return (cfg, trials_data(cfg), *_stage_dirs_of(trials, small))


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_reference_logprobs_are_the_sft_models(trials, small, fp32_stages, quantized):
    """PPOModels.ref_logits (adapters disabled, left-padded batch) == the merged SFT model loaded alone, run on each
    sequence unpadded. Tolerance atol 1e-4 for both: float32 differs only in summation order (measured max |diff|
    4.6e-6); 4-bit quantizes the same merged weights the same way on both sides (measured 3.3e-6)."""
    from rlhf_ablate.ppo.roles import PPOModels

    cfg, data, sft_dir, rm_dir = _stages(trials, small, fp32_stages, quantized)
    roles = PPOModels(cfg, sft_dir, rm_dir)
    roles.train(False)
    prompts, answers = _rm_texts(data)
    ids, attn = _left_padded(roles.tokenizer, prompts, answers, cfg.model.max_length)
    ref = roles.ref_logits(ids, attn)
    alone = models.load_causal_lm(cfg.model, str(sft_dir / "model"), quantize=quantized).eval()
    worst = 0.0
    with torch.no_grad():
        for i in range(ids.shape[0]):
            n = int(attn[i].sum())
            expect = alone(input_ids=ids[i:i + 1, -n:]).logits[0].float()
            got = ref[i, -n:]
            worst = max(worst, (got - expect).abs().max().item())
            torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
            # log-probs of the actual next tokens, the quantity PPO's KL penalty uses
            lp = torch.log_softmax(got[:-1], -1).gather(-1, ids[i, -n + 1:, None])
            lp_alone = torch.log_softmax(expect[:-1], -1).gather(-1, ids[i, -n + 1:, None])
            torch.testing.assert_close(lp, lp_alone, atol=1e-4, rtol=0)
    print(f"ref logits vs SFT alone ({'nf4' if quantized else 'fp32'}): max |diff| {worst:.2e}")


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_shared_reward_head_scores_like_the_rm_stage(trials, small, fp32_stages, quantized):
    """PPOModels.scores on left-padded prompt + answer + EOS == the RM stage's model (stages.rm.load_rm +
    seq_cls_scorer) on the same texts right-padded, the way the RM stage evaluates."""
    from rlhf_ablate.models import score_texts
    from rlhf_ablate.ppo.roles import PPOModels
    from rlhf_ablate.models import load_rm, seq_cls_scorer

    cfg, data, sft_dir, rm_dir = _stages(trials, small, fp32_stages, quantized)
    prompts, answers = _rm_texts(data, n=12)
    rm_model, rm_tok = load_rm(cfg, rm_dir, sft_dir)
    expected = torch.tensor(score_texts(seq_cls_scorer(rm_model), rm_tok, prompts, answers, cfg.model.max_length))
    roles = PPOModels(cfg, sft_dir, rm_dir)
    assert roles.reward_shared
    roles.train(False)
    ids, attn = _left_padded(roles.tokenizer, prompts, answers, cfg.model.max_length)
    got = roles.scores(ids, attn)
    print(f"shared reward vs RM stage ({'nf4' if quantized else 'fp32'}): max |diff| "
          f"{(got - expected).abs().max().item():.2e}, score std {expected.std().item():.3f}")
    assert expected.std() > 0.05, "scores must differ between texts, or the comparison shows nothing"
    # Tolerance 1e-4 for both: fp32 differs in summation order only (measured max |diff| 8.9e-8); nf4 quantizes the
    # same merged SFT weights the same way on both sides and runs the same kernels (measured 1.2e-6).
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# result.json (docs/architecture.md)
# ---------------------------------------------------------------------------------------------------------

RESULT_KEYS = {"schema", "trial_id", "sweep", "index", "status", "error", "seed", "config", "axes", "metrics",
               "metric_meta", "timings", "history", "records", "versions", "started_at", "finished_at"}
EVAL_RECORD_KEYS = {"data_id", "prompt", "reference", "generation", "rouge1", "rouge2", "rougeL", "bleu", "chrf",
                    "reward", "response_len"}


def test_result_json_follows_the_contract(trials, small):
    cfg = trials.config()
    on_disk = read_result(trials.run_dir, cfg.trial_id)
    assert on_disk == json.loads(json.dumps(small)), "result.json on disk is what run_trial returned"
    r = on_disk
    assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
    assert r["schema"] == 1 and r["trial_id"] == cfg.trial_id and r["status"] == "ok" and r["error"] is None
    assert r["seed"] == cfg.seed
    # config: flat dotted keys, every key, with the trial's values (4-bit is the default and ran here)
    assert set(r["config"]) == set(all_keys())
    assert r["config"]["model.quantization"] == "nf4" and r["config"]["ppo.kl_coef"] == SMALL["ppo.kl_coef"]
    # metrics: the namespaces of docs/architecture.md
    m = r["metrics"]
    for k in ("rm/chosen_mean", "rm/rejected_mean", "rm/separation_margin", "rm/pairwise_accuracy",
              "rm/kendall_tau", "rm/spearman_rho", "rm/length_bias", "sft/rougeL", "sft/bleu", "sft/chrf",
              "sft/reward_mean", "ppo/rouge1", "ppo/rouge2", "ppo/rougeL", "ppo/bleu", "ppo/chrf", "ppo/reward_mean",
              "ppo/kl_to_ref", "ppo/response_len", "ppo/objective/kl", "ppo/objective/scores"):
        assert isinstance(m.get(k), (int, float)) and math.isfinite(m[k]), k
    assert m["rm/separation_margin"] == pytest.approx(m["rm/chosen_mean"] - m["rm/rejected_mean"])
    assert {"rouge_tokenizer", "bleu_signature", "chrf_signature"} <= set(r["metric_meta"])
    # timings: every stage with seconds, cache_hit and key; a total
    for stage in ("sft", "rm", "eval_base", "score_base", "eval_sft", "ppo", "eval_ppo"):
        t = r["timings"][stage]
        assert isinstance(t["seconds"], (int, float)) and isinstance(t["cache_hit"], bool) and t["key"], stage
        assert (trials.stage_dir(r, stage) / COMPLETE).is_file()
    assert r["timings"]["total"] > 0
    # history: per-step PPO stats
    steps = r["history"]["ppo"]
    assert [h["step"] for h in steps] == list(range(1, cfg.ppo.total_episodes // cfg.ppo.rollout_batch_size + 1))
    assert all({"objective/kl", "objective/scores", "policy/clipfrac", "loss/value"} <= set(h) for h in steps)
    # records: per prompt, paired across policies by data_id
    data = trials_data(cfg)
    eval_ids = [e.data_id for e in data.eval]
    for policy in ("base", "sft", "ppo"):
        recs = r["records"][policy]
        assert [x["data_id"] for x in recs] == eval_ids
        assert all(EVAL_RECORD_KEYS <= set(x) for x in recs)
        assert m[f"{policy}/reward_mean"] == pytest.approx(sum(x["reward"] for x in recs) / len(recs))
    assert all("kl_to_ref" in x for x in r["records"]["ppo"])
    rm = r["records"]["rm"]
    assert [x["data_id"] for x in rm] == [g.data_id for g in data.rm_eval]
    assert all({"data_id", "scores", "ranks", "lengths", "kendall_tau"} <= set(x) for x in rm)
    assert all(len(x["scores"]) == len(x["ranks"]) == len(x["lengths"]) for x in rm)
    assert {"python", "torch", "transformers", "trl", "peft", "git_commit"} <= set(r["versions"])
    assert r["versions"]["torch"] == torch.__version__


# ---------------------------------------------------------------------------------------------------------
# Learning on the bundled data
# ---------------------------------------------------------------------------------------------------------

def test_reward_model_ranks_held_out_answers(small):
    """Chance is accuracy 0.5 and tau 0. Measured with the defaults at seeds 0/1/2 (commit 05b2796): accuracy
    0.867/0.878/0.833, Kendall tau 0.758/0.758/0.652 (1 RM epoch: as low as 0.789 and 0.561)."""
    m = small["metrics"]
    assert m["rm/n_groups"] >= 10
    assert m["rm/pairwise_accuracy"] >= 0.7, m["rm/pairwise_accuracy"]
    assert m["rm/kendall_tau"] >= 0.4, m["rm/kendall_tau"]
    assert m["rm/separation_margin"] > 0


def test_ppo_raises_the_reward_of_eval_generations(small):
    """The RM's mean score of greedy answers to the held-out prompts, PPO policy vs SFT policy. Measured with the
    defaults and kl_coef 0.1 at seeds 0/1/2: +1.10/+3.20/+1.28 (kl_coef 0.01: +0.99/+3.17/+1.05); the reward's
    scale is set by the RM (rm/margin_std about 2-3), so 0.5 is a clear gain and half the smallest measured one."""
    m = small["metrics"]
    gain = m["ppo/reward_mean"] - m["sft/reward_mean"]
    assert gain >= 0.5, (m["sft/reward_mean"], m["ppo/reward_mean"])


def test_kl_falls_as_kl_coef_rises_and_sft_rm_run_once(trials, small):
    results = {kl: trials.run(**{"ppo.kl_coef": kl}) for kl in KL_COEFS}
    assert all(r["status"] == "ok" for r in results.values()), {k: r["error"] for k, r in results.items()}
    kls = [results[kl]["metrics"]["ppo/kl_to_ref"] for kl in KL_COEFS]
    # Measured ppo/kl_to_ref for kl_coef 0.01/0.1/1.0 with the defaults: seed 0 0.660/0.817/0.094, seed 1
    # 1.916/1.733/0.181, seed 2 1.786/1.535/0.205. kl_coef 1.0 is far lowest every time; 0.01 vs 0.1 differ by
    # about the estimate's noise on the tiny model, so that pair is allowed KL_NOISE.
    assert kls[2] < kls[1] and kls[2] < kls[0], kls
    assert kls[1] <= kls[0] + KL_NOISE, kls
    # The sweep shares SFT and RM through the stage cache: one key each, built once; PPO once per kl_coef.
    for stage in ("sft", "rm", "eval_sft"):
        assert len({r["timings"][stage]["key"] for r in results.values()}) == 1
    assert len({r["timings"]["ppo"]["key"] for r in results.values()}) == len(KL_COEFS)
    built = [e for e in read_executions(trials.cache.root) if e["status"] == "ok"]
    sft_key, rm_key = small["timings"]["sft"]["key"], small["timings"]["rm"]["key"]
    assert sum(e["key"] == sft_key for e in built) == 1 and sum(e["key"] == rm_key for e in built) == 1


# ---------------------------------------------------------------------------------------------------------
# Determinism, DPO
# ---------------------------------------------------------------------------------------------------------

def _without_timings(d):
    """Wall-clock times (ppo/time_*, time/*, the trainers' train_runtime and *_per_second) are the only thing
    allowed to differ between two runs of one trial."""
    if isinstance(d, dict):
        return {k: _without_timings(v) for k, v in d.items() if "time" not in k and not k.endswith("_per_second")}
    if isinstance(d, list):
        return [_without_timings(v) for v in d]
    return d


def test_same_config_and_seed_give_the_same_trial(builtin_cache, tmp_path):
    cfg = TrialConfig().replace(**TINY)
    first = run_trial(cfg, tmp_path / "a", cache=StageCache(tmp_path / "cache_a"))
    # The second run reads nothing from any cache: every stage is rebuilt from scratch.
    second = run_trial(cfg, tmp_path / "b", cache=StageCache(tmp_path / "cache_b", enabled=False))
    assert first["status"] == second["status"] == "ok", (first["error"], second["error"])
    assert not any(t["cache_hit"] for k, t in second["timings"].items() if k != "total")
    for part in ("metrics", "records", "history"):
        a, b = _without_timings(first[part]), _without_timings(second[part])
        assert a.keys() == b.keys()
        assert a == b, part  # exactly equal: same seed, same thread count, same kernels
    assert first["metrics"]["ppo/steps"] == 2


def test_dpo_trial_reports_dpo_metrics(trials, small):
    r = trials.run(method="dpo", **{"dpo.max_steps": 10})
    assert r["status"] == "ok", r["error"]
    m = r["metrics"]
    for k in ("dpo/rougeL", "dpo/bleu", "dpo/chrf", "dpo/reward_mean", "dpo/response_len", "dpo/train_loss_last"):
        assert isinstance(m.get(k), (int, float)) and math.isfinite(m[k]), k
    assert m["dpo/kl_to_ref"] > 0, "the DPO policy must have moved away from the SFT reference"
    assert not any(k.startswith("ppo/") for k in m)
    assert [x["data_id"] for x in r["records"]["dpo"]] == [x["data_id"] for x in r["records"]["sft"]]
    # DPO starts from the same SFT artifact as the PPO trials (and needs no PPO stage).
    assert r["timings"]["sft"]["key"] == small["timings"]["sft"]["key"] and "ppo" not in r["timings"]


# ---------------------------------------------------------------------------------------------------------
# Failures: recorded, never raised; nothing half-written in the cache
# ---------------------------------------------------------------------------------------------------------

def _no_partial_artifacts(cache: StageCache) -> None:
    root = cache.root
    if not root.exists():
        return
    tmp = [p for p in root.rglob(".tmp-*")]
    assert not tmp, tmp
    for stage_dir in (p for p in root.iterdir() if p.is_dir() and p.name != "uncached"):
        for art in (p for p in stage_dir.iterdir() if p.is_dir()):
            assert (art / COMPLETE).is_file(), f"{art} is an artifact directory without {COMPLETE}"


def _check_failed(trials: Trials, r: dict, error_type: str, stage: str) -> None:
    assert r["status"] == "failed"
    assert r["error"]["type"] == error_type and r["error"]["stage"] == stage, r["error"]
    assert r["error"]["message"]
    assert read_result(trials.run_dir, r["trial_id"]) == json.loads(json.dumps(r))
    assert (result_path(trials.run_dir, r["trial_id"]).parent / "error.txt").is_file()
    assert RESULT_KEYS <= set(r) and r["finished_at"]
    _no_partial_artifacts(trials.cache)


def test_missing_data_directory_fails_the_trial_at_the_data_stage(trials, tmp_path):
    missing = tmp_path / "no_such_data"
    before = len(read_executions(trials.cache.root))
    r = trials.run(**{"data.source": str(missing)})
    _check_failed(trials, r, "DataError", "data")
    assert str(missing) in r["error"]["message"] and "data.source" in r["error"]["message"]
    assert r["metrics"] == {} and len(read_executions(trials.cache.root)) == before  # no stage ran


def test_kl_blow_up_fails_the_trial_at_ppo_and_caches_nothing_of_it(trials, small):
    overrides = {"ppo.kl_stop": KL_STOP_TINY, "ppo.total_episodes": 32}
    r = trials.run(**overrides)
    _check_failed(trials, r, "TrialFailed", "ppo")
    assert "kl_stop" in r["error"]["message"] and "KL blow-up" in r["error"]["message"]
    # The stages before PPO finished (and were reused from the small trial); PPO left nothing behind.
    assert r["timings"]["sft"]["cache_hit"] and r["timings"]["rm"]["cache_hit"] and "ppo" not in r["timings"]
    cfg = trials.config(**overrides)
    key = stage_keys(cfg, trials.cache, r["data"]["fingerprint"])["ppo"]
    assert not trials.cache.path("ppo", key).exists()
    runs = [e for e in read_executions(trials.cache.root) if e["key"] == key]
    assert [e["status"] for e in runs] == ["failed"]
