"""Model loading: built-in tiny models through the hub code path, 4-bit, LoRA, merging, sizes. No network."""

from __future__ import annotations

import json
import os
import threading
import unicodedata
import warnings

import pytest
import torch

from rlhf_ablate import models as M
from rlhf_ablate.models import builtin, memory
from rlhf_ablate.run.graph import estimate_trial_memory_gb
from rlhf_ablate.config import BUILTIN_MODELS, ModelConfig, TrialConfig, trial_config_from_overrides
from rlhf_ablate.errors import ModelError
from rlhf_ablate.data.prompting import format_example

warnings.filterwarnings("ignore", message=".*kernels.*")

KOREAN = [
    "안녕하세요. 오늘 날씨가 정말 좋네요!",
    "한국의 수도는 서울이고, 부산은 두 번째로 큰 도시입니다.",
    "뷁 똠방각하 쀍 햏 (드문 음절도 바이트로 표현됩니다)",
    "GPU 2대로 LoRA rank 16을 학습했고, 비용은 12,500원이었다 😊",
    "### 질문:\n김치 만드는 법?\n\n### 답변:\n배추를 절이고 양념을 버무립니다.",
]
QA = [("한국의 수도는 어디인가요?", "서울입니다."), ("건강을 지키는 방법은?", "규칙적으로 운동하고 충분히 주무세요."),
      ("김치는 무엇인가요?", "배추와 고춧가루로 만든 한국의 전통 음식입니다.")]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(builtin_cache):
    """The session's built-in model cache (tests/conftest.py): built-ins are built once and reused by every test."""
    return builtin_cache


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def lm_batch(tok):
    texts = [format_example(q, a, tok.eos_token) for q, a in QA]
    b = tok(texts, return_tensors="pt", padding=True)
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_steps(model, batch, steps=6, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def eval_loss(model, batch):
    model.train()  # train mode with dropout 0: the same numerics as the training steps (no CPU bf16 repacking)
    with torch.no_grad():
        return model(**batch).loss.item()


# ---- built-in models and tokenizer ------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_tokenizer_round_trips_korean_and_compresses_syllables(name):
    tok = M.load_tokenizer(ModelConfig(base_model=name))
    assert tok.pad_token and tok.eos_token and tok.bos_token and tok.pad_token_id != tok.eos_token_id
    for s in KOREAN:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
    # NFD input (decomposed jamo, as some scraped data has) comes back composed: the normalizer is NFC.
    nfd = unicodedata.normalize("NFD", KOREAN[0])
    assert tok.decode(tok(nfd, add_special_tokens=False)["input_ids"]) == KOREAN[0]
    # Sequence length dominates CPU time: on the training corpus a Hangul syllable must cost well under the
    # 3 tokens (UTF-8 bytes) it would cost without merges.
    corpus = M.corpus_texts()
    syll = sum(1 for t in corpus for ch in t if "\uac00" <= ch <= "\ud7a3")
    ntok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in corpus)
    assert syll > 0 and ntok / syll < 1.6, (ntok, syll)
    # The chat template renders the project's one prompt template.
    chat = tok.apply_chat_template([{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": QA[0][1]}],
                                   tokenize=False)
    assert chat == format_example(*QA[0], tok.eos_token)


def test_builtin_is_built_once_atomically_and_concurrently(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_ABLATE_CACHE", str(tmp_path))
    before = builtin.BUILD_COUNT
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(M.resolve_base(ModelConfig(base_model="tiny-gpt2"))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builtin.BUILD_COUNT == before + 1 and len(set(results)) == 1
    path = results[0]
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert M.resolve_base(ModelConfig(base_model="tiny-gpt2")) == path
    assert builtin.BUILD_COUNT == before + 1
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    assert path.startswith(str(tmp_path / "builtin" / "tiny-gpt2-"))
    assert not [d for d in os.listdir(tmp_path / "builtin") if d.startswith(".tmp")]


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_load_by_path_4bit_and_unquantized(name):
    import bitsandbytes as bnb

    cfg4 = ModelConfig(base_model=name, quantization="nf4")
    m4 = M.load_causal_lm(cfg4)
    m32 = M.load_causal_lm(ModelConfig(base_model=name, quantization="none"))
    assert M.is_quantized(m4) and not M.is_quantized(m32)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in m4.modules())
    assert m4.config._name_or_path == M.resolve_base(cfg4)  # loaded by path, like a hub model
    assert M.param_count(cfg4) == sum(p.numel() for p in m32.parameters())
    b = lm_batch(M.load_tokenizer(cfg4))
    with torch.no_grad():
        l4, l32 = m4(**b).logits, m32(**b).logits
    # Same weights, 4-bit rounding: close but not equal.
    assert 0 < (l4 - l32).abs().max() < 0.25 * l32.abs().max()
    # quantize=False overrides the config (how a stage loads weights it will train fully).
    assert not M.is_quantized(M.load_causal_lm(cfg4, quantize=False))


# ---- training ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTIN_MODELS)
@pytest.mark.parametrize("rank,quant", [(8, "nf4"), (16, "none"), (0, "none")])
def test_training_reduces_loss_and_changes_exactly_the_right_params(name, rank, quant):
    cfg = ModelConfig(base_model=name, quantization=quant)
    batch = lm_batch(M.load_tokenizer(cfg))
    model = M.prepare_for_training(M.load_causal_lm(cfg), rank, 0, 0.0, "CAUSAL_LM")
    base_raw = {n: b.clone() for n, b in model.state_dict().items() if "lora_" not in n}
    before = snapshot(model)
    loss0 = eval_loss(model, batch)
    train_steps(model, batch)
    assert eval_loss(model, batch) < loss0 - 0.1
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    if rank == 0:
        assert changed == set(before)  # full fine-tune: every parameter moved
        return
    lora = {n for n in before if "lora_B" in n}
    assert lora and lora <= changed and all("lora_" in n for n in changed)
    # Every base tensor, 4-bit packed weights included, is bit-identical.
    state = model.state_dict()
    assert all(torch.equal(base_raw[n], state[n]) for n in base_raw)
    n_lora = sum(before[n].numel() for n in before if "lora_" in n)
    assert n_lora == rank * M.model_shape(cfg).lora_dims


def test_4bit_gradients_unchanged_by_a_no_grad_eval_forward():
    """PPO alternates no-grad rollouts (eval) and training. On AVX512-BF16 CPUs bitsandbytes would repack the 4-bit
    weights at the first eval forward and route later training forwards through a kernel without autograd; the
    loader turns that off (models._disable_cpu_4bit_repacking). Gradients must not depend on what ran before."""
    cfg = ModelConfig(base_model="tiny-llama", quantization="nf4")
    batch = lm_batch(M.load_tokenizer(cfg))
    model = M.prepare_for_training(M.load_causal_lm(cfg), 8, 0, 0.0, "CAUSAL_LM")
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so that gradients flow to every lora_A through the 4-bit layers above
            torch.nn.init.normal_(p, std=0.1)

    def grads():
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    g0 = grads()
    model.eval()
    with torch.no_grad():
        model.generate(batch["input_ids"][:1], max_new_tokens=3, do_sample=False)
    g1 = grads()
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[n], g1[n], atol=1e-6) for n in g0)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_seq_cls_lora_trains_score_head(name):
    cfg = ModelConfig(base_model=name, quantization="nf4")
    tok = M.load_tokenizer(cfg)
    model = M.prepare_for_training(M.load_seq_cls(cfg), 8, 0, 0.0, "SEQ_CLS")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    chosen = tok([format_example(q, a, tok.eos_token) for q, a in QA], return_tensors="pt", padding=True)
    rejected = tok([format_example(q, "몰라요.", tok.eos_token) for q, _ in QA], return_tensors="pt", padding=True)
    before = snapshot(model)

    def margin():
        return (model(**chosen).logits - model(**rejected).logits).squeeze(-1)

    model.train()
    with torch.no_grad():
        m0 = margin().mean().item()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(6):
        (-torch.nn.functional.logsigmoid(margin())).mean().backward()  # Bradley-Terry loss, as in RewardTrainer
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert margin().mean().item() > m0 + 0.1
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("score.modules_to_save" in n for n in changed)
    assert not any("score.original_module" in n for n in changed)
    assert all("lora_" in n or "modules_to_save" in n for n in changed)


# ---- merging -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTIN_MODELS)
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_merge_and_save_round_trip(name, quant, tmp_path):
    cfg = ModelConfig(base_model=name, quantization=quant)
    tok = M.load_tokenizer(cfg)
    batch = lm_batch(tok)
    del batch["labels"]
    model = M.prepare_for_training(M.load_causal_lm(cfg), 8, 0, 0.0, "CAUSAL_LM")
    train_steps(model, {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)})
    model.eval()
    with torch.no_grad():
        peft_logits = model(**batch).logits
        with model.disable_adapter():
            base_logits = model(**batch).logits
    out = M.merge_and_save(model, tmp_path / "merged", cfg)
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved
    assert {"model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    merged = M.load_causal_lm(cfg, out, quantize=False)
    assert not M.is_quantized(merged)
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    scale = peft_logits.abs().max().item()
    if quant == "none":
        torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)
    else:
        # The merged weights are exactly dequant(W4) + BA in float32, and the 4-bit forward dequantizes and
        # multiplies in float32 too (compute_dtype), so the only difference is the order of float32 operations
        # ((x W^T + x A^T B^T) vs x (W + BA)^T): allow float32 accumulation error, relative to the logit scale.
        assert (merged_logits - peft_logits).abs().max().item() < 1e-4 * scale
    # The merge carried the training: the merged model is far from the base (adapters off).
    assert (merged_logits - base_logits).abs().max().item() > 0.05 * scale
    # The artifact loads 4-bit again when the config asks for it (how RM/PPO consume the SFT model).
    if quant == "nf4":
        assert M.is_quantized(M.load_causal_lm(cfg, out))


# ---- LoRA targets ------------------------------------------------------------------------------------------

def test_lora_targets_per_architecture():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    llama = M.load_causal_lm(ModelConfig(base_model="tiny-llama", quantization="none"))
    assert set(M.lora_target_modules(llama)) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"}
    gpt2 = M.load_causal_lm(ModelConfig(base_model="tiny-gpt2", quantization="none"))
    assert set(M.lora_target_modules(gpt2)) == {"c_attn", "c_proj", "c_fc"}
    assert M.make_lora_config(8, 0, 0.0, "CAUSAL_LM", gpt2).fan_in_fan_out  # Conv1D stores (in, out)
    gpt2_4bit = M.load_causal_lm(ModelConfig(base_model="tiny-gpt2", quantization="nf4"))
    assert not M.make_lora_config(8, 0, 0.0, "CAUSAL_LM", gpt2_4bit).fan_in_fan_out  # Linear4bit is (out, in)
    lc = M.make_lora_config(4, 0, 0.1, "SEQ_CLS", llama)
    assert lc.lora_alpha == 8 and lc.r == 4 and lc.lora_dropout == 0.1
    # Generic fallback on an architecture without an entry: every Linear except the output head.
    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=64))
    assert set(M.lora_target_modules(neox)) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


# ---- errors ------------------------------------------------------------------------------------------------

def test_missing_local_path_names_it(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ModelError, match="no_such_model.*does not exist"):
        M.resolve_base(ModelConfig(base_model=missing))
    with pytest.raises(ModelError, match="does not exist"):
        M.load_causal_lm(ModelConfig(base_model="./models/kanana-local"))
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):
        M.resolve_base(ModelConfig(base_model=str(f)))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ModelError, match="local directory.*empty_dir"):
        M.load_causal_lm(ModelConfig(base_model=str(empty)))


def test_unreachable_hub_id_is_one_clear_model_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    cfg = ModelConfig(base_model="rlhf-ablate-test/does-not-exist-7b", quantization="none")
    assert M.resolve_base(cfg) == cfg.base_model  # a hub id resolves to itself; loading finds out
    for load in (M.load_tokenizer, M.load_causal_lm, M.param_count):
        with pytest.raises(ModelError) as e:
            load(cfg)
        msg = str(e.value)
        assert "rlhf-ablate-test/does-not-exist-7b" in msg and "HF_TOKEN" in msg and "HF_HUB_OFFLINE" in msg
        assert "local directory" in msg and "\n" not in msg


def test_full_fine_tune_on_4bit_refused():
    model = M.load_causal_lm(ModelConfig(base_model="tiny-llama", quantization="nf4"))
    with pytest.raises(ModelError, match="4-bit"):
        M.prepare_for_training(model, 0, 0, 0.0, "CAUSAL_LM")


# ---- sizes and memory --------------------------------------------------------------------------------------

# Llama-3.2-1B's published config (meta-llama/Llama-3.2-1B config.json), written locally: no download.
LLAMA_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072, "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001}


@pytest.fixture()
def llama1b_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_1B))
    return str(tmp_path)


def test_param_count_from_config_only(llama1b_dir):
    # Meta's model card gives 1.23B parameters; the exact count from the architecture is 1,235,814,400.
    n = M.param_count(ModelConfig(base_model=llama1b_dir))
    assert n == 1_235_814_400


def test_memory_estimate_orders_what_users_hit(llama1b_dir):
    def est(**kw):
        return estimate_trial_memory_gb(trial_config_from_overrides({"model.base_model": llama1b_dir, **kw}))

    q4 = est(**{"model.quantization": "nf4", "model.compute_dtype": "bfloat16"})
    bf16 = est(**{"model.quantization": "none", "model.compute_dtype": "bfloat16"})
    fp32 = est(**{"model.quantization": "none", "model.compute_dtype": "float32"})
    assert q4 < bf16 < fp32
    # PPO with rank 0 keeps four copies: it must cost more than the LoRA run on one shared base.
    full = est(**{"model.quantization": "none", "model.compute_dtype": "bfloat16", "sft.lora_rank": 0,
                  "rm.lora_rank": 0, "ppo.lora_rank": 0})
    assert full > bf16 + 4 * 1_235_814_400 * 2 / memory.GIB
    # A larger PPO minibatch grows PPO's estimate (the trial's may stay: its largest stage can be eval).
    from rlhf_ablate.run.graph import estimate_stage_bytes

    def ppo_peak(**kw):
        cfg = trial_config_from_overrides({"model.base_model": llama1b_dir, "model.quantization": "nf4",
                                           "model.compute_dtype": "bfloat16", **kw})
        return estimate_stage_bytes(cfg)["ppo"]["peak"]

    assert ppo_peak(**{"ppo.mini_batch_size": 32, "ppo.rollout_batch_size": 64}) > ppo_peak()
    # A 1B model in 4-bit with LoRA fits a consumer GPU; the tiny built-in fits anywhere.
    assert 1 < q4 < 24
    assert estimate_trial_memory_gb(TrialConfig()) < 1.5


@pytest.mark.parametrize("family,base,floor_gib,limit_gib", [
    ("llama-3.1-8b", "kakaocorp/kanana-1.5-8b-base", 10.0, 20.0),
    ("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 3.0, 8.0)])
def test_recommended_gpu_settings_fit_by_the_estimate(tmp_path, family, base, floor_gib, limit_gib):
    """README, "Real models on a GPU": with the bundled gpu_recommended sweep's settings an 8B nf4 PPO trial at rollout
    64 x (512 + 256) is estimated to need at most 20 GiB (a 24 GB card), Llama-3.2-1B at most 8 GiB. The shapes are
    the published configs (rlhf_ablate/models/families.py) saved locally: no hub access."""
    from pathlib import Path

    from rlhf_ablate.config.sweep import expand, load_sweep
    from rlhf_ablate.models.families import family_config

    path = Path(__file__).resolve().parents[1] / "rlhf_ablate" / "sweeps" / "gpu_recommended.yaml"
    assert load_sweep(path).base["model.base_model"] == "kakaocorp/kanana-1.5-8b-base"
    family_config(family).save_pretrained(tmp_path)
    trials = expand(load_sweep(path, {"model.base_model": str(tmp_path)}))
    p = trials[0].config.ppo
    assert (p.rollout_batch_size, p.max_prompt_length, p.max_new_tokens) == (64, 512, 256)
    assert trials[0].config.model.quantization == "nf4"
    for t in trials:
        gib = estimate_trial_memory_gb(t.config)
        assert floor_gib < gib <= limit_gib, (family, base, gib)  # every stage, eval included


def test_estimate_covers_eval_and_compare_for_every_method_in_the_target_dtype(llama1b_dir, monkeypatch):
    """Every method's trial estimates its eval stage and, with an independent judge RM, compare; each phased stage's
    peak is its resident part plus its largest phase, not their sum; on a pre-Ampere GPU ``auto`` computes in fp32
    (models/loading.py: compute_dtype) and the estimate follows."""
    from rlhf_ablate.run.graph import METHODS, estimate_stage_bytes

    for method in METHODS:
        cfg = trial_config_from_overrides({"model.base_model": llama1b_dir, "method": method,
                                           "eval.judge": "rm", "eval.judge_rm_from": "somewhere"})
        st = estimate_stage_bytes(cfg)
        assert {"sft", "rm", method, "eval_sft", f"eval_{method}", "compare"} <= set(st), (method, set(st))
        for comp in st.values():
            phases = [v for k, v in comp.items() if k.startswith("phase:")]
            if phases:
                resident = sum(v for k, v in comp.items() if not k.startswith("phase:") and k not in
                               ("largest_phase", "peak"))
                assert comp["peak"] == pytest.approx(resident + max(phases))
                if sum(v > 0 for v in phases) > 1:
                    assert comp["peak"] < resident + sum(phases)
    cfg = trial_config_from_overrides({"model.base_model": llama1b_dir})
    assert memory.target_dtype(cfg.model, "cuda") == "bfloat16"  # no GPU here: a bf16-capable one is assumed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert memory.target_dtype(cfg.model, "cuda") == "float32"  # a V100 / T4 seen from this machine
    old = estimate_trial_memory_gb(cfg, dtype="bfloat16")
    fp32 = estimate_trial_memory_gb(cfg, dtype="float32")
    assert estimate_trial_memory_gb(cfg) == pytest.approx(fp32) and fp32 > 1.3 * old
