"""End to end: the bundled lora_rank and kl_coef sweeps (shortened by overrides, run in-process without Ray) give
reports whose tables carry separation margin, Kendall tau and ROUGE columns as mean ± 95% CI over two seeds."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import pytest

from analysis.report import write_report
from rlhf_ablate.config.sweep import TrackingSpec, expand, load_sweep
from rlhf_ablate.run.trial import run_trial_in_sweep

ROOT = Path(__file__).resolve().parents[1]

# Shorter than the defaults (about a third of the compute); these tests check the tables, not how well it learns.
SHORT = {"sft.epochs": 1.0, "rm.epochs": 1.0, "ppo.total_episodes": 64, "eval.max_new_tokens": 24,
         "data.max_eval": 16}


def run_sweep_in_process(name: str, out: Path) -> Path:
    spec = load_sweep(ROOT / "sweeps" / f"{name}.yaml", SHORT)
    spec = dataclasses.replace(spec, cache_dir=str(out / "cache"), tracking=TrackingSpec(wandb="disabled"))
    run_dir = out / name
    for trial in expand(spec):
        result = run_trial_in_sweep(spec, trial, run_dir)
        assert result["status"] == "ok", result["error"]
    write_report(run_dir)
    return run_dir / "report"


def rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reports(tmp_path_factory, builtin_cache):
    out = tmp_path_factory.mktemp("e2e")
    return {name: run_sweep_in_process(name, out) for name in ("lora_rank", "kl_coef")}


def test_lora_rank_table_has_margin_and_tau_with_cis(reports):
    rep = reports["lora_rank"]
    table = rows(rep / "lora_rank.csv")
    for metric in ("rm/separation_margin", "rm/kendall_tau", "rm/pairwise_accuracy"):
        cells = [r for r in table if r["metric"] == metric]
        assert sorted(int(r["lora_rank"]) for r in cells) == [0, 8, 16]
        for r in cells:
            assert r["n"] == "2" and r["trials_failed"] == "0"
            lo, mean, hi = float(r["ci_low"]), float(r["mean"]), float(r["ci_high"])
            assert math.isfinite(mean) and lo <= mean <= hi
    md = (rep / "report.md").read_text(encoding="utf-8")
    assert "RM separation margin ↑" in md and "RM Kendall tau ↑" in md and "(n=2)" in md and " ± " in md
    assert (rep / "lora_rank.tex").read_text(encoding="utf-8").count(r"\pm") >= 9
    for png in ("rm_scores.png", "length_bias.png", "frontier.png", "ppo_curves.png"):
        assert (rep / png).stat().st_size > 10_000


def test_kl_coef_table_has_rouge_bleu_reward_kl_with_cis(reports):
    (path,) = reports["kl_coef"].glob("*.csv")  # one axis, one table
    table = rows(path)
    metrics = {r["metric"] for r in table}
    assert {"ppo/rougeL", "ppo/rouge1", "ppo/bleu", "ppo/reward_mean", "ppo/kl_to_ref"} <= metrics
    for r in table:
        if r["metric"] == "ppo/rougeL":
            assert r["n"] == "2" and float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"])
            assert 0 < float(r["mean"]) < 1  # Korean ROUGE is never silently 0
    md = (reports["kl_coef"] / "report.md").read_text(encoding="utf-8")
    assert "ROUGE-L" in md and "Best vs runner-up" in md
