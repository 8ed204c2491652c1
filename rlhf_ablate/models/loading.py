"""Base-model resolution and loading: one path for hub ids, local directories and the built-in models.

    resolve_base(cfg) -> str                          builtin -> cached dir; local dir -> itself; hub id -> as is
    load_tokenizer(cfg, path=None)                    pad token always set
    load_causal_lm(cfg, path=None, *, quantize=True)  4-bit when cfg.quantization is nf4/fp4
    load_seq_cls(cfg, path=None, *, quantize=True)    num_labels=1, pad_token_id set (reward / value models)

Every failure becomes one ModelError paragraph that names the model and says what to do.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Optional

from .. import hub
from ..config import BUILTIN_MODELS, ModelConfig
from ..errors import ModelError
from .builtin import ensure_builtin

# ---------------------------------------------------------------------------------------------------------
# Resolution and loading
# ---------------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _looks_like_path(s: str) -> bool:
    return (s.startswith(("/", "./", "../", "~", ".\\")) or s.count("/") >= 2 or "\\" in s
            or s.endswith("/") or s in (".", ".."))


def resolve_base(cfg: ModelConfig) -> str:
    """Built-in name -> its cache directory (built if needed); local directory -> itself; hub id -> itself, or its
    local snapshot directory when the hub cannot be reached (or HF_HUB_OFFLINE is set) and the model is cached.

    A string that looks like a path but is not a directory raises ModelError naming it. A hub id that is neither
    reachable nor cached is returned unchanged; loading explains the failure, and :func:`check_base` (the
    pre-flight check of `sweep --dry-run`, `sweep` and `trial`) refuses it before anything starts.
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
    return _hub_source(name, cfg.revision)


def _hub_source(name: str, revision: Optional[str]) -> str:
    """A hub id as is when the hub answers (rlhf_ablate/hub.py probes once per process, a few seconds at most);
    otherwise its cached snapshot directory if there is one, so that loads never wait on huggingface_hub's
    retries (about 25 s per request without network)."""
    if hub.unreachable() is None:
        return name
    return hub.cached_model_dir(name, revision) or name


def check_base(cfg: ModelConfig) -> str:
    """Fail fast, before any GPU-second, when the base model cannot be had; return where it comes from.

    Built-in names always can. A local directory needs config.json. A hub id needs the hub to answer for it (an
    unknown id, a gated model without access, a missing revision are refused), or, when the hub cannot be reached
    within hub.PROBE_TIMEOUT seconds or HF_HUB_OFFLINE is set, a copy in the local Hugging Face cache. Takes at most
    a few seconds either way; nothing is downloaded."""
    name = cfg.base_model.strip()
    if name in BUILTIN_MODELS:
        return f"built-in {name}"
    src = resolve_base(cfg)
    if Path(src).is_dir():
        if not (Path(src) / "config.json").is_file():
            raise ModelError(f"model.base_model: {src} has no config.json; give a model directory saved with "
                             f"save_pretrained (config.json, tokenizer files, *.safetensors).")
        return f"directory {src}" if Path(name).expanduser().is_dir() else f"cached hub model {name} ({src})"
    why = hub.unreachable()
    if why is not None:
        raise ModelError(f"model.base_model: hub model {name!r} is not in the local Hugging Face cache and {why}. "
                         f"Download it where there is network (hf download {name}), or set model.base_model to a "
                         f"local directory.")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(name, revision=cfg.revision or None, timeout=hub.PROBE_TIMEOUT + 2)
    except GatedRepoError:
        raise ModelError(f"model.base_model: {name!r} is gated: accept its licence on the hub and set HF_TOKEN.") \
            from None
    except RevisionNotFoundError:
        raise ModelError(f"model.base_model: {name!r} has no revision {cfg.revision!r} (model.revision).") from None
    except RepositoryNotFoundError:
        raise ModelError(f"model.base_model: no hub model {name!r} (or it is private: set HF_TOKEN). Check the "
                         f"spelling, e.g. kakaocorp/kanana-1.5-2.1b-base.") from None
    except Exception as e:  # noqa: BLE001 - HTTP errors, timeouts: one paragraph, no retry storm
        raise ModelError(f"model.base_model: the hub did not answer for {name!r} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}).") from None
    return f"hub model {name}"


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


# ---------------------------------------------------------------------------------------------------------
# Precision: one decision for every stage (TRL arguments, our PPO loop, the memory estimate)
# ---------------------------------------------------------------------------------------------------------

def gpu_supports_bf16() -> bool:
    """A CUDA GPU with native bf16 (Ampere or newer). Emulated bf16 (``including_emulation``) is slower than fp32."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def compute_dtype(cfg: ModelConfig, device: Optional[str] = None) -> str:
    """``model.compute_dtype`` with ``auto`` resolved: ``bfloat16`` on a GPU that supports it, ``float32`` on the CPU
    (CPU bf16 matmuls are slower than fp32 and PPO's ratio test wants exact fp32 there) and on older GPUs (fp16 would
    need loss scaling in every stage).

    ``device`` asks about another machine than this one: ``"cuda"`` (the memory estimate of a GPU trial, computed on a
    driver that may have no GPU: assumes a bf16-capable GPU, the Ampere+ cards our users run) or ``"cpu"``."""
    if cfg.compute_dtype != "auto":
        return cfg.compute_dtype
    if device is None:
        return "bfloat16" if gpu_supports_bf16() else "float32"
    return "bfloat16" if device == "cuda" else "float32"


def torch_dtype(cfg: ModelConfig, device: Optional[str] = None) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[compute_dtype(cfg, device)]


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs: fp32 operations left outside autocast (the LoRA and value heads'
    fp32 weights, fp32 log-softmax chunks) run on tensor cores with a 10-bit mantissa, which PyTorch documents as
    fine for training ("TensorFloat-32 (TF32) on Ampere devices"). No effect on the CPU."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(cfg: ModelConfig) -> Any:
    """Mixed precision for our own forward passes (PPO): ``torch.autocast`` in the compute dtype when it is bf16/fp16
    (on the GPU, or on the CPU when asked for explicitly), so that peft's fp32 LoRA weights meet half-precision
    activations in half-precision matmuls, as under TRL's ``bf16=True``; a no-op in fp32, where every tensor already
    has the compute dtype."""
    import contextlib

    import torch

    dtype = torch_dtype(cfg)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)


def bnb_config(cfg: ModelConfig) -> Any:
    """BitsAndBytesConfig for cfg.quantization (nf4 / fp4), or None for 'none'."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
                              bnb_4bit_compute_dtype=torch_dtype(cfg),
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
    kw = dict(_hub_kwargs(cfg, src), dtype=torch_dtype(cfg), use_safetensors=True, **extra)
    q = bnb_config(cfg) if quantize else None
    if q is not None:
        # Honoured only because `src` is a path/id string (docs/stack.md), which is why built-ins live on disk.
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


def _contiguous_head_input(model: Any) -> None:
    """Give the LM head a contiguous input.

    Trap (torch 2.13 CPU, bf16): the causal LMs slice the positions they need logits for
    (``hidden_states[:, -k:, :]`` with ``logits_to_keep``, as in every generation step and in PPO's response-only
    scoring); a bf16 matmul of that strided view against a large head weight takes a transient of about four times
    the weight (measured: +1.96 GiB for Llama-3.2-1B's 0.49 GiB head on one token, +0.001 GiB for the same input made
    contiguous). Copying the few rows first costs ``k x hidden`` elements. GPUs are unaffected; the copy is harmless
    there."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]) if args else None)


def load_causal_lm(cfg: ModelConfig, path: Optional[str] = None, *, quantize: bool = True) -> Any:
    """Causal LM of the base (or of `path`, e.g. a merged SFT model), 4-bit if configured and `quantize`."""
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM, cfg, path, quantize, "causal LM")
    _contiguous_head_input(model)
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


def trains_in_4bit(cfg: ModelConfig, lora_rank: int) -> bool:
    """The one 4-bit rule of a trained stage: its base is loaded in 4-bit when the model config quantizes and the
    stage trains LoRA adapters (rank > 0). A full fine-tune (rank 0) trains unquantized weights. Every stage and the
    memory estimate (models/memory.py) ask this."""
    return cfg.quantization != "none" and lora_rank > 0


def is_quantized(model: Any) -> bool:
    """True when the model (or a peft model's base) holds bitsandbytes 4-bit weights."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


