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

from rlhf_ablate.run.cache import StageCache, read_executions
from rlhf_ablate.rundir import default_cache_root
from rlhf_ablate.config.sweep import expand, parse_sweep
from rlhf_ablate.launch.tune import run_sweep
from rlhf_ablate.rundir import FINISHED, read_result

# One xdist group for the tests that start Ray or use the Slurm cluster: they run one after another on one worker
# while the other worker runs the rest (README: `pytest -n 2 --dist loadgroup`).
pytestmark = pytest.mark.xdist_group("cluster")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from rlhf_ablate.launch.tune import _init_ray, _setup_env

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
    """SFT and RM depend on the seed only, PPO on kl_coef: the cache must run SFT/RM once per seed. PPO runs 3 steps
    (total_episodes / rollout_batch_size when ppo.lora_rank is not the default) with objective/scores = 1 - kl_coef,
    and appends every step it computes to trials/<id>/steps.txt before reporting it."""
    from rlhf_ablate.files import write_json as write_json_atomic

    run_dir = Path(run_dir)
    done = read_result(run_dir, trial.trial_id)
    if done and done["status"] == "ok":
        return done
    cache = StageCache(default_cache_root(spec), enabled=use_cache)
    kl = trial.config.ppo.kl_coef
    ppo = trial.config.ppo
    steps = 3 if ppo.lora_rank == 8 else ppo.total_episodes // ppo.rollout_batch_size
    step_log = run_dir / "trials" / trial.trial_id / "steps.txt"
    step_log.parent.mkdir(parents=True, exist_ok=True)
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
                    for step in range(1, steps + 1):
                        with open(step_log, "a") as f:
                            f.write(f"{step}\n")
                        on_step({"stage": "ppo", "step": step, "steps": steps, "ppo/objective/kl": kl * step,
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
    write_json_atomic(run_dir / "trials" / trial.trial_id / "result.json", result)
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


def test_optuna_search_with_asha(tmp_path, ray_session):
    spec = _kl_spec(tmp_path, axes={}, search={"type": "optuna", "metric": "ppo/reward_mean", "mode": "max",
                                               "num_samples": 3, "max_concurrent": 2,
                                               "space": {"ppo.kl_coef": {"loguniform": [0.001, 0.5]}}},
                    scheduler={"type": "asha", "metric": "ppo/objective/scores", "mode": "max", "grace_period": 2})
    run_dir = tmp_path / "run"
    out = io.StringIO()
    assert run_sweep(spec, run_dir, trial_fn=fake_trial, report=False, stream=out) == 0, out.getvalue()
    results = [json.loads(p.read_text()) for p in (run_dir / "trials").glob("*/result.json")]
    assert len(results) == 3 and all(r["status"] in FINISHED for r in results)
    kls = [r["config"]["ppo.kl_coef"] for r in results]
    assert len(set(kls)) == 3 and all(0.001 <= k <= 0.5 for k in kls)
    assert all(r["axes"] == {"ppo.kl_coef": r["config"]["ppo.kl_coef"]} for r in results)
    # rerun: the three finished samples are fed to the searcher, nothing new is run
    n_exec = len(read_executions(tmp_path / "cache"))
    assert run_sweep(spec, run_dir, trial_fn=fake_trial, report=False, stream=io.StringIO()) == 0
    assert len(read_executions(tmp_path / "cache")) == n_exec


def test_asha_rungs_count_ppo_steps_and_stops_are_deterministic(tmp_path, ray_session):
    """ASHA's grace period and rungs count PPO steps (time_attr=ppo_step), not stage events: with grace_period 2
    the trials below the running median end exactly at PPO step 2, where the report that triggered the stop parked
    them; nothing of a stopped trial runs after the sweep returns, so a rerun executes nothing."""
    sched = {"type": "asha", "metric": "ppo/objective/scores", "mode": "max", "grace_period": 2,
             "reduction_factor": 2}
    # 8 PPO steps; one trial at a time in grid order, best first: the first sets every rung, the others fall below
    # the cutoff of the first rung (step 2).
    spec = _kl_spec(tmp_path, axes={"ppo.kl_coef": [0.01, 0.2, 0.4]}, scheduler=sched,
                    base={"ppo.total_episodes": 256, "ppo.rollout_batch_size": 32, "ppo.lora_rank": 4})
    run_dir = tmp_path / "run"
    out = io.StringIO()
    assert run_sweep(spec, run_dir, trial_fn=fake_trial, report=False, stream=out, max_concurrent=1) == 0, \
        out.getvalue()
    trials = expand(spec)
    res = [read_result(run_dir, t.trial_id) for t in trials]
    steps = [[int(x) for x in (run_dir / "trials" / t.trial_id / "steps.txt").read_text().split()] for t in trials]
    assert [r["status"] for r in res] == ["ok", "stopped", "stopped"], out.getvalue()
    assert steps[0] == list(range(1, 9))  # the best trial ran all 8 steps and its eval
    for r, s in zip(res[1:], steps[1:]):
        assert r["error"]["type"] == "EarlyStopped" and r["error"]["ppo_step"] == 2, r["error"]
        assert s == [1, 2]  # computed no step after the one that was judged
    assert "stopped early by asha at PPO step 2" in out.getvalue()
    ex = read_executions(tmp_path / "cache")
    assert sorted((e["stage"], e["status"]) for e in ex if e["stage"] == "ppo") == \
        [("ppo", "interrupted"), ("ppo", "interrupted"), ("ppo", "ok")]
    # The rerun runs nothing: ok and stopped trials are finished.
    assert run_sweep(spec, run_dir, trial_fn=fake_trial, report=False, stream=io.StringIO()) == 0
    assert read_executions(tmp_path / "cache") == ex


def warm_trial(spec, trial, run_dir, *, use_cache=True, on_step=None):
    """Records the worker process and what the previous trial in it left behind (see the test below)."""
    import gc

    imported_before = "torch" in sys.modules  # trial 1 of a worker pays the import, later ones find it
    import torch

    class Garbage:  # noqa: D401 - a trial's model stand-in, kept alive only by a reference cycle
        pass

    gc.disable()  # only an explicit collection (the worker's release_memory) frees cycles now
    left = sum(1 for o in gc.get_objects() if type(o).__name__ == "Garbage")
    g = Garbage()
    g.self, g.weights = g, torch.zeros(1000)
    from rlhf_ablate.files import write_json

    result = {"trial_id": trial.trial_id, "sweep": spec.name, "index": trial.index, "seed": trial.seed,
              "axes": trial.axes, "config": trial.config.flat(), "status": "ok", "error": None,
              "metrics": {"pid": os.getpid(), "torch_imported_before": int(imported_before), "garbage_left": left}}
    write_json(Path(run_dir) / "trials" / trial.trial_id / "result.json", result)
    return result


def test_warm_worker_runs_trials_in_one_process_and_frees_their_memory(tmp_path, ray_session):
    spec = _kl_spec(tmp_path)
    run_dir = tmp_path / "run"
    assert run_sweep(spec, run_dir, trial_fn=warm_trial, report=False, stream=io.StringIO(), max_concurrent=1) == 0
    res = [read_result(run_dir, t.trial_id)["metrics"] for t in expand(spec)]
    assert len({m["pid"] for m in res}) == 1 and res[0]["pid"] != os.getpid()  # one reused worker
    assert [m["torch_imported_before"] for m in res[1:]] == [1, 1]  # imports paid once per worker
    assert [m["garbage_left"] for m in res] == [0, 0, 0]  # each trial's cycles were collected before the next


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


# ---------------------------------------------------------------------------------------------------------
# The real trial (tiny built-in model, bundled Korean data), shortened through overrides
# ---------------------------------------------------------------------------------------------------------

TINY = {"model.quantization": "none", "sft.max_steps": 2, "rm.max_steps": 2, "sft.batch_size": 8,
        "rm.batch_size": 8, "ppo.total_episodes": 8, "ppo.rollout_batch_size": 4, "ppo.mini_batch_size": 4,
        "ppo.max_new_tokens": 8, "eval.max_new_tokens": 8, "data.max_sft": 16, "data.max_rm_groups": 8,
        "data.max_ppo_prompts": 8, "data.max_eval": 4}


@pytest.mark.slow
def test_real_kl_sweep_reuses_sft_rm_isolates_failure_and_logs_wandb(tmp_path, ray_session, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-xyz-0123456789")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    from rlhf_ablate.run.tracking import find_offline_runs, read_offline_run

    raw = {"name": "kl_real", "axes": {"ppo.kl_coef": [0.01, 0.1, 1.0]}, "seeds": [0], "base": TINY,
           "cache_dir": str(tmp_path / "cache"), "tracking": {"wandb": "offline"},
           # kl_coef=1.0 is made to diverge: the KL guard ends it as failed at its first PPO step
           "overrides": [{"when": {"ppo.kl_coef": 1.0}, "set": {"ppo.kl_stop": -1.0}}]}
    spec = parse_sweep(raw, str(tmp_path / "kl_real.yaml"))
    run_dir = tmp_path / "run"
    out = io.StringIO()
    rc = run_sweep(spec, run_dir, report=False, stream=out, max_concurrent=2)
    text = out.getvalue()
    trials = expand(spec)
    res = {t.axes["ppo.kl_coef"]: read_result(run_dir, t.trial_id) for t in trials}
    assert rc == 1, text
    assert res[0.01]["status"] == "ok" and res[0.1]["status"] == "ok", text
    assert res[1.0]["status"] == "failed" and res[1.0]["error"]["type"] == "TrialFailed"
    assert "KL blow-up" in res[1.0]["error"]["message"] and res[1.0]["error"]["stage"] == "ppo"

    # SFT and RM ran once for the three kl_coef values: one execution each, cache hits in the other trials
    ex = [e for e in read_executions(tmp_path / "cache") if e["status"] == "ok"]
    assert sum(e["stage"] == "sft" for e in ex) == 1 and sum(e["stage"] == "rm" for e in ex) == 1
    assert sorted(r["timings"]["sft"]["cache_hit"] for r in res.values()) == [False, True, True]
    assert sorted(r["timings"]["rm"]["cache_hit"] for r in res.values()) == [False, True, True]
    assert len({r["timings"]["ppo"]["key"] for r in res.values() if "ppo" in r["timings"]}) == 2
    assert "ppo step" in text and "FAILED TrialFailed" in text

    # W&B offline: one run per trial, grouped by sweep, tags = axes, per-step PPO metrics read back from disk
    runs = {r["name"]: r for r in map(read_offline_run, find_offline_runs(run_dir / "wandb"))}
    assert set(runs) == {t.trial_id for t in trials}
    ok = runs[trials[0].trial_id]
    assert ok["group"] == "kl_real" and ok["tags"] == ["ppo.kl_coef=0.01"]
    assert ok["config"]["ppo.kl_coef"] == 0.01 and ok["summary"]["status"] == "ok"
    kl_hist = [h["ppo/objective/kl"] for h in ok["history"] if "ppo/objective/kl" in h]
    assert [h["ppo/step"] for h in ok["history"] if "ppo/objective/kl" in h] == [1, 2]
    assert kl_hist == pytest.approx([row["objective/kl"] for row in res[0.01]["history"]["ppo"]])
    assert ok["summary"]["ppo/objective/kl"] == pytest.approx(res[0.01]["metrics"]["ppo/objective/kl"])
    assert "ppo/samples" in ok["tables"] and ok["tables"]["ppo/samples"]["data"]
    assert runs[trials[2].trial_id]["summary"]["status"] == "failed"
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and b"secret-xyz" in p.read_bytes()]
    assert leaked == []


@pytest.mark.slow
def test_sigkill_driver_then_rerun_finishes_each_trial_once(tmp_path):
    import psutil
    import yaml

    sweep_file = tmp_path / "kill.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "kill", "axes": {"ppo.kl_coef": [0.01, 0.1, 1.0]}, "seeds": [0], "base": TINY,
        "cache_dir": str(tmp_path / "cache"), "tracking": {"wandb": "disabled"}}))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhf_ablate", "sweep", str(sweep_file), "--out", str(run_dir), "--no-report",
           "--max-concurrent", "1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ids = None
    try:
        deadline = time.time() + 150
        while True:
            assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished in time"
            if ids is None and (run_dir / "sweep.json").exists():
                ids = [t["trial_id"] for t in json.loads((run_dir / "sweep.json").read_text())["trials"]]
            if ids and any((read_result(run_dir, i) or {}).get("status") == "ok" for i in ids):
                break
            time.sleep(0.2)
        family = psutil.Process(p.pid).children(recursive=True)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver's whole process group, as `kill -9 -PGID` would
        p.wait()
    for child in family:  # Ray daemons that left the process group: end them by pid
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    log.close()
    before = {i: read_result(run_dir, i) for i in ids}
    finished_before = {i: r["started_at"] for i, r in before.items() if r and r["status"] == "ok"}
    assert 1 <= len(finished_before) < 3

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    after = {i: read_result(run_dir, i) for i in ids}
    assert all(r["status"] == "ok" for r in after.values())
    assert {i: after[i]["started_at"] for i in finished_before} == finished_before  # not rerun
    ok_builds = [(e["stage"], e["key"]) for e in read_executions(tmp_path / "cache") if e["status"] == "ok"]
    assert len(ok_builds) == len(set(ok_builds))  # no finished stage was ever computed twice
    assert sum(s == "sft" for s, _ in ok_builds) == 1 and sum(s == "ppo" for s, _ in ok_builds) == 3
    assert f"{len(finished_before)} already done" in second.stdout


def test_asha_stops_members_of_trial_groups(tmp_path, ray_session, builtin_cache):
    """Real trials in trial groups of two (rlhf_ablate/run/groups.py) under ASHA, judged on the fixed KL coefficient
    (mode max, so the decisions follow the config): the second group's first report at PPO step 2, its builder's
    own (kl_coef 0.02 or 0.03), falls below the first group's rung (1.0, 0.01), so the builder's trial is stopped
    there; it leaves the group and trains the other member on (that member is stopped at step 2, or runs on: live
    or from its history). The sweep returns (Tune waits for a stopped builder, launch/tune.py: _wait_for_thread; a reused
    worker waiting for it before waking it was a deadlock), no group file is left behind, and a rerun runs nothing."""
    small = {"sft.max_steps": 2, "rm.max_steps": 2, "data.max_sft": 8, "data.max_rm_groups": 8,
             "data.max_ppo_prompts": 16, "data.max_eval": 2, "model.max_length": 96, "ppo.total_episodes": 24,
             "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 4, "ppo.rollout_micro_batch_size": 4,
             "ppo.max_new_tokens": 8, "ppo.max_prompt_length": 40, "eval.max_new_tokens": 4}
    spec = _kl_spec(tmp_path, base=small, axes={"ppo.kl_coef": [1.0, 0.01, 0.02, 0.03]},
                    resources={"group_size": 2},
                    scheduler={"type": "asha", "metric": "ppo/objective/kl_coef", "mode": "max", "grace_period": 2,
                               "reduction_factor": 2})
    run_dir = tmp_path / "run"
    out = io.StringIO()
    run_sweep(spec, run_dir, report=False, stream=out, max_concurrent=2)
    trials = expand(spec)
    res = [read_result(run_dir, t.trial_id) for t in trials]
    assert res[0]["status"] == "ok" and res[1]["status"] in FINISHED, out.getvalue()
    assert [r["status"] for r in res[2:]].count("stopped") >= 1, out.getvalue()
    assert min(r["error"]["ppo_step"] for r in res[2:] if r["status"] == "stopped") == 2, out.getvalue()
    # Which trial builds a group, and whether two members that reach PPO at the same moment group at all (each takes
    # its own lock first, then neither can take the other's: both train alone), depends on timing; the records do not.
    assert not [p.name for p in (tmp_path / "cache" / "ppo").iterdir() if ".group-" in p.name]
    n_exec = len(read_executions(tmp_path / "cache"))
    assert run_sweep(spec, run_dir, report=False, stream=io.StringIO()) == 0
    assert len(read_executions(tmp_path / "cache")) == n_exec
