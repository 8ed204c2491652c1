"""Finding a sweep file (issue 19): a bare name resolves to ./sweeps/ first, then to the bundled sweeps; the README's
sweeps/NAME.yaml works without a sweeps/ directory; a miss lists the bundled sweeps; `sweeps` lists them with their
descriptions; an include falls back to a bundled sweep. Pure Python, no torch. The non-editable install that ships
the bundled files is tests/test_install.py."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rlhf_ablate.cli import main as cli_main
from rlhf_ablate.config.sweep import expand, load_sweep
from rlhf_ablate.config.sweep_files import (BUNDLED_DIR, bundled_sweeps, describe, list_bundled,
                                            resolve_sweep_file)
from rlhf_ablate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_sweeps_are_package_data_with_a_one_line_description():
    assert BUNDLED_DIR == ROOT / "rlhf_ablate" / "sweeps"
    names = set(bundled_sweeps())
    assert {"lora_rank", "kl_coef", "smoke", "method", "gpu_recommended"} <= names
    assert not (ROOT / "sweeps").exists()  # one copy of each file
    for name, path in bundled_sweeps().items():
        d = describe(path)
        assert d and "\n" not in d and len(d) <= 90, (name, d)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"sweeps/*.yaml"' in pyproject  # shipped in the wheel


def test_bare_name_resolves_to_local_sweeps_first_then_bundled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for typed in ("lora_rank", "lora_rank.yaml", "sweeps/lora_rank.yaml", "sweeps/lora_rank"):
        found = resolve_sweep_file(typed)
        assert (found.path, found.how) == (BUNDLED_DIR / "lora_rank.yaml", "bundled"), typed
        assert found.note == f"sweep file: {BUNDLED_DIR / 'lora_rank.yaml'} (bundled sweep; you typed {typed})"
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "lora_rank.yaml").write_text("name: mine\n")
    found = resolve_sweep_file("lora_rank")
    assert (found.path, found.how) == (Path("sweeps/lora_rank.yaml"), "local")
    assert "from ./sweeps/" in found.note
    # a path that exists is used as typed, and nothing needs saying
    found = resolve_sweep_file("sweeps/lora_rank.yaml")
    assert (found.path, found.how, found.note) == (Path("sweeps/lora_rank.yaml"), "given", None)
    (tmp_path / "kl_coef.yaml").write_text("name: here\n")
    assert resolve_sweep_file("kl_coef.yaml").how == "given"
    assert resolve_sweep_file("kl_coef").how == "bundled"  # no suffix: not the file in the working directory


@pytest.mark.parametrize("typed", ["lora_rnak", "sweeps/nope.yaml", "some/dir/lora_rank.yaml"])
def test_a_miss_lists_the_bundled_sweeps(tmp_path, monkeypatch, typed):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"does not exist") as e:
        resolve_sweep_file(typed)
    msg = str(e.value)
    assert typed in msg and all(name in msg for name in bundled_sweeps())
    assert "python -m rlhf_ablate sweeps" in msg


def test_cli_runs_a_bundled_sweep_by_name_and_says_which_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["sweep", "smoke", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert f"sweep file: {BUNDLED_DIR / 'smoke.yaml'} (bundled sweep; you typed smoke)" in err
    assert "sweep smoke (version 1): 1 trials" in out and "nothing started" in out
    assert not (tmp_path / "runs").exists()
    assert cli_main(["trial", "lora_rank.yaml", "--index", "9"]) == 2  # resolved, then the index is checked
    assert "--index 9 is out of range" in capsys.readouterr().err
    assert cli_main(["sweep", "lora_rnak.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep file lora_rnak.yaml does not exist") and "lora_rank" in err
    assert len(err.strip().splitlines()) <= 6


def test_sweeps_command_lists_names_and_descriptions(capsys):
    assert cli_main(["sweeps"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == list_bundled().strip()
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip() and not line.startswith("Run ")}
    assert set(lines) == set(bundled_sweeps())
    assert "LoRA rank (0 = full fine-tune) of SFT, RM and PPO" in lines["lora_rank"]


def test_includes_resolve_beside_the_file_then_among_the_bundled(tmp_path):
    # a bundled sweep's include (smoke.yaml: include kl_coef.yaml) resolves beside it, inside the package
    smoke = load_sweep(BUNDLED_DIR / "smoke.yaml")
    assert smoke.description.startswith("install check") and len(expand(smoke)) == 1
    assert smoke.base["ppo.total_episodes"] == 8
    # a user's sweep anywhere can build on a bundled one by name
    mine = tmp_path / "mine.yaml"
    mine.write_text(textwrap.dedent("""\
        name: mine
        include: kl_coef.yaml
        seeds: [3]
    """))
    spec = load_sweep(mine)
    assert [t.axes["ppo.kl_coef"] for t in expand(spec)] == [0.01, 0.1, 1.0] and spec.seeds == (3,)
    # a file beside it wins over the bundled one of the same name
    (tmp_path / "kl_coef.yaml").write_text("name: local\naxes: {ppo.kl_coef: [0.5]}\n")
    assert [t.axes["ppo.kl_coef"] for t in expand(load_sweep(mine))] == [0.5]
    (tmp_path / "other.yaml").write_text("name: o\ninclude: nothere.yaml\n")
    with pytest.raises(ConfigError, match="nothere.yaml does not exist"):
        load_sweep(tmp_path / "other.yaml")
