"""W&B tracking: offline run written and read back, group/tags/config, the API key never reaches disk, no-op."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlhf_ablate.config.sweep import TrackingSpec
from rlhf_ablate.run.tracking import NoopTracker, find_offline_runs, make_tracker, read_offline_run, scrub_config


@pytest.fixture
def clean_wandb_env(monkeypatch):
    for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_offline_run_round_trip_and_secret_never_logged(tmp_path, clean_wandb_env):
    clean_wandb_env.setenv("WANDB_API_KEY", "secret-xyz-0123456789")
    run_dir = tmp_path / "run"
    config = {"ppo.kl_coef": 0.1, "sft.lora_rank": 8, "model.base_model": "tiny-llama",
              "hub.api_key": "secret-xyz-0123456789", "data.source": "/data/with/secret-xyz-0123456789"}
    t = make_tracker(TrackingSpec(wandb="offline", project="proj"), sweep_name="kl_coef", trial_id="t0abc",
                     config_flat=config, axes={"ppo.kl_coef": 0.1, "lora_rank": 8}, run_dir=run_dir)
    assert t.enabled
    kls = [0.01, 0.02, 0.05]
    for i, kl in enumerate(kls, start=1):
        t.log({"ppo/objective/kl": kl, "ppo/objective/scores": 0.1 * i}, step=i)
    t.summary({"ppo/rougeL": 0.31, "rm/separation_margin": 1.25})
    t.log_table("ppo/samples", ["prompt", "generation", "reward"], [["안녕?", "안녕하세요.", 0.5]])
    t.finish("ok")

    runs = find_offline_runs(run_dir)
    assert len(runs) == 1 and runs[0].is_relative_to(run_dir / "wandb")
    r = read_offline_run(run_dir)
    assert r["group"] == "kl_coef" and r["name"] == "t0abc"
    assert sorted(r["tags"]) == ["lora_rank=8", "ppo.kl_coef=0.1"]
    assert r["config"]["ppo.kl_coef"] == 0.1 and r["config"]["sft.lora_rank"] == 8
    assert "hub.api_key" not in r["config"] and "data.source" not in r["config"]
    rows = [h for h in r["history"] if "ppo/objective/kl" in h]
    assert [h["ppo/objective/kl"] for h in rows] == kls
    assert [h["ppo/step"] for h in rows] == [1, 2, 3]
    assert math.isclose(r["summary"]["ppo/rougeL"], 0.31) and r["summary"]["status"] == "ok"
    assert r["tables"]["ppo/samples"]["data"] == [["안녕?", "안녕하세요.", 0.5]]
    assert r["exit_code"] == 0

    leaked = [p for p in run_dir.rglob("*") if p.is_file() and b"secret-xyz" in p.read_bytes()]
    assert leaked == []


def test_disabled_by_env_or_spec(tmp_path, clean_wandb_env):
    kw = dict(sweep_name="s", trial_id="t1", config_flat={}, axes={}, run_dir=tmp_path)
    assert isinstance(make_tracker(TrackingSpec(wandb="disabled"), **kw), NoopTracker)
    clean_wandb_env.setenv("WANDB_MODE", "disabled")
    t = make_tracker(TrackingSpec(wandb="offline"), **kw)
    assert isinstance(t, NoopTracker)
    t.log({"a": 1}, step=1)
    t.finish("ok")
    assert not (tmp_path / "wandb").exists()


def test_scrub_config():
    assert scrub_config({"a.api_key": "x", "b.token": "y", "ppo.kl_coef": 0.1, "x.password": "z",
                         "key": 1, "data.split_seed": 0}) == {"ppo.kl_coef": 0.1, "data.split_seed": 0}


def test_one_run_per_trial_a_retry_resumes_it_with_its_attempt(tmp_path, clean_wandb_env):
    """Two attempts of a trial (a failed first try, then the rerun) log to one W&B run id, derived from the trial id;
    each attempt's number is in the run's config. Offline, each attempt is its own offline-run directory with that id
    (``wandb sync`` appends them to the one run); another run directory gets another run."""
    from rlhf_ablate.run.tracking import wandb_run_id

    run_dir = tmp_path / "run"
    kw = dict(sweep_name="kl_coef", trial_id="t0abc", config_flat={"ppo.kl_coef": 0.1}, axes={}, run_dir=run_dir)
    for attempt, status in ((1, "failed"), (2, "ok")):
        t = make_tracker(TrackingSpec(wandb="offline"), attempt=attempt, **kw)
        t.log({"ppo/objective/kl": 0.1 * attempt}, step=1)
        t.finish(status)
    runs = [read_offline_run(p) for p in find_offline_runs(run_dir)]
    assert len(runs) == 2
    assert {r["id"] for r in runs} == {wandb_run_id("t0abc", "kl_coef", run_dir)}
    assert wandb_run_id("t0abc", "kl_coef", run_dir).startswith("t0abc-")
    assert sorted((r["config"]["attempt"], r["summary"]["status"]) for r in runs) == [(1, "failed"), (2, "ok")]
    assert all(r["name"] == "t0abc" and r["config"]["ppo.kl_coef"] == 0.1 for r in runs)
    assert wandb_run_id("t0abc", "kl_coef", tmp_path / "other_run") != wandb_run_id("t0abc", "kl_coef", run_dir)
