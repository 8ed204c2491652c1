"""An LLM judge behind any OpenAI-compatible chat endpoint (a local vLLM or Ollama server, or a hosted API).

Each pair of answers is judged twice, once in each order, so that a judge's preference for the first (or second)
position cancels out (Zheng et al. 2023, "Judging LLM-as-a-Judge", section 3.3: position bias; the swap is their
remedy). Requests have a timeout and a bounded number of retries; a pair whose verdict cannot be had is reported
as not judged, never as a trial failure. The API key comes from an environment variable and is sent only in the
request header: it is not part of any message, log line or result.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

# The built-in judging prompt (Korean). A user's own prompt file uses the same three fields.
DEFAULT_PROMPT = """당신은 한국어 답변의 품질을 평가하는 공정한 심사위원입니다. 아래 질문에 대한 두 답변을 비교하세요.
정확성, 도움이 되는 정도, 구체성, 자연스러운 한국어를 기준으로 판단하고, 답변의 길이나 제시된 순서에는 영향을 받지 마세요.

[질문]
{question}

[답변 A]
{answer_a}

[답변 B]
{answer_b}

더 나은 답변이 A이면 "A", B이면 "B", 우열을 가릴 수 없으면 "동점"이라고만 답하세요."""

# "A", "B입니다", "답변 A", "**B**", "동점", "tie": the answer letter first, or a tie anywhere.
_VERDICT = re.compile(r"^\W*(?:답변\s*)?(A|B)(?![A-Za-z])|동점|\btie\b", re.IGNORECASE)


def parse_verdict(reply: str) -> Optional[str]:
    """"A", "B" or "tie" from a judge's reply, or None when it says none of them."""
    m = _VERDICT.search((reply or "").strip())
    if m is None:
        return None
    if m.group(1):
        return m.group(1).upper()
    return "tie"


@dataclass
class ApiJudge:
    url: str
    model: str
    api_key_env: str = "JUDGE_API_KEY"
    prompt: str = DEFAULT_PROMPT
    timeout: float = 30.0
    retries: int = 2
    backoff: float = 0.5  # seconds before the first retry, doubled after each
    failures: int = 0     # requests that gave no verdict after all retries

    @classmethod
    def from_config(cls, e) -> "ApiJudge":
        prompt = DEFAULT_PROMPT
        if e.judge_prompt:
            try:
                prompt = Path(e.judge_prompt).expanduser().read_text(encoding="utf-8")
            except OSError as err:
                raise ConfigError(f"eval.judge_prompt: cannot read {e.judge_prompt!r} ({err.strerror}).") from None
            missing = [f for f in ("{question}", "{answer_a}", "{answer_b}") if f not in prompt]
            if missing:
                raise ConfigError(f"eval.judge_prompt: {e.judge_prompt} must contain {', '.join(missing)}.")
        return cls(url=e.judge_url, model=e.judge_model, api_key_env=e.judge_api_key_env, prompt=prompt,
                   timeout=e.judge_timeout, retries=e.judge_retries)

    def _request(self, content: str) -> Optional[str]:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": 8}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", data=body, headers=headers,
                                     method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                return data["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as err:
                if err.code not in (408, 429) and err.code < 500:  # a client error does not go away by retrying
                    break
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError):
                pass
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        self.failures += 1
        return None

    def verdict(self, question: str, answer_a: str, answer_b: str) -> Optional[str]:
        reply = self._request(self.prompt.format(question=question, answer_a=answer_a, answer_b=answer_b))
        return parse_verdict(reply) if reply is not None else None

    def both_orders(self, question: str, policy: str, other: str) -> tuple[Optional[str], Optional[str]]:
        """(verdict with the policy's answer as A, verdict with it as B)."""
        return self.verdict(question, policy, other), self.verdict(question, other, policy)
