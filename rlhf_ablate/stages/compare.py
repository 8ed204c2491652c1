"""Compare stage: the aligned policy's eval answers against the SFT (and base) answers, and every answer against
its reference by embedding similarity. It reads the eval stages' records; it trains nothing.

- **Win rate** (``eval.judge``), prompt by prompt on the eval prompts (rlhf_ablate/metrics/winrate.py):
  - ``rm`` (the default): the RM scores both answers. Without ``eval.judge_rm_from`` it is the trial's own RM,
    whose scores are already in the eval records, so this costs nothing; but the policy was optimised against that
    very RM (or, for DPO, on the same preference data), so the win rate flatters it: ``meta.json`` and the report
    say so. ``eval.judge_rm_from`` names an independent RM (another trial's, or an RM artifact directory).
  - ``api``: an LLM judge behind an OpenAI-compatible endpoint, both orders (rlhf_ablate/stages/judge.py).
- **Embedding similarity** (``eval.embedding_model``): cosine, Euclidean and Pearson of each answer to its
  reference, mean-pooled (rlhf_ablate/metrics/embedding.py).

Metrics: ``<method>/winrate_vs_<opponent>`` with ``_ci_low``/``_ci_high``, ``<method>/judge_{win,tie,loss}_vs_
<opponent>``, ``<method>/judge_n_vs_<opponent>``; ``<stage>/emb_{cosine,euclidean,pearson}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .. import models
from ..config import TrialConfig, trial_config_from_overrides
from ..errors import ConfigError
from ..files import read_json, write_json
from ..rundir import artifact_path, cache_root_of, read_result, run_dir_of_trial
from ..metrics.embedding import similarities
from ..metrics.winrate import outcome_from_scores, outcome_from_verdicts, summarize_outcomes
from ..models.memory import EVAL_SCORE_MICRO
from ..runtime import adapt_micro_batch

SELF_JUDGED = ("the trial's own RM judged: the policy was optimised against it (or, for DPO, on the same "
               "preferences), so this win rate flatters the policy; set eval.judge_rm_from to an independent RM")


def resolve_rm_from(path: str, cfg: TrialConfig) -> tuple[TrialConfig, Path, Optional[Path]]:
    """(config to load it with, RM artifact dir, its SFT artifact dir) for ``eval.judge_rm_from``: a trial directory
    (RUN/trials/<id>, with result.json) or an RM artifact directory of the stage cache (with config.json)."""
    p = Path(path).expanduser().resolve()
    if (p / "result.json").is_file():
        r = read_result(run_dir_of_trial(p), p.name) or {}
        if "rm" not in (r.get("timings") or {}):
            raise ConfigError(f"eval.judge_rm_from: {p} has no finished RM stage.")
        root = cache_root_of(r, run_dir_of_trial(p))
        keys = {k: v["key"] for k, v in r["timings"].items() if isinstance(v, dict) and "key" in v}
        other = trial_config_from_overrides(r["config"], f"{p}/result.json")
        rm_dir, sft_dir = artifact_path(root, "rm", keys["rm"]), artifact_path(root, "sft", keys["sft"])
    elif (p / "rm_info.json").is_file() and (p / "config.json").is_file():
        payload = read_json(p / "config.json")["payload"]
        other = trial_config_from_overrides({"model": payload["model"], "rm": payload["rm"]}, f"{p}/config.json")
        upstream = payload.get("upstream") or []
        rm_dir, sft_dir = p, (p.parent.parent / "sft" / upstream[0]) if upstream else None
    else:
        raise ConfigError(f"eval.judge_rm_from: {path!r} is neither a trial directory (RUN/trials/<id> with "
                          f"result.json) nor an RM artifact directory (with rm_info.json and config.json).")
    for d in (rm_dir, sft_dir):
        if d is not None and not d.is_dir():
            raise ConfigError(f"eval.judge_rm_from: the artifact {d} it needs is not in the stage cache.")
    return other, rm_dir, sft_dir


def _rm_outcomes(cfg: TrialConfig, mine: list[dict], theirs: list[dict]) -> list[Optional[float]]:
    if not cfg.eval.judge_rm_from:
        return [outcome_from_scores(a["reward"], b["reward"]) for a, b in zip(mine, theirs)]
    other, rm_dir, sft_dir = resolve_rm_from(cfg.eval.judge_rm_from, cfg)
    rm, tok = models.load_rm(other, rm_dir, sft_dir)
    score = models.seq_cls_scorer(rm)
    prompts = [a["prompt"] for a in mine]
    # rows per pass as the memory estimate reads them, halved on an out-of-memory error (runtime.adapt_micro_batch)
    s_mine, s_theirs = (adapt_micro_batch("compare", EVAL_SCORE_MICRO, lambda m, rows=rows: models.score_texts(
        score, tok, prompts, [a["generation"] for a in rows], other.model.max_length, batch_size=m), phase="scoring")
        for rows in (mine, theirs))
    return [outcome_from_scores(x, y) for x, y in zip(s_mine, s_theirs)]


def _api_outcomes(cfg: TrialConfig, mine: list[dict], theirs: list[dict]) -> tuple[list[Optional[float]], int]:
    from .judge import ApiJudge

    judge = ApiJudge.from_config(cfg.eval)
    out = [outcome_from_verdicts(*judge.both_orders(a["prompt"], a["generation"], b["generation"]))
           for a, b in zip(mine, theirs)]
    return out, judge.failures


def compare(cfg: TrialConfig, evals: dict[str, Path], out: Path) -> None:
    """``evals`` maps an eval stage name (``sft``, the method, and ``base`` when evaluated) to its artifact dir."""
    m, e = cfg.method, cfg.eval
    records = {stage: read_json(d / "records.json") for stage, d in evals.items()}
    metrics: dict[str, float | int | None] = {}
    judged: list[dict] = []
    meta: dict = {"judge": e.judge}
    if e.judge != "none":
        limit = e.judge_max_prompts or None
        for opponent in [s for s in ("sft", "base") if s in records and s != m]:
            mine, theirs = records[m][:limit], records[opponent][:limit]
            if [r["data_id"] for r in mine] != [r["data_id"] for r in theirs]:
                raise ValueError(f"eval records of {m} and {opponent} are not over the same prompts")
            if e.judge == "rm":
                outcomes, failures = _rm_outcomes(cfg, mine, theirs), 0
            else:
                outcomes, failures = _api_outcomes(cfg, mine, theirs)
            s = summarize_outcomes(outcomes)
            tag = f"_vs_{opponent}"
            metrics.update({f"{m}/winrate{tag}": s["win_rate"], f"{m}/winrate{tag}_ci_low": s["ci_low"],
                            f"{m}/winrate{tag}_ci_high": s["ci_high"], f"{m}/judge_win{tag}": s["win"],
                            f"{m}/judge_tie{tag}": s["tie"], f"{m}/judge_loss{tag}": s["loss"],
                            f"{m}/judge_n{tag}": s["n"]})
            if failures:
                meta.setdefault("judge_failures", {})[opponent] = failures
            judged += [{"data_id": a["data_id"], "opponent": opponent, "outcome": o}
                       for a, o in zip(mine, outcomes)]
        if e.judge == "rm":
            meta["judge_rm"] = e.judge_rm_from or "own"
            if not e.judge_rm_from:
                meta["judge_note"] = SELF_JUDGED
        else:
            meta["judge_api"] = {"url": e.judge_url, "model": e.judge_model, "orders": "both (position-debiased)"}
    if e.embedding_model:
        from ..models.embedding import MeanPooledEncoder

        enc = MeanPooledEncoder(e.embedding_model, trust_remote_code=cfg.model.trust_remote_code)
        meta["embedding_model"] = e.embedding_model
        for stage, recs in records.items():
            pairs = [(r["generation"], r["reference"]) for r in recs if r.get("reference")]
            if not pairs:
                continue
            sims = similarities(enc.encode([a for a, _ in pairs]), enc.encode([b for _, b in pairs]))
            for name, values in sims.items():
                metrics[f"{stage}/emb_{name}"] = float(np.nanmean(values)) if np.isfinite(values).any() else None
    write_json(out / "metrics.json", metrics)
    write_json(out / "records.json", judged)
    write_json(out / "meta.json", meta)
