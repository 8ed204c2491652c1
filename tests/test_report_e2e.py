"""End to end: the bundled lora_rank and kl_coef sweeps (shortened by overrides, run in-process without Ray) give
reports with a table for every stage the axis changes (RM, SFT and PPO for the tied LoRA rank; PPO for kl_coef),
base-model rows, mean ± 95% CI over two seeds, the side-by-side answers and the plots (PNG and SVG)."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import pytest

from analysis.report import write_report
from rlhf_ablate.config.sweep import TrackingSpec, expand, load_sweep
from rlhf_ablate.launch.resources import resolve_group_size
from rlhf_ablate.run.trial import run_trial_in_sweep

ROOT = Path(__file__).resolve().parents[1]

# Much shorter than the defaults: these tests check the tables, not how well it learns.
SHORT = {"sft.max_steps": 8, "rm.max_steps": 8, "ppo.total_episodes": 32, "eval.max_new_tokens": 16,
         "data.max_eval": 12}


def run_sweep_in_process(name: str, out: Path) -> Path:
    spec = load_sweep(ROOT / "rlhf_ablate" / "sweeps" / f"{name}.yaml", SHORT)
    spec = dataclasses.replace(spec, cache_dir=str(out / "cache"), tracking=TrackingSpec(wandb="disabled"))
    spec = resolve_group_size(spec, expand(spec), gpus=[])  # kl_coef: its seeds' trials train PPO as groups
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


def test_lora_rank_report_has_rm_sft_and_ppo_tables_with_base_rows(reports):
    rep = reports["lora_rank"]
    table = rows(rep / "lora_rank_rm.csv")
    for metric in ("rm/separation_margin", "rm/kendall_tau", "rm/pairwise_accuracy", "rm/margin_standardized"):
        cells = [r for r in table if r["metric"] == metric]
        assert sorted(int(r["lora_rank"]) for r in cells) == [0, 8, 16]
        for r in cells:
            assert r["n"] == "2" and r["trials_failed"] == "0"
            lo, mean, hi = float(r["ci_low"]), float(r["mean"]), float(r["ci_high"])
            assert math.isfinite(mean) and lo <= mean <= hi
    for stage in ("sft", "ppo"):
        table = rows(rep / f"lora_rank_{stage}.csv")
        metrics = {r["metric"] for r in table}
        for m in ("rouge1", "rouge2", "rougeL", "bleu", "chrf"):
            assert f"{stage}/{m}" in metrics and f"base/{m}" in metrics, (stage, m)
        for r in table:
            if r["metric"] == f"{stage}/rougeL":
                assert r["n"] == "2" and 0 < float(r["mean"]) < 1   # Korean ROUGE is never silently 0
        base = [r for r in table if r["stage"] == "base model"]
        assert base and all(r["reference"] == "true" for r in base)
    md = (rep / "report.md").read_text(encoding="utf-8")
    assert "margin ↑" in md and "Kendall tau ↑" in md and "(n=2)" in md and " ± " in md
    assert "BLEU ↑ [0-100]" in md and "ROUGE-L ↑ [0-1]" in md and "tok:char" in md and "kiwi" in md
    side = md.split("## Side by side")[1]
    assert side.count("### Prompt ") == 3 and "**Reference:**" in side
    assert "| base model |" in side and "| SFT |" in side and "| PPO |" in side
    assert (rep / "lora_rank_rm.tex").read_text(encoding="utf-8").count(r"\pm") >= 9
    for png in ("rm_scores.png", "length_bias.png", "frontier.png", "ppo_curves.png"):
        assert (rep / png).stat().st_size > 10_000
        assert (rep / png.replace(".png", ".svg")).stat().st_size > 10_000
    assert "No Korean font" not in md
    assert "Over-optimization alarm: off (no PPO trial had a gold signal" in md   # unwatched PPO is said so
    page = (rep / "report.html").read_text(encoding="utf-8")   # the same report as one page (test_report_html.py)
    assert page.count('<table class="sortable" id="tbl-lora_rank_') == 3 and page.count("<figure") == 4


def test_kl_coef_table_has_rouge_bleu_reward_kl_with_cis(reports):
    (path,) = reports["kl_coef"].glob("*.csv")  # kl_coef changes PPO only: one table
    table = rows(path)
    metrics = {r["metric"] for r in table}
    assert {"ppo/rougeL", "ppo/rouge1", "ppo/bleu", "ppo/reward_mean", "ppo/kl_to_ref", "base/rougeL",
            "sft/rougeL"} <= metrics
    for r in table:
        if r["metric"] == "ppo/rougeL":
            assert r["n"] == "2" and float(r["ci_low"]) <= float(r["mean"]) <= float(r["ci_high"])
            assert 0 < float(r["mean"]) < 1
    # base and SFT do not depend on kl_coef: one reference row each
    assert sorted({(r["stage"], r["ppo.kl_coef"]) for r in table if r["reference"] == "true"}) == [
        ("SFT", "all"), ("base model", "all")]
    md = (reports["kl_coef"] / "report.md").read_text(encoding="utf-8")
    assert "ROUGE-L" in md and "Best vs runner-up" in md
