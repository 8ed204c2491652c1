"""Ray Tune driver on CPU: real Ray Tune sweeps, stage reuse, failure isolation, resume, SIGKILL, W&B files.

One Ray session is shared by the in-process tests (ray.init costs ~4 s on 2 cores); the SIGKILL test runs the CLI
in a subprocess with its own Ray.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_ablate.cache import StageCache, default_cache_root, read_executions
from rlhf_ablate.sweep import expand, parse_sweep
from rlhf_ablate.tune import FINISHED, read_result, run_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from rlhf_ablate.tune import _init_ray, _setup_env

    _setup_env(None)
    _init_ray(None, 0)
    # The fake trial function lives in this test module, which Ray workers cannot import: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


# ---------------------------------------------------------------------------------------------------------
# A fake trial with the real contract (stage cache, result.json, on_step events): fast orchestration tests
# ---------------------------------------------------------------------------------------------------------

def fake_trial(spec, trial, run_dir, *, use_cache=True, on_step=None):
    """SFT and RM depend on the seed only, PPO on kl_coef: the cache must run SFT/RM once per seed."""
    from rlhf_ablate.trial import _write_atomic

    run_dir = Path(run_dir)
    done = read_result(run_dir, trial.trial_id)
    if done and done["status"] == "ok":
        return done
    cache = StageCache(default_cache_root(spec), enabled=use_cache)
    kl = trial.config.ppo.kl_coef
    result = {"trial_id": trial.trial_id, "sweep": spec.name, "index": trial.index, "seed": trial.seed,
              "axes": trial.axes, "config": trial.config.flat(), "status": "ok", "error": None, "metrics": {},
              "timings": {}, "started_at": time.time()}
    try:
        for stage, payload in (("sft", {"seed": trial.seed}), ("rm", {"seed": trial.seed}),
                               ("ppo", {"seed": trial.seed, "kl": kl})):
            on_step({"stage": stage, "event": "start"})

            def build(d, stage=stage):
                time.sleep(0.3)
                if stage == "ppo":
                    for step in range(1, 4):
                        on_step({"stage": "ppo", "step": step, "steps": 3, "ppo/objective/kl": kl * step,
                                 "ppo/objective/scores": 1.0 - kl})
                    flag = Path(spec.cache_dir) / "fail-once"
                    if kl == 1.0 and not flag.exists():
                        flag.write_text("x")
                        raise FloatingPointError("loss became nan at step 3")
                (d / "out.txt").write_text(stage)

            r = cache.run(stage, cache.key(stage, payload), build)
            result["timings"][stage] = r.timing()
            on_step({"stage": stage, "event": "end", "cache_hit": r.hit, "seconds": r.seconds})
        result["metrics"] = {"ppo/reward_mean": 1.0 - kl}
    except Exception as e:  # noqa: BLE001 - the contract: record, never raise
        result.update(status="failed", error={"type": type(e).__name__, "message": str(e), "stage": "ppo"})
    _write_atomic(run_dir / "trials" / trial.trial_id / "result.json", result)
    return result


def _kl_spec(tmp_path, **extra):
    raw = {"name": "kl_fake", "axes": {"ppo.kl_coef": [0.01, 0.1, 1.0]}, "seeds": [0],
           "tracking": {"wandb": "disabled"}, "cache_dir": str(tmp_path / "cache"), **extra}
    return parse_sweep(raw, str(tmp_path / "kl_fake.yaml"))


def test_grid_sweep_cache_failure_isolation_and_rerun(tmp_path, ray_session):
    spec = _kl_spec(tmp_path)
    run_dir = tmp_path / "run"
    out = io.StringIO()
    rc = run_sweep(spec, run_dir, trial_fn=fake_trial, report=False, stream=out, max_concurrent=2)
    text = out.getvalue()
    assert rc == 1
    trials = expand(spec)
    results = {t.axes["ppo.kl_coef"]: read_result(run_dir, t.trial_id) for t in trials}
    assert [results[k]["status"] for k in (0.01, 0.1, 1.0)] == ["ok", "ok", "failed"]
    assert results[1.0]["error"]["type"] == "FloatingPointError" and "nan" in results[1.0]["error"]["message"]
    ex = [e for e in read_executions(tmp_path / "cache")]
    counts = {s: sum(1 for e in ex if e["stage"] == s) for s in ("sft", "rm", "ppo")}
    assert counts == {"sft": 1, "rm": 1, "ppo": 3}  # SFT and RM once for three kl_coef values
    hits = sum(r["timings"]["sft"]["cache_hit"] for r in results.values())
    assert hits == 2
    sweep = json.loads((run_dir / "sweep.json").read_text())
    assert [t["trial_id"] for t in sweep["trials"]] == [t.trial_id for t in trials]
    # live lines: stage events, PPO steps with the key metric, done / failed, and the summary with the path
    assert "ppo step 3/3 objective/scores=" in text and "(cache hit)" in text
    assert "FAILED FloatingPointError" in text and f"results: {run_dir / 'trials'}" in text
    assert all(len(line) <= 200 for line in text.splitlines())

    # Rerunning the same command: ok trials are not rerun, the failed one is retried (and now succeeds).
    ok_started = {k: results[k]["started_at"] for k in (0.01, 0.1)}
    out2 = io.StringIO()
    assert run_sweep(spec, run_dir, trial_fn=fake_trial, report=False, stream=out2, resume=True) == 0
    again = {t.axes["ppo.kl_coef"]: read_result(run_dir, t.trial_id) for t in trials}
    assert all(r["status"] == "ok" for r in again.values())
    assert {k: again[k]["started_at"] for k in (0.01, 0.1)} == ok_started
    ex2 = read_executions(tmp_path / "cache")
    assert [e["stage"] for e in ex2[len(ex):]] == ["ppo"]  # only the failed trial's PPO ran again
    assert "2 already done, 1 failed before and retried" in out2.getvalue()


def test_resume_without_a_sweep_is_refused(tmp_path):
    from rlhf_ablate.errors import ConfigError

    with pytest.raises(ConfigError, match="no sweep to resume"):
        run_sweep(_kl_spec(tmp_path), tmp_path / "nothing", resume=True, trial_fn=fake_trial)


def test_impossible_trial_refused_before_launch(tmp_path, monkeypatch):
    from rlhf_ablate.errors import ConfigError

    monkeypatch.setenv("RLHF_ABLATE_GPUS", "8")
    spec = _kl_spec(tmp_path, resources={"memory_gb": 20})
    with pytest.raises(ConfigError, match="Refused before launch"):
        run_sweep(spec, tmp_path / "run", trial_fn=fake_trial, report=False)
    assert not (tmp_path / "run" / "trials").exists()
