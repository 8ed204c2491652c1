"""The same numbers on every machine: a trial computes with the thread count of its config (``resources.cpu``),
never the environment's, and the built-in models are built the same way in every process.

The same trial runs twice, with ``OMP_NUM_THREADS`` 1 and 2, each with an empty cache (so each builds the built-in
model and every stage itself), and must give identical metrics. It can fail: computed with 1 and with 2 torch
threads, this trial's RM means differ in the fifth significant digit and PPO's KL in the fourth (measured, see
docs/stack.md, "Determinism"), and the old build of tiny-gpt2 gave different weights with 1 and 2 threads
(rlhf_ablate/models/builtin.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

SWEEP = {"name": "determinism", "seeds": [0], "resources": {"cpu": 1}, "tracking": {"wandb": "disabled"},
         "base": {"model.base_model": "tiny-gpt2", "model.quantization": "none", "sft.max_steps": 2,
                  "rm.max_steps": 2, "sft.batch_size": 8, "rm.batch_size": 8, "ppo.total_episodes": 8,
                  "ppo.rollout_batch_size": 4, "ppo.mini_batch_size": 4, "ppo.max_new_tokens": 8,
                  "eval.max_new_tokens": 8, "data.max_sft": 16, "data.max_rm_groups": 8, "data.max_ppo_prompts": 8,
                  "data.max_eval": 4}}


def _is_timing(key: str) -> bool:
    last = key.rsplit("/", 1)[-1]
    return last.startswith("time") or any(w in last for w in ("runtime", "per_second", "seconds"))


@pytest.mark.slow
def test_same_trial_same_metrics_with_1_and_2_omp_threads(tmp_path):
    sweep = tmp_path / "determinism.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    procs = {}
    for n in (1, 2):
        env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n),
               "RLHF_ABLATE_CACHE": str(tmp_path / f"cache{n}"),  # empty: built-in model and stages built here
               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        # Side by side: each computes with one torch thread, whatever OMP_NUM_THREADS says.
        procs[n] = subprocess.Popen([sys.executable, "-m", "rlhf_ablate", "trial", str(sweep), "--index", "0",
                                     "--out", str(tmp_path / f"run{n}")], cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for n, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
        (path,) = (tmp_path / f"run{n}" / "trials").glob("*/result.json")
        results[n] = json.loads(path.read_text())
    a, b = results[1], results[2]
    assert a["trial_id"] == b["trial_id"] and a["threads"] == b["threads"] == 1
    # The built-in model was built twice, from nothing, to the same bytes.
    assert a["versions"]["builtin_sha256"] == b["versions"]["builtin_sha256"] is not None
    compared = sorted(k for k in a["metrics"] if not _is_timing(k))
    assert any(k.startswith("rm/") for k in compared) and any(k.startswith("ppo/") for k in compared), compared
    assert sorted(a["metrics"]) == sorted(b["metrics"])
    diff = {k: (a["metrics"][k], b["metrics"][k]) for k in compared if a["metrics"][k] != b["metrics"][k]}
    assert not diff, f"metrics differ between OMP_NUM_THREADS=1 and 2: {diff}"
    assert a["records"] == b["records"]  # every generation and score, example by example
