"""The one prompt template, shared by SFT, the reward model, PPO, DPO and eval.

A plain-text template (the KoChatGPT tutorials' style) works for base models that have no chat template, which is
what our users fine-tune (kanana-*-base, Llama-3.2-1B, gemma-2-2b, kogpt2). Every stage must format text the same
way, or the reward model scores a distribution the policy never produces; so nothing else builds prompts.
"""

from __future__ import annotations

import unicodedata

PROMPT_TEMPLATE = "### 질문:\n{prompt}\n\n### 답변:\n"


def normalize(text: str) -> str:
    """NFC (composed Hangul syllables) and trimmed outer whitespace: the form every stage sees."""
    return unicodedata.normalize("NFC", text).strip()


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=normalize(prompt))


def format_example(prompt: str, answer: str, eos_token: str | None) -> str:
    """Prompt + answer (+ EOS, so that the model learns to stop: PPO penalises a missing EOS)."""
    return format_prompt(prompt) + normalize(answer) + (eos_token or "")
