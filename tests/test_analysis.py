"""Tests of the analysis package on synthetic result.json files with known values (docs/architecture.md schema 1).

The statistics are checked against hand computations and scipy references; the tables against the rule that a
best value is bold only when a paired test separates it from the runner-up.
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
from analysis.tables import BEST, NOT_TESTED, TIE

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


def test_paired_bootstrap_one_seed_matches_normal_interval():
    rng = np.random.default_rng(1)
    d = rng.normal(0.1, 1.0, 400)
    a = {(0, str(i)): float(d[i]) for i in range(400)}
    b = {(0, str(i)): 0.0 for i in range(400)}
    # many resamples here, so Monte Carlo error of the 2.5% quantile (~0.06 se at 2000) does not blur the check
    t = paired_bootstrap(a, b, n_resamples=20000)
    assert t.method == "bootstrap" and t.n_seeds == 1 and t.n_pairs == 400
    se = d.std(ddof=1) / math.sqrt(400)
    assert t.diff == pytest.approx(d.mean())
    # percentile bootstrap of a mean ~ mean ± 1.96 se for n=400
    assert t.ci_low == pytest.approx(d.mean() - 1.96 * se, abs=0.1 * se)
    assert t.ci_high == pytest.approx(d.mean() + 1.96 * se, abs=0.1 * se)
    # same inputs, same numbers (fixed seed)
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)


def test_paired_bootstrap_uses_shared_keys_and_pairing_removes_prompt_noise():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1.0, 60)                # big prompt-to-prompt spread, shared by both configs
    a = {(s, str(i)): float(base[i] + 0.05 + rng.normal(0, 0.01)) for s in (0, 1, 2) for i in range(60)}
    b = {(s, str(i)): float(base[i] + rng.normal(0, 0.01)) for s in (0, 1, 2) for i in range(60)}
    b[(3, "x")] = 5.0                            # a key only one side has: ignored
    del a[(0, "0")]
    t = paired_bootstrap(a, b)
    assert t.n_seeds == 3 and t.n_pairs == 179
    assert t.ci_low > 0.03 and t.ci_high < 0.07 and t.p_value < 0.01
    # an unpaired comparison could not see a 0.05 difference under a spread of 1.0
    assert 0.05 < 1.96 * base.std() / math.sqrt(60)


def test_seed_level_fallback_matches_scipy_paired_t():
    a = {0: 0.40, 1: 0.45, 2: 0.43}
    b = {0: 0.38, 1: 0.41, 2: 0.42, 3: 0.9}      # seed 3 has no partner
    t = paired_seed_test(a, b)
    ref = sps.ttest_rel([0.40, 0.45, 0.43], [0.38, 0.41, 0.42])
    lo, hi = ref.confidence_interval(0.95)
    assert t.method == "seed-t" and t.n_pairs == 3
    assert (t.ci_low, t.ci_high) == pytest.approx((lo, hi))
    assert t.p_value == pytest.approx(ref.pvalue)
    assert paired_seed_test({0: 1.0}, {0: 0.5}) is None


def test_rm_group_values():
    rec = {"data_id": "g", "scores": [2.0, 1.0, 1.5], "ranks": [1, 2, 3]}
    # pairs (1>2): 1.0, (1>3): 0.5, (2>3): -0.5
    assert rm_group_value("margin", rec) == pytest.approx(1.0 / 3)
    assert rm_group_value("accuracy", rec) == pytest.approx(2 / 3)
    assert rm_group_value("kendall_tau", rec) == pytest.approx(sps.kendalltau([2.0, 1.0, 1.5], [-1, -2, -3])[0])
    assert rm_group_value("kendall_tau", {**rec, "kendall_tau": 0.25}) == 0.25
    assert math.isnan(rm_group_value("margin", {"data_id": "g"}))


def test_metric_registry_directions_and_axis_sets():
    assert REGISTRY["ppo/kl_to_ref"].higher_is_better is False
    assert REGISTRY["rm/kendall_tau"].higher_is_better is True
    assert REGISTRY["rm/chosen_mean"].higher_is_better is None
    assert table_kind("lora_rank") == table_kind("rm.lora_rank") == "rm"
    assert table_kind("ppo.kl_coef") == "kl" and table_kind("data.version") == "data"
    assert table_kind("model.base_model") == "all"


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def test_clear_best_is_bold_and_close_values_tie(tmp_path):
    make_kl_sweep(tmp_path, effect=(0.0, 0.01, 0.20), noise=0.05)
    rep = build_report(tmp_path)
    t = _table(rep, "ppo.kl_coef")
    assert t.row_keys == [(0.01,), (0.1,), (1.0,)]
    rouge = {r: t.cells[(r, "ppo/rougeL")] for r in t.row_keys}
    assert rouge[(1.0,)].mark == BEST and rouge[(0.1,)].mark == "" and rouge[(0.01,)].mark == ""
    cmp = next(c for c in t.comparisons if c.metric.name == "ppo/rougeL")
    assert cmp.verdict == "separated" and cmp.test.method == "bootstrap" and cmp.test.n_seeds == 3
    md = to_markdown(t)
    row = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    assert "**" in row and "(n=3)" in row

    # 0.01 vs 0.1 alone: a 0.01 difference under 0.05 noise at 3 seeds x 40 prompts is not separable
    tie_dir = tmp_path / "tie"
    make_kl_sweep(tie_dir, coefs=(0.01, 0.1), effect=(0.0, 0.003), noise=0.05)
    t2 = _table(build_report(tie_dir), "ppo.kl_coef")
    cells = [t2.cells[(r, "ppo/rougeL")] for r in t2.row_keys]
    assert [c.mark for c in cells] == [TIE, TIE]
    md2 = to_markdown(t2)
    rouge_col = [line.split(" | ")[t2.col_keys.index("ppo/rougeL") + 2] for line in md2.splitlines()[2:4]]
    assert all("≈" in c and "**" not in c for c in rouge_col)
    assert "ROUGE-L ↑" in md2 and "KL to ref ↓" in md2


def test_lower_is_better_and_directionless_metrics(tmp_path):
    make_kl_sweep(tmp_path)
    t = _table(build_report(tmp_path), "ppo.kl_coef")
    # KL falls with kl_coef in the synthetic sweep: the best KL is the largest coef
    kl_best = [r for r in t.row_keys if t.cells[(r, "ppo/kl_to_ref")].mark == BEST]
    assert kl_best == [(1.0,)]
    assert all(t.cells[(r, "ppo/response_len")].mark == "" for r in t.row_keys)


def test_without_records_falls_back_to_seeds_or_not_tested(tmp_path):
    make_kl_sweep(tmp_path / "a", coefs=(0.01, 1.0), effect=(0.0, 0.2), with_records=False)
    t = _table(build_report(tmp_path / "a"), "ppo.kl_coef")
    cmp = next(c for c in t.comparisons if c.metric.name == "ppo/rougeL")
    assert cmp.test.method == "seed-t" and cmp.verdict == "separated"
    make_kl_sweep(tmp_path / "b", coefs=(0.01, 1.0), seeds=(0,), effect=(0.0, 0.2), with_records=False)
    t = _table(build_report(tmp_path / "b"), "ppo.kl_coef")
    best = t.cells[((1.0,), "ppo/rougeL")]
    assert best.mark == NOT_TESTED and "†" in to_markdown(t) and "**" not in to_markdown(t)
    assert "n=1, no CI" in to_markdown(t) and "±" not in to_markdown(t).split("Best vs")[0]


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
    rep = write_report(tmp_path)
    t = _table(rep, "ppo.kl_coef")
    assert t.cells[((0.1,), "ppo/rougeL")].summary.n == 2
    assert t.cells[((0.01,), "ppo/rougeL")].summary.n == 2
    assert t.counts[((0.01,), None)] == (2, 1)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "2 ok, 1 failed" in md and "(n=2)" in md
    failed_section = md.split("## Failed trials")[1]
    assert "t0s1" in failed_section and "TrialFailed" in failed_section and "kl_stop 50.0" in failed_section
    assert "ppo.kl_coef=0.01" in failed_section
    assert "trials/t1s2" in md.split("## Pending trials")[1]
    assert "4 finished, 1 failed, 1 pending" in md
    csv_text = (tmp_path / "report" / f"{t.slug}.csv").read_text().splitlines()
    header = csv_text[0].split(",")
    row = next(r.split(",") for r in csv_text if r.startswith("0.01,ppo/rougeL,"))
    assert row[header.index("n")] == "2" and row[header.index("trials_failed")] == "1"


def test_nan_metrics_show_as_na_and_do_not_count(tmp_path):
    write_result(tmp_path, "a0", axes={"ppo.kl_coef": 0.1}, seed=0, metrics={"ppo/bleu": 10.0, "ppo/rougeL": None})
    write_result(tmp_path, "a1", axes={"ppo.kl_coef": 0.1}, seed=1, metrics={"ppo/bleu": float("nan"),
                                                                             "ppo/rougeL": None})
    write_result(tmp_path, "a2", axes={"ppo.kl_coef": 0.1}, seed=2, metrics={"ppo/bleu": 12.0, "ppo/rougeL": None})
    write_result(tmp_path, "b0", axes={"ppo.kl_coef": 1.0}, seed=0, metrics={"ppo/bleu": "oops"})
    rep = write_report(tmp_path)
    t = _table(rep, "ppo.kl_coef")
    bleu = t.cells[((0.1,), "ppo/bleu")].summary
    assert (bleu.n, bleu.n_nan, bleu.mean) == (2, 1, 11.0)
    md = to_markdown(t)
    assert "(n=2, 1 NaN)" in md and "n/a (n=0, 3 NaN)" in md
    assert any("metrics['ppo/bleu'] is not a number" in p for p in rep.problems)
    csv_rows = (tmp_path / "report" / f"{t.slug}.csv").read_text().splitlines()
    assert not any("nan" in r.lower() for r in csv_rows[1:])   # missing numbers are empty fields
    assert not any(r.startswith("1,ppo/rougeL,") for r in csv_rows)   # kl_coef=1 never reported ROUGE-L


def test_two_axis_grid_gives_pivots(tmp_path):
    rng = np.random.default_rng(3)
    i = 0
    for rank in (8, 16):
        for version in ("v1", "v2"):
            for seed in (0, 1):
                m = {"rm/separation_margin": 1.0 + 0.5 * (rank == 16) + 0.2 * (version == "v2") + rng.normal(0, .01),
                     "rm/kendall_tau": 0.3 + rng.normal(0, 0.01), "sft/rougeL": 0.2 + rng.normal(0, 0.01)}
                write_result(tmp_path, f"g{i}", axes={"lora_rank": rank, "data.version": version}, seed=seed,
                             metrics=m, index=i)
                i += 1
    rep = build_report(tmp_path)
    assert all(t.layout == "pivot" for t in rep.tables)
    t = _table(rep, "RM separation margin")
    assert t.row_keys == [(8,), (16,)] and t.col_keys == ["v1", "v2"]
    assert t.cells[((16,), "v2")].summary.mean == pytest.approx(1.7, abs=0.05)
    assert t.cells[((16,), "v2")].mark == BEST          # 0.2 apart with sd 0.01 over 2 paired seeds
    md = to_markdown(t)
    assert md.splitlines()[0] == "| lora_rank \\ data.version | v1 | v2 |"
    assert {x.metrics[0].name for x in rep.tables} >= {"rm/separation_margin", "rm/kendall_tau", "sft/rougeL"}


def test_latex_escaping_and_bold(tmp_path):
    assert tex_escape("ppo.kl_coef 50% & $x#{}") == r"ppo.kl\_coef 50\% \& \$x\#\{\}"
    make_kl_sweep(tmp_path)
    t = _table(build_report(tmp_path), "ppo.kl_coef")
    tex = to_latex(t)
    assert "\\toprule" in tex and "\\bottomrule" in tex and "ppo.kl\\_coef" in tex
    assert "\\textbf{" in tex and "$\\pm$" in tex and "$\\uparrow$" in tex
    body = tex.split("\\midrule")[1]
    assert "_" not in body.replace("\\_", "")


def test_rm_table_for_lora_rank_uses_group_bootstrap(tmp_path):
    rng = np.random.default_rng(4)
    i = 0
    for rank, quality in ((0, 0.2), (8, 1.0), (16, 1.05)):
        for seed in (0, 1):
            recs = []
            for g in range(30):
                noise = rng.normal(0, 0.3, 3)
                scores = [quality * (1 - 0.5 * r) + n for r, n in zip((1, 2, 3), noise)]
                recs.append({"data_id": f"g{g}", "scores": scores, "ranks": [1, 2, 3], "lengths": [10, 20, 30]})
            margins = [rm_group_value("margin", r) for r in recs]
            m = {"rm/separation_margin": float(np.mean(margins)), "rm/chosen_mean": 1.0, "rm/rejected_mean": 0.0,
                 "rm/kendall_tau": float(np.mean([rm_group_value("kendall_tau", r) for r in recs])),
                 "rm/pairwise_accuracy": float(np.mean([rm_group_value("accuracy", r) for r in recs])),
                 "ppo/rougeL": 0.3}
            write_result(tmp_path, f"r{i}", axes={"lora_rank": rank}, seed=seed, metrics=m, records={"rm": recs},
                         index=i)
            i += 1
    t = build_report(tmp_path).tables[0]
    assert [m.name for m in t.metrics][:3] == ["rm/chosen_mean", "rm/rejected_mean", "rm/separation_margin"]
    assert "ppo/rougeL" not in t.col_keys      # the LoRA-rank table is the RM table
    cmp = next(c for c in t.comparisons if c.metric.name == "rm/separation_margin")
    assert cmp.test.method == "bootstrap" and cmp.test.n_pairs == 60
    assert cmp.best.startswith("lora_rank=16") and cmp.runner_up.startswith("lora_rank=8")
    assert cmp.verdict == "tie"                # 1.05 vs 1.0 under 0.3 noise: not separable
    assert not any(c.metric.name == "rm/chosen_mean" for c in t.comparisons)


def test_base_model_axis_gets_everything_split_by_stage_and_list_axis_values(tmp_path):
    m = {f"{st}/{k}": 0.5 for st in ("sft", "ppo") for k in ("bleu", "rouge1", "rougeL", "chrf", "reward_mean")}
    m.update({"rm/separation_margin": 1.0, "rm/kendall_tau": 0.4, "custom/thing": 3.0})
    for i, base in enumerate(("tiny-llama", "tiny-gpt2")):
        write_result(tmp_path, f"b{i}", axes={"model.base_model": base}, seed=0, metrics=m, index=i)
    titles = [t.title for t in build_report(tmp_path).tables]
    assert titles == ["model.base_model: reward model", "model.base_model: SFT", "model.base_model: PPO",
                      "model.base_model: other metrics"]
    # a tied axis whose keys take different values stores a list: it becomes one hashable row label
    other = tmp_path / "tied"
    write_result(other, "c0", axes={"lora_rank": [8, 16, 8]}, seed=0, metrics={"rm/kendall_tau": 0.3})
    t = build_report(other).tables[0]
    assert t.row_keys == [("[8, 16, 8]",)]


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
