"""Stage reuse: the kl_coef sweep (3 values) with the stage cache against ``--no-cache``, side by side.

Trials run one at a time by default (``--max-concurrent``). Each repeat runs both variants back to back (order alternating between repeats, so machine drift hits both), each
as the real CLI in a fresh process with a fresh, empty cache directory: the cache variant can only reuse stages
*within* the sweep (SFT, RM and the SFT eval are shared by the three kl_coef trials), exactly what a researcher
gets on a first run. Reported: median wall seconds of each, their ratio, and the stage executions counted from the
cache's ``executions.jsonl``.

    python benchmarks/bench_stage_reuse.py [--repeats 3] [--out FILE] [--size tiny|bundled]

``--size tiny`` (the default) shortens every stage to a few optimizer steps (benchmarks/common.py: TINY), so the
fixed cost of a sweep (Ray's start, the worker's imports) weighs as much as the stages; ``--size bundled`` keeps the
sweep's own stage sizes (the schema defaults), where SFT and RM take seconds, not fractions of one.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
from pathlib import Path

from common import PY, median, snapshot, timed, trial_ok, write_kl_sweep, write_result

from rlhf_ablate.run.cache import read_executions


def one(work: Path, cached: bool, i: int, max_concurrent: int, size: str) -> dict:
    tag = f"{'cache' if cached else 'nocache'}-{i}"
    cache_dir = work / tag / "cache"
    sweep = write_kl_sweep(work / tag, cache_dir, size=size)
    run_dir = work / tag / "run"
    cmd = [PY, "-m", "rlhf_ablate", "sweep", str(sweep), "--out", str(run_dir), "--no-report",
           "--max-concurrent", str(max_concurrent)]
    if not cached:
        cmd.append("--no-cache")
    seconds = timed(cmd, work, work / f"{tag}.log")
    ex = [e for e in read_executions(cache_dir) if e["status"] == "ok"]
    counts = dict(collections.Counter(e["stage"] for e in ex))
    return {"seconds": seconds, "stage_executions": counts, "total_executions": len(ex),
            "trials_ok": trial_ok(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--max-concurrent", type=int, default=1,
                    help="trials at once (default 1: on a 2-core machine, parallel trials fight for the cores and "
                         "the measurement would mix reuse with CPU contention)")
    ap.add_argument("--size", choices=["tiny", "bundled"], default="tiny",
                    help="tiny: every stage a few steps (default); bundled: the sweep's own stage sizes")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_stage_reuse-"))
    snapshot(work)
    runs = {"cache": [], "nocache": []}
    try:
        for i in range(args.repeats):
            order = [True, False] if i % 2 == 0 else [False, True]
            for cached in order:
                r = one(work, cached, i, args.max_concurrent, args.size)
                runs["cache" if cached else "nocache"].append(r)
                print(f"repeat {i + 1}/{args.repeats} {'cache  ' if cached else 'nocache'} {r['seconds']:.1f}s "
                      f"executions {r['stage_executions']} trials ok {r['trials_ok']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: median([r["seconds"] for r in v]) for k, v in runs.items()}
    record = {
        "what": "kl_coef sweep, 3 values x 1 seed, tiny built-in model; CLI wall time with vs without stage cache",
        "size": args.size, "repeats": args.repeats, "max_concurrent": args.max_concurrent, "runs": runs,
        "median_seconds": med, "ratio_nocache_over_cache": med["nocache"] / med["cache"],
        "median_stage_executions": {k: median([r["total_executions"] for r in v]) for k, v in runs.items()},
        "stage_executions_cache": runs["cache"][0]["stage_executions"],
        "stage_executions_nocache": runs["nocache"][0]["stage_executions"]}
    path = write_result("stage_reuse" if args.size == "tiny" else f"stage_reuse_{args.size}", record, args.out)
    print(f"median: cache {med['cache']:.1f}s, no cache {med['nocache']:.1f}s, ratio "
          f"{record['ratio_nocache_over_cache']:.2f}x; executions cache {record['stage_executions_cache']} vs "
          f"no cache {record['stage_executions_nocache']}\nwritten {path}")


if __name__ == "__main__":
    main()
