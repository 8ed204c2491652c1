"""The `slurm` command without a Slurm cluster: generated scripts (array range, throttle, resources, options
precedence, logs), submission through a fake ``sbatch`` that records its arguments, and the errors.

The real cluster run is tests/test_slurm_cluster.py."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_ablate.cli import build_parser, main as cli_main
from rlhf_ablate.config.sweep import expand, load_sweep
from rlhf_ablate.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write_sweep(tmp_path: Path, body: str = "", name: str = "tiny") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: {name}
        version: 1
        axes:
          ppo.kl_coef: [0.01, 0.1, 1.0]
        seeds: [0, 1]
        """) + textwrap.dedent(body), encoding="utf-8")
    return p


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def exec_argv(script: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if line.startswith("exec ")]
    return shlex.split(line[len("exec "):])


def run_slurm(tmp_path: Path, sweep: Path, *extra: str, overrides: tuple[str, ...] = ()) -> tuple[int, Path]:
    out = tmp_path / "run"
    rc = cli_main(["slurm", str(sweep), *overrides, "--out", str(out), *extra])
    return rc, out


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` on PATH that appends its argv (one JSON list per line) to calls.jsonl and prints the next job
    id, like ``sbatch --parsable`` does (optionally as ``id;cluster``)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.jsonl"
    script = bindir / "sbatch"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        path = {str(calls)!r}
        n = sum(1 for _ in open(path)) if os.path.exists(path) else 0
        with open(path, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        if os.environ.get("FAKE_SBATCH_FAIL_AT") == str(n):
            print("sbatch: error: Batch job submission failed: Invalid partition name specified", file=sys.stderr)
            sys.exit(1)
        print(str(4100 + n) + os.environ.get("FAKE_SBATCH_SUFFIX", ""))
        """))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return calls


# ---------------------------------------------------------------------------------------------------------
# Script contents
# ---------------------------------------------------------------------------------------------------------

def test_array_range_throttle_and_task_command(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "slurm: {max_concurrent: 3}\n")
    rc, out = run_slurm(tmp_path, sweep, overrides=("sft.learning_rate=0.001", "model.base_model=tiny-gpt2"))
    assert rc == 0, capsys.readouterr().err
    arr = (out / "slurm" / "array.sbatch").read_text()
    opts = sbatch_lines(arr)
    assert "--array=0-5%3" in opts  # 3 kl values x 2 seeds, throttle from the sweep
    assert f"--output={out.resolve()}/slurm/logs/%A_%a.out" in opts
    assert "--requeue" in opts and "--open-mode=append" in opts
    assert (out / "slurm" / "logs").is_dir()  # sbatch does not create the --output directory itself

    argv = exec_argv(arr)
    assert argv[0] == sys.executable
    assert argv[1:4] == ["-m", "rlhf_ablate", "trial"]
    assert argv[4] == str(sweep.resolve())
    # The generated task command must be a valid `trial` invocation that sees the same overrides and run dir.
    task = build_parser().parse_args(
        [a.replace("$SLURM_ARRAY_TASK_ID", "5") for a in argv[3:]])
    assert task.overrides == ["sft.learning_rate=0.001", "model.base_model=tiny-gpt2"]
    assert task.index == 5 and task.out == out.resolve()

    # The CLI throttle wins over the sweep's.
    rc, out = run_slurm(tmp_path, sweep, "--max-concurrent", "2")
    assert rc == 0
    assert "--array=0-5%2" in sbatch_lines((out / "slurm" / "array.sbatch").read_text())

    printed = capsys.readouterr().out
    assert f"sbatch --parsable {out.resolve()}/slurm/array.sbatch" in printed
    assert f"--dependency=afterany:$ARRAY_JOB_ID {out.resolve()}/slurm/report.sbatch" in printed


def test_trial_groups_make_one_array_task_per_group(tmp_path, capsys):
    """resources.group_size: each task runs one trial group (rlhf_ablate/run/groups.py: the three kl_coef values of a
    seed), with K as resolved where the array was written; `trial --group` names the groups it has when out of range."""
    sweep = write_sweep(tmp_path, "resources: {group_size: auto}\n")
    rc, out = run_slurm(tmp_path, sweep)
    assert rc == 0
    captured = capsys.readouterr()
    arr = (out / "slurm" / "array.sbatch").read_text()
    assert "--array=0-1%4" in sbatch_lines(arr) and "6 trials in 2 trial groups" in arr
    assert "6 trials in 2 trial groups -> array 0-1" in captured.out and "time limit" in captured.err
    task = build_parser().parse_args([a.replace("$SLURM_ARRAY_TASK_ID", "1") for a in exec_argv(arr)[3:]])
    assert (task.group, task.group_size, task.index) == (1, 3, None)
    from rlhf_ablate.launch.slurm import task_trials

    spec = load_sweep(sweep)
    trials = expand(spec)
    resolved, members = task_trials(spec, trials, group=1, group_size=3)
    assert [t.seed for t in members] == [1, 1, 1] and resolved.resources.group_size == 3
    with pytest.raises(ConfigError, match=r"--group 2 is out of range: the sweep has 2 trial groups"):
        task_trials(spec, trials, group=2, group_size=3)
    sbatch_group_1 = write_sweep(tmp_path, "resources: {group_size: 1}\n", name="alone")
    rc, out = run_slurm(tmp_path, sbatch_group_1)
    assert rc == 0 and "--index" in (out / "slurm" / "array.sbatch").read_text()


def test_scripts_are_valid_bash_and_task_ids_match_expand(tmp_path):
    sweep = write_sweep(tmp_path)
    rc, out = run_slurm(tmp_path, sweep)
    assert rc == 0
    for name in ("array.sbatch", "report.sbatch"):
        path = out / "slurm" / name
        assert os.access(path, os.X_OK)
        subprocess.run(["bash", "-n", str(path)], check=True)
    n = len(expand(load_sweep(sweep)))
    assert f"--array=0-{n - 1}%4" in sbatch_lines((out / "slurm" / "array.sbatch").read_text())


def test_array_task_out_of_range_index_is_a_clear_error(tmp_path):
    """Run the generated array script as Slurm would, with a task id past the end: the real `trial` command
    must refuse it with a message that names the range."""
    sweep = write_sweep(tmp_path)
    rc, out = run_slurm(tmp_path, sweep)
    assert rc == 0
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "1"}
    proc = subprocess.run(["bash", str(out / "slurm" / "array.sbatch")], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--index 6 is out of range" in proc.stderr and "0..5" in proc.stderr
    assert not (out / "trials").exists()


def test_resources_from_sweep_and_slurm_section(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "resources: {cpu: 3, gpu: 1}\nslurm: {mem: 32G}\n")
    rc, out = run_slurm(tmp_path, sweep)
    assert rc == 0
    opts = sbatch_lines((out / "slurm" / "array.sbatch").read_text())
    assert {"--cpus-per-task=3", "--gres=gpu:1", "--mem=32G", "--ntasks=1"} <= set(opts)
    report = sbatch_lines((out / "slurm" / "report.sbatch").read_text())
    assert "--cpus-per-task=1" in report and not any(o.startswith(("--gres", "--mem")) for o in report)

    # slurm.cpus_per_task / gpus_per_task override the Ray-style per-trial resources.
    sweep = write_sweep(tmp_path, "resources: {cpu: 3, gpu: 1}\nslurm: {cpus_per_task: 8, gpus_per_task: 2}\n")
    rc, out = run_slurm(tmp_path, sweep)
    opts = sbatch_lines((out / "slurm" / "array.sbatch").read_text())
    assert "--cpus-per-task=8" in opts and "--gres=gpu:2" in opts and not any(o.startswith("--mem") for o in opts)

    # CPU-only sweeps ask for no GPU.
    sweep = write_sweep(tmp_path, "resources: {cpu: 1, gpu: 0}\n")
    rc, out = run_slurm(tmp_path, sweep)
    assert not any(o.startswith("--gres") for o in sbatch_lines((out / "slurm" / "array.sbatch").read_text()))
    capsys.readouterr()


def test_fractional_gpu_becomes_a_whole_gpu_with_an_explanation(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "resources: {gpu: 0.25}\n")
    rc, out = run_slurm(tmp_path, sweep)
    assert rc == 0
    arr = (out / "slurm" / "array.sbatch").read_text()
    assert "--gres=gpu:1" in sbatch_lines(arr)
    err = capsys.readouterr().err
    assert "whole GPUs" in err and "ray_on_allocation.sbatch" in err
    assert "ray_on_allocation.sbatch" in arr  # the note is also kept in the script


def test_gpu_auto_depends_on_the_model(tmp_path):
    sweep = write_sweep(tmp_path)  # built-in tiny model: CPU
    rc, out = run_slurm(tmp_path, sweep)
    assert not any(o.startswith("--gres") for o in sbatch_lines((out / "slurm" / "array.sbatch").read_text()))
    rc, out = run_slurm(tmp_path, sweep, overrides=("model.base_model=meta-llama/Llama-3.2-1B",))
    assert rc == 0
    assert "--gres=gpu:1" in sbatch_lines((out / "slurm" / "array.sbatch").read_text())


def test_partition_account_time_qos_cli_over_sweep(tmp_path):
    sweep = write_sweep(tmp_path, 'slurm: {partition: gpu, account: nlp-lab, qos: normal, time: "02:00:00"}\n')
    rc, out = run_slurm(tmp_path, sweep)
    assert rc == 0
    for name in ("array.sbatch", "report.sbatch"):
        opts = sbatch_lines((out / "slurm" / name).read_text())
        assert {"--partition=gpu", "--account=nlp-lab", "--qos=normal"} <= set(opts)
    assert "--time=02:00:00" in sbatch_lines((out / "slurm" / "array.sbatch").read_text())

    rc, out = run_slurm(tmp_path, sweep, "--partition", "a100", "--time", "00:30:00", "--qos", "high")
    assert rc == 0
    opts = sbatch_lines((out / "slurm" / "array.sbatch").read_text())
    assert {"--partition=a100", "--account=nlp-lab", "--qos=high", "--time=00:30:00"} <= set(opts)
    assert not {"--partition=gpu", "--qos=normal", "--time=02:00:00"} & set(opts)

    # Without a slurm section nothing cluster-specific is invented: the cluster's defaults apply.
    rc, out = run_slurm(tmp_path, write_sweep(tmp_path, name="plain"))
    opts = sbatch_lines((out / "slurm" / "array.sbatch").read_text())
    assert not any(o.startswith(("--partition", "--account", "--qos")) for o in opts)


def test_extra_and_setup_lines(tmp_path):
    sweep = write_sweep(tmp_path, textwrap.dedent("""\
        slurm:
          extra: ["--constraint=a100", "#SBATCH --exclusive"]
          setup: ["module load cuda/12.4", "source ~/venvs/rlhf/bin/activate"]
        """))
    rc, out = run_slurm(tmp_path, sweep)
    assert rc == 0
    arr = (out / "slurm" / "array.sbatch").read_text()
    assert {"--constraint=a100", "--exclusive"} <= set(sbatch_lines(arr))
    body = arr.splitlines()
    assert body.index("module load cuda/12.4") < body.index("source ~/venvs/rlhf/bin/activate") < \
        [i for i, line in enumerate(body) if line.startswith("exec ")][0]
    # The report job loads the same environment but does not inherit GPU constraints.
    rep = (out / "slurm" / "report.sbatch").read_text()
    assert "module load cuda/12.4" in rep and "--constraint=a100" not in sbatch_lines(rep)


def test_time_limit_warning_and_report_after_any(tmp_path):
    # A task is warned before its time limit (B: the batch shell, which `exec` makes the trial process), and the
    # warning is ignored until Python handles it; the report job runs after any outcome of the array.
    rc, out = run_slurm(tmp_path, write_sweep(tmp_path, 'slurm: {time: "04:00:00"}\n'))
    assert rc == 0
    arr = (out / "slurm" / "array.sbatch").read_text()
    assert "--signal=B:USR1@120" in sbatch_lines(arr)
    body = arr.splitlines()
    assert body.index("trap '' USR1") == [i for i, line in enumerate(body) if line.startswith("exec ")][0] - 1
    rep = (out / "slurm" / "report.sbatch").read_text()
    assert "afterany" in rep and not any(o.startswith("--signal") for o in sbatch_lines(rep))
    # A short limit is warned a quarter of it ahead.
    rc, out = run_slurm(tmp_path, write_sweep(tmp_path, 'slurm: {time: "4"}\n', name="short"))
    assert "--signal=B:USR1@60" in sbatch_lines((out / "slurm" / "array.sbatch").read_text())


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("15:30", 930), ("04:00:00", 14400), ("2-0", 172800),
                                           ("1-12:30", 131400), ("1-00:00:05", 86405), ("UNLIMITED", None)])
def test_time_limit_formats(text, seconds):
    from rlhf_ablate.launch.slurm import time_limit_seconds

    assert time_limit_seconds(text) == seconds


def test_time_limit_signal_outside_the_trial_is_recorded(tmp_path, monkeypatch):
    """The warning can arrive where the trial's own failure handling does not see it (W&B starting); the task
    records it then. (The real cluster test covers the signal arriving inside a stage.)"""
    import signal

    from rlhf_ablate.launch import slurm as slurm_mod
    from rlhf_ablate.run import trial as trial_mod
    from rlhf_ablate.rundir import read_result

    def fake_run_trial_in_sweep(spec, trial, run_dir, *, use_cache=True, on_step=None, data=None):
        os.kill(os.getpid(), signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@...` delivers
        for _ in range(1000):  # the handler raises at the next bytecode; bounded in case it never does
            time.sleep(0.01)
        raise AssertionError("SIGUSR1 did not become TimeLimitReached")

    monkeypatch.setattr(trial_mod, "run_trial_in_sweep", fake_run_trial_in_sweep)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    spec = load_sweep(write_sweep(tmp_path))
    trial = expand(spec)[1]
    before = signal.getsignal(signal.SIGUSR1)
    try:
        result = slurm_mod.run_task(spec, trial, tmp_path / "run")
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert result["status"] == "failed" and result["error"]["type"] == "TimeLimitReached"
    assert result["error"]["message"].startswith("time limit")
    assert read_result(tmp_path / "run", trial.trial_id) == result


# ---------------------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------------------

def test_submit_chains_report_after_array(tmp_path, fake_sbatch, capsys):
    sweep = write_sweep(tmp_path)
    rc, out = run_slurm(tmp_path, sweep, "--submit")
    assert rc == 0, capsys.readouterr().err
    calls = [json.loads(line) for line in fake_sbatch.read_text().splitlines()]
    sdir = out.resolve() / "slurm"
    assert calls == [["--parsable", str(sdir / "array.sbatch")],
                     ["--parsable", "--dependency=afterany:4100", str(sdir / "report.sbatch")]]
    printed = capsys.readouterr().out
    assert "submitted array job 4100" in printed and "submitted report job 4101" in printed
    jobs = json.loads((sdir / "jobs.json").read_text())
    assert [(j["array_job_id"], j["report_job_id"], j["n_trials"]) for j in jobs] == [("4100", "4101", 6)]

    # A second submission (e.g. after fixing a failed trial) is appended, not overwritten.
    rc, out = run_slurm(tmp_path, sweep, "--submit")
    jobs = json.loads((sdir / "jobs.json").read_text())
    assert [j["array_job_id"] for j in jobs] == ["4100", "4102"]


def test_submit_parses_cluster_suffix(tmp_path, fake_sbatch, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_SUFFIX", ";cluster-a")
    rc, out = run_slurm(tmp_path, write_sweep(tmp_path), "--submit")
    assert rc == 0
    calls = [json.loads(line) for line in fake_sbatch.read_text().splitlines()]
    assert calls[1][1] == "--dependency=afterany:4100"


def test_sbatch_rejection_is_reported(tmp_path, fake_sbatch, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_FAIL_AT", "0")
    rc, out = run_slurm(tmp_path, write_sweep(tmp_path), "--submit", "--partition", "nope")
    assert rc == 2
    err = capsys.readouterr().err
    assert "Invalid partition name" in err and "sbatch" in err


def test_report_submission_failure_names_the_array_job(tmp_path, fake_sbatch, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SBATCH_FAIL_AT", "1")
    rc, out = run_slurm(tmp_path, write_sweep(tmp_path), "--submit")
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "array job 4100 was submitted" in err and "--dependency=afterany:4100" in err
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert jobs[0]["array_job_id"] == "4100" and jobs[0]["report_job_id"] is None


# ---------------------------------------------------------------------------------------------------------
# Errors: nothing is written or submitted
# ---------------------------------------------------------------------------------------------------------

def test_sbatch_not_found(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    rc, out = run_slurm(tmp_path, write_sweep(tmp_path), "--submit")
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "sbatch not found on PATH" in err and "python -m rlhf_ablate sweep" in err
    assert not out.exists()


def test_optuna_sweep_is_refused(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "search: {type: optuna, space: {ppo.learning_rate: {loguniform: [1.0e-6, 1.0e-4]}}}\n")
    rc, out = run_slurm(tmp_path, sweep)
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "optuna" in err and "fixed list" in err and "rlhf_ablate sweep" in err
    assert not out.exists()


@pytest.mark.parametrize("body, overrides, args, needle", [
    ("base: {ppo.kl_coeff: 0.1}\n", (), [], "kl_coeff"),                        # typo in the sweep
    ("", ("ppo.nope=1",), [], "ppo.nope"),                                      # typo in a CLI override
    ("slurm: {max_concurrent: 0}\n", (), [], "slurm.max_concurrent"),
    ("slurm: {extra: ['--array=0-3']}\n", (), [], "slurm.extra[0]"),
    ("", (), ["--max-concurrent", "0"], "--max-concurrent"),
    ("", (), ["--time", "four hours"], "--time"),
])
def test_invalid_input_writes_nothing(tmp_path, capsys, body, overrides, args, needle):
    rc, out = run_slurm(tmp_path, write_sweep(tmp_path, body), *args, overrides=overrides)
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_run_dir_with_whitespace_is_refused(tmp_path, capsys):
    out = tmp_path / "my runs"
    rc = cli_main(["slurm", str(write_sweep(tmp_path)), "--out", str(out)])
    assert rc == 2
    assert "whitespace" in capsys.readouterr().err
    assert not out.exists()
