"""``python -m rlhf_ablate chat RUN_DIR --trial ID [--stage STAGE] [--prompt TEXT]``: talk to a trial's model.

The model is the stage's artifact from the stage cache (found through the trial's result.json, rlhf_ablate/rundir.py:
trial_artifacts), loaded as eval loads it, and it answers with the prompt template and sampling of eval
(rlhf_ablate/models/generation.py: sampling_for), so what you read here is what the tables scored. Tokens stream as
they come. The stages it can answer with come from the stage graph (rlhf_ablate/run/graph.py: policy_stages).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, TextIO

from ..config import TrialConfig, trial_config_from_overrides
from ..errors import ConfigError
from ..rundir import scan_results, trial_artifacts
from .graph import policy_stages


def find_trial(run_dir: Path, trial: str) -> dict:
    """The result of trial ``trial`` (its id, or a unique prefix of it) under ``run_dir``."""
    results = {r["trial_id"]: r for _, r in scan_results(run_dir) if "trial_id" in r}
    if not results:
        raise ConfigError(f"{run_dir}: no trials here (no trials/*/result.json). Give the run directory of a sweep, "
                          f"e.g. runs/lora_rank.")
    matches = [t for t in results if t.startswith(trial)]
    if len(matches) != 1:
        listing = ", ".join(f"{t} ({_describe(r)})" for t, r in sorted(results.items()))
        what = "matches several trials" if matches else "is not a trial of this run"
        raise ConfigError(f"--trial {trial!r} {what}. Trials in {run_dir}: {listing}.")
    return results[matches[0]]


def _describe(r: dict) -> str:
    axes = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in (r.get("axes") or {}).items())
    return f"{axes} seed={r.get('seed')} {r.get('status')}".strip()


def stage_dirs(run_dir: Path, result: dict) -> dict[str, Path]:
    """Artifact directory of every finished policy stage of the trial that is still in the stage cache."""
    return {k: v for k, v in trial_artifacts(result, Path(run_dir)).items() if k in policy_stages()}


def load_stage(run_dir: Path, result: dict, stage: Optional[str]) -> tuple[Any, Any, TrialConfig, str]:
    """(model, tokenizer, trial config, stage) for ``stage`` (default: the trial's method)."""
    from .. import models

    cfg = trial_config_from_overrides(result["config"], f"{run_dir}/trials/{result['trial_id']}/result.json")
    stage = stage or cfg.method
    dirs = stage_dirs(run_dir, result)
    available = ["base"] + [s for s in policy_stages() if s in dirs]
    if stage not in available:
        raise ConfigError(f"--stage {stage}: trial {result['trial_id']} has no {stage} artifact in the stage "
                          f"cache. Available: {', '.join(available)}.")
    if stage == "base":
        base = models.resolve_base(cfg.model)
        model = models.load_causal_lm(cfg.model, base, quantize=cfg.model.quantization != "none")
        return model, models.load_tokenizer(cfg.model, base), cfg, stage
    if "sft" not in dirs:
        raise ConfigError(f"--stage {stage}: the SFT artifact it is built on is gone from the stage cache.")
    model, _ref, tok = models.load_policy(cfg, dirs["sft"], None if stage == "sft" else dirs[stage])
    return model, tok, cfg, stage


def answer(model: Any, tok: Any, cfg: TrialConfig, prompt: str, stream: TextIO) -> str:
    """Answer ``prompt`` as eval does, writing the tokens to ``stream`` as they are generated."""
    from transformers import TextStreamer

    from ..models import generate, sampling_for

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    out = generate(model, tok, [prompt], **sampling_for(cfg, "chat").kwargs(), batch_size=1,
                   streamer=_Streamer(tok, skip_prompt=True, skip_special_tokens=True))
    return out[0]["text"]
