"""``python -m rlhf_ablate doctor SWEEP`` (rlhf_ablate/run/doctor.py) on the CPU with the built-in model: versions,
one micro-batch of every phase, decode tokens/s and a forecast, within 2 minutes; its cached forecast appears in
``sweep --dry-run``'s table; a broken requirement exits 1 naming it."""

from __future__ import annotations

import re
import time

import pytest


def _doctor(capsys, *argv: str) -> tuple[int, str, float]:
    import torch

    from rlhf_ablate import cli

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        rc = cli.main(["doctor", *argv])
    finally:
        torch.set_num_threads(threads)
    return rc, capsys.readouterr().out, time.perf_counter() - t0


def test_doctor_measures_every_phase_forecasts_and_feeds_the_dry_run(builtin_cache, capsys):
    from rlhf_ablate import cli
    from rlhf_ablate.models import ensure_builtin

    ensure_builtin("tiny-llama")  # built once per session (conftest.py); the doctor's own time starts after it
    capsys.readouterr()
    rc, out, seconds = _doctor(capsys, "smoke")
    assert rc == 0, out
    assert seconds < 120, f"doctor took {seconds:.0f} s"
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes"):
        assert re.search(rf"\b{pkg} \d+\.\d+", out), pkg
    assert re.search(r"bf16: yes", out) and re.search(r"4-bit: yes", out)
    for phase in ("sft", "rm", "generation", "scoring", "update", "eval"):
        m = re.search(rf"^{phase}\s+.*?\s(\d+\.\d+)\s+not measured \(CPU\)\s+(\d+\.\d+)$", out, re.M)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, (phase, out)
    assert float(re.search(r"= (\d+\.\d+) tokens/s", out).group(1)) > 0
    per_trial = re.search(r"^  #0 t\w+ \(ppo\.kl_coef=0\.1, seed=0\): ([\d.e-]+) h", out, re.M)
    total = re.search(r"^total: ([\d.e-]+) device-hours", out, re.M)
    assert per_trial and total and float(per_trial.group(1)) > 0 and float(total.group(1)) > 0
    cached = list((builtin_cache / "doctor").glob("*.json"))
    assert len(cached) == 1
    assert cli.main(["sweep", "smoke", "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "doctor device-h" in table
    row = next(ln for ln in table.splitlines() if ln.startswith("0 "))
    assert float(row.split()[-1]) == pytest.approx(float(per_trial.group(1)), rel=0.01)  # measured: no "*"


def test_dry_run_has_no_forecast_column_without_a_doctor_measurement(tmp_path, monkeypatch, capsys):
    from rlhf_ablate import cli

    monkeypatch.setenv("RLHF_ABLATE_CACHE", str(tmp_path))
    assert cli.main(["sweep", "smoke", "--dry-run"]) == 0
    assert "doctor device-h" not in capsys.readouterr().out


def test_doctor_exits_1_naming_a_broken_requirement(builtin_cache, capsys, monkeypatch):
    from rlhf_ablate.run import doctor

    def no_kernels() -> str:
        raise RuntimeError("bitsandbytes: no kernel for this device")

    monkeypatch.setattr(doctor, "_nf4", no_kernels)
    rc, out, _ = _doctor(capsys, "smoke", "model.quantization=nf4")
    assert rc == 1
    assert re.search(r"PROBLEM: 4-bit is requested \(model\.quantization\).*no kernel for this device", out)
    assert "largest trial" not in out  # stopped before measuring anything


def test_doctor_measures_and_forecasts_the_overoptimization_work(builtin_cache, capsys):
    """The overoptimization sweep, made small: the largest trial (an ensemble reward with a gold RM) builds its gold
    RM and ensemble members, PPO holds them, the gold probe is measured phase by phase, and the forecast has the
    rm_gold / rm_ensemble stages and the probe's time inside PPO's."""
    from rlhf_ablate.files import read_json
    from rlhf_ablate.models import ensure_builtin

    ensure_builtin("tiny-llama")
    capsys.readouterr()
    # ppo.max_new_tokens=64 makes PPO the largest stage, where the ensemble's members and the gold RM weigh
    small = ("ppo.max_new_tokens=64", "ppo.gold_probe_size=4", "ppo.gold_every=2", "ppo.total_episodes=64")
    rc, out, seconds = _doctor(capsys, "overoptimization", *small)
    assert rc == 0, out
    assert re.search(r"^largest trial: #1 .*ppo\.reward=ensemble_mean", out, re.M), out
    for phase in ("rm_gold", "rm_ensemble", "probe_generation", "probe_proxy", "probe_gold", "scoring", "eval"):
        m = re.search(rf"^{phase}\s+.*?\s(\d+\.\d+)\s+not measured \(CPU\)\s+(\d+\.\d+)$", out, re.M)
        assert m and float(m.group(1)) > 0 and float(m.group(2)) > 0, (phase, out)
    line = re.search(r"^  #1 t\w+ \(ppo\.reward=ensemble_mean, seed=0\): [\d.e-]+ h  \((.*)\)$", out, re.M)
    assert line, out
    mins = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) min", line.group(1))}
    assert mins["rm_gold"] > 0 and mins["rm_ensemble"] > 0 and mins["ppo"] > 0, line.group(1)
    probe = float(re.search(r"\(gold probe ([\d.]+)\)", line.group(1)).group(1))
    assert 0 < probe < mins["ppo"]
    single = re.search(r"^  #0 t\w+ \(ppo\.reward=single, seed=0\): [\d.e-]+ h \*  \((.*)\)$", out, re.M)
    assert single and "rm_ensemble" not in single.group(1) and "rm_gold" in single.group(1), out
    # 64 episodes / 16 = 4 PPO steps, the probe every 2: at steps 0, 2 and 4
    recs = [read_json(p) for p in (builtin_cache / "doctor").glob("*.json")]
    rec = next(r for r in recs if r["basis"] == "measured" and r["sweep"] == "overoptimization")
    ph = rec["phases"]
    assert ph["rm_ensemble"]["models"] == 2 and ph["probe_gold"]["gold_models"] == 1
    expected = 3 * sum(ph[k]["seconds"] for k in ("probe_generation", "probe_proxy", "probe_gold"))
    assert rec["gold_probe_seconds"] == pytest.approx(expected, rel=1e-6)
    assert seconds < 120, f"doctor took {seconds:.0f} s"
