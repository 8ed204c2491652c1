"""Win rates and judges without a model: verifiable rewards, the win-rate arithmetic, an LLM judge behind a local
stub of an OpenAI-compatible server (both orders, timeouts, retries, the API key), and embedding similarity."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from rlhf_ablate.config import trial_config_from_overrides
from rlhf_ablate.errors import ConfigError
from rlhf_ablate.metrics.embedding import similarities
from rlhf_ablate.metrics.verifiable import verifiable_reward
from rlhf_ablate.metrics.winrate import outcome_from_scores, outcome_from_verdicts, summarize_outcomes, wilson
from rlhf_ablate.stages.judge import ApiJudge, parse_verdict


# ---- verifiable rewards ------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,reference,match,pattern,want", [
    ("서울 입니다.", "서울입니다", "exact", None, 1.0),          # spacing and final punctuation do not matter
    ("서울입니다", "부산입니다", "exact", None, 0.0),
    ("한국의 수도는 서울입니다!", "서울", "contains", None, 1.0),
    ("한국의 수도는 부산입니다", "서울", "contains", None, 0.0),
    ("DDoS 공격입니다", "ddos", "contains", None, 1.0),           # Latin script is case-folded
    ("계산하면 12 + 30 = 42. 정답: 42", "42", "regex", r"정답\s*[:：]\s*(\S+)", 1.0),
    ("정답: 41", "42", "regex", r"정답\s*[:：]\s*(\S+)", 0.0),
    ("답을 모르겠습니다", "42", "regex", r"정답\s*[:：]\s*(\S+)", 0.0),   # no extraction: no reward
    ("정답: 42", "풀이 ... 정답: 42", "regex", r"정답\s*[:：]\s*(\S+)", 1.0),  # a worked reference is extracted too
    ("아무 답", "", "contains", None, 0.0),                      # an empty reference never matches
])
def test_verifiable_reward(answer, reference, match, pattern, want):
    assert verifiable_reward(answer, reference, match, pattern) == want


def test_verifiable_needs_grpo_or_rloo_and_a_valid_pattern():
    with pytest.raises(ConfigError, match="reward.type"):
        trial_config_from_overrides({"reward.type": "verifiable"})
    with pytest.raises(ConfigError, match="reward.pattern"):
        trial_config_from_overrides({"method": "grpo", "reward.type": "verifiable", "reward.match": "regex"})
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        trial_config_from_overrides({"method": "grpo", "reward.match": "regex", "reward.pattern": "("})
    with pytest.raises(ConfigError, match="grpo.batch_size"):
        trial_config_from_overrides({"method": "grpo", "grpo.num_generations": 3})
    with pytest.raises(ConfigError, match="eval.judge_url"):
        trial_config_from_overrides({"eval.judge": "api"})


# ---- win-rate arithmetic -----------------------------------------------------------------------------------

def test_outcomes_and_summary():
    assert [outcome_from_scores(a, b) for a, b in ((2, 1), (1, 2), (1, 1))] == [1.0, 0.0, 0.5]
    # Both orders: the policy wins only on balance; a judge that always picks position A gives ties.
    assert outcome_from_verdicts("A", "B") == 1.0
    assert outcome_from_verdicts("B", "A") == 0.0
    assert outcome_from_verdicts("A", "A") == 0.5
    assert outcome_from_verdicts("A", "tie") == 1.0
    assert outcome_from_verdicts("tie", "tie") == 0.5
    assert outcome_from_verdicts(None, "A") is None
    s = summarize_outcomes([1.0] * 95 + [0.0] * 5)
    assert s["win_rate"] == pytest.approx(0.95) and s["n"] == 100
    # Wilson at 95/100 (checked against the closed form): about [0.888, 0.978]
    assert s["ci_low"] == pytest.approx(0.8883, abs=1e-3) and s["ci_high"] == pytest.approx(0.9785, abs=1e-3)
    s = summarize_outcomes([1.0, 0.5, 0.0, None])
    assert (s["win"], s["tie"], s["loss"], s["missing"]) == (1 / 3, 1 / 3, 1 / 3, 1)
    assert summarize_outcomes([None, None])["win_rate"] is None
    lo, hi = wilson(1.0, 20)
    assert 0.8 < lo < 1.0 and hi == 1.0  # never a zero-width interval at 100%


def test_wilson_interval_covers_at_its_nominal_rate():
    # The interval is a claim about coverage: simulate binomial win counts and count how often it holds p. Wilson's
    # coverage oscillates around 95% as n and p move (Brown, Cai and DasGupta 2001, "Interval Estimation for a
    # Binomial Proportion"); its dips stay above 92% here (measured: 0.927 at p=0.7, n=30).
    rng = np.random.default_rng(0)
    for p, n in ((0.5, 50), (0.9, 100), (0.7, 30)):
        wins = rng.binomial(n, p, size=4000)
        cover = np.mean([(lambda lo_hi: lo_hi[0] <= p <= lo_hi[1])(wilson(w / n, n)) for w in wins])
        assert 0.92 <= cover <= 0.98, (p, n, cover)


# ---- an LLM judge behind a stub OpenAI-compatible server ----------------------------------------------------

class _Judge(BaseHTTPRequestHandler):
    """Prefers the answer containing '정확한'; 'position' mode always answers A; 'slow' mode never answers in time.
    Records every request's prompt and Authorization header."""

    mode = "content"
    seen: list = []
    delay = 0.0

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        type(self).seen.append({"prompt": prompt, "auth": self.headers.get("Authorization"),
                                "model": body["model"]})
        if type(self).mode == "slow":
            time.sleep(type(self).delay)
        if type(self).mode == "error":
            self.send_response(500)
            self.end_headers()
            return
        a = re.search(r"\[답변 A\]\n(.*?)\n\n\[답변 B\]", prompt, re.S).group(1)
        b = re.search(r"\[답변 B\]\n(.*?)\n\n", prompt, re.S).group(1)
        if type(self).mode == "position":
            verdict = "A"
        else:
            verdict = "A" if "정확한" in a and "정확한" not in b else "B" if "정확한" in b and "정확한" not in a else "동점"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def judge_server():
    _Judge.seen = []
    _Judge.mode = "content"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_api_judge_asks_both_orders_and_cancels_position_bias(judge_server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret-123")
    judge = ApiJudge(url=judge_server, model="stub", api_key_env="MY_JUDGE_KEY", timeout=5, retries=0)
    good, plain = "정확한 답변입니다.", "그냥 답변입니다."
    assert judge.both_orders("질문?", good, plain) == ("A", "B")  # the better answer wins in both positions
    assert outcome_from_verdicts(*judge.both_orders("질문?", good, plain)) == 1.0
    assert outcome_from_verdicts(*judge.both_orders("질문?", plain, good)) == 0.0
    assert len(_Judge.seen) == 6 and all(s["auth"] == "Bearer sk-test-secret-123" for s in _Judge.seen)
    assert all("sk-test" not in s["prompt"] for s in _Judge.seen)  # the key travels in the header only
    # The two orders of one pair put each answer in each position
    first, second = _Judge.seen[0]["prompt"], _Judge.seen[1]["prompt"]
    assert first.index(good) < first.index(plain) and second.index(plain) < second.index(good)
    _Judge.mode = "position"  # a judge that always says "A": every pair becomes a tie, not a win
    assert outcome_from_verdicts(*judge.both_orders("질문?", good, plain)) == 0.5


def test_api_judge_timeouts_and_errors_are_bounded_and_missing(judge_server):
    _Judge.mode, _Judge.delay = "slow", 1.0
    judge = ApiJudge(url=judge_server, model="stub", timeout=0.2, retries=1, backoff=0.01)
    t0 = time.monotonic()
    assert judge.verdict("질문?", "가", "나") is None
    assert time.monotonic() - t0 < 1.5  # two tries of 0.2 s, not an unbounded wait
    assert judge.failures == 1 and len(_Judge.seen) == 2  # 1 try + 1 retry
    _Judge.mode, _Judge.seen = "error", []
    assert judge.verdict("질문?", "가", "나") is None and len(_Judge.seen) == 2  # a 500 is retried, boundedly
    unreachable = ApiJudge(url="http://127.0.0.1:9/v1", model="stub", timeout=0.2, retries=0)
    assert unreachable.verdict("질문?", "가", "나") is None


def test_judge_prompt_file_must_have_the_fields(tmp_path):
    cfg = trial_config_from_overrides({"eval.judge": "api", "eval.judge_url": "http://localhost:1/v1",
                                       "eval.judge_model": "m", "eval.judge_prompt": str(tmp_path / "p.txt")})
    with pytest.raises(ConfigError, match="cannot read"):
        ApiJudge.from_config(cfg.eval)
    (tmp_path / "p.txt").write_text("질문 {question} 만 있음", encoding="utf-8")
    with pytest.raises(ConfigError, match="answer_a"):
        ApiJudge.from_config(cfg.eval)
    (tmp_path / "p.txt").write_text("{question}\n1: {answer_a}\n2: {answer_b}", encoding="utf-8")
    assert ApiJudge.from_config(cfg.eval).prompt.startswith("{question}")


@pytest.mark.parametrize("reply,want", [("A", "A"), ("B입니다.", "B"), ("답변 A", "A"), ("**B**", "B"),
                                        ("동점", "tie"), ("Tie", "tie"), ("모르겠습니다", None), ("Apple", None)])
def test_parse_verdict(reply, want):
    assert parse_verdict(reply) == want


# ---- embedding similarity ----------------------------------------------------------------------------------

def test_similarities_on_known_vectors():
    a = np.array([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    b = np.array([[0.0, 1.0, 0.0], [1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])
    s = similarities(a, b)
    assert s["cosine"].tolist() == pytest.approx([0.0, 1.0, -1.0])
    assert s["euclidean"].tolist() == pytest.approx([2 ** 0.5, 0.0, 2 * 14 ** 0.5])
    assert s["pearson"].tolist() == pytest.approx([-0.5, 1.0, -1.0])


def test_mean_pooled_encoder_from_a_tiny_config(tmp_path, builtin_cache):
    """A tiny BERT built from a config with the built-in tokenizer, saved and loaded by path as a hub encoder would
    be: identical texts are maximally similar, different texts less so."""
    import torch
    from transformers import BertConfig, BertModel

    from rlhf_ablate.config import ModelConfig
    from rlhf_ablate.models import load_tokenizer, resolve_base
    from rlhf_ablate.models.embedding import MeanPooledEncoder

    tok = load_tokenizer(ModelConfig(), resolve_base(ModelConfig()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "enc")
    tok.save_pretrained(tmp_path / "enc")
    enc = MeanPooledEncoder(str(tmp_path / "enc"))
    texts = ["김치는 배추로 만듭니다.", "김치는 배추로 만듭니다.", "오늘 날씨가 맑습니다."]
    v = enc.encode(texts)
    s = similarities(v[:2], v[[1, 2]])
    assert s["cosine"][0] == pytest.approx(1.0) and s["euclidean"][0] == pytest.approx(0.0, abs=1e-6)
    assert s["cosine"][1] < 1.0 and s["euclidean"][1] > 0
    with pytest.raises(Exception, match="eval.embedding_model"):
        MeanPooledEncoder(str(tmp_path / "missing"))


def _eval_dir(root, name, answers):
    from rlhf_ablate.files import write_json

    d = root / name
    write_json(d / "records.json", [{"data_id": f"p{i}", "prompt": f"질문 {i}?", "reference": "정확한 답",
                                     "generation": a, "reward": float(len(a))} for i, a in enumerate(answers)])
    return d


def test_compare_stage_with_the_api_judge(tmp_path, judge_server, monkeypatch):
    from rlhf_ablate.files import read_json
    from rlhf_ablate.stages.compare import compare

    monkeypatch.setenv("JUDGE_API_KEY", "sk-never-in-files")
    ppo = _eval_dir(tmp_path, "ppo", ["정확한 답변"] * 3 + ["보통 답변"])
    sft = _eval_dir(tmp_path, "sft", ["보통 답변"] * 3 + ["정확한 답변"])
    cfg = trial_config_from_overrides({"eval.judge": "api", "eval.judge_url": judge_server,
                                       "eval.judge_model": "stub", "eval.judge_retries": 0})
    compare(cfg, {"sft": sft, "ppo": ppo}, tmp_path / "out")
    m = read_json(tmp_path / "out" / "metrics.json")
    assert (m["ppo/judge_win_vs_sft"], m["ppo/judge_loss_vs_sft"], m["ppo/judge_n_vs_sft"]) == (0.75, 0.25, 4)
    assert m["ppo/winrate_vs_sft"] == 0.75 and len(_Judge.seen) == 8  # 4 pairs x 2 orders
    meta = read_json(tmp_path / "out" / "meta.json")
    assert meta["judge_api"]["orders"].startswith("both")
    for f in (tmp_path / "out").iterdir():  # the key is in no file the stage writes
        assert "sk-never" not in f.read_text(encoding="utf-8")
    # A judge that never answers: the win rate is missing, the stage (and so the trial) still succeeds.
    _Judge.mode, _Judge.delay = "slow", 0.5
    cfg = cfg.replace(**{"eval.judge_timeout": 0.1})
    compare(cfg, {"sft": sft, "ppo": ppo}, tmp_path / "out2")
    m = read_json(tmp_path / "out2" / "metrics.json")
    assert m["ppo/winrate_vs_sft"] is None and m["ppo/judge_n_vs_sft"] == 0
    assert read_json(tmp_path / "out2" / "meta.json")["judge_failures"]["sft"] == 8


def test_compare_stage_with_the_trials_rm_scores(tmp_path):
    from rlhf_ablate.files import read_json
    from rlhf_ablate.stages.compare import compare

    ppo = _eval_dir(tmp_path, "ppo", ["길고 자세한 답변", "짧음", "같은 길이"])   # reward = length
    sft = _eval_dir(tmp_path, "sft", ["짧은 답", "조금 더 긴 답변", "같은 길이"])
    cfg = trial_config_from_overrides({})
    compare(cfg, {"sft": sft, "ppo": ppo}, tmp_path / "out")
    m = read_json(tmp_path / "out" / "metrics.json")
    assert (m["ppo/judge_win_vs_sft"], m["ppo/judge_tie_vs_sft"], m["ppo/judge_loss_vs_sft"]) == (1 / 3, 1 / 3, 1 / 3)
    assert "flatters" in read_json(tmp_path / "out" / "meta.json")["judge_note"]
