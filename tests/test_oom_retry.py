"""Out-of-memory handling on the CPU (rlhf_ablate/runtime.py: adapt_micro_batch): a forward raises the exception a
CUDA allocator raises (``torch.OutOfMemoryError``) whenever its batch is larger than a limit, and

- PPO's update halves its micro-batch and gets the same numbers as a run at the smaller micro-batch from the start
  (accumulation keeps the effective minibatch); scoring halves the rollout micro-batch;
- a TRL stage (SFT) restarts at half the batch and twice the accumulation, and result.json records it;
- a stage that does not fit at a micro-batch of 1 fails the trial, naming the stage, the estimate and the peak;
- the progress line says so.
"""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*kernels.*")

FAMILY = "llama-3.2-1b"


def _oom_above(module: torch.nn.Module, limit: int):
    """A pre-hook that raises torch.OutOfMemoryError when ``module`` gets more than ``limit`` rows."""
    def hook(_m, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is not None and x.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {x.shape[0]} rows > {limit})")
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_smaller_micro_keeps_a_divisor_of_the_batch():
    from rlhf_ablate.runtime import smaller_micro

    assert [smaller_micro(m) for m in (16, 5, 2, 1)] == [8, 2, 1, 1]
    assert smaller_micro(6, total=6) == 3 and smaller_micro(3, total=6) == 1  # 6 = 3 x 2 = 1 x 6, never 2 x 3 + 0
    assert smaller_micro(12, total=12) == 6 and smaller_micro(8, total=12) == 4


def test_retry_records_and_fails_at_one_with_the_peak():
    from rlhf_ablate.runtime import MicroBatchOutOfMemory, adapt_micro_batch, recording_retries

    seen = []

    def attempt(m):
        seen.append(m)
        if m > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return m

    with recording_retries() as rec:
        assert adapt_micro_batch("sft", 8, attempt, total=8) == 2
    assert seen == [8, 4, 2] and rec == [{"stage": "sft", "from": 8, "to": 4}, {"stage": "sft", "from": 4, "to": 2}]
    with pytest.raises(MicroBatchOutOfMemory, match=r"ppo \(update\): out of memory at a micro-batch of 1 "
                                                    r"\(measured peak not measured on cpu\)"):
        adapt_micro_batch("ppo", 2, lambda m: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), phase="update")


def test_progress_line_says_the_micro_batch_was_halved():
    from types import SimpleNamespace

    from rlhf_ablate.launch.progress import LiveLines

    spec = SimpleNamespace(scheduler=SimpleNamespace(type="fifo"))
    lines = LiveLines(spec, None, 2, lookup=lambda *_: None)
    trial = SimpleNamespace(trial_id="abcdef123", index=0, axes={"ppo.kl_coef": 0.1}, seed=0)
    text = lines.line(trial, {"event": "oom_retry", "stage": "ppo", "phase": "update", "from": 4, "to": 2})
    assert text == "[abcdef 1/2 kl_coef=0.1 seed=0] ppo update: out of memory at micro-batch 4; retrying at 2"


@pytest.fixture(scope="module")
def llama(arch_trials):
    """The unquantized Llama-shaped trial tests/test_ppo_loop.py runs too (memoised: one run per session)."""
    r = arch_trials.run(FAMILY, "none")
    assert r["status"] == "ok", r["error"]
    return arch_trials, r


def _update(cfg, roles, b, sc):
    from rlhf_ablate.ppo import math as pm
    from rlhf_ablate.ppo.loop import ppo_update

    torch.manual_seed(0)
    adv = pm.masked_whiten(torch.randn(b["rmask"].shape, generator=torch.Generator().manual_seed(0)), b["rmask"])
    opt = torch.optim.AdamW(roles.trainable_parameters(), lr=cfg.ppo.learning_rate)
    stats = ppo_update(roles, opt, b, sc, adv, sc["old_values"] + 0.5, cfg.ppo, torch.Generator().manual_seed(0))
    return stats, {n: p.detach().clone() for n, p in roles.model.named_parameters() if p.requires_grad}


def test_ppo_update_and_scoring_retry_at_half_the_micro_batch(llama):
    from rlhf_ablate.data import load_data
    from rlhf_ablate.ppo.loop import rollout_adaptive
    from rlhf_ablate.ppo.rollout import build_batch, score_batch
    from rlhf_ablate.runtime import recording_retries

    # mini_batch_size 4, grad_accum 2: train micro-batch 2 (conftest.ArchTrials.TRIAL); the reference runs at 1.
    cfg, roles = llama[0].ppo_models(FAMILY, llama[1])
    assert roles.plan.train_micro == 2 and roles.plan.rollout_micro == 4
    prompts = [x.prompt for x in load_data(cfg.data).ppo_prompts][:8]
    torch.manual_seed(0)
    b = build_batch(roles.tokenizer, prompts, roles.generate(prompts), "cpu")
    sc = score_batch(roles, b, cfg.ppo.temperature)

    body = roles.model.get_base_model().model
    handle = _oom_above(body, 2)
    with recording_retries() as rec:
        sc_retried = rollout_adaptive(roles, "scoring", lambda: score_batch(roles, b, cfg.ppo.temperature))
    handle.remove()
    assert rec == [{"stage": "ppo", "phase": "scoring", "from": 4, "to": 2}] and roles.plan.rollout_micro == 2
    for k in sc:  # no accumulation in scoring: the same numbers at any micro-batch
        torch.testing.assert_close(sc_retried[k], sc[k], rtol=1e-5, atol=1e-6)

    handle = _oom_above(body, 1)
    with recording_retries() as rec:
        stats, params = _update(cfg, roles, b, sc)
    handle.remove()
    assert rec == [{"stage": "ppo", "phase": "update", "from": 2, "to": 1}] and roles.plan.train_micro == 1

    ref_cfg, ref_roles = llama[0].ppo_models(FAMILY, llama[1], **{"ppo.grad_accum": 4})
    assert ref_roles.plan.train_micro == 1
    ref_stats, ref_params = _update(ref_cfg, ref_roles, b, sc)
    assert len(stats) == len(ref_stats) == 8  # 2 minibatches x 4 passes of 1 rollout, no failed pass left over
    assert stats[0]["ratio_min"] == 1.0 == stats[0]["ratio_max"]
    for s, r in zip(stats, ref_stats):
        for k in ("loss/policy", "loss/value", "ratio_mean", "grad_norm"):
            if k in r:
                assert s[k] == pytest.approx(r[k], rel=1e-5, abs=1e-6), (k, s, r)
    assert params.keys() == ref_params.keys()
    for n in params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gold_probe_generation_retries_from_the_probe_seed(llama):
    """The gold probe's generation runs out of memory above 2 rows: it reruns at 2, reseeded inside the attempt, and
    its numbers equal a probe run at a rollout micro-batch of 2 from the start (rlhf_ablate/ppo/gold.py)."""
    from rlhf_ablate.data import load_data
    from rlhf_ablate.ppo.gold import GoldProbe
    from rlhf_ablate.runtime import recording_retries

    class Probe(GoldProbe):  # gold = the trial's RM: these roles have no gold RM, and the retry path is the same
        gold_names = ["reward"]

    cfg, roles = llama[0].ppo_models(FAMILY, llama[1])
    assert roles.plan.rollout_micro == 4
    prompts = [x.prompt for x in load_data(cfg.data).ppo_prompts][:8]
    handle = _oom_above(roles.model.get_base_model().model, 2)
    torch.manual_seed(123)
    with recording_retries() as rec:
        retried = Probe(cfg, prompts)
        row = retried.evaluate(roles, 0)
    handle.remove()
    after_retry = torch.rand(3)  # the probe's forked RNG leaves the caller's stream alone, retry or not
    assert rec == [{"stage": "ppo", "phase": "probe_generation", "from": 4, "to": 2}] and roles.plan.rollout_micro == 2
    torch.manual_seed(123)
    ref = Probe(cfg, prompts)
    ref_row = ref.evaluate(roles, 0)
    torch.testing.assert_close(torch.rand(3), after_retry)
    assert row == ref_row and retried.rows == ref.rows


def test_trl_stage_retries_then_a_stage_that_never_fits_fails_the_trial(llama, tmp_path):
    """SFT runs out of memory above 2 rows (sft.batch_size 4: it reruns at 2 with 2 accumulation steps); the reward
    model runs out of memory at any size, so the trial fails at rm with the estimate and the peak in its error."""
    from rlhf_ablate.files import read_json
    from rlhf_ablate.run.cache import StageCache
    from rlhf_ablate.run.trial import run_trial
    from rlhf_ablate.runtime import StageHooks, observe_stages

    at, _ = llama
    cfg = at.config(FAMILY, "none")
    batches = []

    events: list[dict] = []

    class Hooks(StageHooks):
        def model_ready(self, *models):
            stage = [e["stage"] for e in events if e.get("event") == "start"][-1]
            m = models[0]
            _oom_above(m.get_base_model() if hasattr(m, "get_base_model") else m, 0 if stage == "rm" else 2)
            batches.append(stage)

    with observe_stages(Hooks()):
        result = run_trial(cfg, tmp_path / "runs", cache=StageCache(tmp_path / "stages"), on_step=events.append)
    assert result["status"] == "failed" and result["error"]["stage"] == "rm", result["error"]
    assert batches == ["sft", "sft", "rm", "rm", "rm"]  # sft at 4 then 2; rm at 4, 2 and 1
    assert result["timings"]["sft"]["oom_retries"] == [{"stage": "sft", "from": 4, "to": 2}]
    on_disk = read_json(tmp_path / "runs" / "trials" / result["trial_id"] / "result.json")
    assert on_disk["timings"]["sft"]["oom_retries"] == [{"stage": "sft", "from": 4, "to": 2}]
    msg = result["error"]["message"]
    assert "rm: out of memory at a micro-batch of 1" in msg and "not measured on cpu" in msg, msg
    assert "the memory estimate for stage rm:" in msg and "GiB of tensors estimated on cpu" in msg, msg
    assert result["error"]["oom_retries"][-1] == {"stage": "rm", "from": 2, "to": 1}
    assert [e["to"] for e in events if e.get("event") == "oom_retry"] == [2, 2, 1]


def test_memory_benchmark_slopes_on_synthetic_peaks():
    """benchmarks/bench_memory_slopes.py: slope_ratios differences a 2 x 2 grid of peaks, so the constant part (the
    weights) cancels and a 2x error in the growing term shows as a ratio of 2, whatever the total."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_memory_slopes import slope_ratios

    weights = 5e9
    measured = {(b, t): weights + 1000 * b * t + 7 * b for b in (1, 2) for t in (64, 128)}
    est = {(b, t): 2 * weights + 2000 * b * t + 7 * b for b in (1, 2) for t in (64, 128)}
    r = slope_ratios(measured, est)
    assert r["per_sequence_measured"] == 1000 * 64 + 7 and r["per_token_measured"] == 1000
    assert r["per_token_ratio"] == 2.0 and r["per_sequence_ratio"] == pytest.approx((2000 * 64 + 7) / (1000 * 64 + 7))
    assert slope_ratios(measured, measured)["per_token_ratio"] == 1.0
