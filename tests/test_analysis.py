"""Tests of the analysis package on synthetic result.json files with known values (docs/architecture.md schema 1).

The statistics are checked against hand computations and scipy references; the tables against the rule that a
best value is bold only when its test separates it from every other value (issue 18: tests/test_stats_design.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from analysis.cli import main as cli_main
from rlhf_ablate.metrics.registry import REGISTRY
from analysis.render import tex_escape, to_latex, to_markdown
from analysis.report import build_report, write_report
from analysis.results import ReportError, load_run
from analysis.stats import holm, paired_seed_test, paired_unit_bootstrap, summarize
from analysis.groups import BEST, NOT_TESTED, TIE

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Synthetic results
# ---------------------------------------------------------------------------------------------------------
def write_result(run_dir: Path, trial_id: str, *, axes: dict, seed: int, metrics: dict | None = None,
                 status: str = "ok", error: dict | None = None, records: dict | None = None,
                 history: dict | None = None, sweep: str = "synthetic", index: int = 0,
                 timings: dict | None = None, config: dict | None = None) -> Path:
    d = run_dir / "trials" / trial_id
    d.mkdir(parents=True, exist_ok=True)
    res = {
        "schema": 1, "trial_id": trial_id, "sweep": sweep, "index": index, "status": status,
        "error": error, "seed": seed, "config": {"seed": seed, "method": "ppo", **(config or {}), **axes},
        "axes": axes, "metrics": metrics or {}, "metric_meta": {}, "timings": timings or {},
        "history": history or {}, "records": records or {}, "versions": {"python": "3.11"},
        "started_at": "2026-01-01T00:00:00", "finished_at": "2026-01-01T00:01:00",
    }
    p = d / "result.json"
    p.write_text(json.dumps(res, ensure_ascii=False), encoding="utf-8")  # json writes NaN as NaN, like run_trial
    return p


def make_kl_sweep(run_dir: Path, coefs=(0.01, 0.1, 1.0), seeds=(0, 1, 2), n_prompts=40,
                  effect=(0.0, 0.05, 0.20), noise=0.05, with_records=True, rng_seed=0) -> None:
    """A kl_coef sweep whose ROUGE-L rises by ``effect`` per coef, with per-prompt records, RM records (one RM per
    seed, shared across kl_coef), and PPO history. Trial metrics are the means of the records."""
    rng = np.random.default_rng(rng_seed)
    prompt_difficulty = rng.normal(0.3, 0.1, n_prompts)       # shared across configs: what pairing removes
    idx = 0
    for seed in seeds:
        seed_shift = rng.normal(0, 0.01)
        rm_recs = []
        for p in range(n_prompts):
            lengths = [int(x) for x in rng.integers(10, 80, 3)]
            scores = [0.02 * ln + rng.normal(0, 0.3) + (1.0 - 0.5 * r) for ln, r in zip(lengths, (1, 2, 3))]
            rm_recs.append({"data_id": f"g{p}", "scores": scores, "ranks": [1, 2, 3], "lengths": lengths})
        for ci, (coef, eff) in enumerate(zip(coefs, effect)):
            kl = 2.0 / (1 + 20 * coef) + rng.normal(0, 0.05)
            recs = []
            for p in range(n_prompts):
                rl = prompt_difficulty[p] + eff + seed_shift + rng.normal(0, noise)
                ln = int(rng.integers(5, 40))
                recs.append({"data_id": f"e{p}", "prompt": "질문", "reference": "답", "generation": "답변",
                             "rouge1": rl + 0.1, "rouge2": rl - 0.1, "rougeL": rl, "bleu": 100 * rl,
                             "chrf": 100 * rl + 5, "reward": 0.5 * kl + 0.01 * ln + rng.normal(0, 0.1),
                             "response_len": ln, "kl_to_ref": kl + rng.normal(0, 0.01)})
            metrics = {f"ppo/{k}": float(np.mean([r[k] for r in recs]))
                       for k in ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "response_len", "kl_to_ref")}
            metrics["ppo/reward_mean"] = float(np.mean([r["reward"] for r in recs]))
            history = {"ppo": [{"step": s, "objective/kl": kl * s / 8, "objective/scores": 0.1 * s * (1 - coef / 2)}
                               for s in range(1, 9)]}
            write_result(run_dir, f"t{ci}s{seed}", axes={"ppo.kl_coef": coef}, seed=seed, metrics=metrics,
                         records={"ppo": recs, "rm": rm_recs} if with_records else {}, history=history,
                         sweep="kl_coef", index=idx, timings={"rm": {"seconds": 1.0, "key": f"rm{seed}"}})
            idx += 1


def _table(rep, title_part: str):
    return next(t for t in rep.tables if title_part in t.title)


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------
def test_cell_ci_matches_hand_computation_and_scipy():
    s = summarize([1.0, 2.0, 3.0])
    half = sps.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)          # sd of 1,2,3 is 1
    assert s.n == 3 and s.mean == pytest.approx(2.0)
    assert (s.ci_low, s.ci_high) == pytest.approx((2 - half, 2 + half))
    vals = [0.31, 0.35, 0.29, 0.40]
    ref = sps.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=sps.sem(vals))
    s = summarize(vals)
    assert (s.ci_low, s.ci_high) == pytest.approx(ref)


def test_one_seed_has_no_ci_and_nan_is_not_counted():
    one = summarize([0.5])
    assert one.n == 1 and not one.has_ci and math.isnan(one.ci_low)
    s = summarize([1.0, math.nan, 3.0])
    assert (s.n, s.n_nan, s.mean) == (2, 1, 2.0)
    empty = summarize([math.nan])
    assert empty.n == 0 and empty.n_nan == 1 and math.isnan(empty.mean)


def test_seed_test_matches_scipy_paired_t():
    a = {0: 0.40, 1: 0.45, 2: 0.43}
    b = {0: 0.38, 1: 0.41, 2: 0.42, 3: 0.9}      # seed 3 has no partner
    t = paired_seed_test(a, b)
    ref = sps.ttest_rel([0.40, 0.45, 0.43], [0.38, 0.41, 0.42])
    lo, hi = ref.confidence_interval(0.95)
    assert t.method == "seed-t" and t.n_pairs == 3
    assert (t.ci_low, t.ci_high) == pytest.approx((lo, hi))
    assert t.p_value == pytest.approx(ref.pvalue)
    assert paired_seed_test({0: 1.0}, {0: 0.5}) is None


def test_holm_matches_hand_computation():
    # sorted p 0.01, 0.02, 0.03, 0.04 -> 4*0.01, 3*0.02, 2*0.03, 1*0.04, made monotone: .04 .06 .06 .06
    assert holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([]) == []
    assert holm([0.9, 0.02]) == pytest.approx([0.9, 0.04]) and holm([0.9, 0.8]) == [1.0, 1.0]


def test_prompt_bootstrap_of_a_mean_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 1.0, 400)
    a = np.column_stack([d, np.ones(400)])
    b = np.column_stack([np.zeros(400), np.ones(400)])
    t = paired_unit_bootstrap(a, b, lambda v: v[0] / v[1], n_resamples=5000)
    se = d.std(ddof=1) / math.sqrt(400)
    assert t.method == "prompt-bootstrap" and t.n_pairs == 400 and t.diff == pytest.approx(d.mean())
    assert t.ci_low == pytest.approx(d.mean() - 1.96 * se, abs=0.1 * se)
    assert t.ci_high == pytest.approx(d.mean() + 1.96 * se, abs=0.1 * se)
    assert paired_unit_bootstrap(a, b, lambda v: v[0] / v[1]) == paired_unit_bootstrap(a, b, lambda v: v[0] / v[1])


def test_metric_registry_directions_and_stage_lists():
    from rlhf_ablate.metrics.registry import METHODS, POLICY_STAGES, known_metric

    assert REGISTRY["ppo/kl_to_ref"].higher_is_better is False
    assert REGISTRY["rm/kendall_tau"].higher_is_better is True
    assert REGISTRY["rm/chosen_mean"].higher_is_better is None and REGISTRY["rm/length_bias"].higher_is_better is None
    # raw RM units vs scale-free
    assert REGISTRY["rm/separation_margin"].rm_scale and REGISTRY["ppo/reward_mean"].rm_scale
    assert not REGISTRY["rm/pairwise_accuracy"].rm_scale and not REGISTRY["rm/margin_standardized"].rm_scale
    # one eval metric set per policy stage; a method is one entry in METHODS
    assert POLICY_STAGES == ["base", "sft", *METHODS]
    for st in POLICY_STAGES:
        assert f"{st}/bleu" in REGISTRY and REGISTRY[f"{st}/bleu"].setting == "bleu_signature"
    assert "sft/kl_to_ref" not in REGISTRY and "dpo/kl_to_ref" in REGISTRY
    assert known_metric("ppo/objective/scores") and known_metric("rm/kendall_tau_ci_low")
    assert not known_metric("ppo/rewrd_mean")


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def _ppo_rows(t):
    return [r for r in t.row_keys if r[0] == "PPO"]


def test_clear_best_is_bold_and_close_values_tie(tmp_path):
    make_kl_sweep(tmp_path, effect=(0.0, 0.01, 0.20), noise=0.05)
    rep = build_report(tmp_path)
    t = _table(rep, "PPO eval")
    assert _ppo_rows(t) == [("PPO", 0.01), ("PPO", 0.1), ("PPO", 1.0)]
    rouge = {r: t.cells[(r, "rougeL")] for r in _ppo_rows(t)}
    assert rouge[("PPO", 1.0)].mark == BEST and rouge[("PPO", 0.1)].mark == "" and rouge[("PPO", 0.01)].mark == ""
    cmp = next(c for c in t.comparisons if c.metric.name == "ppo/rougeL")
    assert cmp.verdict == "separated" and cmp.test.method == "rcbd" and cmp.test.n_seeds == 3 and cmp.primary
    assert cmp.test.p_adjusted == cmp.test.p_value        # the primary question: 5% on its own (family "table")
    md = to_markdown(t)
    row = next(line for line in md.splitlines() if line.startswith("| PPO | 1 |"))
    assert "**" in row and "(n=3)" in row

    # 0.01 vs 0.1 alone: a 0.003 difference under 0.05 noise at 3 seeds is not separable
    tie_dir = tmp_path / "tie"
    make_kl_sweep(tie_dir, coefs=(0.01, 0.1), effect=(0.0, 0.003), noise=0.05)
    t2 = _table(build_report(tie_dir), "PPO eval")
    cells = [t2.cells[(r, "rougeL")] for r in _ppo_rows(t2)]
    assert [c.mark for c in cells] == [TIE, TIE]
    md2 = to_markdown(t2)
    assert "ROUGE-L ↑" in md2 and "KL to ref ↓" in md2 and "≈" in md2


def test_lower_is_better_and_directionless_metrics(tmp_path):
    make_kl_sweep(tmp_path)
    t = _table(build_report(tmp_path), "PPO eval")
    # KL falls with kl_coef in the synthetic sweep: the best KL is the largest coef
    assert [r for r in _ppo_rows(t) if t.cells[(r, "kl_to_ref")].mark == BEST] == [("PPO", 1.0)]
    assert all(t.cells[(r, "response_len")].mark == "" for r in _ppo_rows(t))


def test_one_seed_is_never_bold_and_says_why(tmp_path):
    make_kl_sweep(tmp_path, coefs=(0.01, 1.0), seeds=(0,), effect=(0.0, 0.5))
    rep = write_report(tmp_path, plots=False)
    t = _table(rep, "PPO eval")
    best = t.cells[(("PPO", 1.0), "rougeL")]
    md = to_markdown(t)
    assert best.mark == NOT_TESTED and "†" in md and "**" not in md.split("Metrics:")[0]
    assert "n=1, no CI" in md and "±" not in md.split("Metrics:")[0]
    cmp = next(c for c in t.comparisons if c.metric.name == "ppo/rougeL")
    # the one-seed line carries the prompt bootstrap of the statistic itself, marked as prompt noise only
    assert cmp.test is None and cmp.within_seed is not None and cmp.within_seed.diff == pytest.approx(
        t.cells[(("PPO", 1.0), "rougeL")].summary.mean - t.cells[(("PPO", 0.01), "rougeL")].summary.mean)
    assert "prompt noise only" in md
    report = (tmp_path / "report" / "report.md").read_text()
    assert "One seed" in report and "nothing is bold" in report


def test_missing_seed_pending_trial_and_failed_trial(tmp_path):
    make_kl_sweep(tmp_path, coefs=(0.01, 0.1), effect=(0.0, 0.1))
    # seed 2 of kl_coef=0.1: still running (directory without result.json) ...
    (tmp_path / "trials" / "t1s2" / "result.json").unlink()
    # ... and seed 1 of kl_coef=0.01 failed
    p = tmp_path / "trials" / "t0s1" / "result.json"
    res = json.loads(p.read_text())
    res.update(status="failed", metrics={}, records={},
               error={"type": "TrialFailed", "message": "KL 73.1 > kl_stop 50.0 at step 5", "stage": "ppo"})
    p.write_text(json.dumps(res))
    rep = write_report(tmp_path, plots=False)
    t = _table(rep, "PPO eval")
    assert t.cells[(("PPO", 0.1), "rougeL")].summary.n == 2
    assert t.cells[(("PPO", 0.01), "rougeL")].summary.n == 2
    assert t.counts[(("PPO", 0.01), None)] == (2, 1, 0)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "2 ok, 1 failed" in md and "(n=2)" in md
    failed_section = md.split("## Failed trials")[1]
    assert "t0s1" in failed_section and "TrialFailed" in failed_section and "kl_stop 50.0" in failed_section
    assert "ppo.kl_coef=0.01" in failed_section
    assert "trials/t1s2" in md.split("## Pending trials")[1]
    assert "4 finished, 1 failed, 1 pending" in md
    csv_text = (tmp_path / "report" / f"{t.slug}.csv").read_text().splitlines()
    header = csv_text[0].split(",")
    assert header[:3] == ["stage", "ppo.kl_coef", "metric"]
    row = next(r.split(",") for r in csv_text if r.startswith("PPO,0.01,ppo/rougeL,"))
    assert row[header.index("n")] == "2" and row[header.index("trials_failed")] == "1"


def test_nan_metrics_show_as_na_and_do_not_count(tmp_path):
    write_result(tmp_path, "a0", axes={"ppo.kl_coef": 0.1}, seed=0, metrics={"ppo/bleu": 10.0, "ppo/rougeL": None})
    write_result(tmp_path, "a1", axes={"ppo.kl_coef": 0.1}, seed=1, metrics={"ppo/bleu": float("nan"),
                                                                             "ppo/rougeL": None})
    write_result(tmp_path, "a2", axes={"ppo.kl_coef": 0.1}, seed=2, metrics={"ppo/bleu": 12.0, "ppo/rougeL": None})
    write_result(tmp_path, "b0", axes={"ppo.kl_coef": 1.0}, seed=0, metrics={"ppo/bleu": "oops"})
    rep = write_report(tmp_path, plots=False)
    t = _table(rep, "PPO eval")
    bleu = t.cells[(("PPO", 0.1), "bleu")].summary
    assert (bleu.n, bleu.n_nan, bleu.mean) == (2, 1, 11.0)
    md = to_markdown(t)
    assert "(n=2, 1 NaN)" in md and "n/a (n=0, 3 NaN)" in md
    assert any("metrics['ppo/bleu'] is not a number" in p for p in rep.problems)
    csv_rows = (tmp_path / "report" / f"{t.slug}.csv").read_text().splitlines()
    assert not any("nan" in r.lower() for r in csv_rows[1:])   # missing numbers are empty fields
    assert not any(r.startswith("PPO,1,ppo/rougeL,") for r in csv_rows)   # kl_coef=1 never reported ROUGE-L


def test_small_values_keep_two_significant_digits():
    from analysis.render import num

    assert num(0.018, ".2f") == "0.018" and num(23.456, ".2f") == "23.46" and num(0.5, ".2f") == "0.50"
    assert num(0.0042, ".3f") == "0.0042" and num(0.25, ".3f") == "0.250" and num(-0.018, ".2f") == "-0.018"
    assert num(7e-15, ".2f") == "0.00"     # float noise of a smoothed zero BLEU is not "7e-15"


def _rm_recs(rng, quality: float, n: int = 30) -> list[dict]:
    recs = []
    for g in range(n):
        noise = rng.normal(0, 0.3, 3)
        recs.append({"data_id": f"g{g}", "scores": [quality * (1 - 0.5 * r) + e for r, e in zip((1, 2, 3), noise)],
                     "ranks": [1, 2, 3], "lengths": [int(x) for x in rng.integers(10, 60, 3)]})
    return recs


def test_two_axis_grid_gives_pivots_and_raw_rm_units_are_not_compared_across_rms(tmp_path):
    from rlhf_ablate.metrics import rm_metrics

    rng = np.random.default_rng(3)
    i = 0
    for rank in (8, 16):
        for version in ("v1", "v2"):
            for seed in (0, 1):
                # rank 16 / v2: a better RM, on a 10x larger score scale for rank 16
                recs = _rm_recs(rng, 1.0 + 2.0 * (rank == 16 and version == "v2"))
                if rank == 16:
                    recs = [{**r, "scores": [10 * s for s in r["scores"]]} for r in recs]
                m = rm_metrics(recs)
                m["sft/rougeL"] = 0.2 + rng.normal(0, 0.01)
                write_result(tmp_path, f"g{i}", axes={"lora_rank": rank, "data.version": version}, seed=seed,
                             metrics=m, records={"rm": recs}, index=i)
                i += 1
    rep = build_report(tmp_path)
    assert all(t.layout == "pivot" for t in rep.tables)
    t = _table(rep, "reward model margin ↑")
    assert t.row_keys == [(8,), (16,)] and t.col_keys == ["v1", "v2"]
    assert t.cells[((16,), "v2")].summary.mean > 10 * t.cells[((8,), "v1")].summary.mean
    # raw margins of different reward models: shown, never bold, and the table says why
    assert not any(c.mark == BEST for c in t.cells.values())
    assert t.comparisons[0].verdict == "not tested: different RMs" and "raw RM units" in to_markdown(t)
    std = _table(rep, "std. margin")          # the scale-free margin is compared (and found at 16/v2)
    assert std.comparisons[0].test is not None and std.comparisons[0].best.startswith("lora_rank=16")
    md = to_markdown(t)
    assert md.splitlines()[0] == "| lora_rank \\ data.version | v1 | v2 |"
    assert {x.columns[0].name for x in rep.tables} >= {"rm/separation_margin", "rm/kendall_tau", "sft/rougeL"}


def test_latex_escaping_bold_and_korean_preamble_note(tmp_path):
    assert tex_escape("ppo.kl_coef 50% & $x#{}") == r"ppo.kl\_coef 50\% \& \$x\#\{\}"
    make_kl_sweep(tmp_path)
    t = _table(build_report(tmp_path), "PPO eval")
    tex = to_latex(t)
    assert "\\toprule" in tex and "\\bottomrule" in tex and "ppo.kl\\_coef" in tex
    assert "\\textbf{" in tex and "$\\pm$" in tex and "$\\uparrow$" in tex
    assert "kotex" in tex and "BLEU: 0-100" in tex and "ROUGE-L: 0-1" in tex
    body = tex.split("\\midrule")[1]
    assert "_" not in body.replace("\\_", "")


def _stage_timings(seed: int, rank: int) -> dict:
    return {"sft": {"key": f"sft{rank}s{seed}"}, "rm": {"key": f"rm{rank}s{seed}"}, "ppo": {"key": f"p{rank}s{seed}"},
            "eval_base": {"key": f"base{rank == 0}"}}


def test_lora_rank_axis_gets_rm_sft_and_ppo_tables_with_base_rows(tmp_path):
    """The tied LoRA-rank axis changes SFT, RM and PPO (their cache keys differ): three tables; the eval tables
    start with the base model (its text metrics the same for every rank of one quantization, its reward per RM)."""
    from rlhf_ablate.metrics import rm_metrics

    rng = np.random.default_rng(4)
    i = 0
    base_text = {f"base/{k}": v for k, v in {"rouge1": 0.1, "rouge2": 0.02, "rougeL": 0.08, "bleu": 0.018,
                                               "chrf": 5.0, "response_len": 48.0}.items()}
    for rank, quality in ((0, 0.2), (8, 1.0), (16, 1.05)):
        for seed in (0, 1):
            recs = _rm_recs(rng, quality)
            m = {**rm_metrics(recs), **base_text, "base/reward_mean": rng.normal(0, 1)}
            for st, lift in (("sft", 0.2), ("ppo", 0.25)):
                m.update({f"{st}/rouge1": lift + rng.normal(0, .01), f"{st}/rougeL": lift + rng.normal(0, .01),
                          f"{st}/bleu": 100 * lift, f"{st}/reward_mean": rng.normal(1, 0.1)})
            m["ppo/kl_to_ref"] = 0.5 + rng.normal(0, 0.05)
            write_result(tmp_path, f"r{i}", axes={"lora_rank": rank}, seed=seed, metrics=m, records={"rm": recs},
                         index=i, timings=_stage_timings(seed, rank))
            i += 1
    rep = build_report(tmp_path)
    titles = [t.title for t in rep.tables]
    assert titles == ["reward model: lora_rank", "SFT eval (held-out prompts): lora_rank",
                      "PPO eval (held-out prompts): lora_rank"]
    rm_t, sft_t, ppo_t = rep.tables
    assert rm_t.col_keys[:6] == ["chosen_mean", "rejected_mean", "separation_margin", "margin_standardized",
                                 "margin_length_corrected", "pairwise_accuracy"]
    assert "ppo_rougeL" not in rm_t.col_keys and "length_bias" in rm_t.col_keys
    margin = next(c for c in rm_t.comparisons if c.metric.name == "rm/separation_margin")
    assert margin.verdict == "not tested: different RMs"
    acc = next(c for c in rm_t.comparisons if c.metric.name == "rm/pairwise_accuracy")
    assert acc.test is not None and acc.test.method == "rcbd" and acc.test.n_seeds == 2 and not acc.primary
    # base rows: one per rank, since each rank's RM scores them; reference rows are never tested
    assert [r for r in sft_t.row_keys if r[0] == "base model"] == [("base model", 0), ("base model", 8),
                                                                     ("base model", 16)]
    assert all(r[0] == "base model" for r in sft_t.reference_rows)
    assert "0.018" in to_markdown(sft_t)                          # BLEU 0.018 is not printed as 0.02
    assert "kl_to_ref" in ppo_t.col_keys and "SFT" not in {r[0] for r in ppo_t.row_keys}   # SFT changes: own table
    assert all(c.metric.stage == "ppo" for c in ppo_t.comparisons)


def test_kl_axis_collapses_reference_rows_and_tests_reward_under_one_rm(tmp_path):
    make_kl_sweep(tmp_path)
    for p in (tmp_path / "trials").glob("*/result.json"):  # base and SFT evals, the same for every kl_coef
        res = json.loads(p.read_text())
        seed = res["seed"]
        res["metrics"].update({"base/rougeL": 0.1, "base/reward_mean": 0.1 * seed, "sft/rougeL": 0.2 + seed,
                               "sft/reward_mean": 0.5})
        res["timings"].update({"sft": {"key": f"sft{seed}"}, "ppo": {"key": res["trial_id"]},
                               "eval_base": {"key": "base"}})
        p.write_text(json.dumps(res))
    rep = build_report(tmp_path)
    assert [t.title for t in rep.tables] == ["PPO eval (held-out prompts): ppo.kl_coef"]
    t = rep.tables[0]
    assert t.row_keys[:2] == [("base model", "all"), ("SFT", "all")]
    assert any("shown once" in n for n in t.notes)
    reward = next(c for c in t.comparisons if c.metric.name == "ppo/reward_mean")
    assert reward.test is not None           # one RM per seed, shared by the kl_coef values: comparable


def test_cell_and_test_use_the_same_statistic_rm_accuracy_with_ties(tmp_path):
    """RM accuracy is pair-weighted with a tie counting 1/2 in the stage's number, the cell and the test alike.
    The old test averaged per group with a tie as 0 and would rank these two reward models the other way round."""
    from rlhf_ablate.metrics import rm_metrics

    def group(i: int, k: int, order: str) -> dict:
        scores = {"right": list(range(k, 0, -1)), "wrong": list(range(1, k + 1)), "tied": [1.0] * k}[order]
        return {"data_id": f"g{i}", "scores": [float(x) for x in scores], "ranks": list(range(1, k + 1)),
                "lengths": [10] * k}

    tie = group(9, 3, "tied")                                            # 3 tied pairs
    a = [group(i, 2, "right") for i in range(5)] + [group(5, 5, "wrong"), tie]    # 5 right, 10 wrong pairs
    b = [group(0, 5, "right"), group(1, 2, "wrong"), group(2, 2, "wrong"), tie]   # 10 right, 2 wrong pairs
    for i, recs in enumerate((a, b)):
        for seed in (0, 1, 2):
            write_result(tmp_path, f"c{i}s{seed}", axes={"rm.lora_rank": i}, seed=seed, metrics=rm_metrics(recs),
                         records={"rm": recs}, index=3 * i + seed)
    t = build_report(tmp_path).tables[0]
    cells = {r[-1]: t.cells[(r, "pairwise_accuracy")].summary.mean for r in t.row_keys}
    assert cells[0] == pytest.approx((5 + 1.5) / 18) and cells[1] == pytest.approx((10 + 1.5) / 15)
    cmp = next(c for c in t.comparisons if c.metric.name == "rm/pairwise_accuracy")
    # the test pairs the cells' own per-seed numbers: its mean difference is the difference of the cells
    assert cmp.best.startswith("rm.lora_rank=1") and cmp.test.diff == pytest.approx(cells[1] - cells[0])
    # the old per-group, tie-as-0 statistic: A = 5/7 groups right, B = 1/4: the opposite order
    assert np.mean([1] * 5 + [0, 0]) > np.mean([1, 0, 0, 0])


def test_cell_and_test_use_the_same_statistic_corpus_bleu(tmp_path):
    """BLEU cells are corpus BLEU; the test compares the per-seed corpus BLEU, and with one seed its bootstrap
    resamples prompts and recomputes corpus BLEU from the summed statistics (never a mean of sentence BLEU)."""
    from rlhf_ablate.metrics import text_metrics
    from rlhf_ablate.metrics.registry import compute_stage_metrics

    refs = ["고양이가 창가에서 잠을 잔다", "오늘은 비가 많이 온다", "김치찌개를 끓이는 방법을 알려 줘",
            "서울에서 부산까지 기차로 간다", "책을 읽으면 마음이 편해진다", "커피를 마시며 음악을 듣는다"]
    outputs = {0: ["고양이가 잔다", "비가 온다", "김치찌개를 끓인다", "기차로 간다", "책을 읽는다", "커피를 마신다"],
               1: ["고양이가 창가에서 잔다", "오늘은 비가 온다", "김치찌개를 끓이는 방법", "서울에서 부산까지 간다",
                   "책을 읽으면 편하다", "음악을 듣는다"]}
    corpus = {}
    for i, preds in outputs.items():
        tm = text_metrics(preds, refs, rouge_tokenizer="char")
        recs = [{"data_id": f"e{j}", "prompt": "질문", "reference": refs[j], "generation": preds[j], **r,
                 "reward": 0.0, "kl_to_ref": 0.1, "response_len": 5, "has_eos": True}
                for j, r in enumerate(tm.records)]
        m = compute_stage_metrics("ppo", recs)
        assert m["ppo/bleu"] == pytest.approx(tm.corpus["bleu"])
        assert m["ppo/bleu"] != pytest.approx(np.mean([r["bleu"] for r in tm.records]))
        corpus[i] = m["ppo/bleu"]
        write_result(tmp_path, f"k{i}", axes={"ppo.kl_coef": i}, seed=0, metrics=m, records={"ppo": recs},
                     index=i, timings={"rm": {"key": "rm0"}})
    t = _table(build_report(tmp_path), "PPO eval")
    cmp = next(c for c in t.comparisons if c.metric.name == "ppo/bleu")
    assert cmp.within_seed.diff == pytest.approx(corpus[1] - corpus[0])
    assert cmp.test is None and t.cells[(("PPO", 1), "bleu")].mark == NOT_TESTED


def test_trials_with_other_metric_settings_are_not_averaged(tmp_path):
    make_kl_sweep(tmp_path, coefs=(0.1,), seeds=(0, 1, 2))
    for p in sorted((tmp_path / "trials").glob("*/result.json")):
        res = json.loads(p.read_text())
        res["metric_meta"] = {"rouge_tokenizer": "kiwi" if res["seed"] < 2 else "characters",
                              "bleu_signature": "tok:char"}
        p.write_text(json.dumps(res))
    rep = build_report(tmp_path)
    t = _table(rep, "PPO eval")
    assert t.cells[(("PPO", 0.1), "rougeL")].summary.n == 2     # the char-tokenized seed is left out of ROUGE
    assert t.cells[(("PPO", 0.1), "bleu")].summary.n == 3       # ... but not out of BLEU
    assert any("rouge_tokenizer = characters" in p and "t0s2" in p for p in rep.problems)
    assert "ROUGE tokenizer: `kiwi`" in to_markdown(t, {"rouge_tokenizer": "kiwi"})


def test_base_model_axis_gets_every_stage_and_list_axis_values(tmp_path):
    m = {f"{st}/{k}": 0.5 for st in ("sft", "ppo") for k in ("bleu", "rouge1", "rougeL", "chrf", "reward_mean")}
    m.update({"rm/separation_margin": 1.0, "rm/kendall_tau": 0.4, "custom/thing": 3.0})
    for i, base in enumerate(("tiny-llama", "tiny-gpt2")):
        write_result(tmp_path, f"b{i}", axes={"model.base_model": base}, seed=0, metrics=m, index=i,
                     config={"model.base_model": base})
    titles = [t.title for t in build_report(tmp_path).tables]
    assert titles == ["reward model: model.base_model", "SFT eval (held-out prompts): model.base_model",
                      "PPO eval (held-out prompts): model.base_model", "other metrics: model.base_model"]
    # a tied axis whose keys take different values stores a list: it becomes one hashable row label
    other = tmp_path / "tied"
    write_result(other, "c0", axes={"lora_rank": [8, 16, 8]}, seed=0, metrics={"rm/kendall_tau": 0.3})
    t = build_report(other).tables[0]
    assert t.row_keys == [("[8, 16, 8]",)]


def test_stopped_trials_are_listed_with_a_survivorship_note(tmp_path):
    make_kl_sweep(tmp_path, coefs=(0.01, 0.1))
    p = tmp_path / "trials" / "t0s2" / "result.json"
    res = json.loads(p.read_text())
    res.update(status="stopped", metrics={}, records={}, history={},
               error={"type": "EarlyStopped", "message": "ASHA stopped it at PPO step 4", "stage": "ppo"})
    p.write_text(json.dumps(res))
    rep = write_report(tmp_path)
    assert [t.trial_id for t in rep.run.stopped_trials] == ["t0s2"] and not rep.run.failed_trials
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("## Stopped early (ASHA)")[1]
    assert "t0s2" in section and "Survivorship" in section and "ASHA stopped it at PPO step 4" in section
    assert "1 stopped early by the scheduler" in md and "2 ok, 0 failed" not in md
    assert "stopped early by the scheduler are not shown" in next(p for p in rep.plots if p.filename ==
                                                                 "frontier.png").caption


def test_side_by_side_shows_fixed_prompts_with_every_stage(tmp_path):
    make_kl_sweep(tmp_path, coefs=(0.01, 1.0), seeds=(0, 1), n_prompts=6)
    for p in (tmp_path / "trials").glob("*/result.json"):
        res = json.loads(p.read_text())
        for st, answer in (("base", "아무 말"), ("sft", "좋은 답 | 그리고\n둘째 줄")):
            res["records"][st] = [{**r, "generation": answer, "reward": -1.0} for r in res["records"]["ppo"]]
        p.write_text(json.dumps(res))
    md = write_report(tmp_path, plots=False).markdown
    section = md.split("## Side by side")[1].split("\n## ")[0]
    assert section.count("### Prompt ") == 3 and "**Reference:** 답" in section
    assert "| 0.01 | base model | 아무 말 | -1.000 |" in section
    assert "좋은 답 \\| 그리고<br>둘째 줄" in section and "| 1 | PPO | 답변 |" in section
    assert "Seed 0" in section
    assert md == write_report(tmp_path, plots=False).markdown     # fixed prompts: the same every time


# ---------------------------------------------------------------------------------------------------------
# Report, plots, CLI
# ---------------------------------------------------------------------------------------------------------
def test_report_is_deterministic_and_has_plots(tmp_path):
    run = tmp_path / "run"
    make_kl_sweep(run)
    write_report(run, out=tmp_path / "r1")
    write_report(run, out=tmp_path / "r2")
    files1 = sorted(p.name for p in (tmp_path / "r1").iterdir())
    assert files1 == sorted(p.name for p in (tmp_path / "r2").iterdir())
    for name in files1:
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r2" / name).read_bytes(), name
    for png in ("frontier.png", "rm_scores.png", "length_bias.png", "ppo_curves.png"):
        data = (tmp_path / "r1" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert b"matplotlib" not in data.lower()
        assert f"]({png})" in (tmp_path / "r1" / "report.md").read_text()
        svg = (tmp_path / "r1" / png.replace(".png", ".svg")).read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and "<dc:date>" not in svg
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "How to read the tables" in md and "Bold" in md and "≈" in md
    assert "2026-01-01" not in md
    assert not list(tmp_path.glob(".r1.tmp-*")) and not list(tmp_path.glob(".r1.old-*"))


def test_plots_only_when_data_exists(tmp_path):
    write_result(tmp_path, "a", axes={"rm.lora_rank": 8}, seed=0, metrics={"rm/kendall_tau": 0.3})
    rep = write_report(tmp_path)
    assert rep.plots == [] and not list((tmp_path / "report").glob("*.png"))
    assert "## Plots" not in (tmp_path / "report" / "report.md").read_text()


def test_unreadable_json_is_a_problem_not_a_crash(tmp_path):
    make_kl_sweep(tmp_path, coefs=(0.1,), seeds=(0,), n_prompts=3)
    bad = tmp_path / "trials" / "broken"
    bad.mkdir()
    (bad / "result.json").write_text('{"schema": 1, "status": "ok", "metr')
    other = tmp_path / "trials" / "old"
    other.mkdir()
    (other / "result.json").write_text(json.dumps({"schema": 0, "status": "ok"}))
    rep = write_report(tmp_path, formats=("md",), plots=False)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "trials/broken/result.json: not valid JSON (line 1" in md
    assert "trials/old/result.json: schema is 0" in md
    assert len(rep.run.ok_trials) == 1
    assert not list((tmp_path / "report").glob("*.csv"))


def test_cli_errors_exit_2_and_success_exit_0(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty" / "trials" / "t1").mkdir(parents=True)
    assert cli_main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no result.json" in err and "none finished yet" in err
    make_kl_sweep(tmp_path / "run", coefs=(0.1, 1.0), seeds=(0,), n_prompts=4)
    assert cli_main(["report", str(tmp_path / "run"), "--format", "md,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert not (tmp_path / "run" / "report").exists()
    out = tmp_path / "elsewhere"
    assert cli_main(["report", str(tmp_path / "run"), "--out", str(out), "--no-plots"]) == 0
    assert (out / "report.md").is_file() and "2 finished" in capsys.readouterr().out


def test_python_m_analysis_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis", "report", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error: run directory" in proc.stderr and "Traceback" not in proc.stderr


def test_float_noise_between_equal_seeds_is_an_exact_zero_ci():
    from analysis.stats import summarize

    s = summarize([0.7575757575757576, 0.7575757575757575])
    assert s.ci_low == s.ci_high == s.mean
    assert summarize([0.75, 0.76]).ci_high > 0.76


def test_plots_draw_hangul_glyphs_not_empty_boxes():
    """matplotlib's default font has no Hangul: every syllable becomes the same empty box. With the font the
    report registers (NanumGothic from the koreanize-matplotlib dependency) two syllables draw differently."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from analysis.plots import _rc, korean_font

    assert korean_font() == "NanumGothic"

    def pixels(text: str) -> np.ndarray:
        with matplotlib.rc_context(_rc()):
            fig = Figure(figsize=(1, 1), dpi=50)
            canvas = FigureCanvasAgg(fig)
            fig.text(0.1, 0.3, text, fontsize=30)
            canvas.draw()
            return np.asarray(canvas.buffer_rgba()).copy()

    ga, na = pixels("가"), pixels("나")
    assert (ga != 255).any() and (ga != na).any()
