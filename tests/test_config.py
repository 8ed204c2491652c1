"""Config and sweep files: every class of error names the key and the file; expand() is pure and stable."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_ablate.config import (TrialConfig, all_keys, apply_overrides, parse_cli_overrides,
                                trial_config_from_overrides)
from rlhf_ablate.errors import ConfigError
from rlhf_ablate.cli import trial_table
from rlhf_ablate.config.sweep import expand, load_sweep

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "rlhf_ablate" / "sweeps"  # the bundled sweeps (package data)
SWEEPS = sorted(BUNDLED.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


# ---- TrialConfig ------------------------------------------------------------------------------------------

def test_defaults_are_valid_and_frozen():
    cfg = trial_config_from_overrides({})
    assert cfg == TrialConfig()
    with pytest.raises(Exception):
        cfg.seed = 3  # frozen
    assert "ppo.kl_coef" in cfg.flat() and len(all_keys()) == len(cfg.flat())


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'ppo.kl_coeff'.*Did you mean 'ppo.kl_coef'"):
        trial_config_from_overrides({"ppo.kl_coeff": 0.1}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: unknown key 'lora_rank'. Did you mean one of 'sft.lora_rank', 'rm.lora_rank', 'ppo.lora_rank'"):
        trial_config_from_overrides({"lora_rank": 8}, "x.yaml")


@pytest.mark.parametrize("key,value,pattern", [
    ("sft.lora_rank", "eight", r"'sft.lora_rank' must be an integer"),
    ("ppo.kl_coef", "high", r"'ppo.kl_coef' must be a number"),
    ("ppo.adaptive_kl", "yes", r"'ppo.adaptive_kl' must be true or false"),
    ("model.quantization", "int8", r"'model.quantization' must be one of 'none', 'nf4', 'fp4'"),
    ("sft.lora_rank", 8.5, r"'sft.lora_rank' must be an integer"),
])
def test_wrong_types_name_the_key_and_file(key, value, pattern):
    with pytest.raises(ConfigError, match=r"my.yaml: " + pattern):
        trial_config_from_overrides({key: value}, "my.yaml")


@pytest.mark.parametrize("key,value,pattern", [
    ("sft.lora_rank", -8, r"'sft.lora_rank' must be >= 0"),
    ("ppo.kl_coef", -0.1, r"'ppo.kl_coef' must be >= 0"),
    ("ppo.mini_batch_size", 5, r"must divide ppo.rollout_batch_size"),
    ("data.eval_fraction", 1.5, r"'data.eval_fraction' must lie strictly between 0 and 1"),
    ("data.version", "v3", r"'data.version' is 'v3'"),
    ("rm.learning_rate", 0.0, r"'rm.learning_rate' must be > 0"),
])
def test_bad_values(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        trial_config_from_overrides({key: value, "model.quantization": "none"}, "f.yaml")


def test_full_finetune_on_4bit_is_infeasible_and_says_how_to_fix():
    with pytest.raises(ConfigError, match=r"infeasible combination: sft.lora_rank=0 .*model.quantization='nf4'.*"
                                          r"Set model.quantization=none"):
        trial_config_from_overrides({"sft.lora_rank": 0}, "f.yaml")
    # The same rank with an unquantized base is fine.
    assert trial_config_from_overrides({"sft.lora_rank": 0, "model.quantization": "none"}).sft.lora_rank == 0


def test_custom_versions_are_checked_against_the_filters():
    ok = trial_config_from_overrides({"data.custom_versions": {"light": ["nfc", "dedup_exact"]},
                                      "data.version": "light"})
    assert ok.data.version == "light"
    with pytest.raises(ConfigError, match=r"data.custom_versions.light.*unknown filter 'dedup'"):
        trial_config_from_overrides({"data.custom_versions": {"light": ["dedup"]}, "data.version": "light"})


def test_trial_id_is_stable_and_moves_with_any_value():
    a, b = TrialConfig(), TrialConfig()
    assert a.trial_id == b.trial_id
    assert a.replace(**{"ppo.kl_coef": 0.3}).trial_id != a.trial_id
    assert a.replace(**{"seed": 1}).trial_id != a.trial_id
    # Same value written as int or float gives the same config and id (floats are coerced).
    assert a.replace(**{"ppo.kl_coef": 1}).trial_id == a.replace(**{"ppo.kl_coef": 1.0}).trial_id


def test_cli_override_parsing():
    assert parse_cli_overrides(["ppo.kl_coef=0.1", "model.base_model=meta-llama/Llama-3.2-1B",
                                "ppo.adaptive_kl=true"]) == {
        "ppo.kl_coef": 0.1, "model.base_model": "meta-llama/Llama-3.2-1B", "ppo.adaptive_kl": True}
    with pytest.raises(ConfigError, match="key=value"):
        parse_cli_overrides(["ppo.kl_coef"])
    base = TrialConfig().to_dict()
    assert apply_overrides(base, {"ppo.kl_coef": 0.3}, "x")["ppo"]["kl_coef"] == 0.3
    assert base["ppo"]["kl_coef"] == TrialConfig().ppo.kl_coef  # a copy, the input is untouched


# ---- sweep files ----------------------------------------------------------------------------------------

EXPECTED_COUNTS = {"lora_rank": 6, "kl_coef": 6, "base_model": 4, "data_version": 4, "dpo_vs_ppo": 4, "method": 8,
                   "full_grid": 36, "kanana_lora_rank": 6, "gpu_recommended": 9, "smoke": 1,
                   "overoptimization": 12}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_bundled_sweep_expands_with_stable_unique_ids(path):
    trials = expand(load_sweep(path))
    assert len(trials) == EXPECTED_COUNTS[path.stem]
    ids = [t.trial_id for t in trials]
    assert len(set(ids)) == len(ids)
    assert ids == [t.trial_id for t in expand(load_sweep(path))]  # same file, same ids
    assert [t.index for t in trials] == list(range(len(trials)))


def test_ids_stable_across_processes():
    code = ("from rlhf_ablate.config.sweep import load_sweep, expand;"
            "print(','.join(t.trial_id for t in expand(load_sweep('rlhf_ablate/sweeps/kl_coef.yaml'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == [t.trial_id for t in expand(load_sweep(BUNDLED / "kl_coef.yaml"))]


def test_changed_value_changes_only_the_affected_ids(tmp_path):
    a = expand(load_sweep(write(tmp_path, "name: s\naxes: {ppo.kl_coef: [0.01, 0.1]}\n", "a.yaml")))
    b = expand(load_sweep(write(tmp_path, "name: s\naxes: {ppo.kl_coef: [0.01, 0.2]}\n", "b.yaml")))
    assert a[0].trial_id == b[0].trial_id and a[1].trial_id != b[1].trial_id


def test_lora_rank_sweep_ties_axes_and_applies_override():
    trials = expand(load_sweep(BUNDLED / "lora_rank.yaml"))
    for t in trials:
        c = t.config
        assert c.sft.lora_rank == c.rm.lora_rank == c.ppo.lora_rank == t.axes["lora_rank"]
        assert c.model.quantization == ("none" if c.sft.lora_rank == 0 else "nf4")
    assert sorted({t.seed for t in trials}) == [0, 1]


def test_tied_axis_with_per_key_values_and_include(tmp_path):
    write(tmp_path, "base: {ppo.total_episodes: 64}\nseeds: [0, 1, 2]\n", "base.yaml")
    spec = load_sweep(write(tmp_path, """
        name: tied
        include: base.yaml
        axes:
          ranks:
            keys: [sft.lora_rank, rm.lora_rank]
            values: [[8, 16], [16, 8]]
        """))
    trials = expand(spec)
    assert len(trials) == 6 and all(t.config.ppo.total_episodes == 64 for t in trials)
    assert {(t.config.sft.lora_rank, t.config.rm.lora_rank) for t in trials} == {(8, 16), (16, 8)}
    assert "ranks" in trial_table(trials)


@pytest.mark.parametrize("body,pattern", [
    ("name: s\naxes: {ppo.kl_coeff: [0.1]}\n", r"axes.ppo.kl_coeff: unknown key 'ppo.kl_coeff'.*Did you mean"),
    ("name: s\naxis: {ppo.kl_coef: [0.1]}\n", r"unknown top-level key 'axis'.*Did you mean 'axes'"),
    ("name: s\naxes: {ppo.kl_coef: []}\n", r"axes.ppo.kl_coef is empty"),
    ("name: s\naxes: {ppo.kl_coef: [0.1, -1.0]}\n", r"trial 1 \(ppo.kl_coef=-1.0.*'ppo.kl_coef' must be >= 0"),
    ("name: s\naxes: {sft.lora_rank: [-8]}\n", r"'sft.lora_rank' must be >= 0"),
    ("name: s\naxes: {ppo.kl_coef: [0.1, 0.1]}\n", r"lists a value twice"),
    ("name: s\nbase: {sft.lora_rank: 0}\n", r"infeasible combination: sft.lora_rank=0"),
    ("name: s\naxes: {sft.lora_rank: [0, 8]}\n", r"trial 0 \(sft.lora_rank=0.*infeasible combination"),
    ("name: s\nseeds: [0, 0]\n", r"'seeds' lists a seed twice"),
    ("name: s\nbase: {ppo.kl_coef: fast}\n", r"s.yaml: base: 'ppo.kl_coef' must be a number|must be a number"),
    ("name: s\nsearch: {type: optuna}\n", r"search.type=optuna needs search.space"),
    ("name: s\nresources: {gpu: many}\n", r"resources.gpu must be a number"),
    ("name: s\noverrides: [{when: {sft.lora_rnk: 0}, set: {model.quantization: none}}]\n",
     r"overrides\[0\].when: unknown key 'sft.lora_rnk'"),
    ("name: s\nslurm: {partitoin: gpu}\n", r"unknown key 'slurm.partitoin'.*Did you mean 'slurm.partition'"),
    ("name: [s\n", r"not valid YAML"),
])
def test_sweep_errors_name_key_and_file(tmp_path, body, pattern):
    p = write(tmp_path, body)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_sweep(p)
    assert str(p) in str(e.value)


def test_duplicate_trials_are_refused(tmp_path):
    # ppo.kl_coef 0.1 and an override forcing every kl_coef to 0.1 make two identical grid points.
    p = write(tmp_path, """
        name: dup
        axes: {ppo.kl_coef: [0.1, 0.2]}
        overrides: [{when: {ppo.kl_coef: 0.2}, set: {ppo.kl_coef: 0.1}}]
        """)
    with pytest.raises(ConfigError, match=r"duplicate trials: \(ppo.kl_coef=0.1, seed=0\) and "
                                          r"\(ppo.kl_coef=0.2, seed=0\)"):
        load_sweep(p)


# ---- CLI ---------------------------------------------------------------------------------------------

def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "rlhf_ablate", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_help_lists_the_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("sweep", "trial", "slurm", "data", "report"):
        assert cmd in out.stdout


def test_cli_bad_input_is_one_paragraph_exit_2_and_writes_nothing(tmp_path):
    p = write(tmp_path, "name: s\naxes: {ppo.kl_coef: [0.1]}\nbase: {ppo.clip: 0.2}\n")
    out = run_cli("sweep", str(p), "--out", str(tmp_path / "run"))
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert "'ppo.clip'" in out.stderr and str(p) in out.stderr.replace("\n", " ")
    assert not (tmp_path / "run").exists()


def test_cli_dry_run_prints_table_and_starts_nothing(tmp_path):
    out = run_cli("sweep", "sweeps/kl_coef.yaml", "--dry-run", "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert "6 trials" in out.stdout and "ppo.kl_coef" in out.stdout and "nothing started" in out.stdout
    # the README's path: no sweeps/ in the clone any more, so the bundled file is used, and the CLI says so
    assert f"sweep file: {BUNDLED / 'kl_coef.yaml'} (bundled sweep; you typed sweeps/kl_coef.yaml)" in out.stderr
    assert not (tmp_path / "run").exists()


def test_cli_trial_index_out_of_range(tmp_path):
    out = run_cli("trial", "sweeps/kl_coef.yaml", "--index", "6", "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and "--index 6 is out of range" in out.stderr and "0..5" in out.stderr
    assert not (tmp_path / "run").exists()


def test_cli_overrides_may_follow_options(tmp_path):
    out = run_cli("sweep", "sweeps/kl_coef.yaml", "--dry-run", "--out", str(tmp_path / "r"), "ppo.total_episodes=64")
    assert out.returncode == 0, out.stderr
    bad = run_cli("sweep", "sweeps/kl_coef.yaml", "--dry-run", "ppo.total_episodez=64")
    assert bad.returncode == 2 and "Did you mean 'ppo.total_episodes'" in " ".join(bad.stderr.split())
    junk = run_cli("sweep", "sweeps/kl_coef.yaml", "--dry-run", "--bogus")
    assert junk.returncode == 2 and "unrecognized arguments: --bogus" in junk.stderr


# ---- issue 11: YAML traps, numbers, metric names, pre-flight ------------------------------------------------

def test_duplicate_yaml_keys_name_both_lines(tmp_path):
    p = write(tmp_path, "name: s\nbase:\n  ppo.kl_coef: 0.1\n  sft.lora_rank: 8\n  ppo.kl_coef: 0.2\n")
    with pytest.raises(ConfigError, match=r"key 'ppo.kl_coef' appears twice in one mapping \(lines 3 and 5\)"):
        load_sweep(p)
    from rlhf_ablate.config.fields import load_yaml

    # merge keys (<<) are not duplicates; a key repeated in a flow mapping on the command line is
    assert load_yaml("a: &x {k: 1}\nb:\n  <<: *x\n  j: 2\n", "t") == {"a": {"k": 1}, "b": {"k": 1, "j": 2}}
    with pytest.raises(ConfigError, match=r"override 'data.columns=\{prompt: a, prompt: b\}': key 'prompt'"):
        parse_cli_overrides(["data.columns={prompt: a, prompt: b}"])


def test_yaml_11_e_notation_is_a_number_for_float_keys():
    # PyYAML reads `1e-4` as a string (YAML 1.1); the float fields take it as the number every user means.
    cfg = trial_config_from_overrides(parse_cli_overrides(["sft.learning_rate=1e-4", "ppo.kl_coef=5E-2"]))
    assert (cfg.sft.learning_rate, cfg.ppo.kl_coef) == (1e-4, 5e-2)
    with pytest.raises(ConfigError, match=r"'ppo.total_episodes' must be an integer, got '1e3' \(e-notation"):
        trial_config_from_overrides(parse_cli_overrides(["ppo.total_episodes=1e3"]))


@pytest.mark.parametrize("key,value,pattern", [
    ("ppo.kl_coef", float("nan"), "must be a finite number"),
    ("ppo.cliprange", float("-inf"), "must be a finite number"),
    ("sft.learning_rate", 1e39, "beyond the float32 range"),
    ("ppo.max_new_tokens", 2**63, "beyond the 64-bit integer range"),
    ("seed", -1, r"must lie in \[0, 2\*\*32 - 1\]"),
    ("seed", 2**32, r"must lie in \[0, 2\*\*32 - 1\]"),
])
def test_numbers_that_would_break_torch_or_numpy(key, value, pattern):
    with pytest.raises(ConfigError, match=rf"f.yaml: '{re.escape(key)}' .*{pattern}"):
        trial_config_from_overrides({key: value}, "f.yaml")
    assert trial_config_from_overrides({"seed": 2**32 - 1}).seed == 2**32 - 1


def test_metric_namespace_covers_what_trials_report():
    from rlhf_ablate.metrics.registry import all_metric_names as metric_names, known_metric

    for name in ("ppo/reward_mean", "rm/kendall_tau", "ppo/objective/scores", "ppo/objective/kl", "sft/rougeL",
                 "dpo/bleu", "ppo/eos_frac"):
        assert known_metric(name), name
    assert not known_metric("ppo/reward_men") and len(metric_names()) == len(set(metric_names()))
    # every bundled sweep's metrics are known
    for path in SWEEPS:
        spec = load_sweep(path)
        assert known_metric(spec.search.metric) and known_metric(spec.scheduler.metric)


def test_sweep_name_is_a_plain_directory_name(tmp_path):
    for name in ("kl_coef", "lora-rank.v2", "한국어_스윕"):
        assert load_sweep(write(tmp_path, f"name: {name}\n")).name == name
    for bad in ("..", ".", ".hidden", "-x", "a/b", "a\\\\b", "''"):
        with pytest.raises(ConfigError, match="'name' must be a plain directory name"):
            load_sweep(write(tmp_path, f"name: {bad}\n"))


def test_preflight_checks_data_and_model(tmp_path):
    from rlhf_ablate.cli import preflight
    from rlhf_ablate.errors import DataError, ModelError

    spec = load_sweep(BUNDLED / "data_version.yaml")
    lines = preflight(spec, expand(spec))
    assert lines[0].startswith("data ko_sample: sft sft.jsonl (kochatgpt); rm rm.jsonl (kochatgpt)")
    assert len([x for x in lines if x.startswith("data ")]) == 1  # v1 and v2 share the source: checked once
    assert any(x.startswith("model tiny-llama") for x in lines)
    bad = load_sweep(write(tmp_path, f"name: s\nbase: {{data.source: {tmp_path}/none}}\n"))
    with pytest.raises(DataError, match="data.source"):
        preflight(bad, expand(bad))
    model = load_sweep(write(tmp_path, f"name: s\nbase: {{model.base_model: {tmp_path}/none}}\n", "m.yaml"))
    with pytest.raises(ModelError, match="does not exist"):
        preflight(model, expand(model))
