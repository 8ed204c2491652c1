"""Korean text metrics (the rouge_score trap, hand-computed overlaps, signatures) and RM ranking metrics."""

import importlib.util
import math
import unicodedata

import pytest
import sacrebleu
from rouge_score import rouge_scorer, tokenizers

from rlhf_ablate.metrics.text import bleu_from_stats, chrf_from_stats
from rlhf_ablate.metrics import (
    CharTokenizer,
    KiwiTokenizer,
    MetricsError,
    rm_group_records,
    rm_metrics,
    text_metrics,
)

SAME = "오늘 날씨가 정말 좋네요. 산책하러 갈까요?"


@pytest.fixture(scope="module")
def kiwi():
    # One tokenizer for the module; the underlying Kiwi instance is cached process-wide (about 1 s to build).
    return KiwiTokenizer()


# ---------------------------------------------------------------------------------------------------------
# ROUGE on Korean
# ---------------------------------------------------------------------------------------------------------

def test_rouge_score_default_tokenizer_drops_korean_the_trap():
    # The trap this module exists for: identical Korean strings score 0.0 with rouge_score's default tokenizer.
    s = rouge_scorer.RougeScorer(["rouge1", "rougeL"]).score(SAME, SAME)
    assert s["rouge1"].fmeasure == 0.0 and s["rougeL"].fmeasure == 0.0
    assert tokenizers.DefaultTokenizer().tokenize(SAME) == []


@pytest.mark.parametrize("tok", ["kiwi", "char"])
def test_identical_korean_scores_one(tok, kiwi):
    # the config strings ("kiwi", "char") resolve to the tokenizers; Kiwi itself is built once per process
    m = text_metrics([SAME, "감사합니다"], [SAME, "감사합니다"], rouge_tokenizer=tok)
    for k in ("rouge1", "rouge2", "rougeL"):
        assert m.corpus[k] == pytest.approx(1.0), k
    assert m.corpus["bleu"] == pytest.approx(100.0)
    assert m.corpus["chrf"] == pytest.approx(100.0)
    assert [r["rougeL"] for r in m.records] == pytest.approx([1.0, 1.0])


def test_nfd_prediction_matches_nfc_reference(kiwi):
    # Decomposed jamo (macOS files) must score like the composed text, for ROUGE and for sacrebleu.
    nfd = unicodedata.normalize("NFD", SAME)
    assert nfd != SAME
    for tok in (kiwi, "char"):
        m = text_metrics([nfd], [SAME], rouge_tokenizer=tok)
        assert m.corpus["rouge1"] == pytest.approx(1.0)
        assert m.corpus["chrf"] == pytest.approx(100.0)


def test_char_rouge_partial_overlap_hand_computed():
    # pred chars 고 양 이 가 좋 아 (6), ref 고 양 이 를 좋 아 해 (7): 5 shared unigrams, 3 shared bigrams
    # (고양, 양이, 좋아) out of 5 and 6, LCS 고양이좋아 = 5.
    tok = CharTokenizer()
    assert tok.tokenize("고양이가 좋아") == list("고양이가좋아")
    m = text_metrics(["고양이가 좋아"], ["고양이를 좋아해"], rouge_tokenizer="char")
    assert m.records[0]["rouge1"] == pytest.approx(2 * 5 / (6 + 7))
    assert m.records[0]["rouge2"] == pytest.approx(2 * 3 / (5 + 6))
    assert m.records[0]["rougeL"] == pytest.approx(2 * 5 / (6 + 7))


def test_kiwi_rouge_partial_overlap_hand_computed(kiwi):
    pred, ref = "나는 학교에 간다.", "나는 집에 간다"
    # Pin the morpheme analysis this hand computation rests on (punctuation dropped).
    assert kiwi.tokenize(pred) == ["나", "는", "학교", "에", "가", "ᆫ다"]
    assert kiwi.tokenize(ref) == ["나", "는", "집", "에", "가", "ᆫ다"]
    m = text_metrics([pred], [ref], rouge_tokenizer=kiwi)
    # unigrams: 5 of 6 shared; bigrams: 나는, 에가, 간다 = 3 of 5; LCS = 5
    assert m.records[0]["rouge1"] == pytest.approx(5 / 6)
    assert m.records[0]["rouge2"] == pytest.approx(3 / 5)
    assert m.records[0]["rougeL"] == pytest.approx(5 / 6)
    assert m.meta["rouge_tokenizer"].startswith("kiwi-0.24")
    assert "NFC" in m.meta["rouge_tokenizer"]


def test_corpus_scores_and_signatures_recorded(kiwi):
    preds = ["고양이가 좋아", "나는 학교에 간다.", "완전히 다른 답"]
    refs = ["고양이를 좋아해", "나는 집에 간다", "오늘은 비가 온다"]
    m = text_metrics(preds, refs, rouge_tokenizer=kiwi, bleu_tokenize="char")
    assert m.corpus["rougeL"] == pytest.approx(sum(r["rougeL"] for r in m.records) / 3)
    # corpus BLEU / chrF are sacrebleu's corpus scores, not means of sentence scores
    ref_bleu = sacrebleu.metrics.BLEU(tokenize="char").corpus_score(preds, [refs]).score
    ref_chrf = sacrebleu.metrics.CHRF().corpus_score(preds, [refs]).score
    assert m.corpus["bleu"] == pytest.approx(ref_bleu)
    assert m.corpus["chrf"] == pytest.approx(ref_chrf)
    assert 0 < m.corpus["bleu"] < 100 and 0 < m.corpus["chrf"] < 100
    assert "tok:char" in m.meta["bleu_signature"]
    assert f"version:{sacrebleu.__version__}" in m.meta["bleu_signature"]
    assert "nc:6" in m.meta["chrf_signature"]
    assert m.as_metrics("ppo/")["ppo/rougeL"] == m.corpus["rougeL"]
    assert set(m.records[0]) == {"rouge1", "rouge2", "rougeL", "bleu", "chrf", "bleu_stats", "chrf_stats"}
    # the per-sentence statistics summed over any subset give that subset's corpus score (what a bootstrap
    # resample of prompts needs, as in sacrebleu's paired bootstrap)
    sub = [0, 2]
    ref_sub = sacrebleu.metrics.BLEU(tokenize="char").corpus_score([preds[i] for i in sub], [[refs[i] for i in sub]])
    stats = [sum(m.records[i]["bleu_stats"][j] for i in sub) for j in range(10)]
    assert bleu_from_stats(stats) == pytest.approx(ref_sub.score)
    chrf_stats = [sum(m.records[i]["chrf_stats"][j] for i in sub) for j in range(18)]
    assert chrf_from_stats(chrf_stats) == pytest.approx(
        sacrebleu.metrics.CHRF().corpus_score([preds[i] for i in sub], [[refs[i] for i in sub]]).score)
    m13 = text_metrics(preds, refs, rouge_tokenizer="char", bleu_tokenize="13a")
    assert "tok:13a" in m13.meta["bleu_signature"]


def test_guard_raises_when_tokenizer_drops_korean():
    with pytest.raises(MetricsError, match="drops"):
        text_metrics([SAME], [SAME], rouge_tokenizer=tokenizers.DefaultTokenizer())


def test_guard_allows_a_legitimate_zero(kiwi):
    # 사과 (apple) and 과자 (snack) share characters but no morpheme: 0 is the right kiwi ROUGE, not a bug.
    m = text_metrics(["사과"], ["과자"], rouge_tokenizer=kiwi)
    assert m.corpus["rouge1"] == 0.0
    assert text_metrics(["사과"], ["과자"], rouge_tokenizer="char").corpus["rouge1"] == pytest.approx(0.5)


def test_input_errors():
    with pytest.raises(MetricsError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"], rouge_tokenizer="char")
    with pytest.raises(MetricsError, match="no examples"):
        text_metrics([], [], rouge_tokenizer="char")
    with pytest.raises(MetricsError, match="example 1"):
        text_metrics(["a", "b"], ["a", None], rouge_tokenizer="char")
    with pytest.raises(MetricsError, match="rouge_tokenizer"):
        text_metrics(["a"], ["a"], rouge_tokenizer="mecab")


@pytest.mark.skipif(importlib.util.find_spec("mecab_ko") is not None, reason="sacrebleu[ko] is installed")
def test_ko_mecab_missing_says_how_to_install():
    with pytest.raises(MetricsError, match=r"pip install 'sacrebleu\[ko\]'"):
        text_metrics(["안녕"], ["안녕"], rouge_tokenizer="char", bleu_tokenize="ko-mecab")


# ---------------------------------------------------------------------------------------------------------
# Reward-model metrics
# ---------------------------------------------------------------------------------------------------------

def test_perfect_and_reversed_reward_model_sign_convention():
    ranks = [1, 2, 3, 4]
    perfect = [([4.0, 3.0, 2.0, 1.0], ranks, [10, 10, 10, 10]), ([0.9, 0.1, -2.0, -3.0], ranks, [5, 6, 7, 8])]
    m = rm_metrics(perfect)
    assert m["rm/kendall_tau"] == pytest.approx(1.0)
    assert m["rm/spearman_rho"] == pytest.approx(1.0)
    assert m["rm/pairwise_accuracy"] == 1.0 and m["rm/prob_margin_gt_0"] == 1.0
    assert m["rm/separation_margin"] > 0
    assert m["rm/kendall_tau_ci_low"] == pytest.approx(1.0) and m["rm/kendall_tau_ci_high"] == pytest.approx(1.0)
    assert m["rm/n_groups"] == 2 and m["rm/n_pairs"] == 12 and m["rm/kendall_tau_dropped"] == 0

    reversed_ = [([-s for s in scores], r, ln) for scores, r, ln in perfect]
    mr = rm_metrics(reversed_)
    assert mr["rm/kendall_tau"] == pytest.approx(-1.0)
    assert mr["rm/spearman_rho"] == pytest.approx(-1.0)
    assert mr["rm/pairwise_accuracy"] == 0.0
    assert mr["rm/separation_margin"] == pytest.approx(-m["rm/separation_margin"])


def test_margins_hand_computed_ties_and_dropped_prompts():
    groups = [
        ([2.0, 0.5, 1.0], [1, 2, 3], [30, 10, 20]),  # margins 1.5, 1.0, -0.5; tau (2 - 1) / 3
        ([0.3, 0.3], [1, 2], [5, 5]),               # margin 0 (a tie); constant scores -> tau NaN, dropped
        ([3.0, 2.0, 1.0], [1, 1, 2], [1, 2, 3]),    # tied ranks: pairs (0,2), (1,2) only; tau-b = 2/sqrt(6)
        ([7.0, 8.0], [1, 1], [4, 4]),               # all ranks tied: no pair, tau NaN, dropped
    ]
    m = rm_metrics(groups, prefix="")
    margins = [1.5, 1.0, -0.5, 0.0, 2.0, 1.0]
    chosen = [2.0, 2.0, 0.5, 0.3, 3.0, 2.0]
    rejected = [0.5, 1.0, 1.0, 0.3, 1.0, 1.0]
    assert m["n_pairs"] == 6 and m["n_groups"] == 4 and m["n_answers"] == 10
    assert m["chosen_mean"] == pytest.approx(sum(chosen) / 6)
    assert m["rejected_mean"] == pytest.approx(sum(rejected) / 6)
    assert m["separation_margin"] == pytest.approx(sum(margins) / 6)
    mu = sum(margins) / 6
    assert m["margin_std"] == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in margins) / 6))
    assert m["pairwise_accuracy"] == pytest.approx((4 + 0.5) / 6)  # the tie counts 1/2
    assert m["prob_margin_gt_0"] == pytest.approx(4 / 6)
    assert m["prob_margin_gt_0.5"] == pytest.approx(4 / 6)  # 1.5, 1.0, 2.0, 1.0
    small = rm_metrics([([1.0, 0.6, 0.0], [1, 2, 3], [1, 1, 1])], prefix="")  # margins 0.4, 1.0, 0.6
    assert small["prob_margin_gt_0"] == 1.0 and small["prob_margin_gt_0.5"] == pytest.approx(2 / 3)
    assert m["kendall_tau_dropped"] == 2 and m["spearman_rho_dropped"] == 2
    assert m["kendall_tau"] == pytest.approx((1 / 3 + 2 / math.sqrt(6)) / 2)
    assert m["kendall_tau_ci_low"] <= m["kendall_tau"] <= m["kendall_tau_ci_high"]

    recs = rm_group_records(groups, data_ids=["a", "b", "c", "d"])
    assert [r["data_id"] for r in recs] == ["a", "b", "c", "d"]
    assert recs[0]["kendall_tau"] == pytest.approx(1 / 3)
    assert recs[1]["kendall_tau"] is None and recs[3]["spearman_rho"] is None
    assert recs[2]["kendall_tau"] == pytest.approx(2 / math.sqrt(6))
    assert recs[0]["ranks"] == [1, 2, 3] and recs[0]["lengths"] == [30, 10, 20]
    # the records round-trip through rm_metrics (analysis recomputes from result.json)
    assert rm_metrics(recs, prefix="") == m


def test_length_bias_sign():
    longer_better = [([1.0, 2.0, 3.0], [3, 2, 1], [10, 20, 30]), ([0.0, 5.0], [2, 1], [3, 40])]
    assert rm_metrics(longer_better)["rm/length_bias"] == pytest.approx(1.0)
    shorter_better = [([3.0, 2.0, 1.0], [1, 2, 3], [10, 20, 30]), ([5.0, 0.0], [1, 2], [3, 40])]
    assert rm_metrics(shorter_better)["rm/length_bias"] == pytest.approx(-1.0)


def test_length_bias_ignores_a_constant_per_prompt():
    """Issue 10: the old pooled correlation went from +0.88 to -0.88 when each prompt's scores moved by a constant
    (no ranking inside any prompt changes). The within-prompt measure does not move at all."""
    import numpy as np
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    groups = []
    for p in range(40):
        lengths = rng.integers(10, 200, 3)
        scores = 0.01 * lengths + rng.normal(0, 0.5, 3)    # mildly longer-is-better inside each prompt
        groups.append((scores, [1, 2, 3], lengths))
    before = rm_metrics(groups)
    # move every prompt's scores by a constant that falls with the prompt's mean length
    shifted = [(s - 0.05 * np.mean(ln) * 10, r, ln) for s, r, ln in groups]
    after = rm_metrics(shifted)
    assert after["rm/length_bias"] == before["rm/length_bias"] and before["rm/length_bias"] > 0.1
    for k in ("rm/kendall_tau", "rm/pairwise_accuracy", "rm/separation_margin", "rm/margin_standardized",
              "rm/margin_length_corrected"):
        assert after[k] == pytest.approx(before[k]), k
    pooled = lambda gs: spearmanr(np.concatenate([s for s, _, _ in gs]), np.concatenate([ln for *_, ln in gs]))[0]
    assert pooled(groups) > 0.5 and pooled(shifted) < -0.5     # what the pooled measure did


def test_standardized_and_length_corrected_margins_hand_computed():
    # group 1: scores 3, 1 (ranks 1, 2), lengths 20, 10; group 2: scores 2, 2, 0, lengths 10, 30, 20
    groups = [([3.0, 1.0], [1, 2], [20, 10]), ([2.0, 2.0, 0.0], [1, 2, 3], [10, 30, 20])]
    m = rm_metrics(groups, prefix="")
    margins = [2.0, 0.0, 2.0, 2.0]                                  # (3-1), (2-2), (2-0), (2-0)
    assert m["separation_margin"] == pytest.approx(sum(margins) / 4)
    # pooled within-prompt sd: SS = (1 + 1) + (4/9 + 4/9 + 16/9), dof = 1 + 2
    sd = math.sqrt((2 + 24 / 9) / 3)
    assert m["margin_standardized"] == pytest.approx(1.5 / sd)
    # within-prompt slope of score on length: sxy = (1*5 + -1*-5) + (2/3*-10 + 2/3*10 + -4/3*0) = 10,
    # sxx = 50 + 200 = 250 -> 0.04; pair length differences 10, -20, -10, 10 -> sum -10
    assert m["margin_length_corrected"] == pytest.approx((6.0 - 0.04 * -10) / 4)
    # standardized margin does not change under an affine rescaling of one RM's scores
    scaled = rm_metrics([([7 * x + 3 for x in s], r, ln) for s, r, ln in groups], prefix="")
    assert scaled["margin_standardized"] == pytest.approx(m["margin_standardized"])
    assert scaled["separation_margin"] == pytest.approx(7 * m["separation_margin"])


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    import numpy as np

    rng = np.random.default_rng(0)
    groups = [(rng.normal(size=4).tolist(), [1, 2, 3, 4], [1, 2, 3, 4]) for _ in range(40)]
    a, b = rm_metrics(groups, seed=1), rm_metrics(groups, seed=1)
    assert a["rm/kendall_tau_ci_low"] == b["rm/kendall_tau_ci_low"]
    assert a["rm/kendall_tau_ci_low"] < a["rm/kendall_tau"] < a["rm/kendall_tau_ci_high"]
    assert a["rm/spearman_rho_ci_low"] < a["rm/spearman_rho"] < a["rm/spearman_rho_ci_high"]


def test_rm_input_errors():
    with pytest.raises(MetricsError, match="group 1"):
        rm_metrics([([1.0, 2.0], [1, 2], [3, 4]), ([1.0, 2.0], [1], [3, 4])])
    with pytest.raises(MetricsError, match="no groups"):
        rm_metrics([])
    with pytest.raises(MetricsError, match="'lengths'"):
        rm_metrics([{"scores": [1.0], "ranks": [1]}])


def test_docs_metrics_page_is_generated_from_the_registry():
    from pathlib import Path

    from rlhf_ablate.metrics.docs import render_metrics_doc

    page = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
    assert page.read_text(encoding="utf-8") == render_metrics_doc(), (
        "docs/metrics.md is out of date: python -m rlhf_ablate.metrics.docs > docs/metrics.md")
