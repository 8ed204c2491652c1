"""The stage graph (rlhf_ablate/run/graph.py) is the one declaration of a trial's stages (issue 17):

- a method added from outside the package, as one config class, one stage function and one graph entry, runs in a
  real sweep with its keys, run order, result.json, report table, memory estimate and chat, editing nothing else;
- a method without a memory estimate is refused, never estimated as another method;
- the stage cache checks what it serves: a truncated and a deleted artifact file are moved aside and rebuilt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_ablate.config import TrialConfig
from rlhf_ablate.rundir import read_result
from rlhf_ablate.run import graph
from rlhf_ablate.run.cache import StageCache
from rlhf_ablate.run.trial import run_trial

ROOT = Path(__file__).resolve().parents[1]

# The smallest whole trial on the built-in model: 1 SFT and 1 RM step, one PPO step, 4 eval prompts.
TINY = {"sft.max_steps": 1, "rm.max_steps": 1, "sft.batch_size": 4, "rm.batch_size": 4, "data.max_sft": 8,
        "data.max_rm_groups": 4, "data.max_ppo_prompts": 8, "data.max_eval": 4, "model.max_length": 96,
        "ppo.total_episodes": 8, "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 8,
        "ppo.rollout_micro_batch_size": 8, "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 8, "eval.max_new_tokens": 6}

# A method from outside the package: its config class, its stage function and its graph entry, nothing else. It
# "aligns" by saving the SFT model with a fresh (zero-effect) LoRA adapter, which is all the graph needs to know.
PLUGIN = '''
from dataclasses import dataclass
from pathlib import Path

from rlhf_ablate.config import LoraParams
from rlhf_ablate.config.fields import help_field
from rlhf_ablate.files import write_json
from rlhf_ablate.run.graph import Method, register_method
from rlhf_ablate.stages.common import load_for_training, save_trained


@dataclass(frozen=True)
class ToyConfig(LoraParams):
    strength: float = help_field(0.5, "How much the toy method does (nothing).")


def train_toy(ctx, out: Path) -> None:
    cfg = ctx.cfg
    model, tok = load_for_training(cfg, cfg.toy, str(ctx.dirs["sft"] / "model"))
    save_trained(model, tok, out, cfg.toy.lora_rank)
    write_json(out / "metrics.json", {"toy/train_strength": cfg.toy.strength})


register_method(Method("toy", "Toy", ToyConfig, train_toy,
                       memory=lambda cfg, parts: parts.trl_stage(cfg.toy, 1, cfg.model.max_length),
                       uses_rm=lambda cfg: False, auxiliary=("train_strength",)))
'''


def _env(tmp_path: Path, builtin_cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
            graph.PLUGINS_ENV: "toy_method", "RLHF_ABLATE_CACHE": str(builtin_cache), "WANDB_MODE": "disabled",
            "RAY_AUTH_MODE": "disabled"}


def test_eval_keys_follow_the_generation_backend_and_the_gold_rm_only_runs_for_ppo():
    from rlhf_ablate.run.cache import StageCache

    a = graph.stage_keys(TrialConfig(), StageCache("/x", enabled=False), "fp")
    b = graph.stage_keys(TrialConfig().replace(**{"ppo.generation_backend": "compiled"}),
                         StageCache("/x", enabled=False), "fp")
    moved = {k for k in a if a[k] != b[k]}
    assert {"eval_base", "eval_sft", "eval_ppo", "ppo"} <= moved and not moved & {"sft", "rm"}
    # rm.gold=disjoint splits the RM's data for any method, but only PPO with ppo.gold=rm_gold reads a gold RM
    dpo = [s.name for s in graph.trial_stages(TrialConfig().replace(method="dpo", **{"rm.gold": "disjoint"}))]
    ppo = [s.name for s in graph.trial_stages(TrialConfig().replace(**{"rm.gold": "disjoint", "ppo.gold": "rm_gold"}))]
    assert "rm_gold" not in dpo and "rm_gold" in ppo


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")  # a real sweep through Ray
def test_a_method_is_one_graph_entry(tmp_path, builtin_cache):
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(PLUGIN))
    sweep = {"name": "toy", "version": 1, "base": {**TINY, "method": "toy", "toy.lora_rank": 4},
             "axes": {"toy.strength": [0.5]}, "seeds": [0], "cache_dir": str(tmp_path / "cache"),
             "tracking": {"wandb": "disabled"}}
    (tmp_path / "toy.yaml").write_text(json.dumps(sweep))  # JSON is YAML
    env, run = _env(tmp_path, builtin_cache), tmp_path / "run"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "rlhf_ablate", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    dry = cli("sweep", "toy.yaml", "--out", str(run), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "toy" in dry.stdout and "GiB" in dry.stdout + dry.stderr   # the memory estimate column

    p = cli("sweep", "toy.yaml", "--out", str(run))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (tid,) = [d.name for d in (run / "trials").iterdir()]
    r = read_result(run, tid)
    assert r["status"] == "ok", r["error"]
    # run order and keys from the graph: the method's training after SFT (no RM upstream), its eval, compare
    assert list(r["timings"])[:-1] == ["sft", "rm", "eval_base", "score_base", "eval_sft", "toy", "eval_toy",
                                       "compare"]
    assert r["config"]["toy.strength"] == 0.5 and r["metrics"]["toy/train_strength"] == 0.5
    for k in ("toy/rougeL", "toy/kl_to_ref", "toy/winrate_vs_sft"):
        assert isinstance(r["metrics"][k], float), k
    # a zero-initialised adapter is the SFT model: no KL, the same greedy answers
    assert abs(r["metrics"]["toy/kl_to_ref"]) < 1e-3
    assert [x["generation"] for x in r["records"]["toy"]] == [x["generation"] for x in r["records"]["sft"]]
    report = (run / "report" / "report.md").read_text()
    assert "toy/" in report or "Toy" in report

    first = r["records"]["toy"][0]   # chat answers as eval did: the same greedy answer to the same prompt
    chat = cli("chat", str(run), "--trial", tid, "--stage", "toy", "--prompt", first["prompt"])
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert first["generation"].strip() and first["generation"].strip() in chat.stdout


def test_a_method_without_a_memory_estimate_is_refused():
    from rlhf_ablate.config.schema import DPOConfig

    with pytest.raises(ValueError, match="no memory estimate"):
        graph.register_method(graph.Method("nomem", "NoMem", DPOConfig, lambda c, out: None, memory=None))
    assert "nomem" not in graph.METHODS and "nomem" not in TrialConfig.__dataclass_fields__


def test_run_order_and_keys_come_from_one_table():
    from rlhf_ablate.run.cache import StageCache

    for method in graph.METHODS:
        cfg = TrialConfig().replace(method=method)
        names = [s.name for s in graph.trial_stages(cfg)]
        keys = graph.stage_keys(cfg, StageCache("/nonexistent", enabled=False), "fp")
        assert list(keys) == names and names[-2:] == [f"eval_{method}", "compare"]
        for s in graph.trial_stages(cfg):   # every stage runs after what it hashes
            assert all(names.index(u) < names.index(s.name) for u in s.upstream(cfg))
    # a kl_coef change moves the PPO key and what depends on it, never SFT or RM
    a = graph.stage_keys(TrialConfig(), StageCache("/x", enabled=False), "fp")
    b = graph.stage_keys(TrialConfig().replace(**{"ppo.kl_coef": 0.5}), StageCache("/x", enabled=False), "fp")
    assert {k for k in a if a[k] != b[k]} == {"ppo", "eval_ppo", "compare"}


@pytest.mark.slow
def test_damaged_cache_entries_are_moved_aside_and_rebuilt(tmp_path, builtin_cache):
    cache = StageCache(tmp_path / "stages")
    first = run_trial(TrialConfig().replace(**TINY), tmp_path / "run", cache=cache)
    assert first["status"] == "ok", first["error"]
    sft = cache.path("sft", first["timings"]["sft"]["key"])
    rm = cache.path("rm", first["timings"]["rm"]["key"])
    weights = sft / "model" / "model.safetensors"
    with open(weights, "r+b") as f:     # a full or flaky shared file system cut the file short
        f.truncate(weights.stat().st_size // 2)
    (rm / "records.json").unlink()       # and lost a file of another entry

    events: list[dict] = []
    again = run_trial(TrialConfig().replace(**{**TINY, "ppo.kl_coef": 0.3}), tmp_path / "run", cache=cache,
                      on_step=events.append)
    assert again["status"] == "ok", again["error"]
    t = again["timings"]
    assert not t["sft"]["cache_hit"] and "model/model.safetensors" in t["sft"]["repaired"]
    assert not t["rm"]["cache_hit"] and "records.json is missing" in t["rm"]["repaired"]
    said = [e for e in events if e.get("event") == "repaired"]
    assert {e["stage"] for e in said} == {"sft", "rm"}
    assert len(list((tmp_path / "stages" / "sft").glob(".damaged-*"))) == 1   # moved aside, not deleted
    # the rebuilt entries pass the lookup check again
    from rlhf_ablate.run.cache import damage

    assert damage(sft) is None and damage(rm) is None
