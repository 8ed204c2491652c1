"""The over-optimization alarm on the built-in tiny model and the bundled Korean data: it fires where a weak proxy
RM is pushed hard (rlhf_ablate/sweeps/overoptimization.yaml) and stays quiet at PPO's default settings with the same
reward models. The configurations are benchmarks/bench_overopt_tiny.py's, which measured the outcome over seeds
0, 1 and 2 (docs/metrics.md, "Over-optimization", states what it saw); these tests run seed 0. One SFT model and
one pair of proxy and gold RMs serve both tests (the stage cache of a session fixture)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRE_SEED = 2                # the seed of the measurement that fired (the others did not; see the docstrings)
MEASURED_FIRE = (8, 20, 24)  # its gold peak, onset and detection steps


@pytest.fixture(scope="session")
def overopt_bench(builtin_cache, tmp_path_factory):
    from rlhf_ablate.run.cache import StageCache

    spec = importlib.util.spec_from_file_location("bench_overopt_tiny", ROOT / "benchmarks" / "bench_overopt_tiny.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path_factory.mktemp("overopt")
    cache = StageCache(out / "stages")
    # The quiet run builds what every test here shares (SFT, the proxy and gold RMs, the base and SFT evals), so
    # each test's own time is its PPO run.
    quiet = bench.run("quiet", FIRE_SEED, out, cache)
    return bench, out, cache, quiet


def test_alarm_fires_on_a_weak_proxy_and_stops_at_the_last_good_checkpoint(overopt_bench):
    """Measured (benchmarks/bench_overopt_tiny.py, seeds 0, 1, 2): at these settings the alarm fired at seed 2 only
    (gold peak at step 8, onset 20, detected 24); seeds 0 and 1 stayed quiet (docs/metrics.md has the curves). So
    this asserts that seed's steps exactly: the run is deterministic on one torch thread. With
    ppo.stop_on_overoptimization the run ends at the detection and keeps the policy of gold's maximum."""
    from rlhf_ablate.run.trial import run_trial

    bench, out, cache, _ = overopt_bench
    cfg = bench.config("fire", FIRE_SEED).replace(**{"ppo.stop_on_overoptimization": True})
    r = run_trial(cfg, out / "runs", cache=cache)
    assert r["status"] == "ok", r.get("error")
    o = r["overoptimization"]
    assert o["onset_step"] is not None, [e["gold/score"] for e in o["evaluations"]]
    assert (o["peak_step"], o["onset_step"], o["detected_step"]) == MEASURED_FIRE
    d = o["detail"]
    assert d["gold_peak"] - d["gold_at_detection"] > 2.5 * d["drop_se"] > 0
    # Stopped at the detection; the artifact is the policy of gold's maximum, which eval then scored.
    assert o["stopped"] and o["kept_step"] == o["peak_step"]
    assert r["metrics"]["ppo/steps"] == o["detected_step"] < 32
    assert r["history"]["ppo"][-1]["step"] == o["detected_step"]
    assert r["history"]["ppo"][-1]["gold/overoptimized"] == 1.0
    assert "ppo/rougeL" in r["metrics"]
    # Every name it reports (metrics, the gold/* step stats that go to W&B) is in the metric registry.
    from rlhf_ablate.metrics.registry import known_metric

    unknown = [k for k in r["metrics"] if not known_metric(k)]
    unknown += [f"ppo/{k}" for row in r["history"]["ppo"] for k in row if k != "step" and not known_metric(f"ppo/{k}")]
    assert not unknown, unknown
    assert r["history"]["ppo"][0]["step"] == 0 and "gold/score" in r["history"]["ppo"][0]
    # The saved adapter is the policy of the peak: answering the probe with it (same sampling seed) gives exactly the
    # gold scores recorded at the peak's evaluation.
    assert _rescore_probe(cfg, r, cache) == pytest.approx(
        next(e for e in o["evaluations"] if e["step"] == o["peak_step"])["gold_per_prompt"], abs=1e-4)


def _rescore_probe(cfg, r, cache) -> list[float]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from rlhf_ablate.data import load_data
    from rlhf_ablate.data.splits import hold_out_probe
    from rlhf_ablate.ppo.gold import GoldProbe, reward_roles
    from rlhf_ablate.ppo.roles import PPOModels

    d = {s: cache.path(v["bucket"], v["key"]) for s, v in r["timings"].items() if isinstance(v, dict) and "key" in v}
    roles = PPOModels(cfg, d["sft"], d["rm"], reward_roles(cfg, {"rm_gold": d["rm_gold"]}))
    saved = load_file(str(d["ppo"] / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(roles.model, saved, adapter_name="policy")
    _, probe_rows = hold_out_probe(load_data(cfg.data).ppo_prompts, cfg.ppo.gold_probe_size, cfg.data.split_seed)
    probe = GoldProbe(cfg, [x.prompt for x in probe_rows])
    probe.evaluate(roles, 0)
    return probe.rows[-1]["gold_per_prompt"]


def test_alarm_stays_quiet_at_default_ppo_settings(overopt_bench):
    """The same SFT model, proxy and gold RMs; PPO at learning rate 5e-4 and KL coefficient 0.1 for 16 steps."""
    row = overopt_bench[3]
    assert row["status"] == "ok", row["error"]
    assert row["onset_step"] is None, row
    assert len(row["gold"]) == 9   # step 0 and every 2 steps


def test_ensemble_reward_trains_on_extra_adapters_of_the_shared_base(overopt_bench):
    """ppo.reward=ensemble_mean_minus_std with rm.ensemble_size=2: the rm_ensemble stage trains member 2 (its own
    seed, the proxy's fold), PPO holds it and the gold RM as frozen adapters beside the trial's RM, and the probe's
    proxy is the combined reward."""
    from rlhf_ablate.files import read_json
    from rlhf_ablate.run.trial import run_trial

    bench, out, cache, _ = overopt_bench
    cfg = bench.config("fire", FIRE_SEED).replace(**{"rm.ensemble_size": 2, "ppo.reward": "ensemble_mean_minus_std",
                                             "ppo.total_episodes": 32, "ppo.gold_every": 1})
    r = run_trial(cfg, out / "runs", cache=cache)
    assert r["status"] == "ok", r.get("error")
    assert list(r["timings"])[:4] == ["sft", "rm", "rm_gold", "rm_ensemble"]
    ens = cache.path("rm", r["timings"]["rm_ensemble"]["key"])
    member = read_json(ens / "members" / "1" / "rm_info.json")
    assert member["seed"] == cfg.seed + 1000 and member["fold"] == "proxy"
    info = read_json(cache.path("ppo", r["timings"]["ppo"]["key"]) / "ppo_info.json")
    assert info["shared_base"] and info["reward_shared"] and info["extra_rewards"] == ["gold", "reward_1"]
    assert info["reward"] == "ensemble_mean_minus_std"
    assert [row["step"] for row in r["overoptimization"]["evaluations"]] == [0, 1, 2]
