"""Null calibration and power of the bold marks (issues 10 and 18), measured through the report CLI.

Simulated sweeps (analysis/calibration.py: continuous columns, 0/1 outcomes on 20 prompts, tied per-seed
differences; one axis, a 2 x 2 grid of pivots, a failed trial, 4:1 variances between values) are written as
result.json files and run through ``python -m analysis report`` in-process; the marks are read back from its CSV
files. Asserted:
- no value differs: a table's primary question is bold in at most 5% of sweeps, plus the Monte Carlo error of
  this file's own simulation count, per metric type and over everything; never at one seed;
- a real difference on the primary (3 values x 3 seeds, 3 seed-SDs; 3 x 5, 2 seed-SDs): bold on the right value
  in at least 40% of sweeps, and never on a wrong one more often than the null allows.
The full-size measurement is in docs/metrics.md (``python -m analysis calibrate``); this file keeps the run
under a minute.
"""

from __future__ import annotations

import pytest

from analysis.calibration import POWER_TARGETS, SHAPES, TYPES, measure as _measure, mc_bound
from analysis.cli import cli_report_runner


def measure(*args, **kwargs):
    """Every simulated sweep goes through ``python -m analysis report`` (analysis.cli.main, in-process)."""
    return _measure(*args, runner=cli_report_runner, **kwargs)

NULL_SIMS = 30       # per (type, shape, seeds): 36 cells, 1080 sweeps, pooled per type and overall
POWER_SIMS = 100


@pytest.fixture(scope="module")
def null_rates(tmp_path_factory):
    out = {}
    for kind in TYPES:
        for shape in SHAPES:
            for seeds in (2, 3, 5):
                out[(kind, shape, seeds)] = measure(kind, shape, seeds, NULL_SIMS, seed=7,
                                                    tmp=tmp_path_factory.mktemp("null"))
    return out


def test_one_seed_is_never_bold(tmp_path):
    for kind in TYPES:
        for shape in SHAPES:
            r = measure(kind, shape, 1, 3, seed=7, tmp=tmp_path / f"{kind}_{shape}")
            assert r.questions == 3 and r.false_primary == 0 and r.any_false == 0, (kind, shape)


def test_null_primary_questions_are_bold_at_most_five_percent(null_rates):
    for kind in TYPES:
        rs = [r for k, r in null_rates.items() if k[0] == kind]
        q = sum(r.questions for r in rs)
        bold = sum(r.false_primary for r in rs)
        assert q == len(SHAPES) * 3 * NULL_SIMS      # every simulated report asks its one question
        assert bold / q <= mc_bound(0.05, q), (kind, bold, q)
    q = sum(r.questions for r in null_rates.values())
    bold = sum(r.false_primary for r in null_rates.values())
    assert bold / q <= mc_bound(0.05, q), (bold, q)
    # exploratory columns are Holm-corrected over the whole report: any false bold per report stays near 5% too
    sims = sum(r.sims for r in null_rates.values())
    assert sum(r.any_false for r in null_rates.values()) / sims <= mc_bound(0.05, sims) + 0.02


@pytest.mark.parametrize("shape,seeds,effect,target", POWER_TARGETS)
def test_power_on_the_primary_metric(tmp_path, shape, seeds, effect, target):
    r = measure("continuous", shape, seeds, POWER_SIMS, seed=7, effect=effect, tmp=tmp_path)
    assert r.power >= target, (seeds, effect, r.power)
    assert r.false_primary / r.questions <= mc_bound(0.05, r.questions)


if __name__ == "__main__":
    from analysis.calibration import render_section

    print(render_section(200, 200, runner=cli_report_runner), end="")
