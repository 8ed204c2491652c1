"""Memory: the estimate (rlhf_ablate/models/memory.py: estimate_stage_bytes) against the measured peak of SFT, RM and
PPO, for width-true models of the shapes our users run.

Each shape keeps the real model's hidden size, heads, KV heads, intermediate size and vocabulary (Llama-3.2-1B,
Llama-3.1-8B, the shape of Kanana-8B, and Gemma-2-2B; rlhf_ablate/models/families.py), randomly initialised from its
config with a few layers. Every stage runs for real on data that fills the configured lengths, shortened to a step
or two, in a fresh process (rlhf_ablate/run/probe.py):

- on the CPU the measurement is the process's peak anonymous resident memory (file-backed pages, i.e. the
  memory-mapped checkpoint, left out) minus the same before the model was loaded; on a GPU, ``torch.cuda.max_memory_allocated`` minus what was allocated before;
- the estimate is computed for the same configuration and the same device (``estimate_stage_bytes(cfg, device)``:
  on the CPU TRL's torch fallback of its fused LM head is modelled; the packer's GPU figure adds the allocator's
  fragmentation factor and the CUDA context, which a measurement of allocated bytes does not see).

Everything computes in bf16 (``model.compute_dtype: bfloat16``, with autocast, on the CPU too): the dtype ``auto``
picks on a GPU, so the estimate's GPU branch is the one measured; and the fp32 embeddings and LM head of the 8B shape
alone would take 4.2 GB.

Each shape is measured at two depths; the difference is the per-layer cost, measured and estimated, and the
full-depth figures extrapolate from the deeper one (``measured(L) + (layers - L) * per_layer``). One measurement stays
under about 3.5 GiB.

    python benchmarks/bench_memory.py --device cpu --mode totals [--shapes llama-3.2-1b,...] [--work DIR [--reuse]]

Writes the ``totals`` part of benchmarks/results/memory.json: one entry per stage and shape, ``ratio`` = estimate /
measured at the deeper measured depth, the per-layer figures, and the full depth extrapolated from them
(``full_depth_extrapolated_gib``: never measured at full depth).

**What grows** (``--mode slopes``, the default; bench_memory_slopes.py): each phase measured at two batch sizes and
two sequence lengths, and the slopes (bytes per extra sequence, per extra token) compared with the estimate's. Imports torch, transformers, peft and bitsandbytes only
(the stages import TRL in the child processes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_ablate.config import trial_config_from_overrides  # noqa: E402
from rlhf_ablate.models.families import FAMILIES  # noqa: E402
from rlhf_ablate.models.memory import GIB  # noqa: E402
from rlhf_ablate.run.graph import estimate_stage_bytes  # noqa: E402

# The settings every shape runs with: nf4 base, LoRA 8 everywhere, SFT and RM on 2 sequences of 256 tokens (RM:
# one chosen/rejected pair), PPO rollouts of 4 prompts of 192 + 64 tokens generated and scored 4 at a time, updated
# 2 at a time. Small enough for a 2-core CPU, large enough that activations and logits are a good part of the peak.
SETTINGS = {"model.quantization": "nf4", "model.compute_dtype": "bfloat16", "model.max_length": 256,
            "sft.batch_size": 2, "rm.batch_size": 1,
            "ppo.rollout_batch_size": 4, "ppo.rollout_micro_batch_size": 4, "ppo.mini_batch_size": 4,
            "ppo.grad_accum": 2, "ppo.max_prompt_length": 192, "ppo.max_new_tokens": 64}
SHAPES = {
    "llama-3.2-1b": {"depths": (1, 2), "overrides": {}},
    "llama-3.1-8b": {"depths": (1, 2), "overrides": {}},
    "gemma-2-2b": {"depths": (1, 2), "overrides": {}},
}
STAGES = ("sft", "rm", "ppo")
RATIO_BAND = (0.75, 1.33)


def build_model(family: str, layers: int, out: Path) -> None:
    """A random-init model of ``family`` cut to ``layers`` layers, saved in bf16 with the built-in tokenizer (its ids
    are a subset of any of these vocabularies). Built in a child process, so its memory never adds to ours."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from transformers import AutoModelForCausalLM
from rlhf_ablate.config import ModelConfig
from rlhf_ablate.models import ensure_builtin, load_tokenizer
from rlhf_ablate.models.families import family_config
tok = load_tokenizer(ModelConfig(), ensure_builtin("tiny-llama"))
cfg = family_config({family!r}, layers={layers}, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained({str(out)!r}, safe_serialization=True)
tok.save_pretrained({str(out)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def read_measurements(run: Path) -> dict | None:
    """The measurements an earlier run left in ``run`` (each stage's log ends with its PROBE line), or None."""
    found = {}
    for st in STAGES:
        log = run / f"{st}.log"
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("PROBE ")] if log.exists() else []
        if not lines:
            return None
        found[st] = json.loads(lines[-1][len("PROBE "):])
    return found


def run_shape(family: str, spec: dict, device: str, work: Path, reuse: bool = False) -> list[dict]:
    from rlhf_ablate.run.probe import measure_stages, probe_overrides

    rows: dict[int, dict] = {}
    for layers in spec["depths"]:
        mdir = work / f"{family}-L{layers}"
        if not (mdir / "config.json").exists():
            build_model(family, layers, mdir)
        cfg = trial_config_from_overrides({**SETTINGS, **spec["overrides"], "model.base_model": str(mdir)})
        # Shortened as resources.gpu: probe shortens it (a step or two per stage, the phases' sizes as configured);
        # the estimate is of the same configuration.
        cfg = cfg.replace(**probe_overrides(cfg))
        t0 = time.perf_counter()
        run = work / f"run-{family}-L{layers}"
        measured = (read_measurements(run) if reuse else None) or measure_stages(cfg.to_dict(), run, device)
        est = estimate_stage_bytes(cfg, device)
        rows[layers] = {"measured": measured, "estimate": est, "seconds": time.perf_counter() - t0}
        for st in STAGES:
            print(f"{family:13s} L={layers} {st:3s}  estimate {est[st]['peak'] / GIB:6.3f} GiB  measured "
                  f"{measured[st]['measured_bytes'] / GIB:6.3f} GiB  ratio "
                  f"{est[st]['peak'] / measured[st]['measured_bytes']:.3f}", flush=True)
    lo, hi = spec["depths"]
    full = FAMILIES[family].get("num_hidden_layers") or FAMILIES[family].get("n_layer")
    full_dir = work / f"{family}-config-only"  # the estimate reads the config alone: no weights needed at full depth
    if not (full_dir / "config.json").exists():
        from rlhf_ablate.models.families import family_config

        family_config(family).save_pretrained(full_dir)
    full_cfg = trial_config_from_overrides({**SETTINGS, **spec["overrides"], "model.base_model": str(full_dir)})
    full_est = estimate_stage_bytes(full_cfg.replace(**probe_overrides(full_cfg)), device)
    out = []
    for st in STAGES:
        m = {L: rows[L]["measured"][st]["measured_bytes"] for L in (lo, hi)}
        e = {L: rows[L]["estimate"][st]["peak"] for L in (lo, hi)}
        per_m, per_e = (m[hi] - m[lo]) / (hi - lo), (e[hi] - e[lo]) / (hi - lo)
        full_m, full_e = m[hi] + (full - hi) * per_m, full_est[st]["peak"]
        out.append({
            "stage": st, "shape": family, "device": device, "layers_measured": [lo, hi], "layers_full": full,
            "estimate_gib": e[hi] / GIB, "measured_gib": m[hi] / GIB, "ratio": e[hi] / m[hi],
            "estimate_gib_shallow": e[lo] / GIB, "measured_gib_shallow": m[lo] / GIB, "ratio_shallow": e[lo] / m[lo],
            "per_layer_estimate_mib": per_e / 2 ** 20, "per_layer_measured_mib": per_m / 2 ** 20,
            # full depth: measured = the deeper measurement plus (layers - L) measured per-layer increments;
            # estimated = the estimate of the full-depth config
            "full_depth_extrapolated_gib": full_m / GIB, "full_depth_estimate_gib": full_e / GIB,
            "full_depth_ratio": full_e / full_m,
            "estimate_components_mib": {k: v / 2 ** 20 for k, v in rows[hi]["estimate"][st].items()},
            "seconds": rows[hi]["measured"][st]["seconds"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["slopes", "totals"], default="slopes")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="slopes: measurements per point (medians reported)")
    ap.add_argument("--shapes", default=None, help="comma-separated (default: all three)")
    ap.add_argument("--work", type=Path, default=None, help="keep models and logs here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    ap.add_argument("--reuse", action="store_true",
                    help="take the measurements a previous run left (totals: in --work; slopes: in --out) and only "
                         "recompute the estimates")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_memory-"))
    if args.mode == "slopes":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_memory_slopes import run_slopes

        return run_slopes(args.device, work, args.out, args.repeats,
                          args.shapes.split(",") if args.shapes else None, args.reuse)
    shapes = args.shapes.split(",") if args.shapes else list(SHAPES)
    entries = []
    for family in shapes:
        entries += run_shape(family, SHAPES[family], args.device, work, args.reuse)
    print(f"\n{'stage':5s} {'shape':13s} {'estimate GiB':>12s} {'measured GiB':>12s} {'ratio':>6s} "
          f"{'per-layer est/meas MiB':>24s} {'full-depth GiB (ratio)':>24s}")
    for r in entries:
        print(f"{r['stage']:5s} {r['shape']:13s} {r['estimate_gib']:12.3f} {r['measured_gib']:12.3f} "
              f"{r['ratio']:6.3f} {r['per_layer_estimate_mib']:11.1f} / {r['per_layer_measured_mib']:<10.1f} "
              f"{r['full_depth_extrapolated_gib']:14.2f} ({r['full_depth_ratio']:.3f})")
    ok = all(RATIO_BAND[0] <= r["ratio"] <= RATIO_BAND[1] for r in entries)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import write_result

    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    path = write_result("memory", {**{k: v for k, v in old.items() if k == "slopes"}, "totals": {
        "device": args.device, "settings": SETTINGS, "shapes": {k: SHAPES[k] for k in shapes},
        "ratio_band": RATIO_BAND, "all_within_band": ok, "gpu_measured": args.device == "cuda",
        "entries": entries}}, args.out)
    print(f"\nall ratios within {RATIO_BAND}: {ok}; wrote {path}")


if __name__ == "__main__":
    main()
