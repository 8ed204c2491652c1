"""Trial groups (rlhf_ablate/run/groups.py, rlhf_ablate/ppo/group.py): PPO trials that share an SFT model and RM,
trained together on one base, against the same trials alone, side by side in one run.

``--mode time`` (default): the bundled kl_coef sweep's settings on the built-in model, with six kl_coef values and one
seed (0.005 ... 1.0). SFT and RM are built once (the stage cache); then each repeat runs, each in a fresh process:
the six PPO stages alone, one after another, and the groups of K = 2, 4, 6 (the first K values). Reported per K: the
median over repeats of the grouped PPO stage's wall time, of the sum of its members' solo PPO wall times, their
ratio (the CPU target is at most 0.6 at K = 6), and each side's peak resident memory above the process's
level before the models were loaded (VmHWM, like the probe). ``--sweep`` also times the whole sweep through the CLI
(Ray, evals included), ``resources.group_size`` 1 against 6, once each.

``--mode equivalence``: a group's members against their solo runs at the kl_coef sweep's settings over ``--seeds``
seeds (two kl_coef values per seed: a group of two). Reported: for how many PPO steps each member's logged statistics
equal its solo run's to 1e-6, and the paired grouped-minus-solo differences of the final metrics (PPO's last
``objective/scores`` and ``objective/kl``; the eval's ``ppo/reward_mean``, ``ppo/rougeL`` and ``ppo/kl_to_ref``
through each member's own eval stage, rlhf_ablate/stages/evaluate.py) next to the seed-to-seed standard deviation of
the solo runs of each kl_coef.

    python benchmarks/bench_groups.py [--mode time] [--repeats 3] [--sweep]
    python benchmarks/bench_groups.py --mode equivalence [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

KL = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0)
KS = (2, 4, 6)


def _kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def _configs(kls, seed: int = 0):
    from rlhf_ablate.config import trial_config_from_overrides

    return [trial_config_from_overrides({"ppo.kl_coef": kl, "seed": seed}) for kl in kls]


def _upstream(cfg, work: Path) -> dict:
    """SFT and RM of ``cfg`` through the stage cache (built once, then hits)."""
    from rlhf_ablate.data import load_data
    from rlhf_ablate.run.cache import StageCache
    from rlhf_ablate.run.graph import Ctx, stage_keys, trial_stages
    from rlhf_ablate.runtime import set_threads

    set_threads(1)
    cache = StageCache(work / "stages")
    data = load_data(cfg.data)
    keys = stage_keys(cfg, cache, data.fingerprint)
    ctx = Ctx(cfg, data)
    for s in trial_stages(cfg):
        if s.name in ("sft", "rm"):
            ctx.dirs[s.name] = cache.run(s.bucket, keys[s.name], lambda out, s=s: s.build(ctx, out)).path
    return {"sft": ctx.dirs["sft"], "rm": ctx.dirs["rm"], "data": data}


def _child(kind: str, kls: tuple, seed: int, work: str, q, evaluate: bool = False) -> None:
    """One measurement in a fresh process: PPO ``kind`` ("solo": each config alone in turn; "group": all at once)."""
    import gc

    from rlhf_ablate.runtime import set_threads

    set_threads(1)
    cfgs = _configs(kls, seed)
    up = _upstream(cfgs[0], Path(work))
    outs = [Path(tempfile.mkdtemp(dir=work)) for _ in cfgs]
    gc.collect()
    base = _kib("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    per = []
    if kind == "solo":
        from rlhf_ablate.ppo.loop import train_ppo

        for cfg, out in zip(cfgs, outs):
            t = time.perf_counter()
            train_ppo(cfg, up["data"], up["sft"], up["rm"], out)
            per.append(time.perf_counter() - t)
            gc.collect()
    else:
        from rlhf_ablate.ppo.group import train_ppo_group

        assert train_ppo_group(cfgs, up["data"], up["sft"], [up["rm"]] * len(cfgs), outs, [None] * len(cfgs)) \
            == ({}, set())
    seconds = time.perf_counter() - t0
    peak = (_kib("VmHWM") - _kib("RssFile") - _kib("RssShmem") - base) / 1024
    finals = []
    if evaluate:  # each member's own eval stage, as its trial runs it
        from rlhf_ablate.stages.evaluate import evaluate_policy

        for cfg, out in zip(cfgs, outs):
            ev = Path(tempfile.mkdtemp(dir=work))
            evaluate_policy(cfg, up["data"], "ppo", up["sft"], up["rm"], out, ev)
            m = json.loads((ev / "metrics.json").read_text())
            finals.append({k: m[k] for k in ("ppo/reward_mean", "ppo/rougeL", "ppo/kl_to_ref")})
    q.put({"seconds": seconds, "per_member": per, "peak_mib": peak, "finals": finals,
           "histories": [json.loads((o / "history.json").read_text()) for o in outs]})


def _run(kind: str, kls: tuple, seed: int, work: Path, evaluate: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, kls, seed, str(work), q, evaluate))
    p.start()
    res = q.get()
    p.join()
    return res


def time_mode(work: Path, repeats: int, sweep: bool) -> dict:
    _run("solo", KL[:1], 0, work)  # builds SFT and RM into the cache (not timed)
    rows: dict[str, list] = {f"K={k}": [] for k in KS}
    solo_runs = []
    for r in range(repeats):
        solo = _run("solo", KL, 0, work)
        solo_runs.append(solo)
        for k in KS:
            g = _run("group", KL[:k], 0, work)
            rows[f"K={k}"].append({"group_seconds": g["seconds"], "solo_seconds": sum(solo["per_member"][:k]),
                                   "group_peak_mib": g["peak_mib"], "solo_peak_mib": solo["peak_mib"]})
            print(f"repeat {r}: K={k} group {g['seconds']:.1f} s, solo {sum(solo['per_member'][:k]):.1f} s, "
                  f"peak {g['peak_mib']:.0f} / {solo['peak_mib']:.0f} MiB", flush=True)
    summary = {}
    for name, rs in rows.items():
        gs, ss = statistics.median(x["group_seconds"] for x in rs), statistics.median(x["solo_seconds"] for x in rs)
        summary[name] = {"group_ppo_seconds_median": gs, "solo_ppo_seconds_median": ss,
                         "ratio_of_medians": gs / ss,
                         "ratio_median": statistics.median(x["group_seconds"] / x["solo_seconds"] for x in rs),
                         "group_peak_mib_median": statistics.median(x["group_peak_mib"] for x in rs),
                         "solo_peak_mib_median": statistics.median(x["solo_peak_mib"] for x in rs),
                         "runs": rs}
    out = {"mode": "time", "kl_coef": KL, "repeats": repeats, "solo_one_member_seconds_median":
           statistics.median(statistics.median(s["per_member"]) for s in solo_runs), "by_k": summary,
           "cpu_target": "K=6 grouped PPO stage <= 0.6 x the solo PPO stages' total"}
    if sweep:
        out["whole_sweep"] = _whole_sweeps(work)
    return out


def _whole_sweeps(work: Path) -> dict:
    import yaml

    from common import PY, timed, trial_ok

    res = {}
    for size in (1, 6):
        d = work / f"sweep-{size}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "kl.yaml"
        path.write_text(yaml.safe_dump({"name": f"kl_group_{size}", "axes": {"ppo.kl_coef": list(KL)}, "seeds": [0],
                                        "resources": {"group_size": size}, "cache_dir": str(d / "cache"),
                                        "tracking": {"wandb": "disabled"}}))
        seconds = timed([PY, "-m", "rlhf_ablate", "sweep", str(path), "--out", str(d / "run"), "--no-report"], d,
                        d / "log.txt")
        ppo = [json.loads(p.read_text())["timings"]["ppo"] for p in (d / "run" / "trials").glob("*/result.json")]
        res[f"group_size={size}"] = {"seconds": seconds, "trials_ok": trial_ok(d / "run"),
                                     "ppo_stage_seconds": sum(t["seconds"] for t in ppo)}
        print(f"whole sweep, group_size={size}: {seconds:.0f} s", flush=True)
    return res


def equivalence_mode(work: Path, seeds: int) -> dict:
    kls = (0.05, 0.2)
    per_seed = []
    for seed in range(seeds):
        solo, group = _run("solo", kls, seed, work, True), _run("group", kls, seed, work, True)
        for k, kl in enumerate(kls):
            hs, hg = solo["histories"][k], group["histories"][k]
            same = 0
            for a, b in zip(hs, hg):
                if all(abs(a[x] - b[x]) <= 1e-6 for x in ("objective/scores", "objective/kl", "loss/policy")):
                    same += 1
                else:
                    break
            per_seed.append({"seed": seed, "kl_coef": kl, "identical_steps": same, "steps": len(hs),
                             "solo": {**{x: hs[-1][x] for x in ("objective/scores", "objective/kl")},
                                      **solo["finals"][k]},
                             "group": {**{x: hg[-1][x] for x in ("objective/scores", "objective/kl")},
                                       **group["finals"][k]}})
            print(per_seed[-1], flush=True)
    out = {"mode": "equivalence", "kl_coef": kls, "seeds": seeds, "members": per_seed}
    for x in ("objective/scores", "objective/kl", "ppo/reward_mean", "ppo/rougeL", "ppo/kl_to_ref"):
        diffs = [m["group"][x] - m["solo"][x] for m in per_seed]
        spread = [statistics.stdev([m["solo"][x] for m in per_seed if m["kl_coef"] == kl]) if seeds > 1 else None
                  for kl in kls]
        out[x] = {"paired_diff_mean": statistics.mean(diffs), "paired_diff_max_abs": max(abs(d) for d in diffs),
                  "seed_sd_of_solo": spread}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["time", "equivalence"], default="time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="time mode: also time the whole sweep through the CLI")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "groups.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_groups-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = time_mode(work, args.repeats, args.sweep) if args.mode == "time" else equivalence_mode(work, args.seeds)
    from common import write_result

    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    keep = {k: v for k, v in old.items() if k in ("time", "equivalence")}
    path = write_result("groups", {**keep, args.mode: {**res, "seconds": time.perf_counter() - t0}}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
