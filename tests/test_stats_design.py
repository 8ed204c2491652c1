"""Issue 18: the best against every other value on seeds as blocks, primary and exploratory columns, the
report's family statement, one aligned table per method axis, judge-aware win rates, unbalanced seeds, the
minimum detectable difference, the sweep file's ``analysis:`` block and ``python -m analysis plan``.

The statistics are checked against hand computations (two-way ANOVA without interaction) and scipy; the tables
on small synthetic runs whose answer is known. Error rates and power are in tests/test_calibration.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from analysis.cli import main as cli_main
from analysis.report import build_report, render_markdown
from analysis.stats import RCBD, PAIRED, best_vs_rest, jackknife_floor, mdd, power_of, seeds_needed
from analysis.groups import BEST, NOT_TESTED, TIE
from tests.test_analysis import make_kl_sweep, write_result


# ---------------------------------------------------------------------------------------------------------
# stats.best_vs_rest
# ---------------------------------------------------------------------------------------------------------
def test_rcbd_residual_variance_and_p_match_a_hand_two_way_anova():
    y = np.array([[0.30, 0.35, 0.28, 0.33], [0.25, 0.31, 0.22, 0.30], [0.20, 0.27, 0.21, 0.24]])
    a, s = y.shape
    grand = y.mean()
    resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + grand
    s2 = (resid ** 2).sum() / ((a - 1) * (s - 1))
    t = best_vs_rest(y, higher_is_better=True)
    assert t.method == RCBD and t.best == 0 and t.runner_up == 1 and t.df == (a - 1) * (s - 1)
    assert t.sigma == pytest.approx(math.sqrt(s2))
    se = math.sqrt(2 * s2 / s)
    diff = y[0].mean() - y[1].mean()
    assert t.diff == pytest.approx(diff)
    assert t.p_value == pytest.approx(2 * sps.t.sf(diff / se, t.df))      # the largest p: the runner-up
    half = sps.t.ppf(0.975, t.df) * se
    assert (t.ci_low, t.ci_high) == pytest.approx((diff - half, diff + half))
    # lower is better: the same data, the other end
    low = best_vs_rest(y, higher_is_better=False)
    assert low.best == 2 and low.diff < 0


def test_best_must_beat_the_third_value_too():
    # best clearly above the runner-up on 3 seeds, but the third value is noisy-equal on one contrast: the claim
    # "best of all" needs every comparison, so the p is the largest over the rivals
    y = np.array([[1.0, 1.1, 0.9], [0.0, 0.1, -0.1], [0.95, 1.2, 0.7]])
    t = best_vs_rest(y, True)
    assert len(t.p_rivals) == 3 and math.isnan(t.p_rivals[t.best])
    assert t.p_value == max(p for p in t.p_rivals if not math.isnan(p))
    assert t.p_value > 0.05 and t.runner_up == 2


def test_identical_per_seed_differences_are_never_p_zero():
    # 0/1 metric on 20 prompts, two seeds, every seed moved by exactly +0.05: zero residual variance
    y = np.array([[0.60, 0.70], [0.55, 0.65], [0.50, 0.60]])
    t = best_vs_rest(y, True)
    assert t.p_value == 1.0 and t.sigma == 0.0            # no noise to test against: no claim
    floor = 0.5 * 0.5 / 20                                # the binomial variance of one 20-prompt accuracy
    tf = best_vs_rest(y, True, floor_var=floor)
    assert tf.floor and tf.p_value > 0.05 and tf.sigma == pytest.approx(math.sqrt(floor))


def test_unequal_variances_fall_back_to_per_pair_tests():
    rng = np.random.default_rng(0)
    y = np.vstack([rng.normal(0, 5, 8), rng.normal(0, 0.1, 8), rng.normal(0, 0.1, 8)])
    t = best_vs_rest(y, True)
    assert t.homogeneity_p < 0.1 and t.method == PAIRED and t.df == 7
    assert "Brown-Forsythe" in t.describe()


def test_jackknife_floor_of_a_mean_is_var_over_n_net_of_shared_prompts():
    rng = np.random.default_rng(1)
    prompt = rng.normal(0, 1, 200)
    units = [np.column_stack([np.ones(200), prompt + rng.normal(0, 0.5, 200)]) for _ in range(3)]

    def mean(v):
        return v[..., 1] / v[..., 0]
    mean.vectorized = True
    f = jackknife_floor(units, mean)
    assert f == pytest.approx(0.25 / 200, rel=0.2)       # the prompt effect (var 1) cancels between configurations
    assert jackknife_floor(units, mean, aligned=False) == pytest.approx(1.25 / 200, rel=0.25)


def test_power_mdd_and_seeds_needed_agree():
    sigma, a = 1.0, 3
    d = mdd(sigma, 5, (a - 1) * 4)
    assert 0.7 < power_of(d, sigma, 5, a) < 0.9           # the normal-theory MDD is close to 80% power
    s = seeds_needed(2.0, sigma, a)
    assert power_of(2.0, sigma, s, a) >= 0.8 > power_of(2.0, sigma, s - 1, a)
    assert seeds_needed(0.0, sigma, a) is None


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def test_primary_is_bold_at_five_percent_and_exploratory_columns_need_holm_over_the_report(tmp_path):
    make_kl_sweep(tmp_path, effect=(0.0, 0.01, 0.20), noise=0.05)
    rep = build_report(tmp_path)
    t = next(t for t in rep.tables if "PPO eval" in t.title)
    assert t.primary == "rougeL"
    prim = t.primary_comparison
    assert prim.metric.name == "ppo/rougeL" and prim.verdict == "separated"
    assert prim.test.p_adjusted == prim.test.p_value
    expl = [c for c in t.comparisons if not c.primary and c.test is not None]
    n_tests = sum(c.test is not None for tt in rep.tables for c in tt.comparisons)
    for c in expl:
        assert c.test.p_adjusted >= c.test.p_value
        assert (c.verdict == "separated") == (c.test.p_adjusted < 0.05)
    md = render_markdown(rep)
    assert f"asks 1 question" in md and f"Holm over all {n_tests} tests" in md
    assert "minimum detectable difference of ROUGE-L" in md and "(primary)" in md and "(exploratory)" in md


def test_family_statement_counts_questions_and_report_family_is_stricter(tmp_path):
    from analysis.report import family_statement
    from analysis.settings import AnalysisSettings
    from analysis.tables import build_tables

    run = tmp_path / "run"
    _lora_like(run)
    rep = build_report(run)
    text = family_statement(rep)
    assert "asks 3 questions" in text and "at most 15%" in text and "14% if the questions were independent" in text
    tables = build_tables(rep.run, [], AnalysisSettings(family="report"))
    prim = [c for t in tables for c in t.comparisons if c.primary and c.test]
    assert len(prim) == 3 and all(c.test.p_adjusted >= c.test.p_value for c in prim)


def _lora_like(run, seeds=(0, 1, 2)):
    """RM, SFT and PPO tables (a tied lora_rank axis); the RM accuracy of a rank moves by exactly the same amount
    on every seed (a small held-out set), which used to give p = 0."""
    from rlhf_ablate.metrics import rm_metrics
    from tests.test_analysis import _rm_recs, _stage_timings

    rng = np.random.default_rng(5)
    i = 0
    for rank in (0, 8, 16):
        for seed in seeds:
            recs = _rm_recs(rng, 1.0)
            m = rm_metrics(recs)
            m["rm/pairwise_accuracy"] = 0.80 + 0.01 * seed + (0.011 if rank == 16 else 0.0)
            for st in ("sft", "ppo"):
                m.update({f"{st}/rougeL": 0.25 + rng.normal(0, 0.02), f"{st}/rouge1": 0.3 + rng.normal(0, 0.02)})
            m["ppo/kl_to_ref"] = 0.5 + rng.normal(0, 0.05)
            write_result(run, f"r{i}", axes={"lora_rank": rank}, seed=seed, metrics=m, records={"rm": recs},
                         index=i, timings=_stage_timings(seed, rank))
            i += 1


def test_identical_rm_accuracy_differences_are_not_bold(tmp_path):
    _lora_like(tmp_path, seeds=(0, 1))
    rep = build_report(tmp_path)
    rm_t = rep.tables[0]
    acc = next(c for c in rm_t.comparisons if c.metric.name == "rm/pairwise_accuracy")
    assert acc.test is not None and acc.test.p_value > 0 and acc.verdict == "tie"
    assert all(c.mark != BEST for k, c in rm_t.cells.items() if k[1] == "pairwise_accuracy")


def test_unbalanced_seeds_cells_show_both_counts_and_rankings_must_agree(tmp_path):
    make_kl_sweep(tmp_path, effect=(0.0, 0.01, 0.20), noise=0.05, seeds=(0, 1, 2))
    # the best value loses seed 2: its cell averages 2 seeds, the test uses the 2 complete seeds
    p = tmp_path / "trials" / "t2s2" / "result.json"
    d = json.loads(p.read_text())
    d.update(status="failed", error={"type": "RuntimeError", "message": "boom", "stage": "ppo"}, metrics={})
    p.write_text(json.dumps(d))
    rep = build_report(tmp_path)
    t = next(t for t in rep.tables if "PPO eval" in t.title)
    prim = t.primary_comparison
    assert prim.test.n_seeds == 2
    assert any("unbalanced" in n for n in prim.notes)
    cells = {r: t.cells[(r, "rougeL")] for r in t.row_keys if r[0] == "PPO"}
    assert cells[("PPO", 0.01)].test_n == 2 and cells[("PPO", 1.0)].test_n is None
    from analysis.render import to_markdown
    assert "test n=2" in to_markdown(t)


def test_one_seed_is_not_tested(tmp_path):
    make_kl_sweep(tmp_path, seeds=(0,), effect=(0.0, 0.0, 1.0))
    rep = build_report(tmp_path)
    t = next(t for t in rep.tables if "PPO eval" in t.title)
    assert all(c.test is None for c in t.comparisons)
    assert all(c.mark in ("", NOT_TESTED) for c in t.cells.values())
    assert "tests no question" in render_markdown(rep)


def _method_sweep(run, methods=("ppo", "dpo", "grpo", "rloo"), seeds=(0, 1, 2), judge="own", lift=None):
    rng = np.random.default_rng(9)
    lift = lift or {}
    i = 0
    for seed in seeds:
        for m in methods:
            metrics = {"base/rougeL": 0.05, "sft/rougeL": 0.15 + 0.001 * seed,
                       f"{m}/rougeL": 0.25 + lift.get(m, 0.0) + rng.normal(0, 0.01),
                       f"{m}/winrate_vs_sft": 0.6 + rng.normal(0, 0.05)}
            timings = {"sft": {"key": f"sft{seed}", "seconds": 10.0}, "rm": {"key": f"rm{seed}", "seconds": 5.0},
                       m: {"key": f"{m}{seed}", "seconds": 20.0}, "eval_base": {"key": "b"}}
            write_result(run, f"{m}{seed}", axes={"method": m}, seed=seed, metrics=metrics, index=i,
                         timings=timings, config={"method": m})
            p = run / "trials" / f"{m}{seed}" / "result.json"
            d = json.loads(p.read_text())
            d["metric_meta"] = {"compare": {"judge": "rm", "judge_rm": judge}}
            p.write_text(json.dumps(d))
            i += 1


def test_method_axis_gets_one_aligned_table_comparing_the_methods(tmp_path):
    _method_sweep(tmp_path, lift={"dpo": 0.1})
    rep = build_report(tmp_path)
    aligned = [t for t in rep.tables if "aligned policy" in t.title]
    assert len(aligned) == 1 and not any(t.title.startswith(("PPO eval", "DPO eval")) for t in rep.tables)
    t = aligned[0]
    tested = [r for r in t.row_keys if r not in t.reference_rows]
    assert sorted(r[0] for r in tested) == ["DPO", "GRPO", "PPO", "RLOO"]
    assert {r[0] for r in t.reference_rows} == {"base model", "SFT"}
    prim = t.primary_comparison
    assert prim.test.n_configs == 4 and prim.verdict == "separated" and prim.best == "method=dpo"
    assert t.cells[(("DPO", "dpo"), "rougeL")].mark == BEST
    # one RM per seed shared by every method: the own-RM win rates are comparable, and the judge is printed
    win = next(c for c in t.comparisons if c.metric.suffix == "winrate_vs_sft")
    assert win.test is not None and "own reward model" in t.judge


def test_own_rm_win_rates_are_not_compared_across_reward_models(tmp_path):
    from tests.test_analysis import _stage_timings

    rng = np.random.default_rng(2)
    i = 0
    for rank in (8, 16):
        for seed in (0, 1, 2):
            m = {"ppo/rougeL": 0.3 + rng.normal(0, 0.01), "ppo/winrate_vs_sft": 0.5 + 0.2 * (rank == 16)}
            write_result(tmp_path, f"r{i}", axes={"lora_rank": rank}, seed=seed, metrics=m, index=i,
                         timings=_stage_timings(seed, rank))
            p = tmp_path / "trials" / f"r{i}" / "result.json"
            d = json.loads(p.read_text())
            d["metric_meta"] = {"compare": {"judge": "rm", "judge_rm": "own"}}
            p.write_text(json.dumps(d))
            i += 1
    rep = build_report(tmp_path)
    t = next(t for t in rep.tables if "PPO eval" in t.title)
    win = next(c for c in t.comparisons if c.metric.suffix == "winrate_vs_sft")
    assert win.verdict == "not tested: different RMs" and win.test is None
    assert "own reward model" in t.judge


# ---------------------------------------------------------------------------------------------------------
# Sweep file and CLI
# ---------------------------------------------------------------------------------------------------------
def test_sweep_analysis_block_sets_primary_and_family(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\naxes:\n  ppo.kl_coef: [0.01, 0.1]\nseeds: [0, 1]\n"
                     "analysis:\n  primary: {aligned: kl_to_ref}\n  family: report\n")
    from rlhf_ablate.config.sweep import load_sweep
    from rlhf_ablate.errors import ConfigError

    assert load_sweep(sweep).analysis.family == "report"
    run = tmp_path / "run"
    make_kl_sweep(run, coefs=(0.01, 0.1))
    (run / "sweep.json").write_text(json.dumps({"name": "s", "path": str(sweep)}))
    rep = build_report(run)
    t = next(t for t in rep.tables if "PPO eval" in t.title)
    assert t.primary == "kl_to_ref" and rep.settings.family == "report"
    assert "analysis.family: report" in render_markdown(rep)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\naxes:\n  ppo.kl_coef: [0.01, 0.1]\nanalysis:\n  primary: {aligned: rouge_l}\n")
    with pytest.raises(ConfigError, match="rougeL"):
        load_sweep(bad)


def test_plan_prints_seeds_and_cost(tmp_path, capsys):
    _method_sweep(tmp_path, seeds=(0, 1), lift={"dpo": 0.02})
    assert cli_main(["plan", str(tmp_path), "--effect", "0.03"]) == 0
    out = capsys.readouterr().out
    assert "seeds needed" in out and "ROUGE-L" in out and "difference 0.030" in out
    # a seed costs the SFT and RM once (10 + 5 s) and each method's 20 s: 95 s
    assert "A seed costs 95 s" in out
    assert cli_main(["plan", str(tmp_path)]) == 0
    assert "observed best-vs-runner-up gap" in capsys.readouterr().out
