"""Does the over-optimization alarm fire where it should on the built-in tiny model, and stay quiet where it should?

    python benchmarks/bench_overopt_tiny.py [--seeds 0 1 2] [--out DIR]

Two configurations, both from the bundled sweep ``rlhf_ablate/sweeps/overoptimization.yaml`` (its base, reward
``single``; the eval cut to 4 prompts):

- ``fire``: the sweep as it is: a weak proxy RM (10% of the RM groups) pushed by PPO at learning rate 1e-2 with no
  KL penalty for 32 steps, watched by a gold RM trained on the other 90% (probe every 4 steps);
- ``quiet``: the same SFT model, proxy and gold RMs, with PPO at its defaults (learning rate 5e-4, KL coefficient
  0.1) for 16 steps (probe every 2): the policy moves little and gold should not fall.

Prints, per configuration and seed, gold's probe means, the proxy's, the onset verdict and the seconds; writes
benchmarks/results/overopt_tiny.json. tests/test_overopt_tiny.py asserts the outcome on seed 0 with the thresholds
this measures (docs/metrics.md, "Over-optimization").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "rlhf_ablate" / "sweeps" / "overoptimization.yaml"
FAST = {"data.max_eval": 4, "eval.max_new_tokens": 6, "rm.ensemble_size": 1, "ppo.reward": "single"}
QUIET = {"ppo.learning_rate": 5e-4, "ppo.kl_coef": 0.1, "ppo.kl_stop": 50.0, "ppo.total_episodes": 256,
         "ppo.gold_every": 2}


def config(which: str, seed: int):
    """The trial config of ``fire`` or ``quiet`` at ``seed``."""
    from rlhf_ablate.config import TrialConfig
    from rlhf_ablate.config.sweep import read_sweep

    base = read_sweep(SWEEP)["base"]
    return TrialConfig().replace(**{**base, **FAST, **(QUIET if which == "quiet" else {}), "seed": seed})


def run(which: str, seed: int, out: Path, cache) -> dict:
    from rlhf_ablate.run.trial import run_trial

    t0 = time.perf_counter()
    r = run_trial(config(which, seed), out / "runs", cache=cache)
    o = r.get("overoptimization") or {}
    ev = o.get("evaluations") or []
    return {"which": which, "seed": seed, "status": r["status"], "error": r.get("error"),
            "seconds": round(time.perf_counter() - t0, 1), "ppo_seconds": r["timings"].get("ppo", {}).get("seconds"),
            "onset_step": o.get("onset_step"), "peak_step": o.get("peak_step"), "detected_step": o.get("detected_step"),
            "steps": [e["step"] for e in ev], "gold": [round(e["gold/score"], 3) for e in ev],
            "gold_se": [round(e["gold/score_se"], 3) for e in ev], "proxy": [round(e["gold/proxy"], 3) for e in ev],
            "kl": [round(e["gold/kl"], 2) for e in ev],
            "rm_acc": r["metrics"].get("rm/pairwise_accuracy"),
            "gold_acc": r["metrics"].get("rm_gold/pairwise_accuracy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_overopt_tiny"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from rlhf_ablate.run.cache import StageCache

    cache = StageCache(a.out / "stages")
    rows = []
    for seed in a.seeds:
        for which in ("fire", "quiet"):
            row = run(which, seed, a.out, cache)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "overopt_tiny.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
