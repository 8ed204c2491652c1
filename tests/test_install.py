"""The first command works as written, from wherever the user is (issue 19): a non-editable install into a fresh
virtual environment runs a bundled sweep by its bare name from an empty directory, and chat answers with nothing
but the answer.

The environment sees the system site-packages (torch and the pinned stack are already there; nothing is
downloaded: --no-deps, --no-index, --no-build-isolation with the installed setuptools) and is made without pip
(the system pip installs into it with --python, pip >= 22.3), so this costs seconds. The editable install of a
checkout in the system site-packages must not shadow the installed copy: the test asserts where rlhf_ablate is
imported from. The built-in tiny model comes from the session's cache (conftest.builtin_cache), as in every other
trial test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# One xdist group for the tests that start Ray or use the Slurm cluster: they run one after another on one worker
# while the other worker runs the rest (README: `pytest -n 2 --dist loadgroup`).
pytestmark = pytest.mark.xdist_group("cluster")

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_pip_install_runs_a_bundled_sweep_by_name_from_an_empty_directory(tmp_path, builtin_cache):
    # A copy of what the wheel is built from, so the build writes nothing into the checkout (build/, egg-info).
    src = tmp_path / "src"
    for name in ("rlhf_ablate", "analysis"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    pip = _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index",
                "--no-build-isolation", src], tmp_path, env)
    assert pip.returncode == 0, pip.stdout + pip.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    env.update(RLHF_ABLATE_CACHE=str(builtin_cache), WANDB_MODE="offline", WANDB_DIR=str(tmp_path),
               RAY_AUTH_MODE="disabled")
    where = _run([python, "-c", "import rlhf_ablate, analysis; print(rlhf_ablate.__file__); print(analysis.__file__)"],
                 empty, env)
    assert where.returncode == 0, where.stderr
    site = (venv / "lib").resolve()
    assert all(Path(f).resolve().is_relative_to(site) for f in where.stdout.split()), where.stdout
    bundled = Path(where.stdout.split()[0]).parent / "sweeps"
    assert (bundled / "lora_rank.yaml").is_file() and (bundled / "smoke.yaml").is_file()

    # The command, by its bare name (dry run: 6 real trials are the README's 2-minute job).
    dry = _run([python, "-m", "rlhf_ablate", "sweep", "lora_rank.yaml", "--dry-run"], empty, env)
    assert dry.returncode == 0, dry.stderr
    assert f"sweep file: {bundled / 'lora_rank.yaml'} (bundled sweep; you typed lora_rank.yaml)" in dry.stderr
    assert "sweep lora_rank (version 1): 6 trials" in dry.stdout

    # The smallest bundled sweep for real: one trial through every stage, results and report.
    run = _run([python, "-m", "rlhf_ablate", "sweep", "smoke"], empty, env, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert f"{bundled / 'smoke.yaml'} (bundled sweep; you typed smoke)" in run.stderr
    results = [json.loads(p.read_text()) for p in (empty / "runs" / "smoke" / "trials").glob("*/result.json")]
    assert [r["status"] for r in results] == ["ok"], results
    assert isinstance(results[0]["metrics"]["ppo/reward_mean"], float)
    assert (empty / "runs" / "smoke" / "report" / "report.md").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["runs"]  # nothing else written where the user stands

    # chat prints the answer and nothing else: no weight-loading bar, no library warnings (they are behind --verbose)
    chat = _run([python, "-m", "rlhf_ablate", "chat", "runs/smoke", "--trial", results[0]["trial_id"],
                 "--prompt", "김치는 어떻게 만들어요?"], empty, env)
    assert chat.returncode == 0, chat.stderr
    assert chat.stderr == "", chat.stderr
    for noise in ("Loading weights", "it/s]", "Warning", "warn", "kernels"):
        assert noise not in chat.stdout, chat.stdout
