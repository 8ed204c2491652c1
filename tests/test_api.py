"""The notebook API: ``rlhf_ablate.run_sweep(path_or_dict, **overrides)`` returns a results object with
``.to_pandas()`` and ``.report()``; ``analysis.load_run`` gives the same object for a finished run; importing
``rlhf_ablate`` stays cheap."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import rlhf_ablate
from rlhf_ablate.errors import ConfigError

# One xdist group for the tests that start Ray or use the Slurm cluster: they run one after another on one worker
# while the other worker runs the rest (README: `pytest -n 2 --dist loadgroup`).
pytestmark = pytest.mark.xdist_group("cluster")

ROOT = Path(__file__).resolve().parents[1]

# The built-in tiny model, every stage a few steps (as tests/test_tune.py: TINY).
TINY = {"model.quantization": "none", "sft.max_steps": 2, "rm.max_steps": 2, "sft.batch_size": 8,
        "rm.batch_size": 8, "ppo.total_episodes": 8, "ppo.rollout_batch_size": 4, "ppo.mini_batch_size": 4,
        "ppo.max_new_tokens": 8, "eval.max_new_tokens": 8, "data.max_sft": 16, "data.max_rm_groups": 8,
        "data.max_ppo_prompts": 8, "data.max_eval": 4}


def test_import_is_cheap_and_exports_the_api():
    code = ("import sys, rlhf_ablate; heavy = [m for m in ('torch', 'ray', 'transformers', 'pandas') "
            "if m in sys.modules]; print(heavy, callable(rlhf_ablate.run_sweep), callable(rlhf_ablate.load_run))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[] True True", out.stderr


@pytest.fixture
def no_run(monkeypatch):
    """Capture the spec the API hands to the driver instead of running it."""
    from rlhf_ablate.launch import tune

    seen = {}

    def fake(spec, run_dir, **kw):
        seen.update(spec=spec, run_dir=run_dir, **kw)
        raise SystemExit("not run")

    monkeypatch.setattr(tune, "run_sweep", fake)
    return seen


def test_overrides_dotted_and_top_level(no_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):  # a bundled sweep by name, as on the command line
        rlhf_ablate.run_sweep("kl_coef", seeds=[7], ppo__kl_coef=0.3, out=tmp_path / "r", **{"sft.max_steps": 3})
    assert "(bundled sweep; you typed kl_coef)" in capsys.readouterr().err
    spec = no_run["spec"]
    assert spec.seeds == (7,) and spec.base["ppo.kl_coef"] == 0.3 and spec.base["sft.max_steps"] == 3
    assert no_run["run_dir"] == (tmp_path / "r").resolve()


def test_bad_overrides_are_clear_errors(no_run):
    with pytest.raises(ConfigError, match=r"unknown override 'ppo__kl_coeff'.*ppo.kl_coef"):
        rlhf_ablate.run_sweep(ROOT / "rlhf_ablate" / "sweeps" / "kl_coef.yaml", ppo__kl_coeff=0.3)
    with pytest.raises(ConfigError, match="include"):
        rlhf_ablate.run_sweep({"name": "x", "include": "base.yaml"})
    assert "spec" not in no_run  # nothing started


@pytest.fixture
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
def test_two_trial_sweep_through_the_api(tmp_path, builtin_cache, ray_shutdown):
    from analysis import load_run

    sweep = {"name": "api_kl", "base": TINY, "axes": {"ppo.kl_coef": [0.05, 0.5]}, "seeds": [0],
             "cache_dir": str(tmp_path / "cache"), "tracking": {"wandb": "disabled"}}
    res = rlhf_ablate.run_sweep(sweep, out=tmp_path / "run", report=False, max_concurrent=2, stream=io.StringIO())
    df = res.to_pandas()
    assert len(df) == 2 and list(df["status"]) == ["ok", "ok"]
    assert list(df["ppo.kl_coef"]) == [0.05, 0.5] and list(df["seed"]) == [0, 0]
    assert {"trial_id", "index", "error", "rm/pairwise_accuracy", "ppo/reward_mean", "ppo/objective/kl"} <= set(df)
    for _, row in df.iterrows():  # the numbers are the result files' numbers
        saved = json.loads((tmp_path / "run" / "trials" / row["trial_id"] / "result.json").read_text())["metrics"]
        assert all(row[k] == v or (math.isnan(row[k]) and v is None) for k, v in saved.items())
    # A finished run loads into the same object and table; .report() writes the report.
    again = load_run(tmp_path / "run")
    assert type(again) is type(res) and again.to_pandas().equals(df)
    rep = again.report(plots=False)
    assert (tmp_path / "run" / "report" / "report.md").is_file(), rep
