"""GPU memory estimate use, packing fractions, refusal of trials that cannot fit, dry-run columns."""

from __future__ import annotations

import pytest

from rlhf_ablate.errors import ConfigError
from rlhf_ablate.launch.resources import detect_gpus, estimate_column, estimate_gb, gpu_fraction, trial_resources
from rlhf_ablate.config.sweep import expand, parse_sweep


def _spec(resources=None, **base):
    raw = {"name": "r", "axes": {"lora_rank": {"keys": ["sft.lora_rank", "rm.lora_rank", "ppo.lora_rank"],
                                             "values": [8, 16]}},
           "base": base, "resources": resources or {}}
    return parse_sweep(raw, "<test>")


def test_fraction_rounds_up_to_eighths_and_caps():
    assert gpu_fraction(1.0, [80.0]) == 1 / 8
    assert gpu_fraction(10.1, [80.0]) == 2 / 8
    assert gpu_fraction(20.0, [80.0]) == 2 / 8
    assert gpu_fraction(70.0, [80.0, 24.0]) == 1.0  # smallest GPU decides the fraction
    assert gpu_fraction(11.0, [80.0, 24.0]) == 4 / 8


def test_auto_uses_the_model_estimate():
    spec = _spec()
    trials = expand(spec)
    est = estimate_gb(spec, trials[0])
    assert est is not None and 0 < est < 5  # tiny-llama: the CUDA context dominates
    assert trial_resources(spec, trials[0], [])["gpu"] == 0.0  # no GPU: CPU trial
    r = trial_resources(spec, trials[0], [est * 3.5])
    assert r["gpu"] == pytest.approx(gpu_fraction(est, [est * 3.5])) and r["gpu"] == 3 / 8
    # a larger batch needs more memory and never a smaller fraction
    big = _spec(**{"ppo.rollout_batch_size": 256, "ppo.mini_batch_size": 64, "sft.batch_size": 64})
    assert estimate_gb(big, expand(big)[0]) > est


def test_refuses_a_trial_that_cannot_fit():
    spec = _spec({"memory_gb": 30})
    t = expand(spec)[1]
    with pytest.raises(ConfigError) as e:
        trial_resources(spec, t, [24.0, 16.0])
    msg = str(e.value)
    assert t.trial_id in msg and "30.0 GiB" in msg and "24.0 GiB" in msg
    assert trial_resources(spec, t, [40.0])["gpu"] == 6 / 8


def test_numeric_gpu_is_used_as_given_and_columns():
    spec = _spec({"gpu": 0.5, "cpu": 2})
    trials = expand(spec)
    assert trial_resources(spec, trials[0], [])["gpu"] == 0.5
    cols = estimate_column(_spec({"memory_gb": 30}), trials, gpus=[24.0])
    assert cols["request"] == ["REFUSED (> 24.0 GiB)"] * 2 and cols["est. GPU GiB"] == ["30.00"] * 2


def test_detect_gpus_env_override(monkeypatch):
    monkeypatch.setenv("RLHF_ABLATE_GPUS", "80,40.5")
    assert detect_gpus() == [80.0, 40.5]
    monkeypatch.setenv("RLHF_ABLATE_GPUS", "")
    assert detect_gpus() == []
    monkeypatch.setenv("RLHF_ABLATE_GPUS", "lots")
    with pytest.raises(ConfigError):
        detect_gpus()


@pytest.mark.parametrize("base, key, value", [
    ({}, "eval.max_new_tokens", 17),
    ({}, "ppo.generation_backend", "compiled"),
    ({"method": "dpo"}, "ppo.generation_backend", "compiled"),  # every method's eval decodes with it
    ({}, "rm.ensemble_size", 3),
    ({"rm.ensemble_size": 3}, "ppo.reward", "ensemble_min"),
    ({"rm.ensemble_size": 3}, "ppo.gold", "ensemble"),
    ({"rm.ensemble_size": 3, "ppo.gold": "ensemble"}, "ppo.gold_probe_size", 16),
    ({"method": "dpo"}, "rm.gold", "disjoint"),
])
def test_probe_key_follows_what_sets_the_peak(base, key, value):
    from rlhf_ablate.config import TrialConfig
    from rlhf_ablate.launch.resources import probe_key

    a = TrialConfig().replace(**base)
    assert probe_key(a) != probe_key(a.replace(**{key: value}))
    assert probe_key(a) == probe_key(a.replace(**{"ppo.kl_coef": 0.5}))  # not every key: kl_coef sets no peak
