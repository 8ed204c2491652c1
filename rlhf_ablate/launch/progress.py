"""What a researcher sees while a sweep runs: one line per trial event, then a summary table.

A Ray Tune callback (built lazily, so this module imports without Ray) prints stage starts and ends with cache
hits, every few PPO steps with the key metric, and done/failed; it also records the end of trials that could not
record their own (a worker that died, an ASHA early stop) in their result.json (rlhf_ablate/run/result.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ..rundir import FINISHED, read_result, record_failure

KEY_METRICS = ("ppo/objective/scores", "ppo/objective/kl")  # live-line metrics when no search metric is set


def _error_from_file(path: Optional[str]) -> tuple[str, str]:
    """The exception class and message from Ray's error file of a trial whose worker crashed or died."""
    import re

    text = ""
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        pass
    found = re.findall(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit|Interrupt|Died))\s*:\s*(.*)$", text, re.M)
    if found:
        etype, msg = found[-1]
        return etype, f"{msg.strip()} (Ray error file: {path})"
    return "WorkerDied", f"the Ray worker running this trial died; see {path or 'the Ray logs'}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class LiveLines:
    """Builds the Tune callback lazily (ray import) and formats one line per trial event. ``lookup(tune_config,
    tune_trial_id)`` gives the sweep's Trial behind a Tune trial."""

    def __init__(self, spec: Any, run_dir: Path, total: int, stream: Any = None, *,
                 lookup: Callable[[dict, str], Any]):
        self.spec, self.run_dir, self.total, self.lookup = spec, run_dir, total, lookup
        self.stream = stream or sys.stdout
        self.metric = spec.scheduler.metric if spec.scheduler.type == "asha" else None
        self.trials: dict[str, Any] = {}
        self.alarmed: set[str] = set()  # trials whose over-optimization alarm has been printed

    def prefix(self, trial: Any) -> str:
        axes = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in trial.axes.items())
        return f"[{trial.trial_id[:6]} {trial.index + 1}/{self.total} {axes} seed={trial.seed}]"

    def line(self, trial: Any, result: dict) -> Optional[str]:
        ev, stage = result.get("event"), result.get("stage", "")
        if ev == "start":
            return f"{self.prefix(trial)} {stage} ..."
        if ev == "end" and stage == "done":
            if result.get("status") == "ok":
                keys = [k for k in dict.fromkeys((self.spec.search.metric, "ppo/reward_mean",
                                                  "rm/separation_margin")) if k in result][:2]
                return f"{self.prefix(trial)} done " + " ".join(f"{k}={_fmt(result[k])}" for k in keys)
            return f"{self.prefix(trial)} FAILED {result.get('error', '')}"[:200]
        if ev == "end":
            hit = " (cache hit)" if result.get("cache_hit") else ""
            return f"{self.prefix(trial)} {stage} done {result.get('seconds', 0):.1f}s{hit}"
        if ev == "failed":
            return f"{self.prefix(trial)} {stage} failed: {result.get('error', '')}"[:200]
        if ev == "oom_retry":  # a micro-batch that ran out of memory, halved (rlhf_ablate/runtime.py)
            phase = f" {result['phase']}" if result.get("phase") else ""
            return (f"{self.prefix(trial)} {stage}{phase}: out of memory at micro-batch {result.get('from')}; "
                    f"retrying at {result.get('to')}")
        if ev == "group":  # this trial's PPO stage trains its trial group (rlhf_ablate/run/groups.py)
            n = int(result.get("members", 0))
            return f"{self.prefix(trial)} {stage}: training a group of {n} trials on one base"
        if ev == "repaired":  # the stage cache moved a damaged entry aside (rlhf_ablate/run/cache.py)
            return f"{self.prefix(trial)} {stage}: damaged cache entry {result.get('reason', '')}; rebuilding"[:300]
        if "step" in result:
            step, steps = int(result["step"]), int(result.get("steps", 0) or 0)
            every = max(1, steps // 10)
            keys = [self.metric] if self.metric in result else []
            keys += [k for k in KEY_METRICS if k in result and k not in keys]
            shown = " ".join(f"{k.split('/', 1)[-1]}={_fmt(result[k])}" for k in keys[:2])
            # The step's line every 10% of the steps, at the first and the last; a probed step (gold/*, from
            # rlhf_ablate/ppo/gold.py) adds the probe's numbers, and the step where the alarm fires always prints.
            fired = bool(result.get("ppo/gold/overoptimized")) and trial.trial_id not in self.alarmed
            if step % every and step != steps and step != 1 and not fired:
                return None
            if fired:
                self.alarmed.add(trial.trial_id)
            if "ppo/gold/score" in result:
                shown += (f" gold={_fmt(result['ppo/gold/score'])} proxy={_fmt(result['ppo/gold/proxy'])}"
                          f" rho={_fmt(result.get('ppo/gold/spearman'))} kl={_fmt(result.get('ppo/gold/kl'))}"
                          f" len={_fmt(result.get('ppo/gold/response_len'))}"
                          + (" OVER-OPTIMIZED" if result.get("ppo/gold/overoptimized") else ""))
            return f"{self.prefix(trial)} {stage} step {step}/{steps or '?'} {shown}"
        return None

    def emit(self, text: Optional[str]) -> None:
        if text:
            print(text, file=self.stream, flush=True)

    def callback(self) -> Any:
        from ray.tune import Callback

        lines = self

        class LiveLines(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                t = lines._lookup(trial, result)
                if t is not None:
                    lines.emit(lines.line(t, result))

            def on_trial_error(self, iteration, trials, trial, **info):
                t = lines._lookup(trial, {})
                etype, msg = _error_from_file(getattr(trial, "error_file", None))
                rec = record_failure(lines.run_dir, lines.spec.name, t, etype, msg)
                lines.emit(f"{lines.prefix(t)} FAILED {rec['error']['type']}: {rec['error']['message']}"[:200])

            def on_trial_complete(self, iteration, trials, trial, **info):
                # A trial that ended on its own wrote its result before its last report (reporting is
                # synchronous), so a trial without a finished result here is one the scheduler stopped; its thread
                # is still parked in the report that triggered the stop, so last_result is where it ended.
                t = lines._lookup(trial, {})
                if (read_result(lines.run_dir, t.trial_id) or {}).get("status") not in ("ok", "failed"):
                    last = trial.last_result or {}
                    step = last.get("ppo_step")
                    record_failure(lines.run_dir, lines.spec.name, t, "EarlyStopped",
                                   f"stopped by the {lines.spec.scheduler.type} scheduler at PPO step {step}",
                                   stage=str(last.get("stage", "")), status="stopped", ppo_step=step)
                    lines.emit(f"{lines.prefix(t)} stopped early by {lines.spec.scheduler.type} at PPO step {step}")

        return LiveLines()

    def _lookup(self, trial: Any, result: dict) -> Any:
        t = self.trials.get(trial.trial_id)
        if t is None:
            t = self.lookup(trial.config, trial.trial_id)
            self.trials[trial.trial_id] = t
        return t


def summary_table(results: list[dict], spec: Any, width: int = 100) -> str:
    metric_keys = [k for k in dict.fromkeys([spec.search.metric, "ppo/reward_mean", "rm/separation_margin",
                                             "ppo/rougeL"])
                   if any(k in (r.get("metrics") or {}) for r in results)][:3]
    header = ["trial", "axes", "seed", "status"] + [k.split("/", 1)[-1] if len(k) > 16 else k
                                                    for k in metric_keys] + ["time", "cache hits"]
    rows = []
    for r in sorted(results, key=lambda r: (r.get("index") if isinstance(r.get("index"), int) else 1 << 30)):
        axes = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in (r.get("axes") or {}).items())
        status = r.get("status", "?")
        if status not in FINISHED and r.get("error"):
            status = f"{status}: {r['error'].get('type')}"
        timings = {k: v for k, v in (r.get("timings") or {}).items() if isinstance(v, dict)}
        hits = sum(1 for v in timings.values() if v.get("cache_hit"))
        total = (r.get("timings") or {}).get("total")
        rows.append([r.get("trial_id", "?")[:8], axes[:30], str(r.get("seed", "")), status[:32]]
                    + [_fmt((r.get("metrics") or {}).get(k, "")) for k in metric_keys]
                    + [f"{total:.0f}s" if isinstance(total, (int, float)) else "-",
                       f"{hits}/{len(timings)}" if timings else "-"])
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


