"""A real Slurm run: submit a tiny sweep as an array job plus its dependent report job, wait for both, and check
that the results match a Ray-path run of the same sweep (same trial ids, same metrics). A second sweep has a trial
made to fail and a task warned of its time limit: the report job still runs (afterany) and lists both failures,
and submitting the sweep again resumes the timed-out trial from the stage cache.

Needs a running Slurm cluster; CI starts a single-node one with .ci/start_slurm.sh. Skipped when `sinfo` does not
answer or no node is up. About 2-4 minutes on 2 CPU cores (two short CPU trials on each path, run side by side).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_ablate.run.cache import read_executions
from rlhf_ablate.config import parse_cli_overrides
from rlhf_ablate.config.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parent.parent

# Two kl_coef values share SFT and RM (one build, the other task waits on the stage lock and reuses it); the
# overrides keep every stage to a few optimizer steps on the built-in tiny model, and go through the CLI so the
# test also covers how they are carried into the array script.
SWEEP = """\
name: slurm_ci
version: 1
description: two-trial kl_coef sweep for the Slurm integration test
base:
  model.quantization: none
axes:
  ppo.kl_coef: [0.05, 0.5]
seeds: [0]
resources: {cpu: 1, gpu: 0}
tracking: {wandb: disabled}
slurm: {max_concurrent: 2, time: "00:15:00"}
"""
OVERRIDES = ["sft.max_steps=2", "rm.max_steps=2", "ppo.total_episodes=8", "ppo.rollout_batch_size=4",
             "ppo.mini_batch_size=4", "ppo.max_new_tokens=8", "eval.max_new_tokens=8", "data.max_sft=16",
             "data.max_rm_groups=8", "data.max_ppo_prompts=8", "data.max_eval=4"]
DEADLINE_S = 420
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


def _cluster_up() -> str | None:
    """None if a Slurm node is ready, else why the test is skipped."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm client tools not installed (CI runs .ci/start_slurm.sh)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return f"no Slurm node up (sinfo: {proc.stdout.strip() or proc.stderr.strip()})"
    return None


# One xdist group for the tests that start Ray or use the Slurm cluster: they run one after another on one worker
# while the other worker runs the rest (README: `pytest -n 2 --dist loadgroup`).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("cluster")]


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["RLHF_ABLATE_CACHE"] = str(cache)
    env["WANDB_MODE"] = "disabled"
    return env


def _job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job (or array task) id -> (state, reason) for every listed job, finished ones included. Accounting is off
    on the CI cluster, so finished jobs are only visible here for MinJobAge seconds (600 in .ci/start_slurm.sh)."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        jid, state, reason = line.strip().split("|", 2)
        out[jid] = (state, reason)
    return out


def _wait(job_ids: list[str], expect: int, logs: Path, deadline: float) -> dict[str, tuple[str, str]]:
    while True:
        states = _job_states(job_ids)
        if len(states) >= expect and all(s in FINAL for s, _ in states.values()):
            return states
        if any(r == "DependencyNeverSatisfied" for _, r in states.values()):
            return states  # a task failed: the report job will never start
        if time.time() > deadline:
            pytest.fail(f"Slurm jobs not finished after {DEADLINE_S} s: {states}\n{_tails(logs)}")
        time.sleep(2)


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                     for p in sorted(logs.glob("*.out")))


def _results(run_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((run_dir / "trials").glob("*/result.json")):
        r = json.loads(p.read_text())
        out[r["trial_id"]] = r
    return out


def _same_number(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _is_timing(key: str) -> bool:
    """Wall-clock measurements (``ppo/time_update``, ``*_runtime``, ``*_per_second``) that differ run to run."""
    last = key.rsplit("/", 1)[-1]
    return last.startswith("time") or any(w in last for w in ("runtime", "per_second", "seconds"))


def _ray_path(sweep: Path, run_dir: Path, env: dict, n: int, cwd: Path) -> subprocess.Popen:
    """The same sweep through the Ray path (`rlhf_ablate sweep`, rlhf_ablate/launch/tune.py)."""
    log = open(run_dir.parent / "ray_path.log", "w")
    return subprocess.Popen([sys.executable, "-m", "rlhf_ablate", "sweep", str(sweep), *OVERRIDES,
                             "--out", str(run_dir), "--no-report"],
                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _judge_with_rm_from(trial_dir: Path, cfg) -> None:
    """What the compare stage does with ``eval.judge_rm_from: <trial_dir>``: load that RM and score answers."""
    from rlhf_ablate import models
    from rlhf_ablate.stages.compare import resolve_rm_from

    other, rm_dir, sft_dir = resolve_rm_from(str(trial_dir), cfg)
    rm, tok = models.load_rm(other, rm_dir, sft_dir)
    scores = models.score_texts(models.seq_cls_scorer(rm), tok, ["김치는 어떻게 만들어요?"] * 2,
                                ["배추를 소금에 절이고 양념을 버무려 익힙니다.", "몰라요"], other.model.max_length)
    assert len(scores) == 2 and all(math.isfinite(x) for x in scores)


def test_array_job_matches_ray_path(tmp_path):
    why = _cluster_up()
    if why:
        pytest.skip(why)
    deadline = time.time() + DEADLINE_S
    sweep = tmp_path / "slurm_ci.yaml"
    sweep.write_text(SWEEP)
    trials = expand(load_sweep(sweep, parse_cli_overrides(OVERRIDES)))
    n = len(trials)
    assert n == 2
    slurm_run, ray_run = tmp_path / "run_slurm", tmp_path / "run_ray"
    slurm_env = _env(tmp_path / "cache_slurm")
    # Separate caches, so the Ray path recomputes every stage and the comparison is between two real runs.
    ray_env = _env(tmp_path / "cache_ray")

    sub = subprocess.run([sys.executable, "-m", "rlhf_ablate", "slurm", str(sweep), *OVERRIDES,
                          "--out", str(slurm_run), "--submit"],
                         cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    (job,) = json.loads((slurm_run / "slurm" / "jobs.json").read_text())
    array_id, report_id = job["array_job_id"], job["report_job_id"]
    assert f"submitted array job {array_id}" in sub.stdout and f"submitted report job {report_id}" in sub.stdout

    ray = _ray_path(sweep, ray_run, ray_env, n, tmp_path)
    logs = slurm_run / "slurm" / "logs"
    try:
        states = _wait([array_id, report_id], n + 1, logs, deadline)
        ray_rc = ray.wait(timeout=max(10.0, deadline - time.time()))
    finally:
        # Leave the cluster clean when something failed (a report job waiting on a failed array never starts).
        subprocess.run(["scancel", array_id, report_id], capture_output=True, timeout=30)
        if ray.poll() is None:
            ray.kill()

    # Array tasks and the report job all completed; the report ran after the array (afterany).
    tasks = {f"{array_id}_{i}" for i in range(n)}
    assert set(states) == tasks | {report_id}, states
    assert all(states[j][0] == "COMPLETED" for j in states), f"{states}\n{_tails(logs)}"
    assert sorted(p.name for p in logs.glob(f"{array_id}_*.out")) == sorted(f"{t}.out" for t in tasks)

    slurm_results = _results(slurm_run)
    assert sorted(slurm_results) == sorted(t.trial_id for t in trials)
    assert all(r["status"] == "ok" for r in slurm_results.values()), {k: r["error"] for k, r in slurm_results.items()}
    assert (slurm_run / "report" / "report.md").is_file(), _tails(logs)
    # The two tasks shared the SFT and RM stages through the cache: each stage was built once.
    built = [e["stage"] for e in read_executions(tmp_path / "cache_slurm" / "stages")]
    assert built.count("sft") == 1 and built.count("rm") == 1, built

    # The run directory has the Ray path's layout (rlhf_ablate/rundir.py), and eval.judge_rm_from finds a Slurm
    # trial's RM from its result.json alone (its cache_dir and stage keys), even without sweep.json.
    assert json.loads((slurm_run / "sweep.json").read_text())["launcher"] == "slurm"
    (slurm_run / "sweep.json").unlink()
    _judge_with_rm_from(slurm_run / "trials" / trials[0].trial_id, trials[0].config)

    assert ray_rc == 0, (tmp_path / "ray_path.log").read_text()[-3000:]
    ray_results = _results(ray_run)
    assert sorted(ray_results) == sorted(slurm_results)
    for tid, r in slurm_results.items():
        other = ray_results[tid]
        assert (r["index"], r["seed"], r["axes"]) == (other["index"], other["seed"], other["axes"])
        assert sorted(r["metrics"]) == sorted(other["metrics"])
        compared = {k for k in r["metrics"] if not _is_timing(k)}
        # Results, not wall-clock timings, must agree; and there must be real results to compare.
        assert any(k.startswith("rm/") for k in compared) and any(k.startswith("ppo/") for k in compared), compared
        diff = {k: (r["metrics"][k], other["metrics"][k]) for k in sorted(compared)
                if not _same_number(r["metrics"][k], other["metrics"][k])}
        assert not diff, f"trial {tid}: metrics differ between the Slurm and Ray paths: {diff}"

    # Requeue: rerun a finished task through Slurm, as after a preemption. It must append to its log, build no
    # stage again and leave the result alone.
    before = (slurm_run / "trials" / trials[0].trial_id / "result.json").read_bytes()
    n_exec = len(read_executions(tmp_path / "cache_slurm" / "stages"))
    rq = subprocess.run(["scontrol", "requeue", f"{array_id}_0"], capture_output=True, text=True, timeout=30)
    assert rq.returncode == 0, rq.stderr
    # Slurm holds a requeued job with a BeginTime about two minutes ahead; release it now.
    subprocess.run(["scontrol", "update", f"JobId={array_id}_0", "StartTime=now"], capture_output=True, timeout=30)
    deadline = time.time() + 120
    while True:
        st = _job_states([f"{array_id}_0"])
        log = (logs / f"{array_id}_0.out").read_text(errors="replace")
        if "attempt 2" in log and st and all(s == "COMPLETED" for s, _ in st.values()):
            break
        if time.time() > deadline:
            pytest.fail(f"requeued task not finished: {st}\n{log[-3000:]}")
        time.sleep(2)
    assert "attempt 1" in log  # --open-mode=append kept the first attempt's log
    assert (slurm_run / "trials" / trials[0].trial_id / "result.json").read_bytes() == before
    assert len(read_executions(tmp_path / "cache_slurm" / "stages")) == n_exec
    assert len(list((slurm_run / "trials").glob("*/result.json"))) == n


def test_generated_script_runs_under_sbatch_with_out_of_range_index(tmp_path):
    """A task id past the end (e.g. someone edits --array by hand) fails with the trial command's clear error."""
    why = _cluster_up()
    if why:
        pytest.skip(why)
    sweep = tmp_path / "slurm_ci.yaml"
    sweep.write_text(SWEEP)
    env = _env(tmp_path / "cache")
    run_dir = tmp_path / "run"
    gen = subprocess.run([sys.executable, "-m", "rlhf_ablate", "slurm", str(sweep), "--out", str(run_dir)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    # sbatch options on the command line override the script's #SBATCH lines.
    job = subprocess.run(["sbatch", "--parsable", "--array=5", str(run_dir / "slurm" / "array.sbatch")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert job.returncode == 0, job.stderr
    jid = job.stdout.strip().split(";")[0]
    logs = run_dir / "slurm" / "logs"
    states = _wait([jid], 1, logs, time.time() + 120)
    assert [s for s, _ in states.values()] == ["FAILED"]
    log = (logs / f"{jid}_5.out").read_text()
    assert "--index 5 is out of range" in " ".join(log.split()) and "0..1" in log
    assert not (run_dir / "trials").exists()


# kl_coef 1.0 is made to diverge: the KL guard ends it as failed at its first PPO step (as in tests/test_tune.py).
SWEEP_FAILURES = SWEEP.replace("name: slurm_ci", "name: slurm_fail").replace("ppo.kl_coef: [0.05, 0.5]",
                                                                           "ppo.kl_coef: [0.05, 1.0]") + """\
overrides:
  - when: {ppo.kl_coef: 1.0}
    set: {ppo.kl_stop: -1.0}
"""


def _submit(sweep: Path, run_dir: Path, env: dict, cwd: Path) -> dict:
    sub = subprocess.run([sys.executable, "-m", "rlhf_ablate", "slurm", str(sweep), *OVERRIDES, "--out",
                          str(run_dir), "--submit"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    return json.loads((run_dir / "slurm" / "jobs.json").read_text())[-1]


def test_failed_and_timed_out_tasks_get_a_report_and_resume(tmp_path):
    why = _cluster_up()
    if why:
        pytest.skip(why)
    deadline = time.time() + DEADLINE_S
    sweep = tmp_path / "slurm_fail.yaml"
    sweep.write_text(SWEEP_FAILURES)
    trials = expand(load_sweep(sweep, parse_cli_overrides(OVERRIDES)))
    timed_out, diverged = trials  # kl_coef 0.05 gets the time-limit warning; 1.0 fails on its own
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    env = _env(cache)
    job = _submit(sweep, run_dir, env, tmp_path)
    array_id, report_id = job["array_job_id"], job["report_job_id"]
    assert job["dependency"] == f"afterany:{array_id}"
    assert "--signal=B:USR1@" in (run_dir / "slurm" / "array.sbatch").read_text()
    logs = run_dir / "slurm" / "logs"
    try:
        # Once task 0 has started its trial (its attempt is recorded; imports, data and stages take seconds more),
        # send the warning SLURM sends before a time limit: USR1 to the batch shell (#SBATCH --signal=B:USR1@s).
        attempts = run_dir / "trials" / timed_out.trial_id / "attempts.jsonl"
        while not attempts.exists():
            if time.time() > deadline:
                pytest.fail(f"task 0 did not start its trial\n{_tails(logs)}")
            time.sleep(0.2)
        sig = subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array_id}_0"], capture_output=True,
                             text=True, timeout=30)
        assert sig.returncode == 0, sig.stderr
        states = _wait([array_id, report_id], 3, logs, deadline)
    finally:
        subprocess.run(["scancel", array_id, report_id], capture_output=True, timeout=30)
    # Both tasks failed, and the report job still ran, after them, and lists both failures with their reasons.
    assert states[f"{array_id}_0"][0] == states[f"{array_id}_1"][0] == "FAILED", states
    assert states[report_id][0] == "COMPLETED", f"{states}\n{_tails(logs)}"
    first = _results(run_dir)
    err = first[timed_out.trial_id]["error"]
    assert first[timed_out.trial_id]["status"] == "failed" and err["type"] == "TimeLimitReached", err
    assert err["message"].startswith("time limit") and first[timed_out.trial_id]["attempt"] == 1
    assert first[diverged.trial_id]["error"]["type"] == "TrialFailed"
    report = (run_dir / "report" / "report.md").read_text()
    assert "TimeLimitReached" in report and "TrialFailed" in report and "2 failed" in report

    # Submitting the sweep again resumes the timed-out trial: finished stages come from the cache, no stage is
    # built twice, and the trial ends ok on its second attempt. The diverging trial fails again, as it should.
    job = _submit(sweep, run_dir, env, tmp_path)
    try:
        states = _wait([job["array_job_id"]], 2, logs, time.time() + DEADLINE_S)
    finally:
        subprocess.run(["scancel", job["array_job_id"], job["report_job_id"]], capture_output=True, timeout=30)
    second = _results(run_dir)
    assert second[timed_out.trial_id]["status"] == "ok", f"{second[timed_out.trial_id]['error']}\n{_tails(logs)}"
    assert second[timed_out.trial_id]["attempt"] == 2
    assert second[diverged.trial_id]["status"] == "failed" and second[diverged.trial_id]["attempt"] == 2
    ok_builds = [(e["stage"], e["key"]) for e in read_executions(cache / "stages") if e["status"] == "ok"]
    assert len(ok_builds) == len(set(ok_builds)), ok_builds  # nothing finished was computed again
    assert [s for s, _ in ok_builds].count("sft") == 1 and [s for s, _ in ok_builds].count("rm") == 1
