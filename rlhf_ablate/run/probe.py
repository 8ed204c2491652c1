"""Measured peak memory of a trial's stages: the truth the memory estimate (rlhf_ablate/models/memory.py) is
checked against (benchmarks/bench_memory.py) and what ``resources.gpu: probe`` packs by (rlhf_ablate/launch/resources.py).

Each training stage of the trial's graph (SFT, RM, the method; rlhf_ablate/run/graph.py) and the method's eval stage
run for real, shortened to a step or two, in a fresh process on data whose every text fills the configured lengths
(``model.max_length``, ``ppo.max_prompt_length``), so the measurement is the worst case the estimate describes. The
peak is taken over the stage's training part, from the moment its model is loaded and prepared to the moment training
ends (the SFT merge that follows runs on the CPU on every device and is not part of a GPU's peak), relative to the
process before the model was loaded; for eval, from the policy's load to the end of the KL pass (greedy answers of
``memory.EVAL_GENERATE_MICRO`` prompts, the RM's scoring, the KL pass at the rollout micro-batch).

Not probed: ``eval_base``, ``score_base`` and ``eval_sft`` (the same passes as the method's eval with fewer models:
the base or SFT policy, no KL pass or no policy), and ``compare``, whose only model is an RM from another run
(``eval.judge_rm_from``), scored :data:`memory.EVAL_SCORE_MICRO` rows at a time: the method's eval loads an RM of the
trial's own shape beside its policy and scores the same rows, so it bounds compare's peak when the judge RM has the
trial's base model (the estimate assumes that too, models/memory.py: compare_bytes). The stage marks those two points itself
(rlhf_ablate/runtime.py: stage_hooks); the probe observes them, it patches nothing:

- on a GPU: ``torch.cuda.max_memory_allocated`` (reset after loading) minus what was allocated before loading;
- on the CPU: the process's peak anonymous resident memory (``VmHWM``, reset after loading through
  ``/proc/self/clear_refs``, less the file-backed pages: the memory-mapped safetensors files) minus its anonymous
  resident memory before loading, with glibc told to return freed blocks of 64 KiB and more to the system at once
  (``MALLOC_MMAP_THRESHOLD_``), so that resident memory follows live tensors.

``python -m rlhf_ablate.run.probe STAGE SPEC.json`` is the child process; :func:`measure_stages` runs the children.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..runtime import StageHooks, observe_stages

# Korean text long enough to fill any configured length once tokenized (the bundled corpus, repeated).
_FILL_CHARS = 6000


def probe_overrides(cfg: Any) -> dict:
    """Dotted overrides that shorten a trial to what its peak needs: one or two optimizer steps per TRL stage (the
    second step holds the AdamW state), and one PPO step whose rollout is one generation/scoring micro-batch and whose
    update is one minibatch of one forward/backward micro-batch (the phases' sizes stay as configured; eval keeps
    ``eval.max_new_tokens``: its generation's KV cache is part of its peak)."""
    p = cfg.ppo
    micro = min(p.rollout_micro_batch_size, p.rollout_batch_size)
    train_micro = max(1, p.mini_batch_size // p.grad_accum)
    rollout = max(micro, train_micro)
    from ..config import METHOD_CONFIGS

    trl_steps = {f"{m}.max_steps": 2 for m, c in METHOD_CONFIGS.items() if "max_steps" in c.__dataclass_fields__}
    return {"sft.max_steps": 2, "rm.max_steps": 2, **trl_steps, "ppo.total_episodes": rollout,
            "ppo.rollout_batch_size": rollout, "ppo.rollout_micro_batch_size": micro,
            "ppo.mini_batch_size": train_micro, "ppo.grad_accum": 1, "ppo.ppo_epochs": 1}


def fill_data(cfg: Any, tokenizer: Any) -> Any:
    """A DataBundle whose every text fills the configured lengths: SFT rows of a short prompt and a completion longer
    than ``model.max_length`` (TRL truncates them), RM pairs of exactly ``model.max_length`` tokens or just under
    (TRL's RewardTrainer drops longer ones), PPO prompts longer than ``ppo.max_prompt_length`` (cut to it), enough
    of them for the gold probe. Texts are stretches of the bundled Korean corpus."""
    from ..data import DataBundle, corpus_texts
    from ..data.prompting import format_prompt, normalize
    from ..data.records import PromptExample, RankedGroup, SFTExample

    text = " ".join(" ".join(corpus_texts()).split())
    from ..models.memory import EVAL_GENERATE_MICRO

    n_eval = max(EVAL_GENERATE_MICRO, min(cfg.ppo.rollout_micro_batch_size, cfg.ppo.rollout_batch_size))
    n = max(cfg.sft.batch_size, cfg.rm.batch_size, cfg.dpo.batch_size) * 3 + max(cfg.ppo.rollout_batch_size, n_eval)
    # PPO's gold probe holds out ppo.gold_probe_size prompts and needs as many left (config/overopt.py:
    # probe_prompts_problem); its generation and scoring are part of PPO's peak, so the probe runs at its real size.
    n_ppo = n + (2 * cfg.ppo.gold_probe_size if cfg.ppo.gold != "none" else 0)

    def chunk(i: int, chars: int = _FILL_CHARS) -> str:
        start = (i * 977) % max(1, len(text) - chars)
        return text[start:start + chars]

    def n_tokens(prompt: str, answer: str) -> int:
        return len(tokenizer(format_prompt(prompt) + normalize(answer) + tokenizer.eos_token)["input_ids"])

    def fitted(prompt: str, i: int) -> str:
        lo, hi = 0, _FILL_CHARS  # longest answer whose pair stays within model.max_length (binary search)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if n_tokens(prompt, chunk(i, mid)) <= cfg.model.max_length else (lo, mid - 1)
        return chunk(i, lo)

    # A short prompt: TRL truncates to max_length and then drops rows whose completion was cut away entirely.
    sft = [SFTExample(f"s{i}", chunk(i, 40), chunk(i + 1)) for i in range(n)]
    rm_prompt = [chunk(i, 40) for i in range(n)]
    groups = [RankedGroup(f"r{i}", rm_prompt[i], (fitted(rm_prompt[i], i + 2), fitted(rm_prompt[i], i + 3)), (1, 2))
              for i in range(n)]
    prompts = [PromptExample(f"p{i}", chunk(i + 4), chunk(i + 5, 40)) for i in range(n_ppo)]
    return DataBundle(sft_train=sft, rm_train=groups, rm_eval=groups[:2], ppo_prompts=prompts, eval=prompts[:n_eval],
                      version="probe", fingerprint="probe")


# ---------------------------------------------------------------------------------------------------------
# In the child process
# ---------------------------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


class _Meter:
    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda" and torch.cuda.is_available()
        self.baseline = self.now()
        self.peak: int | None = None

    def now(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else _rss_kib("RssAnon") * 1024

    def own(self, *modules: Any) -> None:
        """On the CPU, copy every parameter and buffer into memory of the process's own: weights loaded without a
        conversion are views of the memory-mapped checkpoint (file-backed pages, which the anonymous measurement
        leaves out), as a GPU's copies are not."""
        if self.cuda:
            return
        for m in modules:
            for t in [*m.parameters(), *m.buffers()]:
                if t.device.type == "cpu":
                    t.data = t.data.clone()

    def reset(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (proc(5), "clear_refs")

    def read(self) -> None:
        import torch

        # VmHWM counts file-backed pages too: the safetensors files stay memory-mapped after loading, so each weight
        # read from disk would count twice (its mapped file pages and its quantized or cast copy). Those pages are
        # the page cache, which the kernel reclaims at will; the stage's own memory is the anonymous part. They do
        # not change during training, so the anonymous peak is the peak minus the file-backed pages now.
        self.peak = (torch.cuda.max_memory_allocated() if self.cuda
                     else (_rss_kib("VmHWM") - _rss_kib("RssFile") - _rss_kib("RssShmem")) * 1024)


class _Measuring(StageHooks):
    """The stage hooks of a measuring child (rlhf_ablate/runtime.py): the peak window opens when the stage's models are
    loaded and prepared and closes when training ends. The stage then saves its artifact as usual, which the next
    stage's measurement starts from (an SFT merge runs on the CPU on every device and is outside a GPU's peak)."""

    def __init__(self, meter: _Meter):
        self.meter = meter

    def model_ready(self, *models: Any) -> None:
        self.meter.own(*models)
        self.meter.reset()

    def trained(self) -> None:
        self.meter.read()


def _child(stage: str, spec: dict) -> dict:
    import time

    import torch

    from .. import models
    from ..config import build_trial_config
    from .graph import Ctx, trial_stages

    cfg = build_trial_config(spec["config"], "<probe>")
    data = fill_data(cfg, models.load_tokenizer(cfg.model))
    out = Path(spec["out"])
    node = {s.name: s for s in trial_stages(cfg)}[stage]
    meter = _Meter(spec["device"])
    t0 = time.perf_counter()
    history: list = []
    ctx = Ctx(cfg, data, dirs={k: Path(v) for k, v in spec["dirs"].items()},
              on_step=lambda e: history.append({k: v for k, v in e.items() if k.startswith(f"{stage}/")}))
    with observe_stages(_Measuring(meter)):
        node.build(ctx, out)
    if meter.peak is None:
        raise RuntimeError(f"probe: the {stage} stage ended without reaching its measurement point")
    return {"stage": stage, "device": "cuda" if meter.cuda else "cpu", "baseline_bytes": meter.baseline,
            "peak_bytes": meter.peak, "measured_bytes": meter.peak - meter.baseline,
            "seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(), "ppo_history": history}


# ---------------------------------------------------------------------------------------------------------
# In the parent
# ---------------------------------------------------------------------------------------------------------

def child_env() -> dict:
    """The environment of a measuring child: glibc returns freed blocks of 64 KiB and more to the system at once
    (mallopt(3), M_MMAP_THRESHOLD; setting it also turns off glibc's dynamic threshold), so resident memory follows
    live tensors instead of keeping freed ones."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "WANDB_MODE": "disabled"}


def measure_stage(stage: str, config_dict: dict, work: Path, device: str, *, dirs: dict[str, Path] | None = None,
                  timeout: float = 3600) -> dict:
    """Run one stage in a fresh process and return its measurement (see the module docstring). ``config_dict`` is
    a nested trial config (``TrialConfig.to_dict()``); ``dirs`` the artifacts of the stages before it; the stage's
    artifact goes to ``work/<stage>``."""
    out = work / stage
    out.mkdir(parents=True, exist_ok=True)
    spec = {"config": config_dict, "out": str(out), "device": device,
            "dirs": {k: str(v) for k, v in (dirs or {}).items()}}
    spec_path = work / f"{stage}.spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "rlhf_ablate.run.probe", stage, str(spec_path)]
    p = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    (work / f"{stage}.log").write_text(p.stdout + p.stderr)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBE ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"probe: measuring the {stage} stage failed (exit {p.returncode}); see "
                           f"{work / f'{stage}.log'}:\n{(p.stdout + p.stderr)[-2000:]}")
    return json.loads(lines[-1][len("PROBE "):])


def trained_stages(config_dict: dict) -> tuple[str, ...]:
    """The stages of the trial that train a model, in run order (SFT, RM, the method): what the probe measures."""
    from ..config import build_trial_config
    from .graph import trial_stages

    return tuple(s.name for s in trial_stages(build_trial_config(config_dict, "<probe>")) if s.trains)


def probed_stages(config_dict: dict) -> tuple[str, ...]:
    """What the probe measures, in run order: the training stages (:func:`trained_stages`) and the method's eval
    (the module docstring says why the other eval stages and compare are not measured)."""
    from ..config import build_trial_config

    return (*trained_stages(config_dict), "eval_" + build_trial_config(config_dict, "<probe>").method)


def measure_stages(config_dict: dict, work: Path, device: str, stages: tuple[str, ...] | None = None,
                   timeout: float = 3600) -> dict[str, dict]:
    """The trial's probed stages (:func:`probed_stages`) in run order, each measured in its own process on the
    artifacts of the ones before it; ``stages`` (default: all of them) are returned, and the stages they build on run
    too."""
    work.mkdir(parents=True, exist_ok=True)
    order = probed_stages(config_dict)
    wanted = set(order if stages is None else stages)
    last = max((order.index(s) for s in wanted if s in order), default=-1)
    res: dict[str, dict] = {}
    dirs: dict[str, Path] = {}
    for name in order[:last + 1]:
        res[name] = measure_stage(name, config_dict, work, device, dirs=dirs, timeout=timeout)
        dirs[name] = work / name
    return {k: v for k, v in res.items() if k in wanted}


if __name__ == "__main__":
    _stage, _spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    print("PROBE " + json.dumps(_child(_stage, _spec)), flush=True)
