"""What grows: the memory of each phase at two batch sizes and two sequence lengths, and the slopes (bytes per extra
sequence, bytes per extra token) against the estimate's (rlhf_ablate/models/memory.py), each within 0.75-1.33.

Totals hide errors in the terms that grow: weights are most of a total, and a 2x error in the activations can pass a
total's band. Here the constant part cancels: a slope is the difference of two peaks, measured and estimated alike.

The models are width-true and shallow (``SHAPES``: Llama-3.2-1B, Llama-3.1-8B, Gemma-2-2B: hidden size, MLP width,
heads, KV heads and vocabulary of the published configs), one decoder layer, random init, float32 on the CPU, so that the logits (the LM head over the response
positions), the forward's intermediates and the training activations are a large part of every peak. Measured, the
same way as the stage probe (rlhf_ablate/run/probe.py) and the ``totals`` mode: the process's peak anonymous resident
memory during the phase (``VmHWM`` reset through ``/proc/self/clear_refs``, less file-backed pages) minus its
anonymous resident memory before, with glibc returning freed blocks of 64 KiB and more at once
(``MALLOC_MMAP_THRESHOLD_``, the probe's child environment). Each point is the median of ``--repeats`` runs. The phases
run the package's own code paths:

- ``ppo_generation``: ``models.generate`` (temperature 1, the rollout's sampling) of b prompts of P tokens; length
  axis: P (the prompt's forward and the KV cache grow with it);
- ``ppo_scoring`` (and eval's KL pass, the same function): a no-grad forward keeping the response positions' logits,
  reduced by ``ppo.math.token_logprobs`` in float32 chunks; length axis: the response length R;
- ``ppo_update``: the same with LoRA adapters (rank 8), gradient checkpointing as the plan says, log-probs and
  entropy, and the backward; length axis: R;
- ``eval_rm_scoring``: ``models.score_texts`` with a sequence-classification model, b rows of ``model.max_length``;
  length axis: ``model.max_length``.

- ``sft`` and ``rm``: the stages themselves (TRL's trainers, rlhf_ablate/run/graph.py's build functions, LoRA 8, one
  optimizer step, data that fills ``model.max_length``: rlhf_ablate/run/probe.py: fill_data), measured from the
  moment the model is prepared to the end of training, as the probe measures them (rlhf_ablate/runtime.py:
  stage_hooks); the estimate compared is the training part (``Parts.trl_stage``: the RM's held-out scoring pass after
  training is outside the window); length axis: ``model.max_length``.

    python benchmarks/bench_memory.py --mode slopes --device cpu [--repeats 3] [--shapes llama-3.1-8b,...] [--reuse]
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RATIO_BAND = (0.75, 1.33)
LAYERS = 1
SHAPES = ("llama-3.2-1b", "llama-3.1-8b", "gemma-2-2b")  # width-true, one layer each
# (batch sizes, lengths, the other length) per phase
POINTS = {"ppo_generation": ((2, 4), (256, 512), 8),     # b x prompt length P, 8 new tokens
          "ppo_scoring": ((1, 2), (32, 64), 64),          # b x response length R, prompt 64
          "ppo_update": ((1, 2), (32, 64), 64),           # b x R, prompt 64
          "eval_rm_scoring": ((2, 4), (256, 512), 0),     # b x model.max_length
          "sft": ((1, 2), (64, 128), 0),                  # sft.batch_size x model.max_length
          "rm": ((1, 2), (64, 128), 0)}                   # rm.batch_size (pairs) x model.max_length
TRL_STAGES = ("sft", "rm")


def slope_ratios(points: dict[tuple[int, int], float], est: dict[tuple[int, int], float]) -> dict:
    """Slopes of measured and estimated peaks over a 2 x 2 grid {(b, T): bytes}: per extra sequence (at the shorter
    length) and per extra token (at the smaller batch), and estimate / measured for each."""
    (b1, b2), (t1, t2) = sorted({b for b, _ in points}), sorted({t for _, t in points})

    def slopes(m):
        return (m[(b2, t1)] - m[(b1, t1)]) / (b2 - b1), (m[(b1, t2)] - m[(b1, t1)]) / (t2 - t1)

    (ms, mt), (es, et) = slopes(points), slopes(est)
    return {"per_sequence_measured": ms, "per_sequence_estimated": es, "per_sequence_ratio": es / ms if ms else None,
            "per_token_measured": mt, "per_token_estimated": et, "per_token_ratio": et / mt if mt else None}


def _kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def measure(fn) -> int:
    """Peak anonymous resident bytes of ``fn()`` above what the process held before it."""
    gc.collect()
    base = _kib("RssAnon") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (proc(5))
    out = fn()
    peak = (_kib("VmHWM") - _kib("RssFile") - _kib("RssShmem")) * 1024
    del out
    gc.collect()
    return peak - base


def _model_dir(work: Path, family: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_ablate.config import ModelConfig
    from rlhf_ablate.models import ensure_builtin, load_tokenizer
    from rlhf_ablate.models.families import family_config

    out = work / f"{family}-L{LAYERS}"
    if not (out / "config.json").exists():
        tok = load_tokenizer(ModelConfig(), ensure_builtin("tiny-llama"))
        cfg = family_config(family, layers=LAYERS, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    return out


def _trl_config(mdir: Path, stage: str, b: int, T: int):
    from rlhf_ablate.config import trial_config_from_overrides

    return trial_config_from_overrides({
        "model.base_model": str(mdir), "model.quantization": "none", "model.compute_dtype": "float32",
        "model.max_length": T, "rm.init_from": "base", f"{stage}.batch_size": b, f"{stage}.grad_accum": 1,
        f"{stage}.max_steps": 1, f"{stage}.lora_rank": 8})


class _Stop(Exception):
    """Raised from the stage hooks once training has ended: the measurement is taken, the artifact is not needed."""


def _measure_trl(mdir: Path, stage: str, b: int, T: int, work: Path) -> int:
    import shutil

    from rlhf_ablate.models import load_tokenizer
    from rlhf_ablate.run.graph import Ctx, trial_stages
    from rlhf_ablate.run.probe import fill_data
    from rlhf_ablate.runtime import StageHooks, observe_stages

    cfg = _trl_config(mdir, stage, b, T)
    data = fill_data(cfg, load_tokenizer(cfg.model, str(mdir)))
    node = {s.name: s for s in trial_stages(cfg)}[stage]
    seen: dict[str, int] = {}

    class Window(StageHooks):
        def model_ready(self, *models):
            gc.collect()
            seen["base"] = _kib("RssAnon") * 1024
            Path("/proc/self/clear_refs").write_text("5")

        def trained(self):
            seen["peak"] = (_kib("VmHWM") - _kib("RssFile") - _kib("RssShmem")) * 1024
            raise _Stop

    out = work / f"{stage}-b{b}-T{T}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        with observe_stages(Window()):
            node.build(Ctx(cfg, data), out)
    except _Stop:
        pass
    gc.collect()
    return seen["peak"] - seen["base"]


def _estimates(mdir: Path) -> dict[str, dict[tuple[int, int], float]]:
    """The estimate of each phase at each point, from the estimator the packer uses (device cpu, float32)."""
    from rlhf_ablate.config import trial_config_from_overrides
    from rlhf_ablate.models import memory
    from rlhf_ablate.run.graph import estimate_stage_bytes

    base = {"model.base_model": str(mdir), "model.quantization": "none", "model.compute_dtype": "float32",
            "ppo.lora_rank": 8, "ppo.grad_accum": 1}
    out: dict[str, dict] = {k: {} for k in POINTS}
    for phase, (bs, ts, other) in POINTS.items():
        for b in bs:
            for t in ts:
                if phase in TRL_STAGES:
                    cfg = _trl_config(mdir, phase, b, t)
                    parts = memory.Parts(cfg, "cpu")
                    comp = (memory.sft_bytes(cfg, parts) if phase == "sft" else
                            parts.trl_stage(cfg.rm, 2 * b, t, head=False, seq_cls=True))
                    out[phase][(b, t)] = sum(comp.values())
                    continue
                if phase == "eval_rm_scoring":
                    cfg = trial_config_from_overrides({**base, "model.max_length": t})
                    out[phase][(b, t)] = memory.Parts(cfg, "cpu").fwd(b, t)
                    continue
                P, R = (t, other) if phase == "ppo_generation" else (other, t)
                cfg = trial_config_from_overrides({**base, "ppo.rollout_batch_size": b,
                                                   "ppo.rollout_micro_batch_size": b, "ppo.mini_batch_size": b,
                                                   "ppo.max_prompt_length": P, "ppo.max_new_tokens": R})
                key = {"ppo_generation": "generation", "ppo_scoring": "scoring", "ppo_update": "update"}[phase]
                out[phase][(b, t)] = estimate_stage_bytes(cfg, "cpu")["ppo"][f"phase:{key}"]
    return out


def _measure_all(mdir: Path, repeats: int) -> dict[str, dict[tuple[int, int], list[int]]]:
    import torch

    from rlhf_ablate.config import ModelConfig
    from rlhf_ablate.data import corpus_texts
    from rlhf_ablate.models import (generate, load_causal_lm, load_seq_cls, load_tokenizer, memory, param_count,
                                    prepare_for_training, score_texts, seq_cls_scorer, wants_gradient_checkpointing)
    from rlhf_ablate.ppo.math import token_logprobs

    torch.set_num_threads(2)
    mcfg = ModelConfig(base_model=str(mdir), quantization="none", compute_dtype="float32")
    tok = load_tokenizer(mcfg, str(mdir))
    text = " ".join(" ".join(corpus_texts()).split())
    prompts = [text[i * 997: i * 997 + 4000] for i in range(8)]
    model = load_causal_lm(mcfg, str(mdir), quantize=False)
    V = model.get_output_embeddings().weight.shape[0]
    chunk = max(1, memory.LOGPROB_CHUNK_BYTES // (4 * V))
    n_tok = len(tok)
    res: dict[str, dict] = {k: {} for k in POINTS}

    def batch(b, P, R):
        g = torch.Generator().manual_seed(b * 1000 + P + R)
        ids = torch.randint(5, n_tok, (b, P + R), generator=g)
        return ids, torch.ones_like(ids), ids[:, P:]

    def forward(m, ids, attn, R):
        T = ids.shape[1]
        keep = torch.arange(T - R - 1, T - 1)
        pos = torch.arange(T).expand(ids.shape[0], T)
        return m(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=keep).logits

    def run(phase, fn):
        bs, ts, other = POINTS[phase]
        for b in bs:
            for t in ts:
                res[phase][(b, t)] = [measure(lambda: fn(b, t, other)) for _ in range(repeats)]
                print(f"{phase:16s} b={b} len={t}: {[x / 2 ** 20 for x in res[phase][(b, t)]]} MiB", flush=True)

    def gen(b, P, R):
        torch.manual_seed(0)
        return generate(model, tok, prompts[:b], max_new_tokens=R, do_sample=True, temperature=1.0, batch_size=b,
                        max_prompt_length=P)

    def score(b, R, P):
        ids, attn, resp = batch(b, P, R)
        with torch.no_grad():
            return token_logprobs(forward(model, ids, attn, R), resp, 1.0, chunk)[0]

    model.eval()
    run("ppo_generation", gen)
    run("ppo_scoring", score)
    plan_gc = wants_gradient_checkpointing(param_count(mcfg))
    peft = prepare_for_training(model, 8, 16, 0.0, "CAUSAL_LM", False)
    peft.train()

    def update(b, R, P):
        ids, attn, resp = batch(b, P, R)
        lp, ent = token_logprobs(forward(peft, ids, attn, R), resp, 1.0, chunk, True)
        (-(lp.mean()) - 0.01 * ent.mean()).backward()
        for p in peft.parameters():
            p.grad = None
        return None

    run("ppo_update", update)
    del peft, model
    gc.collect()
    rm = load_seq_cls(mcfg, str(mdir), quantize=False).eval()
    scorer = seq_cls_scorer(rm)

    def rm_score(b, T, _):
        return score_texts(scorer, tok, prompts[:b], prompts[b:2 * b], T, batch_size=b)

    run("eval_rm_scoring", rm_score)
    del rm, scorer
    gc.collect()
    for stage in TRL_STAGES:
        bs, ts, _ = POINTS[stage]
        for b in bs:
            for t in ts:
                res[stage][(b, t)] = [_measure_trl(mdir, stage, b, t, mdir.parent / "trl") for _ in range(repeats)]
                print(f"{stage:16s} b={b} len={t}: {[x / 2 ** 20 for x in res[stage][(b, t)]]} MiB", flush=True)
    return res, plan_gc


def run_slopes(device: str, work: Path, out: Path, repeats: int, shapes: list[str] | None = None,
               reuse: bool = False) -> None:
    if device != "cpu":
        raise SystemExit("bench_memory --mode slopes measures on the CPU only in this version (no GPU was available "
                         "to write and check a CUDA path)")
    from rlhf_ablate.run.probe import child_env

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # resident memory must follow live tensors
        os.execve(sys.executable, [sys.executable, *sys.argv], child_env())
    unknown = sorted(set(shapes or ()) - set(SHAPES))
    if unknown:
        raise SystemExit(f"bench_memory --mode slopes: unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    for family in shapes or SHAPES:
        _run_shape(family, work, out, repeats, reuse)


def _stored(out: Path, family: str):
    """The measurements an earlier run wrote for ``family`` (``--reuse``: only the estimates are recomputed)."""
    old = json.loads(out.read_text()).get("slopes", {}).get(family) if out.exists() else None
    if old is None:
        raise SystemExit(f"bench_memory --reuse: {out} has no slopes measured for {family}")
    measured = {e["phase"]: {tuple(int(x.split("=")[1]) for x in k.split(",")): v["measured_bytes"]
                             for k, v in e["points"].items()} for e in old["entries"]}
    return measured, old["gradient_checkpointing"], old["repeats"], old.get("measured_at", old.get("seconds"))


def _run_shape(family: str, work: Path, out: Path, repeats: int, reuse: bool = False) -> None:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    mdir = _model_dir(work, family)
    est = _estimates(mdir)
    if reuse:
        measured, plan_gc, repeats, seconds = _stored(out, family)
    else:
        measured, plan_gc = _measure_all(mdir, repeats)
        seconds = time.perf_counter() - t0
    entries = []
    print(f"-- {family}", flush=True)
    for phase in POINTS:
        med = {k: statistics.median(v) for k, v in measured[phase].items()}
        r = slope_ratios(med, est[phase])
        within = {k: r[k] is not None and RATIO_BAND[0] <= r[k] <= RATIO_BAND[1]
                  for k in ("per_sequence_ratio", "per_token_ratio")}
        entries.append({"phase": phase, "points": {f"b={b},len={t}": {"measured_median_bytes": med[(b, t)],
                                                                      "estimated_bytes": est[phase][(b, t)],
                                                                      "measured_bytes": measured[phase][(b, t)]}
                                                   for b, t in med},
                        **r, "within_band": within})
        print(f"{phase:16s} per sequence: est {r['per_sequence_estimated'] / 2 ** 20:8.2f} MiB / measured "
              f"{r['per_sequence_measured'] / 2 ** 20:8.2f} = {r['per_sequence_ratio']:.3f}   per token: est "
              f"{r['per_token_estimated'] / 2 ** 10:8.1f} KiB / measured {r['per_token_measured'] / 2 ** 10:8.1f} "
              f"= {r['per_token_ratio']:.3f}", flush=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import write_result

    old = json.loads(out.read_text()) if out.exists() else {}
    slopes = old.get("slopes", {})
    if "entries" in slopes:  # an earlier version's single shape, keyed by its shape now
        slopes = {slopes["model"].split()[0]: slopes}
    slopes[family] = {
        "device": "cpu", "gpu_measured": False, "model": f"{family} width, {LAYERS} layer, random init, float32",
        "gradient_checkpointing": plan_gc, "repeats": repeats, "statistic": "median of repeats",
        "ratio": "estimate / measured", "ratio_band": RATIO_BAND, "seconds": seconds,
        "estimates_recomputed": bool(reuse), "entries": entries}
    keep = {k: v for k, v in old.items() if k == "totals"}
    path = write_result("memory", {**keep, "slopes": slopes}, out)
    print(f"wrote {path} ({family}) in {time.perf_counter() - t0:.0f} s")
