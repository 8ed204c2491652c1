"""Data layer: readers, records, versions (cleaning), splits, bundle, stats and prepare."""

from __future__ import annotations

import json
import sys
import statistics
import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest

from rlhf_ablate.config import DataConfig, trial_config_from_overrides
from rlhf_ablate.data import SAMPLE_DIR, corpus_texts, load_data, pairs
from rlhf_ablate.data import prepare as data_cli
from rlhf_ablate.cli import build_parser, cmd_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import make_sample  # noqa: E402 - tools/ is not a package: the sample generator is a development script
from rlhf_ablate.data.readers import detect_format, prompt_id, read_file
from rlhf_ablate.data.records import RankedGroup
from rlhf_ablate.data.splits import prompt_key
from rlhf_ablate.data.stats import compute_stats, format_stats
from rlhf_ablate.data.dedup import near_duplicate_pairs
from rlhf_ablate.data.versions import FILTERS, dedup_text as _dedup_text, hangul_ratio, is_evasive, is_loop
from rlhf_ablate.errors import ConfigError, DataError


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def v1():
    return load_data(DataConfig(version="v1"))


@pytest.fixture(scope="module")
def v2():
    return load_data(DataConfig(version="v2"))


# ---------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_pairs_count_is_k_choose_2_and_better_first(k):
    g = RankedGroup("g", "p", tuple(f"a{r}" for r in range(k, 0, -1)), tuple(range(k, 0, -1)))
    ps = g.pairs()
    assert len(ps) == k * (k - 1) // 2
    for p in ps:  # answer text a{r} has rank r: chosen must have the smaller rank
        assert int(p.chosen[1:]) < int(p.rejected[1:])
    assert g.best == "a1"


def test_ties_give_no_pair():
    g = RankedGroup("g", "p", ("x", "y", "z"), (1, 1, 2))
    assert {(p.chosen, p.rejected) for p in g.pairs()} == {("x", "z"), ("y", "z")}
    assert len(pairs([g, g])) == 4


# ---------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------

def test_kochatgpt_ranking_lists_indices_best_first(tmp_path):
    # The first row of the real kochatgpt_2_RM.jsonl: completion_1 is ChatGPT's, completion_2 davinci's and
    # completion_0 ada's English text, with ranking [1, 2, 0] (indices ordered best first).
    f = write_jsonl(tmp_path / "rm.jsonl", [{"prompt": "번디는 누구에게 말했나?",
                                             "completion_0": "Allow me to answer your question.",
                                             "completion_1": "라이언에게 말했다.",
                                             "completion_2": "번디는 면담 때 밝혔다.", "ranking": [1, 2, 0]}])
    g = read_file(f, "rm").records[0]
    assert dict(zip(g.answers, g.ranks)) == {"라이언에게 말했다.": 1, "번디는 면담 때 밝혔다.": 2,
                                             "Allow me to answer your question.": 3}
    assert [(p.chosen, p.rejected) for p in g.pairs()][0] == ("라이언에게 말했다.", "번디는 면담 때 밝혔다.")


def test_json_array_and_jsonl_give_the_same_records(tmp_path):
    rows = [{"prompt": f"질문 {i}", "completion": f"답변입니다 {i}"} for i in range(3)]
    a = tmp_path / "a.jsonl"  # a JSON array under a .jsonl name, with a BOM, as KoChatGPT ships it
    a.write_text("\ufeff" + json.dumps(rows, ensure_ascii=False, indent=4), encoding="utf-8")
    b = write_jsonl(tmp_path / "b.jsonl", rows)
    assert read_file(a, "sft").records == read_file(b, "sft").records
    assert len(read_file(a, "sft").records) == 3


def test_json_array_bad_row_names_its_line(tmp_path):
    rows = [{"prompt": "가", "completion": "나입니다"}, {"prompt": "다"}]
    f = tmp_path / "sft.json"
    f.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    line = f.read_text(encoding="utf-8").split("\n").index("  {", 2) + 1  # the second object starts here
    with pytest.raises(DataError, match=rf"sft.json: line {line}: missing field 'completion'"):
        read_file(f, "sft")


BAD_RM_ROWS = [
    ('{"prompt": "질문", "completion_0": "가요", "completion_1": "나요", "ranking": [0, 1]', "invalid JSON"),
    ({"completion_0": "가요", "completion_1": "나요", "ranking": [0, 1]}, "missing field 'prompt'"),
    ({"prompt": "질문", "completion_0": 3, "completion_1": "나요", "ranking": [0, 1]}, "must be a string"),
    ({"prompt": "질문", "completion_0": "  ", "completion_1": "나요", "ranking": [0, 1]}, "is empty"),
    ({"prompt": "질문", "completion_0": "가요", "completion_1": "나요", "ranking": [0, 0]}, "not a permutation"),
    ({"prompt": "질문", "completion_0": "가요", "completion_1": "나요", "ranking": [0, 1, 2]}, "has 3 entries"),
    ({"prompt": "질문", "completion_0": "가요", "completion_1": "나요"}, "missing field 'ranking'"),
]


@pytest.mark.parametrize("bad,reason", BAD_RM_ROWS)
def test_malformed_row_names_file_and_line(tmp_path, bad, reason):
    good = {"prompt": "좋은 질문", "completion_0": "가요", "completion_1": "나요", "ranking": [1, 0]}
    f = write_jsonl(tmp_path / "rm.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as e:
        read_file(f, "rm")
    assert str(f) in str(e.value) and "line 3:" in str(e.value) and reason in str(e.value)
    res = read_file(f, "rm", skip_bad_rows=True)
    assert (len(res.records), res.bad_rows) == (3, 1)
    assert "line 3" in res.bad_reasons[0]


def test_skip_bad_rows_counts_reach_the_bundle_report(tmp_path):
    for name in ("sft", "rm", "ppo", "eval"):
        (tmp_path / f"{name}.jsonl").write_bytes((SAMPLE_DIR / f"{name}.jsonl").read_bytes())
    with open(tmp_path / "sft.jsonl", "a", encoding="utf-8") as f:
        f.write('{"prompt": "깨진 줄"\n{"prompt": "답 없음"}\n')
    with pytest.raises(DataError, match="sft.jsonl: line"):
        load_data(DataConfig(source=str(tmp_path)))
    b = load_data(DataConfig(source=str(tmp_path), skip_bad_rows=True))
    assert b.report["bad_rows"] == 2 and b.report["files"]["sft"]["bad_rows"] == 2
    assert len(b.report["files"]["sft"]["bad_examples"]) == 2


@pytest.mark.parametrize("row,fmt", [
    ({"prompt": "p", "completion": "c"}, "kochatgpt"),
    ({"question": "q", "answer": {"contents": "a"}}, "aihub"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "hf_pref"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "hh"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages"),
    ({"text": "t"}, None),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_unknown_shape_names_file_fields_and_expected(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"text": "무엇", "label": 1}])
    with pytest.raises(DataError) as e:
        read_file(f, "sft")
    msg = str(e.value)
    assert str(f) in msg and "label, text" in msg and "{prompt, completion}" in msg


def test_format_that_cannot_serve_the_kind(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="hf_pref.*cannot be used as sft data"):
        read_file(f, "sft")


def test_hh_prompt_is_the_shared_prefix(tmp_path):
    multi = "\n\nHuman: 안녕?\n\nAssistant: 안녕하세요.\n\nHuman: 김치찌개 끓이는 법?\n\nAssistant:"
    f = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: 여권은 어디서 만드나요?\n\nAssistant: 구청에서 신청합니다.",
         "rejected": "\n\nHuman: 여권은 어디서 만드나요?\n\nAssistant: 몰라."},
        {"chosen": multi + " 김치를 먼저 볶습니다.", "rejected": multi + " 싫어."},
    ])
    g1, g2 = read_file(f, "rm").records
    assert (g1.prompt, g1.answers, g1.ranks) == ("여권은 어디서 만드나요?", ("구청에서 신청합니다.", "몰라."), (1, 2))
    assert g2.prompt == "Human: 안녕?\nAssistant: 안녕하세요.\nHuman: 김치찌개 끓이는 법?"
    assert g2.answers == ("김치를 먼저 볶습니다.", "싫어.")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: x",
                                                "rejected": "\n\nHuman: b\n\nAssistant: y"}])
    with pytest.raises(DataError, match="line 1: 'chosen' and 'rejected' transcripts differ"):
        read_file(bad, "rm")


def test_hf_pref_aihub_and_messages_readers(tmp_path):
    hf = read_file(write_jsonl(tmp_path / "hf.jsonl", [{"prompt": "질문", "chosen": "좋아요", "rejected": "싫어"}]),
                   "rm").records[0]
    assert (hf.answers, hf.ranks) == (("좋아요", "싫어"), (1, 2))
    aihub = write_jsonl(tmp_path / "aihub.jsonl", [
        {"data_id": 17, "question": "질문", "answer01": {"contents": "셋째"}, "answer02": "첫째",
         "answer03": "둘째", "ranking": [3, 1, 2]},
        {"question": "질문2", "answer01": "가", "answer02": "나", "rank01": 2, "rank02": 1},
    ])
    g, h = read_file(aihub, "rm").records
    assert (g.data_id, g.best, g.ranks) == ("17", "첫째", (3, 1, 2))
    assert h.best == "나"
    sft = read_file(write_jsonl(tmp_path / "a_sft.jsonl", [{"question": "q", "answer": {"contents": "a"}}]), "sft")
    assert sft.records[0].completion == "a"
    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "친절하게"}, {"role": "user", "content": "수영은?"},
        {"role": "assistant", "content": "호흡부터 배웁니다."}]}])
    m = read_file(msgs, "sft").records[0]
    assert (m.prompt, m.completion) == ("수영은?", "호흡부터 배웁니다.")
    with pytest.raises(DataError, match="line 1: the last message must be the assistant"):
        read_file(write_jsonl(tmp_path / "m2.jsonl", [{"messages": [{"role": "user", "content": "q"}]}]), "sft")


def test_data_id_from_row_or_normalised_prompt_hash(tmp_path):
    p = "김치찌개는 어떻게 끓이나요?"
    f = write_jsonl(tmp_path / "ppo.jsonl", [{"prompt": p}, {"prompt": unicodedata.normalize("NFD", p) + "  "},
                                             {"id": "row-9", "prompt": p}])
    a, b, c = read_file(f, "ppo").records
    assert a.data_id == b.data_id == prompt_id(p) and c.data_id == "row-9"


# ---------------------------------------------------------------------------------------------------------
# versions on the bundled sample
# ---------------------------------------------------------------------------------------------------------

def _texts(b):
    for x in b.sft_train:
        yield "sft_train", x.prompt, [x.completion]
    for g in b.rm_train:
        yield "rm_train", g.prompt, list(g.answers)
    for x in b.ppo_prompts:
        yield "ppo_prompts", x.prompt, []


def test_v1_holds_the_planted_dirt(v1):
    texts = list(_texts(v1))
    assert any(unicodedata.normalize("NFC", t) != t for _, p, a in texts for t in [p, *a])
    assert any("  " in t or "\t" in t for _, p, a in texts for t in [p, *a])
    assert any(is_evasive(x.completion) for x in v1.sft_train)
    assert any(is_loop(x.completion) for x in v1.sft_train)
    assert any(hangul_ratio(x.completion) < 0.5 for x in v1.sft_train)
    assert any(hangul_ratio(x.prompt) < 0.5 for x in v1.ppo_prompts)
    assert any(is_evasive(g.best) for g in v1.rm_train)


@pytest.mark.parametrize("split,rules", [
    ("sft_train", ["dedup_exact", "dedup_near", "length_outliers", "evasive", "garbage"]),
    ("rm_train", ["dedup_exact", "dedup_near", "length_outliers", "evasive", "garbage"]),
    ("ppo_prompts", ["dedup_exact", "dedup_near", "length_outliers", "garbage"]),
])
def test_v2_drops_rows_under_every_rule(v2, split, rules):
    for rule in rules:
        assert v2.report["dropped"][rule][split] > 0, (rule, split)
    assert v2.report["changed"]["nfc"][split] > 0
    c = v2.report["counts"][split]
    assert c["after_eval_overlap"] - c["after_cleaning"] == sum(v2.report["dropped"][r][split] for r in FILTERS)


def test_v2_removes_the_dirt(v1, v2):
    for _, p, answers in _texts(v2):
        for t in [p, *answers]:
            assert unicodedata.normalize("NFC", t) == t and "  " not in t and "\t" not in t
    assert not any(is_evasive(x.completion) or is_loop(x.completion) or hangul_ratio(x.completion) < 0.5
                   for x in v2.sft_train)
    assert not any(hangul_ratio(x.prompt) < 0.5 for x in v2.ppo_prompts)
    assert not any(is_evasive(g.best) or hangul_ratio(g.best) < 0.5 for g in v2.rm_train)
    for split in ("sft_train", "rm_train", "ppo_prompts"):
        keys = [_dedup_text(r) for r in getattr(v2, split)]
        assert len(keys) == len(set(keys)) and near_duplicate_pairs(keys) == []
        assert near_duplicate_pairs([_dedup_text(r) for r in getattr(v1, split)])  # there were some
    v1_max = max(len(x.completion.split()) for x in v1.sft_train)
    assert max(len(x.completion.split()) for x in v2.sft_train) < v1_max / 3
    # dispreferred dirt stays: loops and English answers ranked last are the RM's negatives
    assert any(is_loop(a) for g in v2.rm_train for a, r in zip(g.answers, g.ranks) if r > 1)


def test_custom_version_and_filter_names_are_validated():
    cfg = DataConfig(version="dedup_only", custom_versions={"dedup_only": ["nfc", "dedup_exact"]})
    b = load_data(cfg)
    assert set(b.report["dropped"]) >= {"dedup_exact"} and b.report["filters"] == ["nfc", "dedup_exact"]
    assert b.report["dropped"]["dedup_exact"]["sft_train"] > 0
    assert "evasive" not in b.report["filters"]
    with pytest.raises(ConfigError, match="unknown filter 'dedup_exakt'.*dedup_exact"):
        trial_config_from_overrides({"data.version": "x", "data.custom_versions": {"x": ["dedup_exakt"]}})


# ---------------------------------------------------------------------------------------------------------
# splits and the bundle
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_no_prompt_in_both_train_and_eval(version):
    b = load_data(DataConfig(version=version))
    eval_prompts = {prompt_key(x.prompt) for x in b.rm_eval + b.eval}
    for split in ("sft_train", "rm_train", "ppo_prompts"):
        assert not {prompt_key(x.prompt) for x in getattr(b, split)} & eval_prompts, split
    assert b.report["eval_overlap_removed"]["sft_train"] > 0  # RM eval prompts were taken out of SFT


def test_split_is_stable_across_versions_and_moves_with_split_seed(v1, v2):
    ids = lambda gs: {g.data_id for g in gs}  # noqa: E731
    assert ids(v2.rm_eval) <= ids(v1.rm_eval) and ids(v2.rm_train) <= ids(v1.rm_train)
    assert not ids(v1.rm_eval) & ids(v1.rm_train)
    other = load_data(DataConfig(version="v1", split_seed=1))
    assert ids(other.rm_eval) != ids(v1.rm_eval)
    n = len(v1.rm_train) + len(v1.rm_eval)
    assert 0.1 < len(v1.rm_eval) / n < 0.3  # eval_fraction 0.2


def test_fingerprint_is_content_and_changes_with_version(v1, v2):
    assert v1.fingerprint != v2.fingerprint
    assert load_data(DataConfig(version="v2")).fingerprint == v2.fingerprint
    assert load_data(DataConfig(version="v2", max_sft=10)).fingerprint != v2.fingerprint


def test_caps_are_deterministic_and_keep_file_order(v2):
    a = load_data(DataConfig(version="v2", max_sft=50, max_rm_groups=20, max_ppo_prompts=7, max_eval=5))
    b = load_data(DataConfig(version="v2", max_sft=50, max_rm_groups=20, max_ppo_prompts=7, max_eval=5))
    assert (len(a.sft_train), len(a.rm_train), len(a.ppo_prompts), len(a.eval)) == (50, 20, 7, 5)
    assert a.sft_train == b.sft_train
    order = {id(x): i for i, x in enumerate(v2.sft_train)}
    pos = [v2.sft_train.index(x) for x in a.sft_train]
    assert pos == sorted(pos) and order


def test_source_dir_with_kochatgpt_names_and_missing_files(tmp_path):
    (tmp_path / "kochatgpt_1_SFT.jsonl").write_bytes((SAMPLE_DIR / "sft.jsonl").read_bytes())
    with pytest.raises(DataError, match=r"no RM file; tried kochatgpt_2_RM\.\*, rm\.\*"):
        load_data(DataConfig(source=str(tmp_path)))
    (tmp_path / "kochatgpt_2_RM.jsonl").write_bytes((SAMPLE_DIR / "rm.jsonl").read_bytes())
    b = load_data(DataConfig(source=str(tmp_path), version="v2"))
    assert b.report["eval_source"] == "held out from the SFT file" and b.eval
    assert b.report["ppo_source"] == "prompts of the SFT file" and b.ppo_prompts
    assert not {prompt_key(x.prompt) for x in b.sft_train} & {prompt_key(x.prompt) for x in b.eval}
    with pytest.raises(DataError, match=r"data.ppo_file: .*nope.jsonl does not exist"):
        load_data(DataConfig(source=str(tmp_path), ppo_file="nope.jsonl"))


def test_bundled_sample_shape_and_corpus():
    rm = read_file(SAMPLE_DIR / "rm.jsonl", "rm").records
    assert len(rm) >= 120 and all(len(g.answers) >= 3 for g in rm) and any(len(g.answers) == 4 for g in rm)
    assert 300 <= len(read_file(SAMPLE_DIR / "sft.jsonl", "sft").records) <= 400
    ev = read_file(SAMPLE_DIR / "eval.jsonl", "eval").records
    assert 40 <= len(ev) <= 60 and all(x.reference for x in ev)
    train_prompts = {prompt_key(x.prompt) for k in ("sft", "rm", "ppo")
                     for x in read_file(SAMPLE_DIR / f"{k}.jsonl", k).records}
    assert not train_prompts & {prompt_key(x.prompt) for x in ev}
    corpus = corpus_texts()
    assert ev[0].reference in corpus and rm[0].answers[-1] in corpus


def test_bundled_sample_is_the_generator_output():
    # The committed files are exactly what `python tools/make_sample.py` writes (regenerate, commit).
    built = make_sample.build()
    for name, rows in built.items():
        lines = (SAMPLE_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows, name


def _hangul(text: str) -> int:
    return sum("가" <= c <= "힣" for c in unicodedata.normalize("NFC", text))


def _clean(text: str) -> bool:
    return not (is_evasive(text) or is_loop(text) or hangul_ratio(text) < 0.5)


@pytest.fixture(scope="module")
def sample_meta():
    meta: list = []
    make_sample.build(meta=meta)
    for m in meta:  # answers best first, NFC (plant_rm turns a few rows to NFD in place)
        m["best_first"] = [unicodedata.normalize("NFC", m["row"][f"completion_{i}"]) for i in m["row"]["ranking"]]
    return meta


def test_sample_has_close_calls_and_bounded_annotator_noise(sample_meta, v2):
    n = len(sample_meta)
    close = [m for m in sample_meta if m["polite"] > 1]
    noisy = [m for m in close if m["swapped"] is not None]
    assert 0.4 <= len(close) / n <= 0.6 and 0.10 <= len(noisy) / n <= 0.15
    assert all(m["swapped"] is None for m in sample_meta if m["polite"] == 1)  # noise only among close calls
    easy = [m for m in sample_meta if m["polite"] == 1]
    assert sum(not _clean(m["best_first"][-1]) or _hangul(m["best_first"][-1]) < 15 for m in easy) > len(easy) / 2
    for m in close:
        polite, rest = m["best_first"][:m["polite"]], m["best_first"][m["polite"]:]
        assert len(set(polite)) == len(polite)
        for a in polite:  # both (or all three) are complete, polite, short Korean answers
            assert _clean(a) and a.endswith(("니다.", "요.")) and 15 <= _hangul(a) <= 60, a
        lengths = [len(a) for a in polite]
        assert max(lengths) < 2 * min(lengths)  # a near miss is not told apart by its length
    # the annotator-noise groups are label noise, not dirt: v2 keeps every one of them
    kept = {prompt_key(g.prompt) for g in v2.rm_train + v2.rm_eval}
    assert all(prompt_key(m["row"]["prompt"]) in kept for m in noisy)
    # the default held-out split gets close calls and noise too (the generator stratifies by it)
    held = {prompt_key(g.prompt) for g in v2.rm_eval}
    held_meta = [m for m in sample_meta if prompt_key(m["row"]["prompt"]) in held]
    assert 0.3 <= sum(m["polite"] > 1 for m in held_meta) / len(held_meta) <= 0.7
    assert any(m["swapped"] is not None for m in held_meta)


def test_near_misses_rank_below_the_concrete_answer_unless_swapped(sample_meta):
    own = {it["prompt"]: it["completion"] for it in make_sample.items()}
    swapped_top = 0
    for m in sample_meta:
        answer = own[unicodedata.normalize("NFC", m["row"]["prompt"])]
        top = 1 if m["swapped"] == 0 else 0  # where the question's own concrete answer sits
        assert m["best_first"][top] == answer and answer not in m["best_first"][:top]
        swapped_top += top
    assert swapped_top > 0  # some noise reaches rank 1 (a polite near miss ranked best)


# ---------------------------------------------------------------------------------------------------------
# stats and prepare
# ---------------------------------------------------------------------------------------------------------

def test_stats_report_length_by_rank(v2):
    s = compute_stats(v2)
    groups = v2.rm_train + v2.rm_eval
    rank1 = statistics.mean(len(g.best) for g in groups)
    assert s["length_by_rank"]["by_rank"][1]["mean_chars"] == round(rank1, 2)
    text = format_stats(s)
    assert f"{round(rank1, 2)}" in text and "length-bias check" in text and "prefer the longer answer" in text
    # the sample is built so that length is not the preference signal
    assert s["length_by_rank"]["rank1_longest_share"] < 0.5
    assert s["duplicates"]["sft_train"] == {"exact": 0, "near": 0}


def _parse(argv):
    return build_parser().parse_args(argv)


def test_cli_stats_json(capsys):
    assert cmd_data(_parse(["data", "stats", "--version", "v1", "--json"])) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["duplicates"]["sft_train"]["exact"] > 0 and s["version"] == "v1"


def test_prepare_round_trips_and_is_atomic(tmp_path, monkeypatch, v2):
    out = tmp_path / "v2"
    assert cmd_data(_parse(["data", "prepare", "--version", "v2", "--out", str(out)])) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cleaning_report.json", "eval.jsonl", "ppo.jsonl", "rm.jsonl",
                                                     "sft.jsonl"]
    rep = json.loads((out / "cleaning_report.json").read_text(encoding="utf-8"))
    assert rep["dropped"]["dedup_exact"]["sft_train"] > 0
    again = load_data(DataConfig(source=str(out), version="v1"))
    assert again.sft_train == v2.sft_train and again.eval == v2.eval
    canon = lambda gs: [(g.data_id, g.prompt, sorted(zip(g.ranks, g.answers))) for g in gs]  # noqa: E731
    assert canon(again.rm_train) == canon(v2.rm_train)  # prepare writes answers in rank order

    with pytest.raises(DataError, match="already exists"):
        cmd_data(_parse(["data", "prepare", "--out", str(out)]))
    def failing(path, rows):  # sft.jsonl and rm.jsonl get written, then the disk fills up
        if Path(path).name == "ppo.jsonl":
            raise OSError("disk full")
        Path(path).write_text("partial", encoding="utf-8")

    monkeypatch.setattr(data_cli, "_jsonl", failing)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OSError):
        cmd_data(_parse(["data", "prepare", "--out", str(out), "--overwrite"]))
    assert sorted(p.name for p in out.iterdir()) == before  # the old version is untouched
    assert (out / "sft.jsonl").read_text(encoding="utf-8") != "partial"
    new = tmp_path / "new"
    with pytest.raises(OSError):
        cmd_data(_parse(["data", "prepare", "--out", str(new)]))
    assert not new.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["v2"]  # no temp dir left
