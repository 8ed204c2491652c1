"""The over-optimization alarm without a model: the onset rule (rlhf_ablate/ppo/overopt.py) on synthetic curves
with a known turn, flat curves and rising gold; the ensemble rewards on hand-written tensors; the probe and gold
folds of the data; the config rules. docs/metrics.md, "Over-optimization", states the rule and its false-alarm rate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_ablate.ppo.overopt import (DEFAULT_K, DEFAULT_M, Evaluation, combine_rewards, false_alarm_rate,
                                     find_onset, probe_summary, synthetic_run)

TURN = 8          # the true turn: gold rises to step 8, then falls
N_EVALS = 20
RUNS = 300


def _turning(rng, slope: float = 0.5):
    gold = [min(s, TURN) * 0.3 - max(0, s - TURN) * slope for s in range(N_EVALS)]
    return synthetic_run(gold, [float(s) for s in range(N_EVALS)], 16, rng)


def test_hand_written_curve_fires_at_the_stated_step():
    # Four prompts; gold peaks at step 2 and falls by 1 on every prompt (paired SE 0), proxy keeps rising.
    g = {0: [0, 1, 2, 3], 1: [1, 2, 3, 4], 2: [2, 3, 4, 5], 3: [1, 2, 3, 4], 4: [0, 1, 2, 3]}
    evals = [Evaluation(s, float(s), tuple(map(float, g[s]))) for s in range(5)]
    o = find_onset(evals, k=2.5, m=2)
    assert (o["peak_step"], o["onset_step"], o["detected_step"]) == (2, 3, 4)
    assert o["drop"] == pytest.approx(2.0)
    # One over-optimized evaluation is not enough with m=2, and is with m=1.
    assert find_onset(evals[:4], m=2) is None
    assert find_onset(evals[:4], m=1)["onset_step"] == 3


def test_no_alarm_when_the_proxy_falls_with_gold():
    g = {0: [0, 1, 2, 3], 1: [2, 3, 4, 5], 2: [1, 2, 3, 4], 3: [0, 1, 2, 3]}
    evals = [Evaluation(s, -float(s), tuple(map(float, g[s]))) for s in range(4)]  # proxy falls too
    assert find_onset(evals, m=1) is None


def test_no_alarm_for_a_drop_within_the_noise():
    # Gold falls by 0.25 on average but the per-prompt differences scatter widely: not beyond 2.5 SE.
    a = (0.0, 2.0, -2.0, 1.0, -1.0, 0.5)
    b = (1.0, 0.0, -1.0, -1.5, 0.0, 0.5)
    evals = [Evaluation(0, 0.0, a), Evaluation(1, 1.0, b), Evaluation(2, 2.0, b)]
    assert find_onset(evals, m=1) is None


def test_synthetic_turn_is_found_within_the_stated_tolerance():
    """Gold rises 0.3 per evaluation to step 8, then falls 0.5 per evaluation (per-prompt noise sd 1, 16 prompts,
    prompt effects sd 1); proxy rises throughout. Tolerance: onset_step in [9, 12] (the first 4 evaluations after
    the turn) and peak_step in [6, 10] (the turn +- 2) in at least 95% of runs; the rule never fires before the
    turn's step in more than 2%."""
    rng = np.random.default_rng(0)
    found = [find_onset(_turning(rng)) for _ in range(RUNS)]
    assert all(o is not None for o in found)
    onset = np.array([o["onset_step"] for o in found])
    peak = np.array([o["peak_step"] for o in found])
    assert np.mean((onset >= TURN + 1) & (onset <= TURN + 4)) >= 0.95
    assert np.mean(np.abs(peak - TURN) <= 2) >= 0.95
    assert np.mean(onset <= TURN) <= 0.02


def test_flat_gold_false_alarm_rate():
    """Flat gold with a rising proxy (the worst case: the proxy condition always holds), 9 evaluations of 16 probe
    prompts (the bundled overoptimization sweep's shape): the rate docs/metrics.md states (2.8% in 2000 runs with
    seed 0), here within its Monte Carlo error at 600 runs."""
    rate = false_alarm_rate(n_runs=600, n_evals=9, n_prompts=16, k=DEFAULT_K, m=DEFAULT_M)
    assert rate <= 0.028 + 3 * math.sqrt(0.028 * 0.972 / 600)
    assert false_alarm_rate(n_runs=600, n_evals=9, n_prompts=16, proxy_slope=0.0) <= rate + 0.02
    # Without the consecutive-evaluation requirement the rate is far higher: m is what keeps it low.
    assert false_alarm_rate(n_runs=600, n_evals=9, n_prompts=16, m=1) > 0.15


def test_rising_gold_never_alarms():
    rng = np.random.default_rng(1)
    fired = sum(find_onset(synthetic_run([0.3 * s for s in range(N_EVALS)], [float(s) for s in range(N_EVALS)],
                                         16, rng)) is not None for _ in range(RUNS))
    assert fired / RUNS <= 0.01


def test_scale_free():
    """The rule compares a drop with its own SE: scaling gold by any positive factor changes no verdict or step."""
    rng = np.random.default_rng(2)
    steps = lambda o: None if o is None else (o["onset_step"], o["peak_step"], o["detected_step"])  # noqa: E731
    verdicts = []
    for _ in range(30):
        evals = _turning(rng, slope=0.2)
        scaled = [Evaluation(e.step, e.proxy, tuple(10.0 * g for g in e.gold)) for e in evals]
        assert steps(find_onset(evals)) == steps(find_onset(scaled))
        verdicts.append(find_onset(evals) is not None)
    assert any(verdicts)


def test_combine_rewards_by_hand():
    s = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 0.0], [2.0, 2.0, 0.0]])  # [K=3, B=3]
    assert combine_rewards(s, "single").tolist() == [1.0, -2.0, 0.0]
    assert combine_rewards(s, "ensemble_mean").tolist() == pytest.approx([2.0, 0.0, 0.0])
    assert combine_rewards(s, "ensemble_min").tolist() == [1.0, -2.0, 0.0]
    std0 = math.sqrt(2 / 3)  # population std of (1, 3, 2)
    std1 = math.sqrt(8 / 3)  # of (-2, 0, 2)
    assert combine_rewards(s, "ensemble_mean_minus_std").tolist() == pytest.approx([2.0 - std0, -std1, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        combine_rewards(s[:1], "ensemble_mean")


def test_probe_summary():
    out = probe_summary([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 1.0, 3.0])
    assert out["gold/score"] == pytest.approx(1.25)
    assert out["gold/score_se"] == pytest.approx(np.std([0, 1, 1, 3], ddof=1) / 2)
    assert out["gold/spearman"] == pytest.approx(0.9486832980505138)
    assert math.isnan(probe_summary([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])["gold/kendall"])


def test_probe_and_gold_folds_are_disjoint_and_stable():
    from rlhf_ablate.data.records import PromptExample
    from rlhf_ablate.data.splits import gold_fold, hold_out_probe

    rows = [PromptExample(f"id{i}", f"질문 {i}", None) for i in range(50)]
    kept, probe = hold_out_probe(rows, 16, 0)
    assert len(probe) == 16 and len(kept) == 34
    assert not {r.data_id for r in kept} & {r.data_id for r in probe}
    # The probe is a function of the ids: dropping other rows keeps the same probe prompts.
    _, probe2 = hold_out_probe([r for r in rows if r not in probe][:10] + probe, 16, 0)
    assert {r.data_id for r in probe2} == {r.data_id for r in probe}
    proxy, gold = gold_fold(rows, 0.5, 0)
    assert len(proxy) + len(gold) == 50 and 10 < len(gold) < 40
    assert not {r.data_id for r in proxy} & {r.data_id for r in gold}


@pytest.mark.parametrize("overrides, key", [
    ({"ppo.reward": "ensemble_min"}, "ppo.reward"),
    ({"ppo.reward": "ensemble_mean", "rm.ensemble_size": 1}, "ppo.reward"),
    ({"ppo.gold": "rm_gold"}, "ppo.gold"),
    ({"rm.gold": "disjoint"}, "rm.gold"),
    ({"ppo.gold": "ensemble", "rm.ensemble_size": 3, "ppo.reward": "ensemble_mean"}, "ppo.gold"),
    ({"ppo.stop_on_overoptimization": True}, "ppo.stop_on_overoptimization"),
    ({"rm.gold": "disjoint", "ppo.gold": "rm_gold", "rm.gold_fraction": 1.0}, "rm.gold_fraction"),
    ({"rm.ensemble_size": 0}, "rm.ensemble_size"),
])
def test_config_errors_name_the_keys(overrides, key):
    from rlhf_ablate.config import TrialConfig
    from rlhf_ablate.errors import ConfigError

    with pytest.raises(ConfigError, match=f"'{key}'"):
        TrialConfig().replace(**overrides)


def test_memory_estimate_counts_the_extra_reward_adapters():
    from rlhf_ablate.config import TrialConfig
    from rlhf_ablate.run.graph import estimate_stage_bytes

    one = estimate_stage_bytes(TrialConfig())["ppo"]
    three = estimate_stage_bytes(TrialConfig().replace(**{"rm.ensemble_size": 3, "ppo.reward": "ensemble_min"}))
    gold = estimate_stage_bytes(TrialConfig().replace(**{"rm.ensemble_size": 3, "ppo.reward": "ensemble_min",
                                                         "rm.gold": "disjoint", "ppo.gold": "rm_gold"}))
    assert "extra_rewards" not in one
    assert three["ppo"]["extra_rewards"] == 2 * one["reward"]  # two more adapters the size of the RM's
    assert gold["ppo"]["extra_rewards"] == 3 * one["reward"]
    assert three["ppo"]["peak"] == pytest.approx(one["peak"] + 2 * one["reward"])
    assert set(three) >= {"rm_ensemble"} and "rm_gold" in gold


def test_report_lists_and_marks_the_affected_trials(tmp_path):
    """report.md's section and summary line, report.html's alarm slot, and the PPO curves' onset line, from two
    trials' result.json: one whose alarm fired at step 6, one quiet."""
    from test_analysis import write_result

    from analysis.report import write_report

    for tid, reward, onset in (("tfired", "single", 6), ("tquiet", "ensemble_min", None)):
        gold = [0.0, 0.5, 1.0, 1.2, 0.6, 0.2, -0.2, -0.6, -1.0] if onset else [0.1 * s for s in range(9)]
        hist = [{"step": s, "objective/scores": 0.2 * s, "objective/kl": 0.5 * s, "gold/score": g,
                 "gold/proxy": 0.2 * s} for s, g in enumerate(gold)]
        detail = ({"onset_step": 6, "peak_step": 3, "detected_step": 7, "gold_peak": 1.2, "gold_at_detection": -0.6,
                   "proxy_peak": 0.6, "proxy_at_detection": 1.4, "drop": 1.8, "drop_se": 0.3, "k": 2.5, "m": 2}
                  if onset else None)
        p = write_result(tmp_path, tid, axes={"ppo.reward": reward}, seed=0, history={"ppo": hist},
                         metrics={"ppo/rougeL": 0.2, "ppo/kl_to_ref": 4.0, "ppo/reward_mean": 0.5})
        res = json.loads(p.read_text(encoding="utf-8"))
        res["overoptimization"] = {"gold": "rm_gold", "reward": reward, "probe_size": 16, "every": 1, "k": 2.5,
                                   "m": 2, "onset_step": onset, "peak_step": 3 if onset else None,
                                   "detected_step": 7 if onset else None, "detail": detail, "stopped": bool(onset),
                                   "kept_step": 3 if onset else 8, "evaluations": hist}
        p.write_text(json.dumps(res), encoding="utf-8")
    out = tmp_path / "report"
    write_report(tmp_path, out)
    md = (out / "report.md").read_text(encoding="utf-8")
    section = md[md.index("## Over-optimization alarm"):]
    assert "Over-optimization alarm: fired in 1 of 2 trials with a gold probe: `tfired` (step 6)." in md
    assert "tfired" in section.split("##")[1] and "tquiet" not in section.split("##")[1]
    assert "yes, policy of step 3" in section
    assert "Dashed lines: the over-optimization onset of 1 trial(s)" in md
    assert "Red rings: the 1 trial(s) whose over-optimization alarm fired" in md
    page = (out / "report.html").read_text(encoding="utf-8")
    fired = page[page.index('id="alarm-trial-tfired"'):]
    assert fired.split("</div>", 1)[0].count("fired at step 6") == 1
    quiet = page[page.index('id="alarm-trial-tquiet"'):]
    assert "Over-optimization alarm: quiet." in quiet.split("</section>", 1)[0]


def test_progress_line_shows_proxy_gold_and_the_alarm():
    """The live line of a probed step shows gold, proxy, their rank correlation, KL and length (and the alarm);
    an unprobed step between the every-10% lines stays silent."""
    from types import SimpleNamespace

    from rlhf_ablate.config.sweep import load_sweep
    from rlhf_ablate.config.sweep_files import BUNDLED_DIR
    from rlhf_ablate.launch.progress import LiveLines

    spec = load_sweep(BUNDLED_DIR / "overoptimization.yaml")
    lines = LiveLines(spec, Path("."), 8, lookup=lambda *_: None)
    trial = SimpleNamespace(trial_id="tabcdef1234", index=0, axes={"ppo.reward": "single"}, seed=0)
    ev = {"stage": "ppo", "step": 6, "steps": 100, "ppo/objective/scores": 0.5, "ppo/objective/kl": 3.0,
          "ppo/gold/score": -0.25, "ppo/gold/proxy": 0.75, "ppo/gold/spearman": 0.5, "ppo/gold/kl": 4.0,
          "ppo/gold/response_len": 12.0, "ppo/gold/overoptimized": 1.0}
    line = lines.line(trial, ev)
    assert "gold=-0.25" in line and "proxy=0.75" in line and "rho=0.5" in line and "OVER-OPTIMIZED" in line
    quiet = {k: v for k, v in ev.items() if "gold" not in k} | {"step": 7}
    assert lines.line(trial, quiet) is None
    # probed steps keep the 10% cadence (ppo.gold_every=1 probes every step); the alarm prints once, when it fires
    probed = ev | {"step": 8, "ppo/gold/overoptimized": 0.0}
    assert lines.line(trial, probed) is None and lines.line(trial, probed | {"step": 10}) is not None
    assert lines.line(trial, ev | {"step": 11}) is None  # still over-optimized, already said
    other = SimpleNamespace(trial_id="tother123456", index=1, axes={"ppo.reward": "single"}, seed=0)
    assert "OVER-OPTIMIZED" in lines.line(other, ev | {"step": 13})


def test_probe_prompt_count_is_checked_before_any_stage(tmp_path):
    """Too few PPO prompts for ppo.gold_probe_size fail the config (data.max_ppo_prompts), the trial at its data
    stage (before SFT trains), and the launchers' preflight, each naming the key and the count."""
    from types import SimpleNamespace

    from rlhf_ablate.cli import preflight
    from rlhf_ablate.config import TrialConfig
    from rlhf_ablate.data import load_data
    from rlhf_ablate.errors import ConfigError
    from rlhf_ablate.run.cache import StageCache
    from rlhf_ablate.run.trial import run_trial

    gold = {"rm.ensemble_size": 3, "ppo.gold": "ensemble"}
    with pytest.raises(ConfigError, match=r"'ppo.gold_probe_size' is 32, but data.max_ppo_prompts=40"):
        TrialConfig().replace(**gold, **{"data.max_ppo_prompts": 40})
    n = len(load_data(TrialConfig().data).ppo_prompts)
    cfg = TrialConfig().replace(**gold, **{"ppo.gold_probe_size": n // 2 + 1})
    res = run_trial(cfg, tmp_path / "runs", cache=StageCache(tmp_path / "stages"))
    assert res["status"] == "failed" and res["error"]["stage"] == "data" and list(res["timings"]) == ["total"], res
    assert f"ppo.gold_probe_size={n // 2 + 1}" in res["error"]["message"]
    assert f"the data has {n} PPO prompts" in res["error"]["message"]
    trial = SimpleNamespace(config=cfg, index=0, trial_id="t0")
    spec = SimpleNamespace()
    with pytest.raises(ConfigError, match=f"trial 0 \\(t0\\): ppo.gold_probe_size={n // 2 + 1} .* {n} PPO"):
        preflight(spec, [trial])
    ok = SimpleNamespace(config=TrialConfig().replace(**gold, **{"ppo.gold_probe_size": n // 2}), index=0,
                         trial_id="t1")
    assert f"{n} PPO prompts" in "\n".join(preflight(spec, [ok]))


def test_memory_probe_data_holds_the_gold_probe():
    """run/probe.py: fill_data makes enough PPO prompts for the bundled over-optimization sweep's probe, under the
    memory probe's overrides (what train_ppo checks: config/overopt.py, probe_prompts_problem)."""
    from rlhf_ablate import models
    from rlhf_ablate.config.overopt import probe_prompts_problem
    from rlhf_ablate.config.sweep import expand, load_sweep
    from rlhf_ablate.config.sweep_files import BUNDLED_DIR
    from rlhf_ablate.run.probe import fill_data, probe_overrides

    trial = expand(load_sweep(BUNDLED_DIR / "overoptimization.yaml"))[0]
    cfg = trial.config.replace(**probe_overrides(trial.config))
    data = fill_data(cfg, models.load_tokenizer(cfg.model))
    assert cfg.ppo.gold == "rm_gold" and cfg.ppo.gold_probe_size == 48
    assert len(data.ppo_prompts) >= 2 * 48 and not probe_prompts_problem(cfg, len(data.ppo_prompts))
