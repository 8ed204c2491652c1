"""Orchestration overhead: the same trials through Ray Tune (the CLI sweep) against a direct in-process loop.

Both variants run the kl_coef sweep (3 values x 1 seed, tiny model) from a fresh process with a fresh cache, one
trial at a time (``--max-concurrent 1``), so the difference is what orchestration costs, not parallelism: Ray's
start, the worker process (one, reused by the three trials: imports paid once), result plumbing and our driver. Side by side in each
repeat, order alternating. Reported: medians and the ratio Ray Tune / direct loop. A third variant, Ray Tune with
2 concurrent trials, shows what the orchestration buys back on a multi-core machine.

    python benchmarks/bench_orchestration.py [--repeats 3] [--out FILE] [--no-parallel]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import PY, median, snapshot, timed, trial_ok, write_kl_sweep, write_result

DIRECT = """
import sys
from pathlib import Path
from rlhf_ablate.config.sweep import load_sweep, expand
from rlhf_ablate.run.trial import run_trial_in_sweep
spec = load_sweep(sys.argv[1])
bad = [t for t in expand(spec) if run_trial_in_sweep(spec, t, Path(sys.argv[2]))["status"] != "ok"]
sys.exit(1 if bad else 0)
"""


def one(work: Path, variant: str, i: int) -> dict:
    tag = f"{variant}-{i}"
    sweep = write_kl_sweep(work / tag, work / tag / "cache")
    run_dir = work / tag / "run"
    if variant == "direct":
        # Both variants compute with resources.cpu = 1 torch thread (rlhf_ablate/runtime.py); OMP_NUM_THREADS=1
        # also keeps the rest of this process on one core, as Ray does for a 1-CPU trial.
        cmd = ["env", "OMP_NUM_THREADS=1", PY, "-c", DIRECT, str(sweep), str(run_dir)]
    else:
        cmd = [PY, "-m", "rlhf_ablate", "sweep", str(sweep), "--out", str(run_dir), "--no-report",
               "--max-concurrent", "1" if variant == "tune" else "2"]
    seconds = timed(cmd, work, work / f"{tag}.log")
    return {"seconds": seconds, "trials_ok": trial_ok(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-parallel", action="store_true", help="skip the 2-concurrent Ray Tune variant")
    args = ap.parse_args()
    variants = ["tune", "direct"] + ([] if args.no_parallel else ["tune_parallel2"])
    work = Path(tempfile.mkdtemp(prefix="bench_orchestration-"))
    snapshot(work)
    runs: dict[str, list] = {v: [] for v in variants}
    try:
        for i in range(args.repeats):
            order = variants if i % 2 == 0 else list(reversed(variants))
            for v in order:
                r = one(work, v, i)
                runs[v].append(r)
                print(f"repeat {i + 1}/{args.repeats} {v:15s} {r['seconds']:.1f}s trials ok {r['trials_ok']}",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {v: median([r["seconds"] for r in rs]) for v, rs in runs.items()}
    record = {"what": "kl_coef sweep, 3 values x 1 seed, tiny model, fresh process and cache per run; Ray Tune "
                      "(1 trial at a time) vs a direct in-process loop over run_trial_in_sweep",
              "repeats": args.repeats, "runs": runs, "median_seconds": med,
              "ratio_tune_over_direct": med["tune"] / med["direct"],
              "overhead_seconds_per_trial": (med["tune"] - med["direct"]) / 3}
    if "tune_parallel2" in med:
        record["ratio_tune_parallel2_over_direct"] = med["tune_parallel2"] / med["direct"]
    path = write_result("orchestration", record, args.out)
    print(f"median: Ray Tune {med['tune']:.1f}s, direct loop {med['direct']:.1f}s, ratio "
          f"{record['ratio_tune_over_direct']:.2f}x" + (f"; Ray Tune x2 concurrent {med['tune_parallel2']:.1f}s"
                                                         if "tune_parallel2" in med else "") + f"\nwritten {path}")


if __name__ == "__main__":
    main()
