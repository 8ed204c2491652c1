"""A corpus of broken sweep files, data files and command lines, each run through the CLI (issue 11, "Done when").

For every case: exit status 2, at most 6 lines on stderr, the culprit (key, file, line or row) named, no traceback,
and nothing left behind: no run directory, no stage cache, no output directory. The corpus is written by this file
(no third-party data); the Korean rows are our own. Most cases run in-process through ``rlhf_ablate.cli.main``
(fast); a batch at the end runs the real ``python -m rlhf_ablate`` entry point in parallel subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from rlhf_ablate.cli import MAX_ERROR_LINES, main

ROOT = Path(__file__).resolve().parents[1]

SFT = [{"prompt": "김치찌개는 어떻게 끓이나요?", "completion": "김치를 먼저 볶은 뒤 물을 붓고 끓입니다."},
       {"prompt": "DDoS가 뭐야?", "completion": "여러 컴퓨터가 한 서버에 요청을 몰아 보내 서비스를 멈추게 하는 공격입니다."},
       {"prompt": "여권은 어디서 만드나요?", "completion": "가까운 구청이나 시청 여권과에서 신청합니다."},
       {"prompt": "비 오는 날 빨래는 어떻게 말려요?", "completion": "제습기를 켜고 빨래 사이를 넓게 띄워 말립니다."}]
RM = [{"prompt": "수영을 처음 배울 때 무엇부터 하나요?", "completion_0": "물에 뜨는 연습부터 합니다.",
       "completion_1": "몰라.", "completion_2": "I like swimming very much.", "ranking": [0, 1, 2]},
      {"prompt": "감기에 걸리면 어떻게 하나요?", "completion_0": "푹 쉬고 물을 자주 마십니다.",
       "completion_1": "그냥 참아.", "ranking": [0, 1]},
      {"prompt": "전세와 매매는 무엇이 다른가요?", "completion_0": "알아서 찾아봐.",
       "completion_1": "전세는 보증금을 맡기고 빌리는 것이고 매매는 집을 사는 것입니다.", "ranking": [1, 0]}]


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def array(rows) -> str:
    return json.dumps(rows, ensure_ascii=False, indent=4)


def sweep(base: str = "", extra: str = "", name: str = "bad") -> str:
    return f"name: {name}\nbase:\n  eval.num_samples_logged: 4\n{base}{extra}"


DATA_SWEEP = sweep("  data.source: {d}/data\n")


def line_of(text: str, needle: str) -> int:
    """1-based line of the first `needle` in `text` (where a parser must say the problem is)."""
    return text[:text.index(needle)].count("\n") + 1


def data(sft: Optional[str] = None, rm: Optional[str] = None, **more: object) -> dict:
    files: dict = {"s.yaml": DATA_SWEEP, "data/sft.jsonl": jsonl(SFT) if sft is None else sft,
                   "data/rm.jsonl": jsonl(RM) if rm is None else rm}
    files.update({f"data/{k.replace('__', '.')}": v for k, v in more.items()})
    return files


@dataclass
class Case:
    id: str
    files: dict
    culprit: str  # a substring of the message (newlines folded): the key, file, line or row
    argv: list = field(default_factory=lambda: ["sweep", "{d}/s.yaml", "--dry-run", "--out", "{d}/run"])
    env: dict = field(default_factory=dict)


def _dry(*extra: str) -> list:
    return ["sweep", "{d}/s.yaml", *extra, "--dry-run", "--out", "{d}/run"]


CASES = [
    # ---- sweep files: reading ------------------------------------------------------------------------------
    Case("not_utf8", {"s.yaml": b"name: bad\ndescription: \xb1\xe8\xc4\xa1\n"}, "line 2: not UTF-8"),
    Case("utf16", {"s.yaml": "name: bad\n".encode("utf-16")}, "not UTF-8"),
    Case("sweep_is_a_directory", {"s.yaml/x": "name: bad\n"}, "is a directory"),
    Case("sweep_missing", {}, "s.yaml does not exist"),
    Case("empty_file", {"s.yaml": ""}, "must be a mapping"),
    Case("top_level_list", {"s.yaml": "- name: bad\n"}, "must be a mapping"),
    Case("yaml_syntax", {"s.yaml": "name: [bad\n"}, "not valid YAML"),
    Case("yaml_tab_indent", {"s.yaml": "name: bad\nbase:\n\tppo.kl_coef: 0.1\n"}, "line 3"),
    Case("duplicate_top_key", {"s.yaml": "name: bad\nseeds: [0]\nseeds: [1]\n"}, "'seeds' appears twice"),
    Case("duplicate_base_key", {"s.yaml": sweep("  ppo.kl_coef: 0.1\n  ppo.kl_coef: 0.2\n")},
         "'ppo.kl_coef' appears twice in one mapping (lines 4 and 5)"),
    Case("base_is_a_list", {"s.yaml": "name: bad\nbase: [ppo.kl_coef, 0.1]\n"}, "'base' must be a mapping"),
    Case("base_is_a_string", {"s.yaml": "name: bad\nbase: ppo.kl_coef=0.1\n"}, "'base' must be a mapping"),
    Case("include_number", {"s.yaml": "name: bad\ninclude: 5\n"}, "'include' must be a file name"),
    Case("include_missing", {"s.yaml": "name: bad\ninclude: nope.yaml\n"}, "nope.yaml does not exist"),
    Case("include_directory", {"s.yaml": "name: bad\ninclude: inc\n", "inc/x.yaml": "seeds: [0]\n"},
         "is a directory"),
    Case("include_cycle", {"s.yaml": "name: bad\ninclude: b.yaml\n", "b.yaml": "include: s.yaml\n"},
         "include cycle"),
    Case("include_not_utf8", {"s.yaml": "name: bad\ninclude: b.yaml\n", "b.yaml": b"seeds: [0]\n# \xff\n"},
         "b.yaml: line 2: not UTF-8"),
    # ---- sweep files: names, seeds, sections -----------------------------------------------------------------
    Case("name_dotdot", {"s.yaml": "name: ..\n"}, "'name' must be a plain directory name"),
    Case("name_dot", {"s.yaml": "name: .\n"}, "'name' must be a plain directory name"),
    Case("name_absolute", {"s.yaml": "name: /tmp/elsewhere\n"}, "'name' must be a plain directory name"),
    Case("name_subdir", {"s.yaml": "name: a/b\n"}, "'name'"),
    Case("name_missing", {"s.yaml": "seeds: [0]\n"}, "'name'"),
    Case("name_number", {"s.yaml": "name: 5\n"}, "'name'"),
    Case("unknown_top_key", {"s.yaml": "name: bad\naxis: {ppo.kl_coef: [0.1]}\n"}, "Did you mean 'axes'"),
    Case("seed_negative", {"s.yaml": "name: bad\nseeds: [-1]\n"}, "'seeds' must lie in [0, 2**32 - 1]"),
    Case("seed_huge", {"s.yaml": "name: bad\nseeds: [100000000000000000000000]\n"}, "'seeds'"),
    Case("seed_text", {"s.yaml": "name: bad\nseeds: [zero]\n"}, "'seeds'"),
    Case("seed_twice", {"s.yaml": "name: bad\nseeds: [1, 1]\n"}, "lists a seed twice"),
    Case("base_seed", {"s.yaml": sweep("  seed: 3\n")}, "base: 'seed' is set by the top-level `seeds:` list"),
    Case("seed_beyond_numpy", {"s.yaml": "name: bad\nseeds: [4294967296]\n"}, "'seeds' must lie in"),
    Case("max_concurrent_negative", {"s.yaml": "name: bad\nmax_concurrent: -1\n"}, "'max_concurrent'"),
    Case("overrides_not_list", {"s.yaml": "name: bad\noverrides: {when: {}, set: {}}\n"}, "'overrides'"),
    Case("override_unknown_key", {"s.yaml": "name: bad\noverrides: [{when: {sft.lora_rnk: 0}, set: {seed: 1}}]\n"},
         "overrides[0].when: unknown key 'sft.lora_rnk'"),
    Case("tracking_mode", {"s.yaml": "name: bad\ntracking: {wandb: maybe}\n"}, "'tracking.wandb'"),
    Case("search_not_mapping", {"s.yaml": "name: bad\nsearch: optuna\n"}, "'search' must be a mapping"),
    # ---- numbers ---------------------------------------------------------------------------------------------
    Case("kl_coef_nan", {"s.yaml": sweep("  ppo.kl_coef: .nan\n")}, "'ppo.kl_coef' must be a finite number"),
    Case("kl_coef_inf", {"s.yaml": sweep("  ppo.kl_coef: .inf\n")}, "'ppo.kl_coef' must be a finite number"),
    Case("kl_coef_negative", {"s.yaml": sweep("  ppo.kl_coef: -0.1\n")}, "'ppo.kl_coef' must be >= 0"),
    Case("gpu_nan", {"s.yaml": "name: bad\nresources: {gpu: .nan}\n"}, "'resources.gpu' must be a finite number"),
    Case("gpu_negative", {"s.yaml": "name: bad\nresources: {gpu: -1}\n"}, "resources.gpu must be >= 0"),
    Case("memory_inf", {"s.yaml": "name: bad\nresources: {memory_gb: .inf}\n"}, "'resources.memory_gb'"),
    Case("episodes_e30", {"s.yaml": sweep("  ppo.total_episodes: 1e30\n")}, "'ppo.total_episodes' must be an integer"),
    Case("episodes_float", {"s.yaml": sweep("  ppo.total_episodes: 1.0e+30\n")}, "'ppo.total_episodes'"),
    Case("episodes_int_overflow", {"s.yaml": sweep("  ppo.total_episodes: 1000000000000000000000000000000\n")},
         "'ppo.total_episodes' is 1000000000000000000000000000000, beyond the 64-bit"),
    Case("lr_float32_overflow", {"s.yaml": sweep("  sft.learning_rate: 1.0e+39\n")}, "'sft.learning_rate'"),
    Case("lr_zero", {"s.yaml": sweep("  rm.learning_rate: 0.0\n")}, "'rm.learning_rate' must be > 0"),
    Case("axis_value_nan", {"s.yaml": "name: bad\naxes: {ppo.kl_coef: [0.1, .nan]}\n"}, "'ppo.kl_coef'"),
    Case("eval_fraction", {"s.yaml": sweep("  data.eval_fraction: 1.5\n")}, "'data.eval_fraction'"),
    # ---- keys, types, rules ----------------------------------------------------------------------------------
    Case("unknown_base_key", {"s.yaml": sweep("  ppo.kl_coeff: 0.1\n")}, "Did you mean 'ppo.kl_coef'"),
    Case("wrong_type", {"s.yaml": sweep("  sft.lora_rank: eight\n")}, "'sft.lora_rank' must be an integer"),
    Case("wrong_literal", {"s.yaml": sweep("  model.quantization: int8\n")}, "'model.quantization' must be one of"),
    Case("infeasible", {"s.yaml": sweep("  sft.lora_rank: 0\n")}, "infeasible combination: sft.lora_rank=0"),
    Case("axis_unknown_key", {"s.yaml": "name: bad\naxes: {ppo.kl_coeff: [0.1]}\n"}, "axes.ppo.kl_coeff"),
    Case("axis_empty", {"s.yaml": "name: bad\naxes: {ppo.kl_coef: []}\n"}, "axes.ppo.kl_coef is empty"),
    Case("tied_axis_length", {"s.yaml": "name: bad\naxes: {r: {keys: [sft.lora_rank, rm.lora_rank], "
                                        "values: [[8, 8, 8]]}}\n"}, "axes.r.values[0]"),
    Case("data_version", {"s.yaml": sweep("  data.version: v9\n")}, "'data.version'"),
    Case("custom_filter", {"s.yaml": sweep("  data.version: mine\n  data.custom_versions: {mine: [dedup]}\n")},
         "data.custom_versions.mine"),
    Case("columns_unknown_field", {"s.yaml": sweep("  data.columns: {promt: instruction}\n")},
         "Did you mean 'prompt'"),
    Case("columns_not_text", {"s.yaml": sweep("  data.columns: {prompt: 3}\n")}, "'data.columns.prompt'"),
    Case("evasive_mode", {"s.yaml": sweep("  data.evasive_rm: sometimes\n")}, "'data.evasive_rm'"),
    # ---- metrics ---------------------------------------------------------------------------------------------
    Case("search_metric_typo", {"s.yaml": "name: bad\nsearch: {type: optuna, metric: ppo/reward_men, space: "
                                          "{ppo.kl_coef: {loguniform: [0.001, 1.0]}}}\n"},
         "search.metric 'ppo/reward_men' is not a metric a trial reports. Did you mean 'ppo/reward_mean'"),
    Case("scheduler_metric_typo", {"s.yaml": "name: bad\nscheduler: {type: asha, metric: ppo/objective/score}\n"},
         "Did you mean 'ppo/objective/scores'"),
    Case("scheduler_metric_at_end", {"s.yaml": "name: bad\nscheduler: {type: asha, metric: rm/kendall_tau}\n"},
         "scheduler.metric 'rm/kendall_tau' is reported only when a trial ends"),
    Case("search_space_inf", {"s.yaml": "name: bad\nsearch: {type: optuna, space: "
                                        "{ppo.kl_coef: {uniform: [0.0, .inf]}}}\n"}, "search.space.ppo.kl_coef"),
    Case("search_space_log_zero", {"s.yaml": "name: bad\nsearch: {type: optuna, space: "
                                             "{ppo.kl_coef: {loguniform: [0.0, 1.0]}}}\n"}, "needs low > 0"),
    # ---- command lines ---------------------------------------------------------------------------------------
    Case("override_typo", {"s.yaml": sweep()}, "Did you mean 'ppo.total_episodes'", _dry("ppo.total_episodez=8")),
    Case("override_nan", {"s.yaml": sweep()}, "'ppo.kl_coef' must be a finite number", _dry("ppo.kl_coef=.nan")),
    Case("override_no_value", {"s.yaml": sweep()}, "override 'ppo.kl_coef'", _dry("ppo.kl_coef")),
    Case("override_dup_key", {"s.yaml": sweep()}, "appears twice", _dry("data.columns={prompt: a, prompt: b}")),
    Case("trial_index", {"s.yaml": sweep()}, "--index 7 is out of range",
         ["trial", "{d}/s.yaml", "--index", "7", "--out", "{d}/run"]),
    # ---- data: files and rows (sweep --dry-run reads the first rows) ----------------------------------------
    Case("data_source_missing", {"s.yaml": sweep("  data.source: {d}/nowhere\n")}, "data.source: {d}/nowhere"),
    Case("data_source_hub_offline", {"s.yaml": sweep("  data.source: acme/no-such-korean-set\n")},
         "acme/no-such-korean-set", env={"HF_HUB_OFFLINE": "1"}),
    Case("array_missing_comma", data(rm='[\n  {"prompt": "가", "completion_0": "나", "completion_1": "다", '
                                       '"ranking": [0, 1]}\n  {"prompt": "라"}\n]'),
         "rm.jsonl: line 3: expected ',' or ']'"),
    Case("array_double_comma", data(rm=array(RM).replace("},", "},,", 1)),
         f"rm.jsonl: line {line_of(array(RM), '},')}: two commas"),
    Case("array_trailing_comma", data(sft=array(SFT)[:-2] + ",\n]"),
         f"sft.jsonl: line {array(SFT).count(chr(10))}: a comma before ']'"),
    Case("array_not_closed", data(sft=array(SFT)[:-1]), "not closed"),
    Case("jsonl_broken_line", data(rm=jsonl([RM[0], RM[1], '{"prompt": "깨진 줄"'])),
         "rm.jsonl: line 3: invalid JSON"),
    Case("lone_surrogate", data(sft=jsonl([SFT[0], '{"prompt": "질문\\ud800", "completion": "답입니다."}'])),
         "sft.jsonl: line 2: field 'prompt' holds a lone UTF-16 surrogate"),
    Case("lone_surrogate_skipped_no_rows", data(sft=jsonl(['{"prompt": "질문\\udc00", "completion": "답"}'])),
         "no usable sft rows", _dry("data.skip_bad_rows=true")),
    Case("data_not_utf8", data(sft=jsonl(SFT).encode("utf-8") + "{\"prompt\": \"김치\"}\n".encode("cp949")),
         "sft.jsonl: line 5: not UTF-8"),
    Case("missing_ranking", data(rm=jsonl([{k: v for k, v in RM[0].items() if k != "ranking"}])),
         "missing field 'ranking'"),
    Case("ranking_not_permutation", data(rm=jsonl([dict(RM[0], ranking=[0, 0, 1])])), "not a permutation"),
    Case("ranking_too_long", data(rm=jsonl([dict(RM[1], ranking=[0, 1, 2])])), "has 3 entries"),
    Case("answer_not_text", data(sft=jsonl([dict(SFT[0], completion=["목록"])])), "field 'completion' must be a string"),
    Case("answer_empty", data(sft=jsonl([dict(SFT[0], completion="   ")])), "field 'completion' is empty"),
    Case("row_is_a_list", data(sft=jsonl([["김치", "찌개"]])), "line 1: a row must be a JSON object"),
    Case("unknown_shape", data(sft=jsonl([{"text": "무엇", "label": 1}])), "cannot tell the format"),
    Case("one_json_object", data(sft=json.dumps({"data": SFT}, ensure_ascii=False, indent=2)),
         "holds one JSON object, not rows"),
    Case("hh_transcripts_differ", data(rm=jsonl([{"chosen": "\n\nHuman: 가?\n\nAssistant: 네.",
                                                 "rejected": "\n\nHuman: 나?\n\nAssistant: 아니요."}])),
         "'chosen' and 'rejected' transcripts differ"),
    Case("no_rm_file", {"s.yaml": DATA_SWEEP, "data/sft.jsonl": jsonl(SFT)}, "no RM file"),
    Case("sft_file_missing", {"s.yaml": sweep("  data.source: {d}/data\n  data.sft_file: nope.jsonl\n"),
                              "data/rm.jsonl": jsonl(RM)}, "data.sft_file: {d}/data/nope.jsonl does not exist"),
    Case("unknown_extension", {"s.yaml": sweep("  data.source: {d}/data\n  data.rm_file: rm.xlsx\n"),
                               "data/rm.xlsx": "x"}, "unknown file type"),
    Case("parquet_garbage", {"s.yaml": sweep("  data.source: {d}/data/rm.parquet\n"),
                             "data/rm.parquet": b"PAR1 this is not parquet"}, "not a readable Parquet file"),
    Case("csv_cells", {"s.yaml": sweep("  data.source: {d}/data/sft.csv\n"),
                       "data/sft.csv": "prompt,completion\n김치찌개는?,김치를 볶습니다.,덤\n"},
         "sft.csv: line 2: has 3 cells but the header has 2"),
    Case("csv_header_twice", {"s.yaml": sweep("  data.source: {d}/data/sft.csv\n"),
                              "data/sft.csv": "prompt,prompt\n가,나\n"}, "names column(s) ['prompt'] twice"),
    Case("columns_map_missing", {"s.yaml": sweep("  data.source: {d}/data\n  data.columns: {prompt: question_text}\n"),
                                 "data/sft.jsonl": jsonl([{"질문": r["prompt"], "completion": r["completion"]}
                                                          for r in SFT]), "data/rm.jsonl": jsonl(RM)},
         "data.columns maps prompt from column 'question_text', which the first row lacks"),
    Case("bad_row_beyond_preview", data(rm=jsonl(RM * 10 + [dict(RM[0], ranking=[5, 6, 7])])),
         "rm.jsonl: line 31", ["trial", "{d}/s.yaml", "--index", "0", "--out", "{d}/run"]),
    Case("sweep_bad_row_beyond_preview", data(rm=jsonl(RM * 10 + [dict(RM[0], ranking=[5, 6, 7])])),
         "rm.jsonl: line 31", ["sweep", "{d}/s.yaml", "--out", "{d}/run"]),  # a real sweep reads every row first
    Case("trial_missing_data", {"s.yaml": sweep("  data.source: {d}/nowhere\n")}, "data.source: {d}/nowhere",
         ["trial", "{d}/s.yaml", "--index", "0", "--out", "{d}/run"]),
    # ---- data commands -----------------------------------------------------------------------------------------
    Case("stats_missing_source", {}, "data.source: {d}/nowhere", ["data", "stats", "--source", "{d}/nowhere"]),
    Case("stats_bad_columns", {}, "--columns", ["data", "stats", "--columns", "prompt"]),
    Case("stats_bad_version", {}, "'data.version'", ["data", "stats", "--version", "v9"]),
    Case("stats_saved_split", {}, "has no split 'trian' (splits: train). Did you mean 'train'",
         ["data", "stats", "--source", "{d}/saved", "--rm-file", "trian"]),
    Case("prepare_out_exists", {"out/x": "keep me"}, "already exists",
         ["data", "prepare", "--out", "{d}/out"]),
    Case("prepare_bad_data", data(sft=jsonl(['{"prompt": "깨진'])), "sft.jsonl: line 1",
         ["data", "prepare", "--source", "{d}/data", "--out", "{d}/run"]),
    # ---- models ------------------------------------------------------------------------------------------------
    Case("model_missing_path", {"s.yaml": sweep("  model.base_model: ./no/such/model\n")},
         "'./no/such/model' does not exist"),
    Case("model_is_a_file", {"s.yaml": sweep("  model.base_model: {d}/w.safetensors\n"), "w.safetensors": "x"},
         "is a file"),
    Case("model_dir_without_config", {"s.yaml": sweep("  model.base_model: {d}/mdl\n"), "mdl/x.txt": "x"},
         "has no config.json"),
    Case("model_hub_offline", {"s.yaml": sweep("  model.base_model: acme/no-such-model-7b\n")},
         "'acme/no-such-model-7b' is not in the local Hugging Face cache and offline mode is on",
         env={"HF_HUB_OFFLINE": "1"}),
]


def _write(d: Path, files: dict) -> None:
    for rel, content in files.items():
        p = d / rel.replace("{d}", str(d))
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content.replace("{d}", str(d)), encoding="utf-8")


def _saved_dataset(d: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(RM)}).save_to_disk(str(d / "saved"))


def test_the_corpus_is_large_and_distinct():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


def _check(out: str, err: str, rc: int, case: Case, d: Path, cache: Path, before: set) -> None:
    text = err.replace(str(d), "{d}")
    assert rc == 2, f"{case.id}: exit {rc}\n{err}\n{out}"
    assert "Traceback" not in err + out, f"{case.id}: traceback\n{err}"
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= MAX_ERROR_LINES, f"{case.id}: {len(lines)} lines\n{err}"
    assert case.culprit in " ".join(text.split()), f"{case.id}: culprit {case.culprit!r} not named in\n{err}"
    assert not (d / "run").exists(), f"{case.id}: left {sorted(p.name for p in (d / 'run').rglob('*'))}"
    assert set(d.rglob("*")) == before, f"{case.id}: wrote {sorted(set(d.rglob('*')) - before)}"
    assert not cache.exists() or not any(cache.iterdir()), f"{case.id}: wrote into the cache"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_exits_2_names_the_culprit_and_leaves_nothing(case, tmp_path, monkeypatch, capsys):
    d = tmp_path / "case"
    d.mkdir()
    _write(d, case.files)
    if "{d}/saved" in case.argv:
        _saved_dataset(d)
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLHF_ABLATE_CACHE", str(cache))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(d)
    before = set(d.rglob("*"))
    capsys.readouterr()
    try:
        rc = main([a.replace("{d}", str(d)) for a in case.argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    _check(out, err, rc, case, d, cache, before)


# ---------------------------------------------------------------------------------------------------------
# The real entry point, in parallel subprocesses
# ---------------------------------------------------------------------------------------------------------

def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


SUBPROCESS = [
    Case("sub_not_utf8", {"s.yaml": b"name: bad\n# \xea\xb9\n"}, "line 2: not UTF-8"),
    Case("sub_trial_missing_data", {"s.yaml": sweep("  data.source: {d}/nowhere\n")}, "data.source: {d}/nowhere",
         ["trial", "{d}/s.yaml", "--index", "0", "--out", "{d}/run"]),
    # No HF_HUB_OFFLINE, and the hub does not answer: refused after one failed connection, no retries.
    Case("sub_model_hub_unreachable", {"s.yaml": sweep("  model.base_model: acme/no-such-model-7b\n")},
         "could not be reached", env={"HF_ENDPOINT": "http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "",
                                      "HF_HOME": "{d}/hf"}),
    Case("sub_data_hub_unreachable", {"s.yaml": sweep("  data.source: acme/no-such-set\n")},
         "could not be reached", env={"HF_ENDPOINT": "http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "",
                                      "HF_HOME": "{d}/hf"}),
]


def test_entry_point_batch(tmp_path):
    port = _closed_port()
    procs = []
    for case in SUBPROCESS:
        d = tmp_path / case.id
        d.mkdir()
        _write(d, case.files)
        env = {**os.environ, "RLHF_ABLATE_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.update({k: v.replace("{port}", str(port)).replace("{d}", str(d)) for k, v in case.env.items()})
        before = set(d.rglob("*"))
        argv = [a.replace("{d}", str(d)) for a in case.argv]
        t0 = time.monotonic()
        procs.append((case, d, before, t0, subprocess.Popen(
            [sys.executable, "-m", "rlhf_ablate", *argv], cwd=d, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
    for case, d, before, t0, p in procs:
        out, err = p.communicate(timeout=300)
        # the unreachable hub costs one refused connection, not ~25 s of retries per request
        assert "Retrying" not in err, f"{case.id}: retries\n{err}"
        # interpreter start and imports vary with the machine's load; the lines must be ours only
        err_lines = [ln for ln in err.splitlines() if not ln.startswith(("Failed to load CPU gemm_4bit",))]
        _check(out, "\n".join(err_lines), p.returncode, case, d, tmp_path / "cache", before)


# ---------------------------------------------------------------------------------------------------------
# Failing fast, failing visibly
# ---------------------------------------------------------------------------------------------------------

def test_unreachable_hub_fails_within_seconds_even_when_the_connection_hangs(monkeypatch):
    """A firewall that drops packets (or a DNS server that never answers) makes a connection hang instead of
    failing; huggingface_hub then retries for ~25 s per request. The probe gives up after hub.PROBE_TIMEOUT."""
    from rlhf_ablate import hub
    from rlhf_ablate.config import ModelConfig
    from rlhf_ablate.errors import ModelError
    from rlhf_ablate.models.loading import check_base

    calls = []
    release = threading.Event()  # set at the end, so the probe's thread ends with the test and not in a later one

    def hang(*a, **k):
        calls.append(a)
        release.wait(60)
        raise OSError("connection released by the test")

    # Online as far as every spelling goes: huggingface_hub reads HF_HUB_OFFLINE once, at its import, so a test
    # earlier in this process that imported it under HF_HUB_OFFLINE=1 leaves constants.HF_HUB_OFFLINE True.
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", hang)
    hub._probe.cache_clear()
    t0 = time.monotonic()
    with pytest.raises(ModelError, match=r"acme/no-such-model-7b.*could not be reached \(no answer within 3 s\)"):
        check_base(ModelConfig(base_model="acme/no-such-model-7b"))
    # 3 s of probe plus slack for a loaded machine; without the probe's timeout this takes ~25 s or hangs (60 s).
    assert time.monotonic() - t0 < 10.0 and len(calls) == 1
    with pytest.raises(ModelError):  # one probe per process, whatever the number of model configs
        check_base(ModelConfig(base_model="acme/other-model-7b"))
    assert len(calls) == 1
    release.set()
    hub._probe.cache_clear()


def test_a_data_failure_in_a_sweep_trial_leaves_no_tracking_run_or_cache_entry(tmp_path, monkeypatch):
    """The Ray/SLURM path (run_trial_in_sweep) records the failure in result.json, but the data is read before the
    tracker starts: no W&B run, no stage lock, no executions.jsonl."""
    from rlhf_ablate.config.sweep import expand, load_sweep
    from rlhf_ablate.run.trial import run_trial_in_sweep

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("RLHF_ABLATE_CACHE", str(tmp_path / "cache"))
    s = tmp_path / "s.yaml"
    s.write_text(sweep(f"  data.source: {tmp_path}/nowhere\n"), encoding="utf-8")
    spec = load_sweep(s)
    run = tmp_path / "run"
    r = run_trial_in_sweep(spec, expand(spec)[0], run)
    assert r["status"] == "failed" and r["error"]["stage"] == "data" and r["error"]["type"] == "DataError"
    tdir = run / "trials" / r["trial_id"]
    # attempts.jsonl counts the start (run/result.py: begin_attempt); no tracking run, lock or stage artifact
    assert sorted(p.name for p in tdir.iterdir()) == ["attempts.jsonl", "error.txt", "result.json"]
    assert sorted(p.name for p in run.iterdir()) == ["trials"]  # no wandb/
    assert not (tmp_path / "cache").exists()


def test_trial_prints_why_it_failed(tmp_path, monkeypatch, capsys):
    """`trial` exits 1 for a failed trial and names the error class, the stage, the message and the traceback."""
    import rlhf_ablate.run.trial as trial_mod
    from rlhf_ablate.rundir import new_result, write_result

    def failing(spec, trial, run_dir, **kw):
        assert kw["data"] is not None  # the CLI read the data before starting the trial
        r = new_result(trial.trial_id, sweep=spec.name, index=trial.index, seed=trial.seed,
                       config=trial.config.flat(), axes=trial.axes)
        r.update(status="failed", error={"type": "TrialFailed", "stage": "ppo",
                                         "message": "ppo: KL blow-up at step 3: mean KL 61.20 nats > ppo.kl_stop 50"})
        write_result(run_dir, r)
        (Path(run_dir) / "trials" / trial.trial_id / "error.txt").write_text("Traceback ...", encoding="utf-8")
        return r

    monkeypatch.setattr(trial_mod, "run_trial_in_sweep", failing)
    s = tmp_path / "s.yaml"
    s.write_text(sweep(), encoding="utf-8")
    rc = main(["trial", str(s), "--index", "0", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "trial 0 (t" in err and "failed at stage ppo: TrialFailed: ppo: KL blow-up at step 3" in err
    assert f"traceback: {tmp_path / 'run'}/trials/" in err and err.strip().endswith("error.txt")
