"""``ppo.generation_backend: compiled`` (rlhf_ablate/models/decoding.py) draws the same tokens as ``eager``
(transformers' generate) at the same seed, greedy and sampled, on the built-in model in 4-bit with a LoRA adapter;
and it fails with a message naming the setting where torch.compile cannot build."""

from __future__ import annotations

import pytest
import torch

PROMPTS = ["한국의 수도는 어디인가요?", "좋은 책을 추천해 주세요", "파이썬으로 정렬하는 방법을 알려 주세요",
           "오늘 저녁 메뉴는?"]


@pytest.fixture(scope="module")
def policy(builtin_cache):
    from rlhf_ablate import models as M
    from rlhf_ablate.config import ModelConfig

    cfg = ModelConfig(base_model="tiny-llama", quantization="nf4")
    tok = M.load_tokenizer(cfg, M.ensure_builtin("tiny-llama"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = M.prepare_for_training(M.load_causal_lm(cfg), 8, 16, 0.0, "CAUSAL_LM", True)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter: not the zero init, so LoRA changes the logits
                p.data.normal_(0.0, 0.1)
    return model, tok


def _ids(model, tok, backend: str, do_sample: bool, seed: int = 0) -> list[list[int]]:
    from rlhf_ablate.models import generate

    torch.manual_seed(seed)
    out = generate(model, tok, PROMPTS, max_new_tokens=12, do_sample=do_sample, batch_size=len(PROMPTS),
                   max_prompt_length=40, backend=backend)
    return [o["ids"] for o in out]


@pytest.mark.slow  # the first torch.compile in a process: 15 s with a warm inductor cache, about 2 min cold on 2 busy cores
def test_compiled_decoding_draws_the_same_tokens_as_eager(policy):
    from rlhf_ablate.models.decoding import compile_unavailable

    why = compile_unavailable()
    if why is not None:
        pytest.skip(f"torch.compile cannot build code on this machine: {why}")
    model, tok = policy
    assert any(n for n, _ in model.named_parameters() if "lora_B" in n)
    for do_sample in (False, True):
        eager = _ids(model, tok, "eager", do_sample)
        compiled = _ids(model, tok, "compiled", do_sample)
        assert compiled == eager, f"do_sample={do_sample}"
        assert sum(len(x) for x in eager) > 2 * len(PROMPTS)  # tokens were decoded, not just an EOS
    # Sampling is sampling: another seed draws other tokens, through both backends alike.
    other = _ids(model, tok, "compiled", True, seed=1)
    assert other != compiled and other == _ids(model, tok, "eager", True, seed=1)


def test_the_backend_comes_from_the_trial_config_for_every_purpose():
    from rlhf_ablate.config import TrialConfig
    from rlhf_ablate.errors import ConfigError
    from rlhf_ablate.models import sampling_for

    cfg = TrialConfig().replace(**{"ppo.generation_backend": "compiled"})
    assert {sampling_for(cfg, p).kwargs()["backend"] for p in ("rollout", "eval", "eval_kl", "chat")} == {"compiled"}
    assert sampling_for(TrialConfig(), "rollout").backend == "eager"
    with pytest.raises(ConfigError, match="generation_backend"):
        TrialConfig().replace(**{"ppo.generation_backend": "vllm"})


def test_compiled_backend_names_the_setting_where_compile_cannot_build(policy, monkeypatch):
    from rlhf_ablate.errors import ModelError
    from rlhf_ablate.models import decoding, generate

    model, tok = policy
    monkeypatch.setattr(decoding, "compile_unavailable", lambda: "RuntimeError: no C++ compiler found")
    with pytest.raises(ModelError, match=r"ppo\.generation_backend=compiled.*no C\+\+ compiler.*=eager"):
        generate(model, tok, PROMPTS[:1], max_new_tokens=2, do_sample=False, backend="compiled")
