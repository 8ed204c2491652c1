"""Base models: resolution, loading (4-bit or not), LoRA, merging, and memory estimates.

One loading path for everything. A hub id, a local directory and a built-in tiny model all go through
``from_pretrained(<path or id>)``: the built-in models ("tiny-llama", "tiny-gpt2") are built once from a config with a
fixed seed, with a byte-level BPE tokenizer trained on the bundled Korean corpus, and saved to a cache directory.
Loading them by path exercises the code that loads real hub models, including 4-bit quantization, which
transformers honours only when the model is given as a path string (see /work/shared/FACTS.md, TRL section).

Public API (see docs/contracts.md):
    resolve_base(cfg) -> str                          builtin -> cached dir; local dir -> itself; hub id -> as is
    load_tokenizer(cfg, path=None)                    pad token always set
    load_causal_lm(cfg, path=None, *, quantize=True)  4-bit when cfg.quantization is nf4/fp4
    load_seq_cls(cfg, path=None, *, quantize=True)    num_labels=1, pad_token_id set (reward / value models)
    lora_target_modules(model), make_lora_config(...), prepare_for_training(...)
    merge_and_save(model, out_dir, cfg)               full-precision merged model + tokenizer, loadable by path
    param_count(cfg), estimate_trial_memory_gb(trial_cfg)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from .config import BUILTIN_MODELS, ModelConfig
from .errors import ModelError

# Bump when the way built-in models or their tokenizer are made changes; it is part of the cache directory name,
# so an old build is never reused by new code.
BUILTIN_CODE_VERSION = 2

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

# The chat template renders conversations with the project's one prompt template (rlhf_ablate/prompting.py), so
# `messages` datasets and the plain-text stages produce the same text. `{% generation %}` marks the assistant part
# for TRL's `assistant_only_loss` (FACTS: TRL 1.16).
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
    """Texts the built-in tokenizer is trained on: the bundled Korean corpus plus SEED_TEXT.

    Uses ``rlhf_ablate.data.corpus_texts()`` when the data package provides it; otherwise reads every string value of
    every JSON / JSON-lines file under rlhf_ablate/data/ko_sample/.
    """
    texts: list[str] = []
    try:
        from . import data as data_pkg

        provided = getattr(data_pkg, "corpus_texts", None)
    except Exception as e:  # noqa: BLE001 - a broken data package would fail the trial anyway; say so, go on
        import warnings

        warnings.warn(f"rlhf_ablate.data failed to import ({type(e).__name__}: {e}); the built-in tokenizer is "
                      f"trained on the raw ko_sample files instead.", stacklevel=2)
        provided = None
    if provided is not None:
        try:
            texts = [t for t in provided() if isinstance(t, str)]
        except Exception as e:  # noqa: BLE001 - same reasoning: the data stage reports its own errors
            import warnings

            warnings.warn(f"rlhf_ablate.data.corpus_texts() failed ({type(e).__name__}: {e}); the built-in "
                          f"tokenizer is trained on the raw ko_sample files instead.", stacklevel=2)
            provided = None
    if provided is None:
        sample_dir = Path(__file__).resolve().parent / "data" / "ko_sample"
        for f in sorted(sample_dir.glob("*.json*")) if sample_dir.is_dir() else []:
            raw = f.read_text(encoding="utf-8")
            try:
                rows = [json.loads(raw)] if f.suffix == ".json" else [
                    json.loads(line) for line in raw.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise ModelError(f"{f}: not valid JSON ({e}); it is read to train the built-in tokenizer.") from e
            for row in rows:
                texts.extend(_strings(row))
    return [unicodedata.normalize("NFC", t) for t in [SEED_TEXT, *texts] if t.strip()]


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


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

    key = json.dumps({"model_config": mc, "corpus": _corpus_hash(texts if texts is not None else corpus_texts()),
                      "vocab": BUILTIN_VOCAB_SIZE, "seed": BUILTIN_INIT_SEED, "code": BUILTIN_CODE_VERSION,
                      "pretrain_steps": BUILTIN_PRETRAIN_STEPS,
                      "transformers": transformers.__version__}, sort_keys=True, default=str)
    return cache_root() / "builtin" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _train_tokenizer(texts: list[str]) -> Any:
    """Byte-level BPE with NFC normalisation (FACTS recipe), wrapped for transformers."""
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

    global BUILD_COUNT
    tokenizer = _train_tokenizer(texts)
    config = _builtin_model_config(name)
    # Fixed init independent of (and without disturbing) the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_INIT_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _pretrain(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "rlhf_ablate_builtin.json").write_text(json.dumps(
        {"name": name, "corpus_sha256": _corpus_hash(texts), "texts": len(texts), "vocab": len(tokenizer),
         "code_version": BUILTIN_CODE_VERSION, "init_seed": BUILTIN_INIT_SEED}, indent=1))
    BUILD_COUNT += 1


BUILTIN_PRETRAIN_STEPS = 300


def _pretrain(model: Any, tokenizer: Any, steps: int = BUILTIN_PRETRAIN_STEPS) -> None:
    """Pretrain the built-in model on the bundled corpus (raw documents, no prompt template, no eval file).

    Real base models are pretrained, and LoRA only adapts them: on a randomly initialised model a rank-8 adapter
    barely lowers the SFT loss, so a LoRA-rank ablation on it would measure nothing. A few hundred full-parameter
    steps (about 20 s on 2 CPU cores, once per machine: the result is cached) give a small model that writes Korean,
    which SFT then teaches the ### 질문/### 답변 format.
    """
    import torch

    from .data import pretrain_texts

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
    model.config.rlhf_ablate_pretrain = {"steps": steps, "final_loss": round(float(loss), 4)}


def ensure_builtin(name: str) -> str:
    """Build the built-in model once (atomically, under a file lock) and return its directory."""
    from filelock import FileLock

    texts = corpus_texts()
    final = builtin_dir(name, texts)
    if final.is_dir():
        return str(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The lock makes a concurrent process wait for the first build instead of building too; the rename makes the
    # directory appear only complete, so a killed build never leaves something a later trial would load.
    with FileLock(str(final) + ".lock", timeout=600):
        if final.is_dir():
            return str(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            _build_builtin(name, texts, tmp)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


# ---------------------------------------------------------------------------------------------------------
# Resolution and loading
# ---------------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _looks_like_path(s: str) -> bool:
    return (s.startswith(("/", "./", "../", "~", ".\\")) or s.count("/") >= 2 or "\\" in s
            or s.endswith("/") or s in (".", ".."))


def resolve_base(cfg: ModelConfig) -> str:
    """Built-in name -> its cache directory (built if needed); local directory -> itself; hub id -> as is.

    A string that looks like a path but is not a directory raises ModelError naming it. A hub id is returned
    unchanged; whether it can be fetched is found out (and explained) when it is loaded.
    """
    name = cfg.base_model.strip()
    if name in BUILTIN_MODELS:
        return ensure_builtin(name)
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve())
    if p.exists():
        raise ModelError(f"model.base_model: {name!r} is a file; give the directory holding config.json and the "
                         f"safetensors weights.")
    if _looks_like_path(name):
        raise ModelError(f"model.base_model: local model directory {name!r} does not exist (resolved to "
                         f"{p.resolve()}). Check the path, or use a built-in model ({', '.join(BUILTIN_MODELS)}) "
                         f"or a hub id such as meta-llama/Llama-3.2-1B.")
    if not _HUB_ID.match(name):
        raise ModelError(f"model.base_model: {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
                         f"an existing directory, nor a hub id of the form org/name.")
    return name


def _is_hub_id(path: str) -> bool:
    return not Path(path).expanduser().exists()


@contextlib.contextmanager
def _explain_load_errors(path: str, cfg: ModelConfig, what: str):
    """Turn the many ways a hub or local load fails into one ModelError paragraph."""
    try:
        yield
    except ModelError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:  # hub errors, offline mode, missing files, bad configs
        cause = " ".join(str(e).split())[:400]
        if _is_hub_id(path):
            from huggingface_hub import constants

            rev = f" at revision {cfg.revision!r}" if cfg.revision else ""
            offline = (" Offline mode is on (HF_HUB_OFFLINE=1), so only models already in the local Hugging Face "
                       "cache can load." if constants.HF_HUB_OFFLINE else "")
            tried = ("the local Hugging Face cache only" if constants.HF_HUB_OFFLINE
                     else "the local Hugging Face cache and the hub")
            raise ModelError(
                f"model.base_model: could not load the {what} of hub model {path!r}{rev}: tried {tried}, which "
                f"failed ({type(e).__name__}: {cause}).{offline} This machine "
                f"may have no network; if the model is gated, accept its licence and set HF_TOKEN; check the id "
                f"spelling. To use a model you downloaded elsewhere (`hf download {path} --local-dir DIR`), set "
                f"model.base_model=DIR (a local directory with config.json and *.safetensors).") from e
        raise ModelError(f"model.base_model: could not load the {what} from local directory {path!r} "
                         f"({type(e).__name__}: {cause}). It needs config.json, tokenizer files and *.safetensors "
                         f"weights (this project loads safetensors only).") from e


def _hub_kwargs(cfg: ModelConfig, path: str) -> dict:
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision and _is_hub_id(path):
        kw["revision"] = cfg.revision
    return kw


def _torch_dtype(cfg: ModelConfig) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.compute_dtype]


def bnb_config(cfg: ModelConfig) -> Any:
    """BitsAndBytesConfig for cfg.quantization (nf4 / fp4), or None for 'none'."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                              bnb_4bit_compute_dtype=_torch_dtype(cfg),
                              bnb_4bit_use_double_quant=cfg.double_quant)


def load_tokenizer(cfg: ModelConfig, path: Optional[str] = None) -> Any:
    """The tokenizer of the base (or of `path`), with a pad token (eos when the model has none)."""
    from transformers import AutoTokenizer

    src = path or resolve_base(cfg)
    with _explain_load_errors(src, cfg, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(src, **_hub_kwargs(cfg, src))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"model.base_model: the tokenizer of {src!r} has neither a pad nor an eos token; "
                             f"padding and PPO's end-of-response handling need one.")
        tok.pad_token = tok.eos_token
    return tok


def _device_map() -> Any:
    import torch

    # One trial = one GPU (Ray/SLURM expose it as the current device); bitsandbytes needs the weights placed at load.
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else None


def _load(auto_cls: Any, cfg: ModelConfig, path: Optional[str], quantize: bool, what: str, **extra: Any) -> Any:
    src = path or resolve_base(cfg)
    kw = dict(_hub_kwargs(cfg, src), dtype=_torch_dtype(cfg), use_safetensors=True, **extra)
    q = bnb_config(cfg) if quantize else None
    if q is not None:
        # Honoured only because `src` is a path/id string (FACTS), which is why built-ins live on disk.
        kw["quantization_config"] = q
    dm = _device_map()
    if dm is not None:
        kw["device_map"] = dm
    with _explain_load_errors(src, cfg, what):
        model = auto_cls.from_pretrained(src, **kw)
    if q is not None:
        _disable_cpu_4bit_repacking(model)
    return model


def _disable_cpu_4bit_repacking(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    Trap (bitsandbytes 0.50 on CPUs with AVX512-BF16): the first eval-mode forward without grad repacks every
    Linear4bit weight in place (`packing_format_for_cpu`), and from then on every forward, training ones included,
    goes through `gemv_4bit`, which has no autograd kernel: gradients through the frozen 4-bit layers to the LoRA
    adapters below them are silently wrong (torch warns "an autograd kernel was not registered"). PPO alternates
    no-grad rollouts and training, so it would hit this every step. The flag is per module; turning it off keeps
    the standard dequantize-then-matmul path (slower CPU inference, correct gradients). GPUs are unaffected.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def load_causal_lm(cfg: ModelConfig, path: Optional[str] = None, *, quantize: bool = True) -> Any:
    """Causal LM of the base (or of `path`, e.g. a merged SFT model), 4-bit if configured and `quantize`."""
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM, cfg, path, quantize, "causal LM")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(cfg, path).pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    return model


def load_seq_cls(cfg: ModelConfig, path: Optional[str] = None, *, quantize: bool = True) -> Any:
    """Sequence-classification model with one output (reward / value model). The score head is new (random init
    from the caller's torch seed) unless `path` already holds one. pad_token_id is set, which the model needs to
    find the last real token of each padded row."""
    from transformers import AutoModelForSequenceClassification

    pad = load_tokenizer(cfg, path).pad_token_id
    model = _load(AutoModelForSequenceClassification, cfg, path, quantize, "sequence-classification model",
                  num_labels=1, pad_token_id=pad)
    model.config.pad_token_id = pad
    return model


def is_quantized(model: Any) -> bool:
    """True when the model (or a peft model's base) holds bitsandbytes 4-bit weights."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text",
                                "qwen2", "qwen3", "phi3", "exaone", "kanana")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
_HEAD_NAMES = ("lm_head", "score", "classifier", "v_head", "value_head")


def _is_linear_like(module: Any) -> bool:
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))  # bnb Linear4bit subclasses nn.Linear


def lora_target_modules(model: Any) -> list[str]:
    """LoRA target module names for the model's architecture.

    Llama-like models (llama, gemma, mistral, qwen, ...): the attention and MLP projections. GPT-2: c_attn, c_proj
    (attention and MLP output), c_fc. Anything else: every Linear / Conv1D layer except the output head and
    classification heads.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LORA_TARGETS:
        return list(LORA_TARGETS[model_type])
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if _is_linear_like(module) and module is not out_emb and leaf not in _HEAD_NAMES and leaf != "base_layer":
            names.add(leaf)
    if not names:
        raise ModelError(f"model has no Linear or Conv1D layers LoRA could target (model_type={model_type!r}).")
    return sorted(names)


def _targets_conv1d(model: Any, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())


def make_lora_config(rank: int, alpha: int, dropout: float, task_type: str, model: Any) -> Any:
    """peft LoraConfig. alpha 0 means 2 * rank. task_type 'CAUSAL_LM' or 'SEQ_CLS'; with SEQ_CLS, peft adds the
    `score`/`classifier` head to modules_to_save, so the head is trained fully and saved with the adapter.
    fan_in_fan_out is set for GPT-2's Conv1D layers (weight stored as (in, out)); a 4-bit GPT-2 has them converted
    to Linear4bit by transformers, which needs it off."""
    from peft import LoraConfig

    if rank < 1:
        raise ModelError(f"LoRA rank must be >= 1 for an adapter, got {rank}; rank 0 is a full fine-tune.")
    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ModelError(f"LoRA task_type must be 'CAUSAL_LM' or 'SEQ_CLS', got {task_type!r}.")
    targets = lora_target_modules(model)
    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=targets,
                      fan_in_fan_out=_targets_conv1d(model, targets), bias="none", task_type=task_type)


# Below this many parameters, gradient checkpointing costs more time than the memory it saves is worth.
GRADIENT_CHECKPOINTING_MIN_PARAMS = 100_000_000


def wants_gradient_checkpointing(model_or_count: Any) -> bool:
    """The one rule for gradient checkpointing (stages pass it to TRL configs; the memory estimate assumes it)."""
    n = model_or_count if isinstance(model_or_count, int) else sum(p.numel() for p in model_or_count.parameters())
    return n >= GRADIENT_CHECKPOINTING_MIN_PARAMS


def prepare_for_training(model: Any, rank: int, alpha: int, dropout: float, task_type: str,
                         quantized: Optional[bool] = None) -> Any:
    """rank > 0: a peft model with fresh LoRA adapters (and prepare_model_for_kbit_training first when 4-bit).
    rank 0: the model itself with every parameter trainable (a full fine-tune), refused on a 4-bit model."""
    quantized = is_quantized(model) if quantized is None else quantized
    gc = wants_gradient_checkpointing(model)
    if rank == 0:
        if quantized:
            raise ModelError("lora_rank=0 (full fine-tune) on a 4-bit model: bitsandbytes 4-bit weights cannot be "
                             "trained. Set model.quantization=none for rank-0 trials, or use a LoRA rank > 0.")
        for p in model.parameters():
            p.requires_grad_(True)
        if gc:
            model.gradient_checkpointing_enable()
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    elif gc:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return get_peft_model(model, make_lora_config(rank, alpha, dropout, task_type, model))


# ---------------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------------

def merge_and_save(model: Any, out_dir: str | os.PathLike, cfg: ModelConfig, *, tokenizer: Any = None,
                   base_path: Optional[str] = None) -> str:
    """Save a full-precision model (adapters merged) plus tokenizer as safetensors in `out_dir`; return it.

    - peft model on an unquantized base: ``merge_and_unload()`` (this merges in place: the peft model passed in is
      consumed).
    - peft model on a 4-bit base: peft's own merge into Linear4bit would re-quantize W + BA and lose the update's
      precision, so instead the base is reloaded unquantized from `base_path` (default: the path the base was
      loaded from), every 4-bit weight is replaced by its dequantized value (the weights the adapter was trained
      against, in cfg.compute_dtype), and the adapter is merged there. The result computes what the 4-bit peft model
      computed, up to float rounding; a later stage may load it 4-bit again (re-quantizing W_dq + BA).
    - a plain (rank-0) model: saved as is.
    The saved config carries no quantization_config, so loading the directory gives what `cfg` asks for.
    """
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        inner = model.get_base_model()
        src = base_path or inner.config._name_or_path
        merged = _merge_quantized(model, inner, src, cfg) if is_quantized(inner) else model.merge_and_unload()
    else:
        if is_quantized(model):
            raise ModelError("merge_and_save got a 4-bit model without adapters: there is nothing trained to save; "
                             "pass the peft model, or load the base with model.quantization=none.")
        merged, src = model, base_path or model.config._name_or_path
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.save_pretrained(out, safe_serialization=True)
    (tokenizer if tokenizer is not None else load_tokenizer(cfg, src)).save_pretrained(out)
    return str(out)


def _dequantize_4bit(module: Any) -> Any:
    """The weight of a bitsandbytes Linear4bit as a dense (out, in) tensor.

    Trap (bitsandbytes 0.50, CPUs with AVX512-BF16): the first forward in eval mode without grad repacks the 4-bit
    weight in place into a CPU-specific layout (`packing_format_for_cpu`, bf16 absmax), after which
    `dequantize_4bit` (and so peft's `dequantize_bnb_weight` and peft's own merge) returns garbage. bitsandbytes
    undoes the packing itself before saving a state dict (`Linear4bit._save_to_state_dict`); we do the same, in
    place, and its next eval forward packs again.
    """
    import bitsandbytes as bnb

    w = module.weight
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return bnb.functional.dequantize_4bit(w.data, w.quant_state)


def _merge_quantized(peft_model: Any, inner: Any, src: str, cfg: ModelConfig) -> Any:
    import bitsandbytes as bnb
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D

    dtype = _torch_dtype(cfg)
    extra = {"num_labels": inner.config.num_labels} if hasattr(inner, "score") or hasattr(inner, "classifier") else {}
    with _explain_load_errors(src, cfg, "unquantized base for merging"):
        fresh = type(inner).from_pretrained(src, dtype=dtype, use_safetensors=True, **_hub_kwargs(cfg, src), **extra)
    fresh.config.pad_token_id = inner.config.pad_token_id
    with torch.no_grad():
        for name, module in inner.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                target = fresh.get_submodule(name.removesuffix(".base_layer"))
                w = _dequantize_4bit(module).to(device="cpu", dtype=dtype)
                # transformers converts GPT-2's Conv1D (weight (in, out)) into Linear4bit (weight (out, in)).
                target.weight.copy_(w.T if isinstance(target, Conv1D) else w)
    adapter = peft_model.active_adapter
    lcfg = copy.deepcopy(peft_model.peft_config[adapter])
    lcfg.fan_in_fan_out = _targets_conv1d(fresh, list(lcfg.target_modules))
    lcfg.inference_mode = True
    fresh_peft = get_peft_model(fresh, lcfg)
    state = {k: v.detach().to("cpu", dtype) for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter).items()}
    result = set_peft_model_state_dict(fresh_peft, state)
    if result.unexpected_keys:
        raise ModelError(f"merge_and_save: adapter weights did not fit the reloaded base {src!r} "
                         f"(unexpected keys: {result.unexpected_keys[:5]}).")
    return fresh_peft.merge_and_unload()


# ---------------------------------------------------------------------------------------------------------
# Sizes and memory
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a base model, read from its config (no weights loaded)."""

    params: int              # all parameters (tied weights counted once)
    quantizable: int         # parameters of Linear/Conv1D layers bitsandbytes converts (not embeddings/head)
    lora_dims: int           # sum of (in + out) over the LoRA target layers: LoRA params = rank * lora_dims
    hidden: int
    layers: int
    heads: int
    kv_dim: int              # kv heads * head dim (GQA shrinks the KV cache)
    vocab: int


def _load_config(cfg: ModelConfig) -> Any:
    name = cfg.base_model.strip()
    if name in BUILTIN_MODELS:
        return _builtin_model_config(name)
    from transformers import AutoConfig

    src = resolve_base(cfg)
    with _explain_load_errors(src, cfg, "config"):
        return AutoConfig.from_pretrained(src, **_hub_kwargs(cfg, src))


@functools.lru_cache(maxsize=32)
def _shape_cached(cfg: ModelConfig) -> ModelShape:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _load_config(cfg)
    with init_empty_weights():  # meta tensors: shapes without memory
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    # transformers 5 ties input and output embeddings when weights are loaded, not in from_config; tie here so
    # a tied head is counted once (parameters() deduplicates shared tensors).
    model.tie_weights()
    params = sum(p.numel() for p in model.parameters())
    out_emb = model.get_output_embeddings()
    targets = set(lora_target_modules(model))
    quantizable = lora_dims = 0
    for name, m in model.named_modules():
        if _is_linear_like(m) and m is not out_emb:
            quantizable += m.weight.numel()
            if name.rsplit(".", 1)[-1] in targets:
                lora_dims += sum(m.weight.shape)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    heads = getattr(text, "num_attention_heads", None) or text.n_head
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    layers = getattr(text, "num_hidden_layers", None) or text.n_layer
    return ModelShape(params=params, quantizable=quantizable, lora_dims=lora_dims, hidden=hidden, layers=layers,
                      heads=heads, kv_dim=kv_heads * head_dim, vocab=text.vocab_size)


def model_shape(cfg: ModelConfig) -> ModelShape:
    return _shape_cached(cfg)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the base causal LM, from its config alone (built-ins: their config; hub ids and directories:
    AutoConfig on meta tensors, which needs the config locally or online)."""
    return model_shape(cfg).params


GIB = 1024 ** 3
CUDA_OVERHEAD_GIB = 0.5   # CUDA context, cuBLAS workspace, allocator
FRAGMENTATION = 1.15      # PyTorch caching-allocator slack on top of live tensors


def estimate_trial_memory_gb(trial_cfg: Any) -> float:
    """Estimated peak GPU memory of one trial, in GiB, used to pack trials on GPUs and refuse impossible ones.

    The stages of a trial run one after another and free their models, so the peak is the largest stage::

        peak = FRAGMENTATION * max(SFT, RM, PPO or DPO) + CUDA_OVERHEAD_GIB

    with, for P parameters of which Q sit in quantizable Linear layers, compute-dtype width w (4 fp32, 2 bf16/fp16):

    - weights W:  4-bit: Q * (0.5 + scales) + (P - Q) * w, scales = 4/64 bytes per weight (fp32 absmax per
      64-block) or ~1/64 with double quantization; unquantized: P * w.
    - LoRA of rank r: r * sum(in + out) over target layers trainable parameters, each 16 bytes (fp32 weight,
      gradient and two Adam moments). A full fine-tune (r = 0): 4 * w bytes per parameter (weight, gradient,
      two Adam moments, in the parameter dtype).
    - activations for batch b and length s (Korthikanti et al. 2022, "Reducing Activation Recomputation",
      eq. 1, scaled from 16-bit to w): b * s * h * L * (34 + 5 * heads * s / h) * w / 2; with gradient
      checkpointing (models >= GRADIENT_CHECKPOINTING_MIN_PARAMS) only the layer inputs b * s * h * L * w plus one
      layer's activations are kept.
    - LM logits: b * s * V * 4 bytes * 3 (fp32 logits, log-softmax, gradient); not for the reward model.

    Stages: SFT = W + LoRA(sft) + act(sft.batch_size) + logits. RM = W + LoRA(rm) + act(2 * rm.batch_size) (chosen
    and rejected). PPO with LoRA: ONE shared base W, policy and value adapters trained (2 * LoRA(ppo)), the reward
    adapter frozen, policy and value forward/backward on ppo.mini_batch_size, logits, and the rollout KV cache
    rollout_batch_size * s * L * 2 * kv_dim * w. PPO with rank 0: separate copies, policy and value trained
    (2 * full) plus reference and reward weights (2 * W). DPO: W + LoRA(dpo) + act(2 * batch) + logits (LoRA's
    reference is the base with adapters off; rank 0 adds a reference copy W). s = model.max_length throughout.
    """
    cfg = trial_cfg
    shape = model_shape(cfg.model)
    w = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.compute_dtype]
    P, Q = shape.params, shape.quantizable
    s = cfg.model.max_length
    if cfg.model.quantization != "none":
        scales = (1 / 64 + 4 / (64 * 256)) if cfg.model.double_quant else 4 / 64
        weights = Q * (0.5 + scales) + (P - Q) * w
    else:
        weights = P * w
    gc = wants_gradient_checkpointing(P)

    def trainable(rank: int) -> float:
        return rank * shape.lora_dims * 16 if rank > 0 else P * 4 * w

    def act(b: int) -> float:
        per_layer = b * s * shape.hidden * (34 + 5 * shape.heads * s / shape.hidden) * w / 2
        if gc:
            return b * s * shape.hidden * shape.layers * w + per_layer
        return per_layer * shape.layers

    def logits(b: int) -> float:
        return b * s * shape.vocab * 4 * 3

    stages = {
        "sft": weights + trainable(cfg.sft.lora_rank) + act(cfg.sft.batch_size) + logits(cfg.sft.batch_size),
        "rm": weights + trainable(cfg.rm.lora_rank) + act(2 * cfg.rm.batch_size),
    }
    if cfg.method == "ppo":
        p = cfg.ppo
        kv = p.rollout_batch_size * s * shape.layers * 2 * shape.kv_dim * w
        common = 2 * act(p.mini_batch_size) + logits(p.mini_batch_size) + kv
        if p.lora_rank > 0:
            frozen_rm = cfg.rm.lora_rank * shape.lora_dims * w if cfg.rm.lora_rank > 0 else weights
            stages["ppo"] = weights + 2 * trainable(p.lora_rank) + frozen_rm + common
        else:
            stages["ppo"] = 2 * trainable(0) + 2 * weights + common
    else:
        d = cfg.dpo
        ref = weights if d.lora_rank == 0 else 0
        stages["dpo"] = weights + ref + trainable(d.lora_rank) + act(2 * d.batch_size) + logits(2 * d.batch_size)
    return FRAGMENTATION * max(stages.values()) / GIB + CUDA_OVERHEAD_GIB
