"""``python -m rlhf_ablate doctor [SWEEP]``: what a user runs, in minutes, before a long sweep.

1. The versions that matter (torch and its CUDA, bitsandbytes, transformers, trl, peft) and whether bf16 and 4-bit
   actually run here: a tiny bf16 matmul and a tiny nf4 matmul through bitsandbytes' kernels, each checked against
   float32 (and ``torch.compile`` when a trial asks for ``ppo.generation_backend: compiled``).
2. For the sweep's largest trial by the memory estimate (rlhf_ablate/run/graph.py: estimate_trial_memory_gb), its
   models built through the real loading path on data that fills the configured lengths (run/probe.py: fill_data),
   and one micro-batch of every phase timed, with its peak memory against the estimate on a GPU:
   SFT and RM (two optimizer steps of the real stages), PPO's generation, scoring and update (one micro-batch each,
   on the four roles of ppo/roles.py; another method: two steps of its stage), and eval (one batch of 16 prompts as
   stages/evaluate.py runs it: greedy answers, RM scores, the KL pass; its loading timed apart).
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
import dataclasses
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from ..runtime import StageHooks, observe_stages, release_memory
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


# ---- 2. one micro-batch of every phase ----------------------------------------------------------------------------

class Meter:
    """Time and, on a GPU, peak memory of a block, relative to what was allocated before the models were loaded."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.base = torch.cuda.memory_allocated() if self.cuda else 0
        self.base_reserved = torch.cuda.memory_reserved() if self.cuda else 0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        out = {"seconds": time.perf_counter() - self.t0}
        if self.cuda:
            out["allocated_bytes"] = torch.cuda.max_memory_allocated() - self.base
            out["reserved_bytes"] = torch.cuda.max_memory_reserved() - self.base_reserved
        return out


class _Window(StageHooks):
    """A TRL stage's training, from the prepared model to the end of training (rlhf_ablate/runtime.py)."""

    def __init__(self, meter: Meter):
        self.meter, self.result = meter, None

    def model_ready(self, *models: Any) -> None:
        self.meter.start()

    def trained(self) -> None:
        self.result = self.meter.stop()


STEPS = 2  # optimizer steps of each TRL stage measured: the second holds the AdamW state


def measure_config(cfg: Any) -> Any:
    """The trial cut to what the measurement needs: two optimizer steps of each TRL-trained stage."""
    from ..config import METHOD_CONFIGS

    over = {f"{m}.max_steps": STEPS for m, c in METHOD_CONFIGS.items() if "max_steps" in c.__dataclass_fields__}
    return cfg.replace(**{"sft.max_steps": STEPS, "rm.max_steps": STEPS, **over})


def _trl_stage(node: Any, ctx: Any, out: Path) -> dict:
    meter = Meter()
    window = _Window(meter)
    t0 = time.perf_counter()
    with observe_stages(window):
        node.build(ctx, out)
    if window.result is None:
        raise RuntimeError(f"doctor: the {node.name} stage ended without training")
    release_memory()
    # Loading, preparing, merging and saving: once per stage, whatever its step count.
    return {**window.result, "steps": STEPS, "fixed_seconds": time.perf_counter() - t0 - window.result["seconds"]}


def _ppo_phases(cfg: Any, data: Any, sft: Path, rm: Path, out: Path) -> dict:
    """Generation, scoring and one update micro-batch of PPO on its four roles, as ppo/loop.py runs them."""
    import torch

    from ..ppo import math as ppo_math
    from ..ppo.loop import ppo_update
    from ..ppo.roles import PPOModels
    from ..ppo.rollout import build_batch, score_batch

    p = cfg.ppo
    meter = Meter()
    t0 = time.perf_counter()
    roles = PPOModels(cfg, sft, rm)
    fixed = time.perf_counter() - t0
    dev = next(roles.model.parameters()).device
    prompts = [x.prompt for x in data.ppo_prompts][:roles.plan.rollout_micro]
    res: dict[str, dict] = {}
    warmup = None
    if p.generation_backend == "compiled":  # the first call compiles the decode step: once per process, not per step
        t0 = time.perf_counter()
        roles.generate(prompts)
        warmup = time.perf_counter() - t0
    meter.start()
    responses = roles.generate(prompts)
    res["generation"] = {**meter.stop(), "rows": len(prompts),
                         "tokens": sum(len(r["ids"]) for r in responses), "compile_seconds": warmup}
    b = build_batch(roles.tokenizer, prompts, responses, dev)
    meter.start()
    sc = score_batch(roles, b, p.temperature)
    res["scoring"] = {**meter.stop(), "rows": len(prompts)}
    rewards, _ = ppo_math.per_token_rewards(sc["raw_scores"], sc["old_logprobs"], sc["ref_logprobs"], b["rmask"],
                                            p.kl_coef, p.kl_estimator)
    adv, ret = ppo_math.compute_gae(rewards, sc["old_values"], b["rmask"], p.gamma, p.lam)
    n = min(roles.plan.train_micro, len(prompts))
    keep = lambda d: {k: (v[:n] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in d.items()}  # noqa: E731
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=p.learning_rate)
    one = dataclasses.replace(p, ppo_epochs=1, mini_batch_size=n)
    meter.start()
    ppo_update(roles, optimizer, keep(b), keep(sc), adv[:n], ret[:n], one, torch.Generator().manual_seed(0))
    res["update"] = {**meter.stop(), "rows": n}
    t0 = time.perf_counter()
    roles.save_policy(out)
    res["update"]["fixed_seconds"] = fixed + time.perf_counter() - t0  # loading the four roles, saving the policy
    del roles, optimizer
    release_memory()
    return res


def _eval_phase(cfg: Any, data: Any, sft: Path, rm: Path, policy_dir: Path) -> dict:
    """One eval batch as stages/evaluate.py: evaluate_policy runs it (its text metrics aside): the policy's greedy
    answers, the RM's scores of them, then, with the RM freed, the KL pass. Loading is timed apart."""
    from ..models import generate, load_policy, load_rm, sampling_for, score_texts, seq_cls_scorer
    from ..stages.evaluate import kl_to_reference

    prompts = [x.prompt for x in data.eval][:EVAL_BATCH]
    meter = Meter()
    t0 = time.perf_counter()
    policy, ref, tok = load_policy(cfg, sft, policy_dir)
    rm_model, rm_tok = load_rm(cfg, rm, sft)
    load = time.perf_counter() - t0
    if cfg.ppo.generation_backend == "compiled":  # compile the decode steps of both samplings outside the timing
        generate(policy, tok, prompts, **sampling_for(cfg, "eval").kwargs())
        if ref is not None:
            kl_to_reference(cfg, policy, ref, tok, prompts)
    meter.start()
    t1 = time.perf_counter()
    greedy = generate(policy, tok, prompts, **sampling_for(cfg, "eval").kwargs())
    decode = {"decode_seconds": time.perf_counter() - t1, "decode_tokens": sum(len(g["ids"]) for g in greedy)}
    score_texts(seq_cls_scorer(rm_model), rm_tok, prompts, [g["text"] for g in greedy], cfg.model.max_length)
    del rm_model
    if ref is not None:
        kl_to_reference(cfg, policy, ref, tok, prompts)
    out = {**meter.stop(), "rows": len(prompts), "load_seconds": load, **decode}
    del policy, ref
    release_memory()
    return out


def measure(cfg: Any, work: Path, say: Callable[[str], None]) -> dict:
    """Every phase of one trial, one micro-batch each (see the module docstring); ``work`` holds the artifacts."""
    from .. import models
    from .graph import Ctx, trial_stages
    from .probe import fill_data

    mcfg = measure_config(cfg)
    data = fill_data(mcfg, models.load_tokenizer(mcfg.model))
    data = dataclasses.replace(data, eval=list(data.ppo_prompts)[:EVAL_BATCH])
    nodes = {s.name: s for s in trial_stages(mcfg)}
    dirs: dict[str, Path] = {}
    phases: dict[str, dict] = {}
    for name in ("sft", "rm"):
        say(f"measuring {name} ({STEPS} optimizer steps) ...")
        dirs[name] = work / name
        dirs[name].mkdir(parents=True)
        phases[name] = _trl_stage(nodes[name], Ctx(mcfg, data, dirs=dict(dirs)), dirs[name])
    m = mcfg.method
    dirs[m] = work / m
    dirs[m].mkdir(parents=True)
    if m == "ppo":
        say("measuring ppo: generation, scoring, update (one micro-batch each) ...")
        phases.update(_ppo_phases(mcfg, data, dirs["sft"], dirs["rm"], dirs[m]))
    else:
        say(f"measuring {m} ({STEPS} optimizer steps) ...")
        phases["update"] = _trl_stage(nodes[m], Ctx(mcfg, data, dirs=dict(dirs)), dirs[m])
    say(f"measuring eval ({EVAL_BATCH} prompts: greedy answers, RM scores, the KL pass) ...")
    phases["eval"] = _eval_phase(mcfg, data, dirs["sft"], dirs["rm"], dirs[m])
    release_memory()
    return phases


def estimates(cfg: Any, device: str) -> dict[str, float]:
    """The memory estimate of each measured phase, in bytes (rlhf_ablate/run/graph.py: estimate_stage_bytes): a
    phase of PPO is PPO's resident part plus that phase."""
    from .graph import estimate_stage_bytes

    st = estimate_stage_bytes(cfg, device)
    out = {k: st[k]["peak"] for k in ("sft", "rm") if k in st}
    m = st.get(cfg.method, {})
    resident = m.get("peak", 0.0) - m.get("largest_phase", 0.0)
    for ph in ("generation", "scoring", "update"):
        out[ph] = resident + m[f"phase:{ph}"] if f"phase:{ph}" in m else m.get("peak", 0.0)
    ev = st.get("eval_" + cfg.method)
    if ev:
        out["eval"] = ev["peak"]
    return out


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
    say("phase       unit                     seconds  measured alloc / reserved MiB  estimate MiB")
    units = {"sft": f"optimizer step (x{STEPS})", "rm": f"optimizer step (x{STEPS})", "generation": "rollout "
             "micro-batch", "scoring": "rollout micro-batch", "update": "train micro-batch", "eval": f"{EVAL_BATCH} eval prompts"}
    for ph, r in phases.items():
        unit = units[ph] if not (ph == "update" and cfg.method != "ppo") else f"{cfg.method} step (x{STEPS})"
        mem = (f"{_mib(r.get('allocated_bytes'))} / {_mib(r.get('reserved_bytes'))}" if gpu else "not measured (CPU)")
        say(f"{ph:<11} {unit:<24} {r['seconds']:8.2f}  {mem:<30} {_mib(est.get(ph))}")
    fixed = {ph: r["fixed_seconds"] for ph, r in phases.items() if r.get("fixed_seconds")}
    if "eval" in phases:
        fixed["eval"] = phases["eval"]["load_seconds"]
    say("  once per stage (loading, preparing, merging, saving): "
        + ", ".join(f"{'ppo' if ph == 'update' and cfg.method == 'ppo' else ph} {v:.2f} s" for ph, v in fixed.items()))
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
    for t, hours, basis, secs in rows:
        axes = ", ".join(f"{k}={v}" for k, v in t.axes.items())
        say(f"  #{t.index} {t.trial_id} ({axes + ', ' if axes else ''}seed={t.seed}): {hours:.4g} h"
            + ("" if basis == "measured" else " *") + "  ("
            + ", ".join(f"{k} {v / 60:.2f} min" for k, v in secs.items()) + ")")
    say(f"total: {total:.4g} device-hours for {len(trials)} trial(s), stages shared through the stage cache "
        f"counted once ({sum(r[1] for r in rows):.4g} h if none were shared)")
    say("measured: one micro-batch (or two optimizer steps) of each phase of the largest trial, and each stage's "
        "loading and saving; extrapolated: every count (SFT/RM steps from the data and max_steps/epochs, their batches' padded "
        "length from a sample of the data, total_episodes // "
        "rollout_batch_size PPO steps, eval prompts), and for * trials their sizes, linearly in tokens, at the "
        "measured trial's speed per token (its model, quantization and LoRA ranks); not counted: process start-up, "
        "reading data, eval's text metrics, compare")
    say(f"cached {len(rows)} forecast(s) under {doctor_dir()} (sweep --dry-run shows them)")
    say(f"doctor finished in {time.perf_counter() - t_start:.0f} s: nothing broken")
    return 0
