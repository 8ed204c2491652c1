"""The built-in tiny models ("tiny-llama", "tiny-gpt2"): the laptop/CI stand-ins for hub models.

Each is built once from a config with a fixed seed, with a byte-level BPE tokenizer trained on the bundled Korean
corpus, pretrained a few hundred steps on it, and saved to a cache directory. Loading them by path then exercises
the code that loads real hub models (rlhf_ablate/models/loading.py), including 4-bit quantization, which
transformers honours only when the model is given as a path string (docs/stack.md, "TRL").

**The same weights in every process.** The pretraining runs with a pinned torch thread count
(:data:`BUILD_THREADS`) and deterministic algorithms, whatever ``OMP_NUM_THREADS`` or the caller's thread count
is: with the machine's default threads a fresh clone (2 threads) and an earlier run (1 thread, inside a Ray trial)
built different weights, and the same trial ids then gave different PPO rewards (issue 12). The sha256 of the
weights is recorded in ``rlhf_ablate_builtin.json`` and in every result.json (``versions.builtin_sha256``), so a
difference between machines is visible rather than silent.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from pathlib import Path
from typing import Any, Optional

from ..config import BUILTIN_MODELS
from ..errors import ModelError
from ..files import atomic_dir, config_hash, file_lock, read_json, write_json

# Bump when the way built-in models or their tokenizer are made changes; it is part of the cache directory name,
# so an old build is never reused by new code. 3: built with BUILD_THREADS and deterministic algorithms.
BUILTIN_CODE_VERSION = 3

# torch threads of the build, in every process (see the module docstring).
BUILD_THREADS = 1

# Fixed init seed of the built-in models: the same weights on every machine, whatever the trial seed.
BUILTIN_INIT_SEED = 1234

# Target vocabulary of the built-in tokenizer, and the vocab_size of the built-in model configs. Byte-level BPE
# starts from 256 byte symbols and a Hangul syllable is 3 UTF-8 bytes, so with a few hundred merges most syllables
# still cost 2-3 tokens; ~2000 lets the common syllables and frequent words of the corpus become single tokens
# (about 1 token per syllable on the bundled data, measured by tests/test_models.py), and sequence length is what
# dominates CPU time. If the corpus is too small to learn that many merges the tokenizer is smaller than the
# embedding table and the extra rows are never used (as with Llama-3's padded vocabulary).
BUILTIN_VOCAB_SIZE = 2000

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# The chat template renders conversations with the project's one prompt template (rlhf_ablate/data/prompting.py), so
# `messages` datasets and the plain-text stages produce the same text. `{% generation %}` marks the assistant part
# for TRL's `assistant_only_loss` (docs/stack.md, "TRL").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### 질문:\\n' + message['content'] | trim + '\\n\\n### 답변:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + eos_token }}"
    "{% endgeneration %}{% elif message['role'] == 'system' %}{{ message['content'] | trim + '\\n\\n' }}"
    "{% endif %}{% endfor %}"
)

# Seed text for the built-in tokenizer. It is always part of the corpus, so the tokenizer knows the prompt template
# and common everyday Korean even before (or without) the bundled data files.
SEED_TEXT = """### 질문:
한국어로 간단히 대답해 주세요.

### 답변:
네, 알겠습니다. 질문에 대해 최대한 정확하고 친절하게 답변드리겠습니다.
안녕하세요. 오늘 날씨가 정말 좋네요. 저는 서울에 살고 있습니다. 주말에는 친구들과 함께 공원에 가서 산책을 합니다.
인공지능은 사람의 학습 능력과 추론 능력을 컴퓨터 프로그램으로 구현한 기술입니다. 최근에는 대규모 언어 모델이
많은 관심을 받고 있습니다. 언어 모델은 문장의 다음 단어를 예측하도록 학습됩니다.
건강을 지키려면 규칙적으로 운동하고, 충분히 자고, 균형 잡힌 식사를 하는 것이 중요합니다. 물을 자주 마시는 것도
도움이 됩니다. 스트레스를 줄이기 위해 취미 생활을 하는 사람도 많습니다.
한국의 수도는 서울이고, 부산은 두 번째로 큰 도시입니다. 제주도는 아름다운 자연으로 유명한 섬입니다.
김치는 배추와 무에 고춧가루, 마늘, 파, 젓갈 등을 넣어 만든 한국의 전통 음식입니다. 비빔밥과 불고기도 인기가 많습니다.
공부를 잘하는 방법은 무엇인가요? 계획을 세우고, 꾸준히 복습하고, 모르는 것은 선생님께 질문하는 것이 좋습니다.
책을 읽으면 생각하는 힘이 길러지고 새로운 지식을 얻을 수 있습니다. 역사, 과학, 문학, 경제, 사회, 문화, 예술.
죄송하지만 그 질문에는 답변하기 어렵습니다. 다른 도움이 필요하시면 말씀해 주세요. 감사합니다. 좋은 하루 보내세요!
사과, 바나나, 딸기, 포도, 수박, 귤. 월요일, 화요일, 수요일, 목요일, 금요일, 토요일, 일요일. 하나, 둘, 셋, 넷, 다섯.
1. 첫째, 2. 둘째, 3. 셋째. 2024년 3월 15일 오후 2시 30분. 가격은 10,000원입니다. Python, GPU, AI, LoRA, PPO.
"""


# ---------------------------------------------------------------------------------------------------------
# Built-in tiny models
# ---------------------------------------------------------------------------------------------------------

# How many times this process built a built-in model (tests check that a second resolve does not rebuild).
BUILD_COUNT = 0


def _builtin_model_config(name: str) -> Any:
    """The transformers config of a built-in model. Special-token ids match the order in `_train_tokenizer`."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "tiny-llama":
        from transformers import LlamaConfig

        # Llama-3.2-1B's shape in miniature: GQA (2 kv heads for 4 query heads), SwiGLU MLP, tied embeddings.
        return LlamaConfig(vocab_size=BUILTIN_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=True, **ids)
    if name == "tiny-gpt2":
        from transformers import GPT2Config

        # KoGPT2's architecture (Conv1D layers, learned positions) in miniature.
        return GPT2Config(vocab_size=BUILTIN_VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                          n_inner=None, tie_word_embeddings=True, **ids)
    raise ModelError(f"model.base_model: unknown built-in model {name!r}; built-ins are {', '.join(BUILTIN_MODELS)}.")


def corpus_texts() -> list[str]:
    """Texts the built-in tokenizer is trained on: SEED_TEXT plus every string of the bundled Korean sample
    (rlhf_ablate/data/__init__.py: corpus_texts), NFC-normalised."""
    from ..data import corpus_texts as sample_texts

    return [unicodedata.normalize("NFC", t) for t in [SEED_TEXT, *sample_texts()] if t.strip()]


def _corpus_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def cache_root() -> Path:
    """$RLHF_ABLATE_CACHE, or ~/.cache/rlhf_ablate."""
    return Path(os.environ.get("RLHF_ABLATE_CACHE") or Path.home() / ".cache" / "rlhf_ablate").expanduser()


def builtin_dir(name: str, texts: Optional[list[str]] = None) -> Path:
    """Cache directory of a built-in model: builtin/<name>-<hash(model config, corpus, code version)>."""
    mc = _builtin_model_config(name).to_dict()
    mc.pop("transformers_version", None)  # hashed separately below, so the key is explicit about it
    import transformers

    key = {"model_config": mc, "corpus": _corpus_hash(texts if texts is not None else corpus_texts()),
           "vocab": BUILTIN_VOCAB_SIZE, "seed": BUILTIN_INIT_SEED, "code": BUILTIN_CODE_VERSION,
           "pretrain_steps": BUILTIN_PRETRAIN_STEPS, "threads": BUILD_THREADS,
           "transformers": transformers.__version__}
    return cache_root() / "builtin" / f"{name}-{config_hash(key, 12)}"


def _train_tokenizer(texts: list[str]) -> Any:
    """Byte-level BPE with NFC normalisation (docs/stack.md, "Installing"), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Order fixes the ids: <pad>=0, <s>=1, </s>=2, <unk>=3 (the model configs above rely on it).
    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    trainer = trainers.BpeTrainer(vocab_size=BUILTIN_VOCAB_SIZE, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, clean_up_tokenization_spaces=False,
                                   **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_builtin(name: str, texts: list[str], out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from ..runtime import pinned_threads

    global BUILD_COUNT
    tokenizer = _train_tokenizer(texts)
    config = _builtin_model_config(name)
    deterministic = torch.are_deterministic_algorithms_enabled()
    # Fixed init independent of (and without disturbing) the caller's RNG state; a fixed thread count and
    # deterministic kernels, so every process computes the same weights (module docstring).
    with torch.random.fork_rng(devices=[]), pinned_threads(BUILD_THREADS):
        torch.use_deterministic_algorithms(True)
        try:
            torch.manual_seed(BUILTIN_INIT_SEED)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            _pretrain(model, tokenizer)
        finally:
            torch.use_deterministic_algorithms(deterministic)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_json(out / "rlhf_ablate_builtin.json", {
        "name": name, "corpus_sha256": _corpus_hash(texts), "texts": len(texts), "vocab": len(tokenizer),
        "code_version": BUILTIN_CODE_VERSION, "init_seed": BUILTIN_INIT_SEED, "threads": BUILD_THREADS,
        "weights_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()})
    BUILD_COUNT += 1


def builtin_sha256(path: str | Path) -> Optional[str]:
    """The sha256 of a built-in model's weights, as recorded at build time (None for anything else)."""
    try:
        return read_json(Path(path) / "rlhf_ablate_builtin.json").get("weights_sha256")
    except (OSError, ValueError):
        return None


BUILTIN_PRETRAIN_STEPS = 300


def _pretrain(model: Any, tokenizer: Any, steps: int = BUILTIN_PRETRAIN_STEPS) -> None:
    """Pretrain the built-in model on the bundled corpus (raw documents, no prompt template, no eval file).

    Real base models are pretrained, and LoRA only adapts them: on a randomly initialised model a rank-8 adapter
    barely lowers the SFT loss, so a LoRA-rank ablation on it would measure nothing. A few hundred full-parameter
    steps (about 20 s on 2 CPU cores, once per machine: the result is cached) give a small model that writes Korean,
    which SFT then teaches the ### 질문/### 답변 format.
    """
    import torch

    from ..data import pretrain_texts

    docs = [tokenizer(t + tokenizer.eos_token)["input_ids"][:128] for t in pretrain_texts()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    with torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(BUILTIN_INIT_SEED)
        for step in range(steps):
            batch = [docs[i] for i in torch.randint(len(docs), (32,), generator=g).tolist()]
            L = max(map(len, batch))
            ids = torch.full((len(batch), L), tokenizer.pad_token_id)
            att = torch.zeros((len(batch), L), dtype=torch.long)
            for j, d in enumerate(batch):
                ids[j, :len(d)] = torch.tensor(d)
                att[j, :len(d)] = 1
            for pg in opt.param_groups:  # linear warmup over 20 steps, then linear decay to 10 %
                pg["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
            loss = model(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    model.eval()
    model.config.rlhf_ablate_pretrain = {"steps": steps, "final_loss": round(float(loss.detach()), 4)}


def ensure_builtin(name: str) -> str:
    """Build the built-in model once (atomically, under a file lock) and return its directory."""
    texts = corpus_texts()
    final = builtin_dir(name, texts)
    if final.is_dir():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The lock makes a concurrent process wait for the first build instead of building too; the rename makes the
    # directory appear only complete, so a killed build never leaves something a later trial would load.
    with file_lock(str(final) + ".lock"):
        if final.is_dir():
            return str(final)
        with atomic_dir(final) as tmp:
            _build_builtin(name, texts, tmp)
    return str(final)


