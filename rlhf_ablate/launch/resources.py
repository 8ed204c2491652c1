"""Per-trial resources: a GPU-memory estimate, packing small trials several to a GPU, refusing impossible ones.

The estimate is :func:`rlhf_ablate.run.graph.estimate_trial_memory_gb`: the peak of the trial's largest stage as the
stages actually run it (weights at 4-bit or full width, LoRA or full fine-tune optimizer state, activations with or
without checkpointing, the logits of the response positions, PPO's generation KV cache, micro-batches: the formula
is in rlhf_ablate/models/memory.py), times the allocator's fragmentation, plus the CUDA context.
benchmarks/bench_memory.py measures it against the truth. The sweep's ``resources.memory_gb`` replaces it when set,
for models whose config cannot be read offline or when you measured the real peak.

Packing rule (``resources.gpu: auto``, the default):

- no GPU visible: 0 GPUs, the trial runs on CPU;
- otherwise a GPU *fraction* ``ceil(8 * SAFETY_MARGIN * estimate / smallest_gpu_gb) / 8``, capped at 1: Ray then
  places up to 8 small trials on one GPU and never more than fit by the estimate with its margin. The smallest GPU
  is used so that a fraction fits wherever Ray puts it. The margin applies to the model-based estimate only, not
  to a ``resources.memory_gb`` you give or to a probe's measurement;
- a trial whose estimate exceeds the largest GPU is refused before anything starts (:class:`ConfigError` naming
  the trial and the numbers) rather than dying with CUDA OOM hours later. Lower ``ppo.rollout_micro_batch_size``,
  ``ppo.mini_batch_size`` (or raise ``ppo.grad_accum``), ``model.max_length`` or use ``model.quantization: nf4``.

``resources.gpu: probe`` measures instead of estimating, on a machine with a GPU: each distinct model and batch
configuration of the sweep runs SFT, RM and PPO for a step or two on this machine's first GPU
(rlhf_ablate/run/probe.py: one generation, scoring and update micro-batch of PPO, at the configured lengths), and the
measured peak (``torch.cuda.max_memory_allocated``, times the fragmentation factor, plus the CUDA context) replaces
the estimate. Measurements are cached per configuration in ``<stage cache>/memory_probe.json``. Without a GPU,
``probe`` falls back to the estimate.

A number for ``resources.gpu`` (``0.5``, ``1``, ``2``) is used as given: you know your trials best.

GPU memory is read with ``torch.cuda.mem_get_info`` (free GiB per visible device, so memory other processes hold
counts against the trial), or ``nvidia-smi`` when torch has no CUDA. ``RLHF_ABLATE_GPUS`` (comma-separated GiB
per GPU, e.g. ``80,80``; empty for none) overrides the detection, for a Ray cluster whose driver machine has no
GPU or for tests.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from typing import Any, Optional

from ..errors import ConfigError, RlhfAblateError

FRACTION_STEP = 8  # GPU fractions are multiples of 1/8: at most 8 trials share a GPU
# Packing asks for the model-based estimate times this: benchmarks/bench_memory.py accepts estimates from 0.75 to
# 1.33 of the measured peak (its CPU ratios are in benchmarks/README.md), and 1.25 keeps a trial whose estimate is
# 20 % low inside its share of the GPU. GPU figures were not measured yet, which is one more reason for the margin.
SAFETY_MARGIN = 1.25


def detect_gpus() -> list[float]:
    """Free memory (GiB) of each GPU visible to this process; [] when there is none."""
    env = os.environ.get("RLHF_ABLATE_GPUS")
    if env is not None:
        try:
            return [float(x) for x in env.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"RLHF_ABLATE_GPUS={env!r} must be comma-separated GiB per GPU, e.g. 80,80.") from None
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return []
    if shutil.which("nvidia-smi") is None:  # no driver: skip importing torch just to learn there is no GPU
        return []
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.mem_get_info(i)[0] / 1024 ** 3 for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - fall back to nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    free = {int(i): float(m) / 1024 for i, m in (line.split(",") for line in out.strip().splitlines() if line)}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        try:
            return [free[int(v)] for v in visible.split(",") if int(v) in free]
        except ValueError:  # UUIDs in CUDA_VISIBLE_DEVICES: count only
            return list(free.values())[:len(visible.split(","))]
    return [free[i] for i in sorted(free)]


def estimate_gb(spec: Any, trial: Any) -> Optional[float]:
    """The trial's estimated peak GPU memory (GiB): ``resources.memory_gb`` if set, a probe's measurement with
    ``resources.gpu: probe`` on a GPU machine, else the model-based estimate; None when the base model's config cannot
    be read (a hub id offline)."""
    if spec.resources.memory_gb is not None:
        return float(spec.resources.memory_gb)
    if spec.resources.gpu == "probe" and detect_gpus():
        return probe_gb(spec, trial)
    from ..run.graph import estimate_trial_memory_gb
    from ..run.groups import group_key, group_size

    model = trial.config.model
    if model in _UNREADABLE:  # a hub config that failed once fails again (and each try may retry for a minute)
        return None
    try:
        # In a trial group any member may train the whole group (rlhf_ablate/run/groups.py): each asks for that.
        k = group_size(spec) if group_key(trial.config, spec.resources.cpu) is not None else 1
        if k > 1:
            return float(group_memory_gb(trial.config, k))
        return float(estimate_trial_memory_gb(trial.config))
    except (RlhfAblateError, OSError, ValueError):
        _UNREADABLE.add(model)
        return None


_UNREADABLE: set = set()  # ModelConfigs whose config could not be read in this process


def group_memory_gb(cfg: Any, k: int, dtype: Optional[str] = None) -> float:
    """Estimated peak GPU memory (GiB) of a trial whose PPO stage trains a group of ``k``: its largest stage
    (:func:`group_stage_bytes`), times the allocator factor, plus the CUDA context (run/graph.py:
    estimate_trial_memory_gb)."""
    from ..models import memory

    stages = group_stage_bytes(cfg, k, dtype)
    return memory.FRAGMENTATION * max(s["peak"] for s in stages.values()) / memory.GIB + memory.CUDA_OVERHEAD_GIB


def group_stage_bytes(cfg: Any, k: int, dtype: Optional[str] = None) -> dict[str, dict[str, float]]:
    """The trial's stage estimates (run/graph.py: estimate_stage_bytes) with PPO's and its eval's for a group of
    ``k``: one base, ``k`` policy and value adapters with their AdamW state, and ``k`` times the rows of every
    generation, scoring and update pass (the member's estimate at ``k`` times the rollout, micro and minibatch
    sizes); the batched eval generates ``k`` times the rows (its generation phase, linear in the rows, times ``k``;
    its KL pass at ``k`` times the micro-batch)."""
    import dataclasses

    from ..run.graph import estimate_stage_bytes

    stages = estimate_stage_bytes(cfg, "cuda", dtype)
    if k > 1 and "ppo" in stages:
        p = cfg.ppo
        wide = dataclasses.replace(cfg, ppo=dataclasses.replace(
            p, rollout_batch_size=k * p.rollout_batch_size, rollout_micro_batch_size=k * p.rollout_micro_batch_size,
            mini_batch_size=k * p.mini_batch_size))
        widened = estimate_stage_bytes(wide, "cuda", dtype)
        ppo = {kk: v for kk, v in widened["ppo"].items() if kk != "peak"}
        ppo["trainable"] = k * stages["ppo"]["trainable"]
        from ..models.memory import with_peak

        stages["ppo"] = with_peak(ppo)
        if "eval_ppo" in widened and not cfg.eval.do_sample:  # the members' evals batched (run/groups.py)
            ev = {kk: v for kk, v in widened["eval_ppo"].items() if kk != "peak"}
            ev["phase:generation"] = k * stages["eval_ppo"]["phase:generation"]
            ev["largest_phase"] = max(v for kk, v in ev.items() if kk.startswith("phase:"))
            stages["eval_ppo"] = with_peak(ev)
    return stages


def auto_group_size(spec: Any, trials: list, gpus: list[float], margin: float) -> int:
    """``auto``: the largest K up to ``run/groups.py: MAX_AUTO`` (and the widest bucket of groupable trials) whose group
    estimate times ``margin`` fits the smallest of ``gpus``; without GPUs, ``run/groups.py: MAX_AUTO``."""
    from ..run import groups

    buckets = groups.buckets(spec, trials)
    widest = max((len(v) for k, v in buckets.items() if not k.startswith("alone-")), default=1)
    if not gpus or widest < 2:
        return min(groups.MAX_AUTO, max(1, widest))
    first = min(v[0] for k, v in buckets.items() if not k.startswith("alone-") and len(v) == widest)
    for k in range(min(groups.MAX_AUTO, widest), 1, -1):
        if group_memory_gb(trials[first].config, k) * margin <= min(gpus):
            return k
    return 1


def resolve_group_size(spec: Any, trials: list, gpus: Optional[list[float]] = None) -> Any:
    """``spec`` with ``resources.group_size: auto`` replaced by the K it means on this machine (the largest group
    whose estimate, with the packing margin, fits the smallest GPU; rlhf_ablate/run/groups.py: auto_group_size).
    Resolved once by the driver (and by a SLURM task from the same GPUs), so every member agrees on its group."""
    import dataclasses

    if spec.resources.group_size != "auto":
        return spec
    k = auto_group_size(spec, trials, detect_gpus() if gpus is None else gpus, SAFETY_MARGIN)
    return dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, group_size=k))


def group_column(spec: Any, trials: list) -> dict[str, list[str]]:
    """The ``sweep --dry-run`` table's ``group`` column: ``g<n>/<K>`` (the n-th group, of K members) or ``alone``
    with why (rlhf_ablate/run/groups.py)."""
    from ..run.groups import alone_reason, plan_groups

    if spec.resources.group_size == 1:
        return {}
    where = {}
    for n, g in enumerate(plan_groups(spec, trials)):
        for t in g:
            where[t.trial_id] = f"g{n}/{len(g)}" if len(g) > 1 else "alone"
    return {"group": [where[t.trial_id] + (f" ({why})" if where[t.trial_id] == "alone"
                                           and (why := alone_reason(t.config)) else "") for t in trials]}


def dry_run_columns(spec: Any, trials: list) -> dict[str, list[str]]:
    """``sweep --dry-run``'s columns of this module: the trial groups and each trial's estimate and request."""
    spec = resolve_group_size(spec, trials)
    return {**group_column(spec, trials), **estimate_column(spec, trials)}


def _describe(trial: Any) -> str:
    axes = ", ".join(f"{k}={v}" for k, v in trial.axes.items())
    return f"trial {trial.index} ({trial.trial_id}{', ' + axes if axes else ''}, seed={trial.seed})"


def gpu_fraction(estimate: float, gpus: list[float]) -> float:
    frac = math.ceil(FRACTION_STEP * estimate / min(gpus) - 1e-9) / FRACTION_STEP
    return min(1.0, max(1.0 / FRACTION_STEP, frac))


def _margin(spec: Any) -> float:
    """The safety margin on what packing requests: only the model-based estimate gets one (see the docstring)."""
    measured = spec.resources.memory_gb is not None or spec.resources.gpu == "probe"
    return 1.0 if measured else SAFETY_MARGIN


def probe_key(trial_cfg: Any) -> str:
    """What a probe's measurement depends on: the model config, the stages' batch and length settings, and what else
    sets a stage's peak: eval's answer length and decoding backend (``ppo.generation_backend``, which every method's
    eval decodes with), the RM stages that run (``rm.ensemble_size``, ``rm.gold``) and, for PPO, the reward models it
    holds (``ppo.reward``, ``ppo.gold``) and the gold probe's size."""
    from ..files import config_hash

    c = trial_cfg.to_dict()
    shared = ("lora_rank", "batch_size", "grad_accum", "rollout_batch_size", "rollout_micro_batch_size",
              "mini_batch_size", "max_prompt_length", "max_new_tokens", "init_from")
    extra = {"rm": ("ensemble_size", "gold"), "ppo": ("reward", "gold", "gold_probe_size", "generation_backend")}
    keep = {"model": c["model"], "method": c["method"],
            **{s: {k: v for k, v in c[s].items() if k in shared + extra.get(s, ())}
               for s in ("sft", "rm", c["method"])},
            "eval": {"max_new_tokens": c["eval"]["max_new_tokens"],
                     "generation_backend": c["ppo"]["generation_backend"],
                     "max_prompt_length": c["ppo"]["max_prompt_length"]}}
    return config_hash(keep)[:16]


def probe_gb(spec: Any, trial: Any) -> float:
    """Measured peak GPU memory (GiB) of the trial's configuration: a short run of each stage on the first GPU
    (rlhf_ablate/run/probe.py), cached per :func:`probe_key` in ``<stage cache>/memory_probe.json``."""
    import json
    import tempfile
    from pathlib import Path

    from ..files import write_json
    from ..models.memory import CUDA_OVERHEAD_GIB, FRAGMENTATION, GIB
    from ..rundir import default_cache_root
    from ..run.probe import measure_stages, probe_overrides

    cache = default_cache_root(spec) / "memory_probe.json"
    key = probe_key(trial.config)
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in known:
        cfg = trial.config.replace(**probe_overrides(trial.config))
        with tempfile.TemporaryDirectory(prefix="memory_probe-") as work:
            res = measure_stages(cfg.to_dict(), Path(work), "cuda")
        known = json.loads(cache.read_text()) if cache.exists() else {}
        known[key] = {"base_model": trial.config.model.base_model,
                      "stages_gib": {k: v["measured_bytes"] / GIB for k, v in res.items()}}
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, known)
    return FRAGMENTATION * max(known[key]["stages_gib"].values()) + CUDA_OVERHEAD_GIB


def trial_resources(spec: Any, trial: Any, gpus: list[float], estimate: Optional[float] = None) -> dict:
    """Ray resource request of one trial: ``{"cpu": n, "gpu": g, "estimate_gb": e}``.

    ``gpus`` is the free GiB of each GPU (:func:`detect_gpus`). Raises :class:`ConfigError` when the trial cannot
    fit on the largest GPU. ``estimate`` skips recomputing the estimate when the caller already has it."""
    cpu = spec.resources.cpu
    est = estimate if estimate is not None else estimate_gb(spec, trial)
    if gpus and est is not None and est > max(gpus):
        raise ConfigError(
            f"{spec.path}: {_describe(trial)} needs about {est:.1f} GiB of GPU memory "
            f"(model.base_model={trial.config.model.base_model}, model.quantization="
            f"{trial.config.model.quantization}), more than the largest GPU has free ({max(gpus):.1f} GiB). "
            f"Refused before launch: use model.quantization=nf4, a LoRA rank > 0, smaller ppo.rollout_batch_size / "
            f"ppo.mini_batch_size / model.max_length, or set resources.memory_gb if you measured less.")
    if not isinstance(spec.resources.gpu, str):  # a number: as given
        gpu = float(spec.resources.gpu)
    elif not gpus:
        gpu = 0.0
    elif est is None:
        gpu = 1.0  # unknown size: a whole GPU is the safe request
    else:
        gpu = gpu_fraction(est * _margin(spec), gpus)
    return {"cpu": cpu, "gpu": gpu, "estimate_gb": est}


def format_request(res: dict) -> str:
    g = res["gpu"]
    gpu = "0 GPU" if g == 0 else (f"{g:g} GPU" if g >= 1 else f"{g:.3g} GPU ({round(1 / g, 2):g}/GPU)")
    return f"{res['cpu']} CPU, {gpu}"


def estimate_column(spec: Any, trials: list, gpus: Optional[list[float]] = None) -> dict[str, list[str]]:
    """Extra columns of the ``sweep --dry-run`` table: estimated GPU GiB and the resource request (or REFUSED)."""
    gpus = detect_gpus() if gpus is None else gpus
    est_col, req_col = [], []
    for t in trials:
        est = estimate_gb(spec, t)
        est_col.append("?" if est is None else f"{est:.2f}")
        try:
            req_col.append(format_request(trial_resources(spec, t, gpus, estimate=est)))
        except ConfigError:
            req_col.append(f"REFUSED (> {max(gpus):.1f} GiB)")
    return {"est. GPU GiB": est_col, "request": req_col}
