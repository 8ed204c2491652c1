"""Wall time of the default tiny trial in two checkouts, interleaved: did a change make a trial slower?

    python benchmarks/bench_trial_time.py --before /path/to/old/checkout [--after .] [--repeats 3]

Runs ``python -m rlhf_ablate trial sweeps/kl_coef.yaml --index 1 --no-cache`` (SFT, RM, base/SFT/PPO evals, PPO on
the built-in tiny Llama and the bundled data) from each checkout (its sweeps/, or its bundled sweep where the
checkout has none), one warm-up each (it builds the built-in model into that checkout's own cache), then
``repeats`` timed runs each in the order B A A B B A ..., and prints the medians, their ratio and each run's stage
seconds. Writes benchmarks/results/trial_time.json. Other load on the machine moves both variants alike only when
they interleave, which is why they do.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(checkout: Path, cache: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "RLHF_ABLATE_CACHE": str(cache), "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "rlhf_ablate", "trial", "sweeps/kl_coef.yaml", "--index", "1",
                        "--no-cache", "--out", str(out)], env=env, cwd=checkout, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    found = glob.glob(str(out / "trials" / "*" / "result.json"))
    if p.returncode != 0 or not found:
        raise SystemExit(f"trial in {checkout} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-2000:]}")
    res = json.loads(Path(found[0]).read_text())
    m = res["metrics"]
    return {"wall": round(wall, 2), "status": res["status"],
            "stages": {k: round(v["seconds"], 2) for k, v in res["timings"].items()
                       if isinstance(v, dict) and "seconds" in v},
            "ppo_reward_gain": m.get("ppo/reward_mean", 0.0) - m.get("sft/reward_mean", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, default=ROOT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trial_time.json")
    args = ap.parse_args()
    variants = {"before": args.before.resolve(), "after": args.after.resolve()}
    work = Path(tempfile.mkdtemp(prefix="bench_trial_time-"))
    pattern = ["before", "after", "after", "before"]
    order = [pattern[i % 4] for i in range(2 * args.repeats)]
    runs: list[dict] = []
    try:
        for v in variants:  # warm-up: builds the built-in model into this variant's cache
            run_once(variants[v], work / f"cache-{v}", work / f"warm-{v}")
        for i, v in enumerate(order):
            r = {"variant": v, **run_once(variants[v], work / f"cache-{v}", work / f"run-{i}")}
            print(json.dumps(r), flush=True)
            runs.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {v: statistics.median(r["wall"] for r in runs if r["variant"] == v) for v in variants}
    stage_med = {v: {st: statistics.median(r["stages"].get(st, 0.0) for r in runs if r["variant"] == v)
                     for st in runs[0]["stages"]} for v in variants}
    ratio = med["after"] / med["before"]
    print(f"median wall: before {med['before']:.1f} s, after {med['after']:.1f} s, after / before {ratio:.3f}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import write_result

    path = write_result("trial_time", {"before": str(variants["before"]), "after": str(variants["after"]),
                                       "median_wall_s": med, "median_stage_s": stage_med, "ratio": ratio,
                                       "runs": runs}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
