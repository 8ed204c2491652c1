"""Calibration and power of the bold marks, measured through the report CLI on simulated sweeps (issue 18).

Each simulated sweep is a run directory of result.json files (schema 1) that ``python -m analysis report``
(``analysis.cli.main``, in-process, ``--format csv --no-plots``) turns into tables; the marks are read back from
the CSV files, so the whole path result.json -> tables -> bold marks is what is measured. The CLI is passed in as
``runner`` (analysis/cli.py sits above this module); without one, ``write_report`` is called directly, the
function the CLI calls.

The model of one trial's per-prompt value, per metric column (the one tests/test_calibration.py used for issue 10):

    prompt difficulty (shared by every trial) + seed effect (shared by the configurations of one seed)
    + the trial's own training shift (new for every configuration and seed) + per-prompt noise

- ``continuous``: as written, with scales like the real columns (ROUGE, BLEU, chrF, RM reward, KL);
- ``discrete``: every per-prompt value is a 0/1 outcome on 20 prompts, Bernoulli(sigmoid(the same sum on the
  logit scale)): a metric such as an accuracy or a win rate on a small held-out set;
- ``tied``: 0/1 outcomes where each seed draws one outcome vector shared by its configurations (one SFT and RM
  per seed) and each configuration flips about one prompt in twenty: per-seed differences are often identical.

Shapes: ``one_axis`` (3 values of ppo.kl_coef), ``two_axes`` (2 x 2 grid, one pivot table per metric),
``failed`` (one axis, one trial of the sweep failed), ``unequal`` (one axis, one value has 4x the variance of
the others: its training shift SD is doubled).

A *question* is a table's primary metric (ROUGE-L here); a false bold is a bold on a question when no value
differs. Power: the true best value is bold.

    python -m analysis calibrate --sims 500 --power-sims 500 > analysis/calibration_measured.md   # minutes
    python -m rlhf_ablate.metrics.docs > docs/metrics.md          # includes it
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

N_PROMPTS = 20
COEFS = (0.01, 0.1, 1.0)
GRID = ((0.01, 0.1), (1e-5, 3e-5))   # ppo.kl_coef x ppo.lr
PRIMARY = "rougeL"
# name -> (mean, prompt sd, seed sd, training-shift sd, per-prompt sd); scales like the real columns
COLUMNS = {
    "rouge1": (0.30, 0.10, 0.01, 0.03, 0.05), "rouge2": (0.10, 0.05, 0.005, 0.015, 0.03),
    "rougeL": (0.25, 0.10, 0.01, 0.03, 0.05), "bleu": (8.0, 3.0, 0.3, 1.0, 2.0),
    "chrf": (25.0, 5.0, 0.5, 1.5, 3.0), "reward": (1.0, 0.5, 0.05, 0.15, 0.3),
    "kl_to_ref": (1.0, 0.2, 0.05, 0.12, 0.2),
}
# discrete/tied: logit-scale (mean, prompt sd, seed sd, training-shift sd); per-prompt noise is the Bernoulli draw
LOGIT = (0.0, 1.0, 0.1, 0.3)
FLIP = 0.05          # tied: chance that a configuration flips one prompt's outcome of its seed
METRIC = {"reward": "reward_mean"}
TYPES = ("continuous", "discrete", "tied")
SHAPES = ("one_axis", "two_axes", "failed", "unequal")


def seed_sd(kind: str) -> float:
    """SD over seeds of one configuration's primary value: the unit of the effects in the power targets."""
    if kind == "continuous":
        _, _, s, t, e = COLUMNS[PRIMARY]
        return math.sqrt(s * s + t * t + e * e / N_PROMPTS)
    # 0/1 outcomes at logit 0: Var of the mean of 20 Bernoulli(1/2) plus the logit-scale shifts (slope 1/4)
    _, _, s, t = LOGIT
    return math.sqrt(0.25 / N_PROMPTS + (0.25 ** 2) * (s * s + t * t))


def _configs(shape: str) -> list[dict]:
    if shape == "two_axes":
        return [{"ppo.kl_coef": a, "ppo.lr": b} for a in GRID[0] for b in GRID[1]]
    return [{"ppo.kl_coef": c} for c in COEFS]


def simulate_run(run_dir: Path, rng: np.random.Generator, kind: str, shape: str, n_seeds: int,
                 effect: float = 0.0, best: int = 0) -> None:
    """Write one simulated sweep's result.json files. ``effect`` (in seed-SD units) is added to configuration
    ``best``'s primary metric (ROUGE-L), on the value scale (continuous) or the logit scale (discrete, tied)."""
    configs = _configs(shape)
    names = list(COLUMNS)
    k = len(names)
    failed = (int(rng.integers(len(configs))), int(rng.integers(n_seeds))) if shape == "failed" else None
    sd_unit = seed_sd(kind)
    jp = names.index(PRIMARY)
    if kind == "continuous":
        mean, sd_p, sd_s, sd_t, sd_e = (np.array([COLUMNS[n][i] for n in names]) for i in range(5))
        prompts = rng.normal(0, 1, (N_PROMPTS, k)) * sd_p
    else:
        mean, sd_p, sd_s, sd_t = (np.full(k, v) for v in LOGIT)
        prompts = rng.normal(0, 1, (N_PROMPTS, k)) * sd_p
    d = run_dir / "trials"
    d.mkdir(parents=True, exist_ok=True)
    index = 0
    for seed in range(n_seeds):
        seed_effect = rng.normal(0, 1, k) * sd_s
        if kind == "tied":
            shared = rng.random((N_PROMPTS, k)) < _sigmoid(mean + prompts + seed_effect)
        for ci, axes in enumerate(configs):
            tid = f"c{ci}s{seed}"
            index += 1
            base = {"schema": 1, "trial_id": tid, "sweep": "calibration", "index": index, "seed": seed,
                    "config": {"seed": seed, "method": "ppo", **axes}, "axes": axes,
                    "timings": {"rm": {"key": f"rm{seed}"}, "sft": {"key": f"sft{seed}"}, "ppo": {"key": tid}}}
            if failed == (ci, seed):
                res = {**base, "status": "failed", "error": {"type": "RuntimeError", "message": "simulated",
                                                             "stage": "ppo"}, "metrics": {}}
                _write(d / tid, res)
                continue
            scale = 2.0 if (shape == "unequal" and ci == 0) else 1.0
            shift = rng.normal(0, 1, k) * sd_t * scale
            lift = np.zeros(k)
            if ci == best and effect:
                # continuous: effect x SD on the value scale; 0/1: on the logit scale, slope 1/4 at logit 0
                lift[jp] = effect * sd_unit if kind == "continuous" else effect * sd_unit / 0.25
            if kind == "continuous":
                values = mean + prompts + seed_effect + shift + lift + rng.normal(0, 1, (N_PROMPTS, k)) * sd_e
            elif kind == "discrete":
                values = (rng.random((N_PROMPTS, k)) < _sigmoid(mean + prompts + seed_effect + shift + lift))
                values = values.astype(float)
            else:
                flip = rng.random((N_PROMPTS, k)) < FLIP * scale
                up = rng.random((N_PROMPTS, k)) < _sigmoid(lift)[None, :] - 0.5   # the effect: extra successes
                values = np.where(flip, ~shared, shared) | (up & (lift > 0)[None, :])
                values = values.astype(float)
            records = [{"data_id": f"e{p}", **{n: float(values[p, j]) for j, n in enumerate(names)},
                        "response_len": 20} for p in range(N_PROMPTS)]
            metrics = {f"ppo/{METRIC.get(n, n)}": float(values[:, j].mean()) for j, n in enumerate(names)}
            metrics["ppo/response_len"] = 20.0
            _write(d / tid, {**base, "status": "ok", "error": None, "metrics": metrics,
                             "records": {"ppo": records}})


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def _write(d: Path, res: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(json.dumps(res), encoding="utf-8")


@dataclass
class Outcome:
    """What one report said: per question (primary metric table), whether it was bold and where."""
    primary_bold: list          # per primary question: the bold configuration's label, or None
    exploratory_bold: int       # bold cells in exploratory columns
    questions: int


def _write_report(run_dir: Path, out_dir: Path) -> None:
    from .report import write_report

    write_report(run_dir, out=out_dir, formats=("csv",), plots=False)


def report_marks(run_dir: Path, out_dir: Path, runner=None) -> Outcome:
    """The report of ``run_dir`` written to ``out_dir`` as CSV by ``runner(run_dir, out_dir)`` (the CLI, or
    write_report); the marks are read back from the CSV files."""
    (runner or _write_report)(run_dir, out_dir)
    prim: list = []
    expl = 0
    questions = 0
    for f in sorted(out_dir.glob("*.csv")):
        rows = list(csv.DictReader(f.open(encoding="utf-8")))
        tested = [r for r in rows if r["reference"] == "false" and r["higher_is_better"] in ("true", "false")]
        if any(r["primary"] == "true" for r in tested):
            questions += 1
            bold = [r for r in tested if r["primary"] == "true" and r["mark"] == "best"]
            prim.append(_label(bold[0]) if bold else None)
        expl += sum(1 for r in tested if r["primary"] != "true" and r["mark"] == "best")
    return Outcome(prim, expl, questions)


def _label(row: dict) -> str:
    return f"{row.get('ppo.kl_coef', '')}|{row.get('ppo.lr', '')}"


def best_label(shape: str, best: int = 0) -> str:
    c = _configs(shape)[best]
    from .groups import fmt_value

    return f"{fmt_value(c['ppo.kl_coef'])}|{fmt_value(c['ppo.lr']) if 'ppo.lr' in c else ''}"


@dataclass
class Rates:
    kind: str
    shape: str
    n_seeds: int
    sims: int
    questions: int          # primary questions asked over all sims
    false_primary: int      # bold on a primary question (null) / bold on the wrong value (power runs)
    any_false: int          # sims with any false bold, primary or exploratory (null only)
    hits: int = 0           # power: bold on the right value

    @property
    def rate(self) -> float:
        return self.false_primary / max(self.questions, 1)

    @property
    def power(self) -> float:
        return self.hits / max(self.questions, 1)

    @property
    def report_rate(self) -> float:
        return self.any_false / max(self.sims, 1)


def measure(kind: str, shape: str, n_seeds: int, sims: int, seed: int = 0, effect: float = 0.0,
            tmp: Optional[Path] = None, runner=None) -> Rates:
    """Simulate ``sims`` sweeps and count bolds through the report CLI."""
    rng = np.random.default_rng([seed, TYPES.index(kind), SHAPES.index(shape), n_seeds, int(effect * 100)])
    own = tmp is None
    root = Path(tempfile.mkdtemp(prefix="calib-")) if own else Path(tmp)
    r = Rates(kind, shape, n_seeds, sims, 0, 0, 0)
    right = best_label(shape)
    try:
        for i in range(sims):
            run = root / f"run{i}"
            simulate_run(run, rng, kind, shape, n_seeds, effect=effect)
            o = report_marks(run, root / f"out{i}", runner)
            r.questions += o.questions
            if effect:
                r.hits += sum(b == right for b in o.primary_bold)
                r.false_primary += sum(b is not None and b != right for b in o.primary_bold)
            else:
                r.false_primary += sum(b is not None for b in o.primary_bold)
                r.any_false += bool(o.exploratory_bold or any(b is not None for b in o.primary_bold))
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(root / f"out{i}", ignore_errors=True)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    return r


def mc_bound(rate: float, n: int, z: float = 2.0) -> float:
    """rate plus z Monte Carlo standard errors of a proportion over n draws."""
    return rate + z * math.sqrt(rate * (1 - rate) / max(n, 1))


POWER_TARGETS = (("one_axis", 3, 3.0, 0.40), ("one_axis", 5, 2.0, 0.40))   # shape, seeds, effect (seed SDs), target


def render_section(sims: int, power_sims: int, seed: int = 0, runner=None) -> str:
    """The docs/metrics.md section: measured false-bold rates per question and power, with the command."""
    L = ["## Calibration and power of the bold marks (measured)", "",
         f"Measured by `python -m analysis calibrate --sims {sims} --power-sims {power_sims}` through "
         "`python -m analysis report` on simulated sweeps (analysis/calibration.py describes the model); "
         "`tests/test_calibration.py` repeats a smaller set and asserts the same bounds. A question is a table's "
         "primary metric; \"per question\" is the fraction of questions with a bold when no value differs, "
         "\"report\" the fraction of reports with any bold at all (primary or exploratory). Target: per question "
         "≤ 5% (plus Monte Carlo error), 0 at one seed.", "",
         "| metric type | table shape | seeds | sweeps | questions | false bold per question | any false bold "
         "per report |", "|---|---|---|---|---|---|---|"]
    for kind in TYPES:
        for shape in SHAPES:
            for s in (1, 2, 3, 5):
                r = measure(kind, shape, s, sims if s > 1 else max(20, sims // 10), seed, runner=runner)
                L.append(f"| {kind} | {shape} | {s} | {r.sims} | {r.questions} | {r.rate:.3f} | "
                         f"{r.report_rate:.3f} |")
    L += ["", "Power: the primary metric of one configuration is better by the effect (in units of the SD over "
              "seeds of one configuration's value); the others are equal. Bold on the right value:", "",
          "| metric type | values x seeds | effect | sweeps | bold on the right value | bold on a wrong value | "
          "target |", "|---|---|---|---|---|---|---|"]
    for kind in ("continuous", "discrete"):
        for shape, s, eff, target in POWER_TARGETS:
            r = measure(kind, shape, s, power_sims, seed, effect=eff, runner=runner)
            L.append(f"| {kind} | 3 x {s} | {eff:g} SD | {r.sims} | {r.power:.3f} | {r.rate:.3f} | "
                     f"≥ {target:.2f} |")
    return "\n".join(L) + "\n"
