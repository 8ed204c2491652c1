"""``python -m rlhf_ablate doctor [SWEEP]``: what a user runs, in minutes, before a long sweep.

1. The versions that matter (torch and its CUDA, bitsandbytes, transformers, trl, peft) and whether bf16 and 4-bit
   actually run here: a tiny bf16 matmul and a tiny nf4 matmul through bitsandbytes' kernels, each checked against
   float32 (and ``torch.compile`` when a trial asks for ``ppo.generation_backend: compiled``).
2. For the sweep's largest trial by the memory estimate (rlhf_ablate/run/graph.py: estimate_trial_memory_gb), its
   models built through the real loading path on data that fills the configured lengths (run/probe.py: fill_data),
   and one micro-batch of every phase timed, with its peak memory against the estimate on a GPU:
   SFT, RM and the over-optimization reward stages rm_gold / rm_ensemble (two optimizer steps of the real stages, of
   each ensemble member), PPO's generation, scoring and update (one micro-batch each, on the roles of ppo/roles.py
   with the trial's extra reward models) and, with ``ppo.gold`` set, one gold-probe evaluation (answers, proxy and
   gold scores of ``ppo.gold_probe_size`` prompts); another method: two steps of its stage; and eval (one batch of
   16 prompts as stages/evaluate.py runs it: greedy answers, then the RM's scores, then the KL pass; loading timed
   apart). The measuring is rlhf_ablate/run/doctor_phases.py.
3. Decode tokens/s of the rollout micro-batch and of eval's greedy answers.
4. A forecast of the sweep's device-hours, per trial and in all: each stage's measured time per unit (optimizer
   step, rollout micro-batch, eval prompt) times the trial's own counts (SFT and RM steps from the data and
   ``max_steps``/``epochs``, PPO steps = ``total_episodes // rollout_batch_size``, eval prompts), scaled linearly in
   tokens for trials whose batch sizes or lengths differ from the measured one; stages that trials share through the
   stage cache (same key) are counted once in the total.
5. The forecast per trial, cached as JSON under the cache root (``<cache>/doctor/<key>.json``), keyed by what
   decides speed (model section, lengths, batch sizes, ranks, step counts, data, backend, device name, threads), so
   that ``sweep --dry-run`` shows it for any trial of the same configuration (run/forecast.py).

Exit 1 with the problem named when something the sweep needs does not work here (4-bit without working kernels,
bf16 where the trials compute in bf16, a compiled backend that cannot build, a phase that fails).
"""

from __future__ import annotations

import contextlib
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from .doctor_phases import STEPS, estimates, measure
from .forecast import EVAL_BATCH, device_name, doctor_dir, forecast_sweep


# ---- 1. versions and device checks ------------------------------------------------------------------------------

def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> list[str]:
    import platform

    import torch

    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {device_name()}"
            if torch.cuda.is_available() else f"no GPU visible (built with CUDA {torch.version.cuda})"
            if torch.version.cuda else "CPU build, no CUDA")
    return [f"python {platform.python_version()}, torch {torch.__version__} ({cuda})",
            "transformers " + _version("transformers") + ", trl " + _version("trl") + ", peft " + _version("peft")
            + ", bitsandbytes " + _version("bitsandbytes")]


def _check(fn: Callable[[], str]) -> tuple[bool, str]:
    try:
        return True, fn()
    except Exception as e:  # noqa: BLE001 - a check reports what broke, whatever it was
        return False, f"{type(e).__name__}: {' '.join(str(e).split())[:240]}"


def _bf16() -> str:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(dev)
    err = ((a.bfloat16() @ a.bfloat16()).float() - a @ a).abs().max().item()
    if not err < 1.0:
        raise RuntimeError(f"bf16 matmul is off by {err:.3g} from float32")
    return f"a 64x64 bf16 matmul runs on {dev} (max error {err:.2g} against float32)"


def _nf4() -> str:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g).to(dev)
    x = torch.randn(4, 64, generator=g).to(dev)
    q, state = F.quantize_4bit(w, quant_type="nf4")
    y = bnb.matmul_4bit(x, q.t(), quant_state=state)
    ref = x @ F.dequantize_4bit(q, state).t()
    err = (y.float() - ref.float()).abs().max().item()
    if not err < 1e-2 * max(1.0, ref.abs().max().item()):
        raise RuntimeError(f"the nf4 matmul disagrees with its dequantized weight by {err:.3g}")
    return f"an nf4 linear runs through bitsandbytes' kernels on {dev} (agrees with its dequantized weight)"


def device_checks(trials: list) -> tuple[list[str], list[str]]:
    """(lines, problems) of bf16, 4-bit and, if asked for, compiled decoding on this device."""
    import torch

    from ..models import compute_dtype

    gpu = torch.cuda.is_available()
    lines, problems = [], []
    wants_bf16 = any(compute_dtype(t.config.model) == "bfloat16" for t in trials)
    ok, msg = _check(_bf16)
    lines.append(f"bf16: {'yes' if ok else 'NO'}: {msg}" + ("" if gpu else "; on the CPU `model.compute_dtype: auto` "
                                                             "computes in float32, bf16 only when asked for"))
    if not ok and wants_bf16:
        problems.append(f"bf16 does not run here but trials compute in bf16: {msg}. Set model.compute_dtype=float32.")
    wants_4bit = any(t.config.model.quantization != "none" for t in trials)
    ok, msg = _check(_nf4)
    lines.append(f"4-bit: {'yes' if ok else 'NO'}: {msg}" + ("" if gpu else "; on the CPU it is correct but slow "
                                                             "(bitsandbytes' CPU path), for tests, not for sweeps"))
    if not ok and wants_4bit:
        problems.append(f"4-bit is requested (model.quantization) but bitsandbytes' kernels do not run here: {msg}. "
                        f"Install a bitsandbytes build for this device, or set model.quantization=none.")
    if any(t.config.ppo.generation_backend == "compiled" for t in trials):
        from ..models.decoding import compile_unavailable

        why = compile_unavailable()
        lines.append("torch.compile: " + ("builds code here" if why is None else f"NO: {why}"))
        if why is not None:
            problems.append(f"ppo.generation_backend=compiled, but torch.compile cannot build here ({why}); set "
                            f"ppo.generation_backend=eager.")
    return lines, problems


# ---- the command ---------------------------------------------------------------------------------------------------

def _mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2 ** 20:.1f}"


def _largest(trials: list) -> tuple[Any, Optional[float]]:
    from .graph import estimate_trial_memory_gb

    best, best_gb = trials[0], None
    for t in trials:
        try:
            gb = float(estimate_trial_memory_gb(t.config))
        except Exception:  # noqa: BLE001 - a config the estimate cannot read (a hub id offline) is not the largest
            continue
        if best_gb is None or gb > best_gb:
            best, best_gb = t, gb
    return best, best_gb


def run_doctor(spec: Any, trials: list, work: Path, say: Optional[Callable[[str], None]] = None) -> int:
    """The whole check (module docstring); prints as it goes (to the stdout of the call), returns the exit code (0
    fine, 1 a problem)."""
    import torch

    out = sys.stdout
    say = say or (lambda m: print(m, file=out, flush=True))

    from ..runtime import set_threads

    t_start = time.perf_counter()
    set_threads(spec.resources.cpu)
    dev = device_name()
    say(f"doctor: sweep {spec.name}, {len(trials)} trial(s), device {dev}, {torch.get_num_threads()} torch thread(s)")
    for line in versions():
        say("  " + line)
    lines, problems = device_checks(trials)
    for line in lines:
        say("  " + line)
    if problems:
        for p in problems:
            say(f"PROBLEM: {p}")
        return 1
    trial, gb = _largest(trials)
    axes = ", ".join(f"{k}={v}" for k, v in trial.axes.items())
    say(f"largest trial: #{trial.index} {trial.trial_id} ({axes + ', ' if axes else ''}seed={trial.seed}), "
        f"estimated peak {'?' if gb is None else f'{gb:.2f}'} GiB on a GPU")
    cfg = trial.config
    try:
        # The libraries' own prints (TRL's log rows) go to a log file in the work directory, not between our lines.
        with open(work / "libraries.log", "w") as log, contextlib.redirect_stdout(log):
            phases = measure(cfg, work, lambda m: say("  " + m))
    except Exception as e:  # noqa: BLE001 - the sweep would fail the same way: name it, exit 1
        say(f"PROBLEM: measuring trial #{trial.index} failed: {type(e).__name__}: {' '.join(str(e).split())[:400]}")
        return 1
    gpu = torch.cuda.is_available()
    est = estimates(cfg, "cuda" if gpu else "cpu")
    say("phase            unit                     seconds  measured alloc / reserved MiB  estimate MiB")
    probe = f"probe of {cfg.ppo.gold_probe_size}"
    units = {"sft": f"optimizer step (x{STEPS})", "rm": f"optimizer step (x{STEPS})", "rm_gold": f"optimizer step "
             f"(x{STEPS})", "rm_ensemble": f"opt. step (x{STEPS}) per RM", "generation": "rollout micro-batch",
             "scoring": "rollout micro-batch", "update": "train micro-batch", "eval": f"{EVAL_BATCH} eval prompts",
             "probe_generation": probe, "probe_proxy": probe, "probe_gold": probe}
    for ph, r in phases.items():
        unit = units[ph] if not (ph == "update" and cfg.method != "ppo") else f"{cfg.method} step (x{STEPS})"
        mem = (f"{_mib(r.get('allocated_bytes'))} / {_mib(r.get('reserved_bytes'))}" if gpu else "not measured (CPU)")
        say(f"{ph:<16} {unit:<24} {r['seconds']:8.2f}  {mem:<30} {_mib(est.get(ph))}")
    fixed = {ph: r["fixed_seconds"] for ph, r in phases.items() if r.get("fixed_seconds")}
    if "eval" in phases:
        fixed["eval"] = phases["eval"]["load_seconds"]
    say("  once per stage (loading, preparing, merging, saving): "
        + ", ".join(f"{'ppo' if ph == 'update' and cfg.method == 'ppo' else ph} {v:.2f} s"
                    + (" per RM" if ph == "rm_ensemble" else "") for ph, v in fixed.items()))
    if not gpu:
        say("  memory is measured on a GPU only (torch.cuda.max_memory_allocated/reserved); on the CPU the "
            "estimates are for a GPU run of this trial")
    if "generation" in phases:
        g = phases["generation"]
        say(f"decode: {g['tokens']} response tokens for {g['rows']} prompts in {g['seconds']:.2f} s = "
            f"{g['tokens'] / g['seconds']:.1f} tokens/s (PPO rollout micro-batch, ppo.generation_backend="
            f"{cfg.ppo.generation_backend}, prefill included"
            + (f"; the first call, which compiled, took {g['compile_seconds']:.1f} s" if g.get("compile_seconds")
               else "") + ")")
    e = phases.get("eval", {})
    if e.get("decode_seconds"):
        say(f"decode: {e['decode_tokens']} response tokens for {e['rows']} prompts in {e['decode_seconds']:.2f} s = "
            f"{e['decode_tokens'] / e['decode_seconds']:.1f} tokens/s (eval's greedy answers, prefill included)")
    # ---- forecast -------------------------------------------------------------------------------------------
    say("forecast (device-hours on this device; * extrapolated linearly in tokens from the measured trial):")
    rows, total = forecast_sweep(spec, trials, trial, phases, dev)
    for t, hours, basis, secs, probe in rows:
        axes = ", ".join(f"{k}={v}" for k, v in t.axes.items())
        say(f"  #{t.index} {t.trial_id} ({axes + ', ' if axes else ''}seed={t.seed}): {hours:.4g} h"
            + ("" if basis == "measured" else " *") + "  ("
            + ", ".join(f"{k} {v / 60:.2f} min" + (f" (gold probe {probe / 60:.2f})" if k == "ppo" and probe else "")
                        for k, v in secs.items()) + ")")
    say(f"total: {total:.4g} device-hours for {len(trials)} trial(s), stages shared through the stage cache "
        f"counted once ({sum(r[1] for r in rows):.4g} h if none were shared)")
    say("measured: one micro-batch (or two optimizer steps) of each phase of the largest trial, and each stage's "
        "loading and saving (rm_ensemble: per RM); extrapolated: every count (SFT/RM steps from the data and "
        "max_steps/epochs, the RMs on their fold of rm.gold=disjoint, rm_gold's rm.gold_max_steps, ensemble_size - 1 "
        "extra RMs, their batches' padded length from a sample of the data, total_episodes // rollout_batch_size PPO "
        "steps, gold-probe evaluations at step 0, every gold_every steps and the last, eval prompts), and for * "
        "trials their sizes, linearly in tokens (scoring also in forward passes: 3 + the reward models PPO's reward "
        "reads), at the measured trial's speed per token (its model, quantization and LoRA ranks); a probe the "
        "measured trial lacked is its rollout phases per token; not counted: process start-up, reading data, eval's "
        "text metrics, compare")
    say(f"cached {len(rows)} forecast(s) under {doctor_dir()} (sweep --dry-run shows them)")
    say(f"doctor finished in {time.perf_counter() - t_start:.0f} s: nothing broken")
    return 0
