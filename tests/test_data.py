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


# ---------------------------------------------------------------------------------------------------------
# reading: JSON arrays (linear, strict), surrogates, gzip, the KoChatGPT SFT variant, column maps
# ---------------------------------------------------------------------------------------------------------

def test_json_array_keeps_line_numbers_deep_into_a_large_file(tmp_path):
    rows = [{"prompt": f"질문 {i}번은 무엇인가요?", "completion": f"{i}번 답입니다."} for i in range(20000)]
    rows[19990] = {"prompt": "마지막 근처 질문"}
    f = tmp_path / "sft.jsonl"
    text = json.dumps(rows, ensure_ascii=False, indent=2)
    f.write_text(text, encoding="utf-8")
    line = text[:text.index('"마지막 근처 질문"')].count("\n")  # the object's '{' is on the line before its field
    with pytest.raises(DataError, match=rf"sft.jsonl: line {line}: missing field 'completion'"):
        read_file(f, "sft")


@pytest.mark.parametrize("text,problem", [
    ('[{"prompt": "가", "completion": "나"} {"prompt": "다", "completion": "라"}]', "missing comma"),
    ('[{"prompt": "가", "completion": "나"},, {"prompt": "다", "completion": "라"}]', "two commas"),
    ('[{"prompt": "가", "completion": "나"},]', "trailing comma"),
    ('[{"prompt": "가", "completion": "나"}', "not closed"),
    ('[{"prompt": "가", "completion": "나"}] []', "extra data"),
])
def test_json_array_syntax_errors_are_never_skipped(tmp_path, text, problem):
    f = tmp_path / "sft.json"
    f.write_text(text, encoding="utf-8")
    for skip in (False, True):  # an array cannot be resynchronised after a syntax error
        with pytest.raises(DataError, match=r"sft.json: line 1: .*" + problem.split()[0]):
            read_file(f, "sft", skip_bad_rows=skip)


def test_lone_surrogate_is_a_bad_row_and_skippable(tmp_path):
    f = tmp_path / "ppo.jsonl"
    f.write_text('{"prompt": "좋은 질문입니다"}\n{"prompt": "깨진 \\ud800 질문"}\n{"prompt": "이모지 \\ud83d\\ude00 괜찮아요"}\n',
                 encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: field 'prompt' holds a lone UTF-16 surrogate"):
        read_file(f, "ppo")
    res = read_file(f, "ppo", skip_bad_rows=True)
    assert [r.prompt for r in res.records] == ["좋은 질문입니다", "이모지 😀 괜찮아요"] and res.bad_rows == 1
    for r in res.records:
        r.prompt.encode("utf-8")  # what used to raise deep inside a stage


def test_gzipped_json_lines(tmp_path):
    import gzip

    f = tmp_path / "rm.jsonl.gz"
    f.write_bytes(gzip.compress(json.dumps({"prompt": "질문", "chosen": "좋은 답입니다", "rejected": "싫어"},
                                           ensure_ascii=False).encode("utf-8")))
    assert read_file(f, "rm").records[0].answers == ("좋은 답입니다", "싫어")


def test_kochatgpt_sft_variant_with_numbered_completions(tmp_path):
    f = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "라면을 맛있게 끓이는 법은?", "completion_0": "물이 끓으면 면과 스프를 넣고 4분 끓입니다.",
         "completion_1": "파와 달걀을 넣으면 더 맛있습니다.", "completion_2": "찬물에 면을 헹구지 마세요."},
        {"prompt": "비빔밥 재료는?", "completion_0": "몰라요.", "completion_1": "밥, 나물, 고추장, 달걀입니다.",
         "ranking": [1, 0]},
    ])
    recs = read_file(f, "sft").records
    assert [r.completion for r in recs[:3]] == ["물이 끓으면 면과 스프를 넣고 4분 끓입니다.",
                                                "파와 달걀을 넣으면 더 맛있습니다.", "찬물에 면을 헹구지 마세요."]
    assert len({r.data_id for r in recs[:3]}) == 1  # one id: the three stay on the same side of every split
    assert recs[3].completion == "밥, 나물, 고추장, 달걀입니다." and len(recs) == 4  # ranked: the best answer
    # as RM data the unranked variant is refused with the way out
    with pytest.raises(DataError, match="missing field 'ranking' .*use the file as data.sft_file"):
        read_file(f, "rm")


def test_column_map_reads_other_schemas(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "제주도 여행 코스를 추천해 줘",
                                                 "output": "첫날은 성산일출봉, 둘째 날은 한라산을 추천합니다."}])
    cols = {"prompt": "instruction", "completion": "output"}
    r = read_file(alpaca, "sft", columns=cols).records[0]
    assert (r.prompt, r.completion) == ("제주도 여행 코스를 추천해 줘", "첫날은 성산일출봉, 둘째 날은 한라산을 추천합니다.")
    pairs_ = write_jsonl(tmp_path / "p.jsonl", [{"question": "김장은 언제 하나요?", "response_j": "보통 11월 말에 합니다.",
                                                 "response_k": "아무 때나"}])
    g = read_file(pairs_, "rm", columns={"prompt": "question", "chosen": "response_j",
                                         "rejected": "response_k"}).records[0]
    assert (g.prompt, g.best, g.ranks) == ("김장은 언제 하나요?", "보통 11월 말에 합니다.", (1, 2))
    with pytest.raises(ConfigError, match=r"data.columns' maps onto 'promt'.*Did you mean 'prompt'"):
        trial_config_from_overrides({"data.columns": {"promt": "q"}})


# ---------------------------------------------------------------------------------------------------------
# sources: Parquet, CSV, save_to_disk, a Hub id from the local cache, Hugging Face directory layouts
# ---------------------------------------------------------------------------------------------------------

PREF_ROWS = [{"q": f"{topic}에 대해 알려 주세요.", "good": f"{topic}은(는) {desc} 자세히 설명해 드릴게요.",
              "bad": "몰라요."} for topic, desc in [
    ("광합성", "식물이 빛으로 양분을 만드는 과정입니다."), ("중력", "물체가 서로 끌어당기는 힘입니다."),
    ("금리", "돈을 빌리거나 맡길 때 붙는 이자의 비율입니다."), ("태양계", "태양과 그 둘레를 도는 천체의 모임입니다."),
    ("미세먼지", "공기 중에 떠다니는 아주 작은 먼지입니다."), ("분리수거", "쓰레기를 종류별로 나누어 버리는 일입니다."),
    ("신용 점수", "금융 거래의 믿음을 숫자로 나타낸 것입니다."), ("화산", "땅속 마그마가 분출하는 산입니다."),
    ("세포", "생물을 이루는 가장 작은 단위입니다."), ("환전", "다른 나라 돈으로 바꾸는 일입니다.")]]
PREF_COLUMNS = {"prompt": "q", "chosen": "good", "rejected": "bad"}


def _stats_cli(capsys, *argv) -> dict:
    from rlhf_ablate.cli import main

    assert main(["data", "stats", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_stats_on_a_parquet_file_with_a_column_map(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(PREF_ROWS), f)
    s = _stats_cli(capsys, "--source", str(f), "--columns", "prompt=q,chosen=good,rejected=bad")
    assert s["ranks"]["pairs"] == len(PREF_ROWS)
    assert s["cleaning"]["sft_source"] == "rank-1 answers of the RM data"  # preference data alone: SFT on chosen
    assert s["counts"]["sft_train"]["read"] == len(PREF_ROWS) and s["cleaning"]["tables"]["rm"].startswith("split")


def test_stats_on_a_save_to_disk_dataset_with_a_column_map(tmp_path, capsys):
    import datasets

    sft = [{"q": r["q"], "answer_text": r["good"]} for r in PREF_ROWS]
    datasets.DatasetDict({"sft": datasets.Dataset.from_list(sft), "rm": datasets.Dataset.from_list(PREF_ROWS)}
                         ).save_to_disk(str(tmp_path / "ds"))
    s = _stats_cli(capsys, "--source", str(tmp_path / "ds"),
                   "--columns", "prompt=q,completion=answer_text,chosen=good,rejected=bad")  # one map, both splits
    assert s["cleaning"]["sft_source"] == "file" and s["cleaning"]["tables"]["sft"] == "split 'sft'"
    assert s["ranks"]["pairs"] == len(PREF_ROWS) and s["counts"]["sft_train"]["read"] > 0


def test_save_to_disk_splits_named_by_kind(tmp_path):
    import datasets

    sft = [{"q": r["q"], "completion": r["good"]} for r in PREF_ROWS]
    datasets.DatasetDict({"sft": datasets.Dataset.from_list(sft), "rm": datasets.Dataset.from_list(PREF_ROWS)}
                         ).save_to_disk(str(tmp_path / "ds"))
    b = load_data(DataConfig(source=str(tmp_path / "ds"), columns=PREF_COLUMNS))
    assert b.report["sft_source"] == "file" and b.report["tables"]["sft"] == "split 'sft'"
    assert len(b.rm_train) + len(b.rm_eval) == len(PREF_ROWS)
    one = datasets.Dataset.from_list(PREF_ROWS)
    one.save_to_disk(str(tmp_path / "one"))  # a single Dataset: preference rows -> RM, SFT from its best answers
    b1 = load_data(DataConfig(source=str(tmp_path / "one"), columns=PREF_COLUMNS))
    assert b1.report["sft_source"] == "rank-1 answers of the RM data"


def test_csv_file_with_ranking_cells(tmp_path):
    import csv

    f = tmp_path / "rm.csv"
    with open(f, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "completion_0", "completion_1", "completion_2", "ranking"])
        w.writerow(["떡볶이는 어떻게 만드나요?", "그냥 사 드세요.", "떡과 어묵을 고추장 양념에 졸입니다.\n약한 불이 좋습니다.",
                    "Tteokbokki is good.", "[1, 0, 2]"])
        w.writerow(["잡채 당면은 얼마나 삶나요?", "6분 정도 삶은 뒤 찬물에 헹굽니다.", "대충", "오래", "[0, 2, 1]"])
    g = read_file(f, "rm").records
    assert g[0].best == "떡과 어묵을 고추장 양념에 졸입니다.\n약한 불이 좋습니다."  # a quoted cell with a line break
    assert g[1].ranks == (1, 3, 2)
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,completion_0,completion_1,ranking\n질문,가,나,"[0, 1]"\n질문,가,나,"[0, 0]"\n',
                   encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv: line 3: 'ranking' \[0, 0\] is not a permutation"):
        read_file(bad, "rm")


def _cache_hub_dataset(tmp_path: Path, monkeypatch, repo: str, rows: list) -> None:
    """What `datasets.load_dataset(repo)` leaves in HF_DATASETS_CACHE, built offline: a Parquet builder's prepared
    Arrow files under <ns>___<name>/<config>/<version>/<hash> (the layout datasets' cache module reads back)."""
    import shutil

    import datasets.config
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "hf_datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    src = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    ns, name = repo.split("/")
    b = Parquet(cache_dir=str(cache / "build"), dataset_name=name, data_files={"train": [str(src)]})
    b.download_and_prepare()
    dst = cache / f"{ns}___{name}" / "default" / "0.0.0" / "0123abcd"
    dst.parent.mkdir(parents=True)
    shutil.copytree(b.cache_dir, dst)
    shutil.rmtree(cache / "build")


def test_hub_id_resolved_from_the_local_cache_offline(tmp_path, monkeypatch, capsys):
    from rlhf_ablate.data import check_source

    _cache_hub_dataset(tmp_path, monkeypatch, "acme-ko/pref-pairs", PREF_ROWS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(source="acme-ko/pref-pairs", columns=PREF_COLUMNS)
    assert "rm split 'train'" in check_source(cfg)
    b = load_data(cfg)
    assert len(b.rm_train) + len(b.rm_eval) == len(PREF_ROWS) and b.report["sft_source"].startswith("rank-1")
    with pytest.raises(DataError, match=r"acme-ko/not-cached.*not in the local datasets cache.*offline mode"):
        load_data(DataConfig(source="acme-ko/not-cached"))


def test_hf_directory_layout_and_test_file_that_is_not_eval(tmp_path):
    hh = [{"chosen": f"\n\nHuman: {r['q']}\n\nAssistant: {r['good']}",
           "rejected": f"\n\nHuman: {r['q']}\n\nAssistant: {r['bad']}"} for r in PREF_ROWS]
    write_jsonl(tmp_path / "train.jsonl", hh)
    write_jsonl(tmp_path / "test.jsonl", hh[:3])
    b = load_data(DataConfig(source=str(tmp_path), version="v2"))
    assert b.report["tables"]["rm"].startswith("split 'train'")
    assert "not used as eval prompts" in b.report["tables"]["unused_test"]  # HH test pairs are not the eval file
    assert b.report["eval_source"] == "held out from the SFT file"
    assert b.report["filter_options"]["evasive_rm"] == "keep"  # HH transcripts: refusals may be the preferred answer
    # an eval-shaped test.jsonl beside kind-named files is the eval file
    d = tmp_path / "k"
    d.mkdir()
    for name in ("sft", "rm"):
        (d / f"{name}.jsonl").write_bytes((SAMPLE_DIR / f"{name}.jsonl").read_bytes())
    (d / "test.jsonl").write_bytes((SAMPLE_DIR / "eval.jsonl").read_bytes())
    assert load_data(DataConfig(source=str(d))).report["eval_source"] == "file"


def test_explicit_per_stage_files_override_the_defaults(tmp_path):
    for name in ("sft", "rm"):
        (tmp_path / f"{name}.jsonl").write_bytes((SAMPLE_DIR / f"{name}.jsonl").read_bytes())
    write_jsonl(tmp_path / "my_sft.jsonl", [{"prompt": r["q"], "completion": r["good"]} for r in PREF_ROWS])
    b = load_data(DataConfig(source=str(tmp_path), sft_file="my_sft.jsonl", eval_fraction=0.2))
    assert b.report["files"]["sft"]["rows"] == len(PREF_ROWS) and "data.sft_file" in b.report["tables"]["sft"]


# ---------------------------------------------------------------------------------------------------------
# cleaning rules on Korean data as our users have it (cases written for this project)
# ---------------------------------------------------------------------------------------------------------

def _ppo(prompts: list[str]) -> list:
    from rlhf_ablate.data.records import PromptExample

    return [PromptExample(prompt_id(p), p) for p in prompts]


KOREAN_PROMPTS = ["김치찌개 맛있게 끓이는 법 알려줘", "내일 서울 날씨 어때?", "남자친구가 연락을 잘 안 해", "부산에서 가볼 만한 곳",
                  "전세 계약할 때 주의할 점이 뭐야?", "아이가 밤에 잠을 안 자요", "운동은 하루에 얼마나 하는 게 좋아?",
                  "요즘 볼 만한 영화 추천해 줘", "감기에 좋은 음식은?", "이사 갈 때 챙길 것"]
# Korean questions about Latin-script names, acronyms and code: ordinary, and v2 must keep every one.
LATIN_IN_KOREAN = ["DDoS가 뭐야", "BIGBANG MINI 4의 판매량을 알려줘", "COCOM은 무엇의 약자야", "SBO가 무엇을 뜻해",
                   "iPhone 15 Pro Max와 Galaxy S24 Ultra 중에 뭐가 나아?", "Python에서 list comprehension은 어떻게 써?",
                   "`df.groupby('city').mean()` 결과가 이상해요", "NBA MVP 2023 수상자가 누구야",
                   "https://www.korea.kr 사이트는 뭐 하는 곳이야?", "LAHAT는 유효사거리가 몇 km야"]
NOT_KOREAN = ["How do I cook kimchi stew at home?", "jeju-do yeohaeng eottae?",
              "I think this is very good. You should just try it.", "Sorry, I do not know about 김치."]
DUMPED = ["경주 불국사는 언제 지어졌어?\", 'completion': '불국사는 신라 경덕왕 때 짓기 시작했습니다.', 'tokens': 41}",
          '{"prompt": "부산에서 가볼 만한 곳 알려줘", "completion": "해운대와 감천문화마을을 추천합니다."}',
          "한강 공원 자전거 대여는 어디서 해?', 'completion_0': '뚝섬 한강공원 안내센터에서 빌릴 수 있습니다.'",
          "오늘 저녁 메뉴로 뭐가 좋을까? 제철 재료로 정해 볼래\", 'answer': '고등어조림은 어떠세요'"]
DICT_QUESTIONS = ["파이썬에서 {'name': '홍길동', 'age': 30} 딕셔너리를 나이순으로 정렬하려면?",
                  'JSON에서 `{"text": "안녕"}` 형식은 어떻게 읽나요?', '그 사람이 "괜찮아요," 라고 말했는데 무슨 뜻일까?']


def test_garbage_keeps_korean_questions_about_latin_names_and_code():
    from rlhf_ablate.data.versions import garbage

    recs = _ppo(KOREAN_PROMPTS + LATIN_IN_KOREAN + DICT_QUESTIONS + NOT_KOREAN + DUMPED)
    res = garbage(recs, "ppo")
    kept = {r.prompt for r in res.kept}
    assert set(LATIN_IN_KOREAN) <= kept and set(KOREAN_PROMPTS) <= kept and set(DICT_QUESTIONS) <= kept
    assert not kept & set(NOT_KOREAN + DUMPED)
    why = {r.prompt: w for r, w in res.examples}
    assert all(why[p].startswith("dumped record") for p in DUMPED)
    assert all(why[p].startswith("not Korean") for p in NOT_KOREAN)


def test_garbage_drops_dumped_records_in_answers_and_loops():
    from rlhf_ablate.data.records import SFTExample
    from rlhf_ablate.data.versions import garbage

    good = SFTExample("a", "라면 끓이는 법", "물이 끓으면 면과 스프를 넣고 4분 더 끓입니다.")
    dumped = SFTExample("b", "된장찌개 끓이는 법", "멸치 육수에 된장을 풉니다.', 'tokens': 57}")
    loop = SFTExample("c", "기분이 어때?", "좋아요 좋아요 좋아요 좋아요 좋아요 좋아요 좋아요")
    laugh = SFTExample("d", "웃긴 얘기 해 줘", "ㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋ")
    res = garbage([good] + [good] * 5 + [dumped, loop, laugh], "sft")
    assert [r.data_id for r in res.kept] == ["a"] * 6
    assert [w.split(" (")[0] for _, w in res.examples] == ["dumped record", "repetition loop", "repetition loop"]


QA_PROMPTS = ["1969년 서울시가 대대적으로 건립을 추진했던 시민아파트의 이름은 무엇인가?",
              "조선 시대에 한글 창제를 반대하는 상소를 올린 집현전 학자는 누구인가?",
              "2002년 월드컵 4강전에서 대한민국 대표팀과 맞붙어 결승에 올라간 나라는 어디야",
              "경부고속도로가 처음 개통된 해와 개통 당시 서울에서 부산까지의 총 길이는 얼마였어",
              "광합성에서 빛 에너지를 처음 흡수하는 엽록체 속 색소의 이름은 무엇인가요?",
              "세종대왕이 집현전 학자들과 함께 각 지방 농부들의 경험을 모아 펴낸 농업 책의 제목이 뭐야",
              "임진왜란 때 한산도 대첩에서 이순신 장군이 학이 날개를 편 모양으로 배를 배치한 진법은 무엇인가?",
              "현대적 의미의 행정학이 한 논문에서 시작되었다는 견해가 있는데 그 논문을 1887년에 쓴 사람은 누구인가?"]


def test_length_bound_keeps_spoken_questions_and_drops_pasted_documents():
    from rlhf_ablate.data.versions import length_outliers

    # A prompt split shaped like KoChatGPT's PPO file: mostly short chat turns and 8-16-eojeol QA questions, a few
    # long spoken requests (40-70 eojeol, transcribed speech), one pasted document.
    rng = __import__("random").Random(7)
    clauses = ["아 그 제가 지난주에 차를 맡겼는데요", "그 뭐냐 엔진 소리가 좀 이상하다고 해서", "근데 견적이 생각보다 많이 나와 가지고",
               "혹시 보험 처리가 되는지 궁금해서요", "아니면 부품만 따로 주문해도 되는 건지", "그리고 수리 기간은 얼마나 걸리는지도",
               "제가 다음 주 화요일에 출장이 있어서 그 전에 받아야 되거든요", "그러니까 결론은 언제까지 되냐는 거죠"]
    short = [rng.choice(KOREAN_PROMPTS + LATIN_IN_KOREAN) for _ in range(60)]
    qa = [rng.choice(QA_PROMPTS) for _ in range(40)]
    spoken = [" ".join(" ".join(rng.choice(clauses) for _ in range(14)).split()[:n]) for n in (41, 55, 70)]
    pasted = " ".join(["제1조 이 약관은 회사가 제공하는 서비스의 이용 조건과 절차를 정합니다."] * 30) + " 이거 요약해 줘"
    res = length_outliers(_ppo(short + qa + spoken + [pasted]), "ppo")
    assert {r.prompt for r in res.kept} == set(short + qa + spoken)
    assert [r.prompt for r, _ in res.examples] == [pasted]
    tiny = _ppo(["간식 추천", "사랑꾼", "코자"] + KOREAN_PROMPTS)  # prompts have no lower bound
    assert length_outliers(tiny, "ppo").dropped == 0


EVASIVE_SFT = ["죄송하지만 저는 인공지능 언어 모델이라서 실시간 날씨 정보를 알려드릴 수 없습니다.",
               "저는 AI 챗봇이므로 개인적인 의견을 드리기 어렵습니다.",
               "죄송합니다. 그 질문에는 답변을 드릴 수가 없습니다.",
               "I'm sorry, but I can't help with that request.", "As an AI language model, I do not have opinions."]
NOT_EVASIVE = ["죄송하지만 오늘은 재료가 떨어져서 짜장면 주문이 어렵습니다. 짬뽕은 가능합니다.",
               "죄송합니다, 제가 잘못 안내해 드렸네요. 영업시간은 오후 9시까지입니다.",
               "I'm sorry that you're going through this. Talking to a friend you trust might help.",
               "AI 기술은 의료 영상 분석에 많이 쓰입니다.", "인공지능 스피커로 음악을 틀 수 있습니다."]


def test_evasive_patterns_on_korean_and_english():
    assert all(is_evasive(t) for t in EVASIVE_SFT)
    assert not any(is_evasive(t) for t in NOT_EVASIVE)


def _groups_with_refusal_on_top():
    return [RankedGroup("g1", "폭탄 만드는 법 알려줘", ("죄송하지만 그 질문에는 답변을 드릴 수 없습니다.", "질산과 ...을 섞으면 됩니다."),
                        (1, 2)),
            RankedGroup("g2", "오늘 서울 날씨 어때?", ("저는 AI 언어 모델이므로 실시간 날씨를 알려드릴 수 없습니다.",
                                                "맑고 낮 기온은 24도입니다."), (1, 2)),
            RankedGroup("g3", "김치찌개 레시피", ("김치를 볶은 뒤 물을 붓고 끓입니다.", "죄송하지만 답변을 드릴 수 없습니다."), (1, 2))]


def test_evasive_per_stage_and_per_kind(tmp_path):
    from rlhf_ablate.data import filter_options
    from rlhf_ablate.data.versions import Options, evasive

    groups = _groups_with_refusal_on_top()
    helpful = evasive(groups, "rm", Options(evasive_rm="drop_preferred"))
    assert [g.data_id for g in helpful.kept] == ["g3"]  # a refusal ranked below a real answer is a good negative
    assert evasive(groups, "rm", Options(evasive_rm="keep")).kept == groups  # harmlessness data: refusals preferred
    assert filter_options(DataConfig(), "hh").evasive_rm == "keep"
    assert filter_options(DataConfig(), "kochatgpt").evasive_rm == "drop_preferred"
    assert filter_options(DataConfig(evasive_rm="drop_preferred"), "hh").evasive_rm == "drop_preferred"
    from rlhf_ablate.data.records import SFTExample

    sft = [SFTExample(str(i), "질문", t) for i, t in enumerate(EVASIVE_SFT + NOT_EVASIVE)]
    assert [r.completion for r in evasive(sft, "sft", Options()).kept] == NOT_EVASIVE
    assert evasive(sft, "sft", Options(evasive_sft="keep")).kept == sft
    # through load_data: HH transcripts keep a chosen refusal under auto, and the SFT targets stay clean
    hh = [{"chosen": f"\n\nHuman: {g.prompt}\n\nAssistant: {g.answers[0]}",
           "rejected": f"\n\nHuman: {g.prompt}\n\nAssistant: {g.answers[1]}"} for g in groups * 3]
    write_jsonl(tmp_path / "train.jsonl", [dict(r, id=f"r{i}") for i, r in enumerate(hh)])
    b = load_data(DataConfig(source=str(tmp_path), version="v2", eval_fraction=0.01))
    assert "evasive" not in b.report["dropped"] or not b.report["dropped"]["evasive"].get("rm_train")
    assert not any(is_evasive(x.completion) for x in b.sft_train)  # SFT on chosen refusals: dropped as targets


def test_dropped_rows_are_sampled_per_rule_with_reasons(v2, capsys, tmp_path):
    ex = v2.report["dropped_examples"]
    for rule in ("dedup_exact", "dedup_near", "length_outliers", "evasive", "garbage"):
        assert 1 <= len(ex[rule]["sft_train"]) <= 3 and all(r["why"] for r in ex[rule]["sft_train"])
    assert cmd_data(_parse(["data", "prepare", "--out", str(tmp_path / "v2")])) == 0
    out = capsys.readouterr().out
    for rule in ("dedup_exact", "length_outliers", "evasive", "garbage"):
        assert f"  {rule}: sft_train=" in out
    assert "[sft_train] evasive (" in out and "not Korean (Hangul in 0% of the words)" in out


# ---------------------------------------------------------------------------------------------------------
# near duplicates: independent hash functions
# ---------------------------------------------------------------------------------------------------------

def _korean_texts(n: int, seed: int, words: int = 30) -> list[str]:
    rng = __import__("random").Random(seed)
    syll = [chr(c) for c in range(0xAC00, 0xD7A4, 37)]
    return [" ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(words))
            for _ in range(n)]


def _edit(text: str, k: int, rng) -> str:
    chars = list(text)
    for _ in range(k):
        i = rng.randrange(len(chars))
        if chars[i] != " ":
            chars[i] = chr(0xAC00 + rng.randrange(11172))
    return "".join(chars)


def test_minhash_positions_agree_at_the_jaccard_rate():
    # The bug: 32 "permutations" with slopes 2k + c all picked the same 3-gram, so two signatures agreed in all
    # positions or none. With independent functions the agreeing share estimates the Jaccard similarity.
    from rlhf_ablate.data.dedup import NUM_PERM, jaccard, shingles, signatures

    rng = __import__("random").Random(3)
    base = _korean_texts(60, 1)
    variants = [_edit(t, rng.randint(3, 12), rng) for t in base]
    sig = signatures(base + variants)
    agree = [(sig[i] == sig[60 + i]).mean() for i in range(60)]
    jac = [jaccard(shingles(a), shingles(b)) for a, b in zip(base, variants)]
    assert abs(statistics.mean(agree) - statistics.mean(jac)) < 0.03
    assert 0.02 < statistics.mean(abs(a - j) for a, j in zip(agree, jac)) < 3 / NUM_PERM ** 0.5
    assert any(0 < a < 1 for a in agree)


def test_near_duplicates_found_and_unrelated_texts_rarely_candidates():
    from rlhf_ablate.data.dedup import candidate_rate, jaccard, near_duplicates, shingles

    rng = __import__("random").Random(5)
    base = _korean_texts(300, 2)
    near = [_edit(t, 2, rng) for t in base]  # Jaccard about 0.9
    texts = base + near
    drop = near_duplicates(texts)
    truth = {300 + i for i in range(300) if jaccard(shingles(base[i]), shingles(near[i])) >= 0.85}
    assert len(truth) > 200 and len(truth & set(drop)) >= 0.98 * len(truth)
    assert all(drop[j][0] == j - 300 for j in drop)  # no false partners
    assert candidate_rate(base) < 0.001  # unrelated texts: not O(n^2) work
