"""Generation and scoring on any causal LM or reward model, shared by PPO rollouts and eval.

Text is formatted only through rlhf_ablate/data/prompting.py, so SFT, the reward model, PPO and eval all see the
same prompt + answer + EOS layout (TRL's SFT and Reward trainers append EOS to plain-text completions; we do the
same when we score or roll out).

Sampling must draw from exactly the distribution that PPO later recomputes (issue 9), so generation here:
- runs with an explicit ``GenerationConfig`` holding only what we ask for: the model's own ``generation_config``
  (a hub checkpoint's repetition penalty, top-k, ...) is swapped out for the call, since transformers 5 fills every
  unset field of a passed config from it (``GenerationMixin._prepare_generation_config``);
- stops at EOS and at the prompt template's next-turn header (``stop_strings``: a base model that learned the
  template may start the next "### 질문:" instead of emitting EOS); the header is cut from the response;
- takes prompts truncated from the left to a token budget, and returns the exact query ids it used, so that the
  scoring passes see token for token what the sampler saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..data.prompting import PROMPT_TEMPLATE, format_prompt, normalize
from .decoding import BACKENDS, segmented_decode, static_decode

# The template's next-turn header ("### 질문:"): where a model that keeps going would start the next user turn.
NEXT_TURN_HEADER = PROMPT_TEMPLATE.split("{prompt}")[0].strip()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as generate() uses; without them a left-padded forward pass would
    disagree with the log-probs seen during sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextmanager
def eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of the model to p = 0, for good (TRL's ``disable_dropout_in_model`` does the first half).

    PPO's importance ratio compares log-probs of the sampled tokens under the policy at sampling time and now; with
    dropout on in the update (p = 0.1 in GPT-2-family models such as KoGPT2) the ratio is not 1 at the first
    minibatch, and clipping acts on noise. Eval mode would switch dropout off too, but it also switches off gradient
    checkpointing (transformers checkpoints only ``if self.training``), so the models stay in train mode with p = 0.
    Attention dropout is a float attribute in transformers' attention modules (``attention_dropout``, used only
    ``if self.training``), so it is zeroed as well."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "attn_dropout_p", "dropout_p"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


def batched(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# ---------------------------------------------------------------------------------------------------------
# Prompts in, responses out
# ---------------------------------------------------------------------------------------------------------

def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: Optional[int] = None) -> list[list[int]]:
    """Formatted prompts as token ids. A prompt longer than ``max_prompt_length`` tokens loses its beginning: the
    end holds the template's answer cue ("### 답변:"), which the model needs to start answering. A leading special
    token the tokenizer adds (Llama-3's BOS) is kept in front."""
    out = []
    for p in prompts:
        ids = tokenizer(format_prompt(p))["input_ids"]
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            head = ids[:1] if ids[0] in tokenizer.all_special_ids and max_prompt_length > 1 else []
            ids = head + ids[len(ids) - (max_prompt_length - len(head)):]
        out.append(ids)
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), right-aligned: decoder-only generation continues from the last column."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            attn[i, width - len(s):] = 1
    return ids.to(device), attn.to(device)


@dataclass(frozen=True)
class Sampling:
    """How a policy answers, in one place for every caller (issue 17): PPO's rollouts, eval's greedy answers and its
    KL sample, chat, and the sampling TRL's GRPO/RLOO trainers are configured with. ``kwargs()`` are
    :func:`generate`'s keyword arguments."""

    max_new_tokens: int
    do_sample: bool
    temperature: float = 1.0
    max_prompt_length: Optional[int] = None   # prompt tokens kept (the start is cut); None: whole prompts
    stop_at_header: bool = True               # stop at the template's next-turn header, cut it from the answer
    backend: str = "eager"                    # ppo.generation_backend: eager (HF generate) or compiled (decoding.py)

    def kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
                    max_prompt_length=self.max_prompt_length, stop_at_header=self.stop_at_header,
                    backend=self.backend)


def sampling_for(cfg: Any, purpose: str) -> Sampling:
    """The sampling of ``purpose`` for trial config ``cfg``:

    - ``rollout``: PPO's temperature sampling (``ppo.max_new_tokens``, ``ppo.temperature``);
    - ``eval`` (and ``chat``, which answers as eval does): ``eval.max_new_tokens``, greedy unless ``eval.do_sample``;
    - ``eval_kl``: eval's one temperature-1 sample per prompt that ``kl_to_ref`` is estimated on;
    - a sampling method's name (``grpo``, ``rloo``): its section's ``max_new_tokens`` and ``temperature``.

    Every one cuts prompts to ``ppo.max_prompt_length`` (the template's answer cue at the end is kept), so no stage
    sees a longer prompt than the memory estimate assumes, and every one decodes with ``ppo.generation_backend``
    (TRL's GRPO/RLOO trainers generate with their own code and take only the lengths and temperature)."""
    keep, backend = cfg.ppo.max_prompt_length, cfg.ppo.generation_backend
    if purpose == "rollout":
        return Sampling(cfg.ppo.max_new_tokens, True, cfg.ppo.temperature, keep, backend=backend)
    if purpose in ("eval", "chat"):
        return Sampling(cfg.eval.max_new_tokens, cfg.eval.do_sample, 1.0, keep, backend=backend)
    if purpose == "eval_kl":
        return Sampling(cfg.eval.max_new_tokens, True, 1.0, keep, backend=backend)
    section = getattr(cfg, purpose, None)
    if section is None or not hasattr(section, "temperature"):
        raise ValueError(f"sampling_for: unknown purpose {purpose!r}")
    return Sampling(section.max_new_tokens, True, section.temperature, keep, backend=backend)


def generation_config(tokenizer, *, max_new_tokens: int, do_sample: bool, temperature: float = 1.0,
                      stop_at_header: bool = True, output_scores: bool = False) -> Any:
    """The whole sampling setup, explicitly: pure temperature sampling (top-k 0, top-p 1, no penalties: N+ details,
    "temperature 1 rollouts") or greedy decoding, EOS and pad from the tokenizer, a stop at the next-turn header,
    KV cache on. ``generate`` must get ``tokenizer=`` for the stop string."""
    from transformers import GenerationConfig

    sampling = dict(temperature=temperature, top_k=0, top_p=1.0) if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=do_sample, num_beams=1, **sampling,
        repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True,
        stop_strings=[NEXT_TURN_HEADER] if stop_at_header else None,
        output_scores=output_scores, return_dict_in_generate=output_scores)


@contextmanager
def own_generation_config(model) -> Iterable[None]:
    """Hide the model's ``generation_config`` during a generate call (see the module docstring); restored after."""
    from transformers import GenerationConfig

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


def cut_at_header(tokenizer, ids: list[int], header: str = NEXT_TURN_HEADER) -> tuple[list[int], str, bool]:
    """``(kept ids, answer text, found)`` for a response (without EOS) that may run into the next-turn header.

    The kept ids are the longest token prefix whose text ends before the header (a token that straddles the header's
    start is dropped with it). A response that *starts* with the header keeps its sampled ids, so that PPO still
    sees (and its missing-EOS penalty still punishes) the turn it wrote; its answer text is empty."""
    full = tokenizer.decode(ids, skip_special_tokens=True)
    pos = full.find(header)
    if pos < 0:
        return ids, full, False
    if not full[:pos].strip():  # nothing but whitespace before the header: no answer to keep
        return ids, "", True
    keep = 0
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) > pos:
            break
        keep = k
    return (ids[:keep] if keep else ids), full[:pos], True


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool,
             temperature: float = 1.0, batch_size: int = 16, max_prompt_length: Optional[int] = None,
             stop_at_header: bool = True, return_logprobs: bool = False, streamer: Any = None,
             backend: str = "eager") -> list[dict]:
    """Batched generation from raw prompts (formatted here), ``batch_size`` prompts per ``model.generate`` call.

    Returns, per prompt: ``query`` (the prompt's token ids as fed to the model), ``ids`` (response ids up to and
    including EOS when the model stopped there, or up to the next-turn header), ``text`` (without EOS and header),
    ``has_eos``, ``stopped`` (ended at the header) and, with ``return_logprobs``, ``logprobs``: the log-probability
    of each kept token under the distribution it was sampled from (the processed scores; a test instrument, it keeps
    ``max_new_tokens x batch x vocab`` scores). ``streamer`` (a transformers streamer, one prompt at a time)
    receives the tokens as they come. ``backend``: ``eager`` (``model.generate``) or ``compiled`` (a static KV
    cache and a compiled decode step, rlhf_ablate/models/decoding.py: the same tokens at the same seed)."""
    if backend not in BACKENDS:
        raise ValueError(f"generate: backend {backend!r} is not one of {BACKENDS}")
    out = []
    dev = next(model.parameters()).device
    queries = encode_prompts(tokenizer, prompts, max_prompt_length)
    with eval_mode(model), own_generation_config(model):
        for chunk in batched(queries, batch_size):
            ids, attn = left_pad(chunk, tokenizer.pad_token_id, dev)
            gcfg = generation_config(tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature, stop_at_header=stop_at_header,
                                     output_scores=return_logprobs)
            if backend == "compiled":
                seqs, scores = static_decode(model, tokenizer, ids, attn, gcfg, streamer, max_prompt_length)
            else:
                res = model.generate(input_ids=ids, attention_mask=attn, generation_config=gcfg, tokenizer=tokenizer,
                                     **({"streamer": streamer} if streamer is not None else {}))
                seqs, scores = (res.sequences, res.scores) if return_logprobs else (res, None)
            resp = seqs[:, ids.shape[1]:]
            step_lp = None
            if return_logprobs:
                step_lp = torch.stack([torch.log_softmax(s.float(), -1) for s in scores], 1)  # [b, steps, V]
            for row, (q, r) in enumerate(zip(chunk, resp.tolist())):
                out.append(_response(tokenizer, q, r, stop_at_header,
                                     None if step_lp is None else step_lp[row]))
    return out


@torch.no_grad()
def generate_segments(model, tokenizer, prompt_lists: Sequence[Sequence[str]], adapters: Sequence[str],
                      generators: Sequence[Optional[torch.Generator]], *, max_new_tokens: int, do_sample: bool,
                      temperature: float = 1.0, batch_size: int = 16, max_prompt_length: Optional[int] = None,
                      stop_at_header: bool = True) -> list[list[dict]]:
    """:func:`generate` for several policies on one peft base at once (trial groups, rlhf_ablate/ppo/group.py):
    ``prompt_lists[k]`` answered by adapter ``adapters[k]`` with random stream ``generators[k]``. Call ``i`` decodes
    the ``i``-th ``batch_size`` prompts of every list in one batch, each row through its own adapter
    (models/lora.py: route_rows) and each list's rows sampled from its own stream (decoding.py: segmented_decode),
    so list ``k`` gets the answers :func:`generate` gives it alone at ``batch_size``, with its stream in the same
    state, up to float rounding of the wider batch. Returns one list of responses per prompt list."""
    from .lora import route_rows

    dev = next(model.parameters()).device
    queries = [encode_prompts(tokenizer, p, max_prompt_length) for p in prompt_lists]
    out: list[list[dict]] = [[] for _ in prompt_lists]
    gcfg = generation_config(tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                             stop_at_header=stop_at_header)
    n_calls = max((len(q) + batch_size - 1) // batch_size for q in queries)
    with eval_mode(model), own_generation_config(model):
        for i in range(n_calls):
            chunks = [q[i * batch_size:(i + 1) * batch_size] for q in queries]
            rows = [r for c in chunks for r in c]
            names = [a for a, c in zip(adapters, chunks) for _ in c]
            segments, start = [], 0
            for c, g in zip(chunks, generators):
                segments.append((start, start + len(c), g))
                start += len(c)
            ids, attn = left_pad(rows, tokenizer.pad_token_id, dev)
            with route_rows(model, names):
                seqs = segmented_decode(model, tokenizer, ids, attn, gcfg, [s for s in segments if s[1] > s[0]])
            resp = seqs[:, ids.shape[1]:].tolist()
            for k, (a, b, _g) in enumerate(segments):
                out[k] += [_response(tokenizer, q, r, stop_at_header, None) for q, r in zip(chunks[k], resp[a:b])]
    return out


def _response(tokenizer, query: list[int], row: list[int], stop_at_header: bool,
              step_logprobs: Optional[torch.Tensor]) -> dict:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids: list[int] = []
    for t in row:
        ids.append(t)
        if t == eos:
            break
    while ids and ids[-1] == pad and pad != eos:
        ids.pop()
    has_eos = bool(ids) and ids[-1] == eos
    body = ids[:-1] if has_eos else ids
    text, stopped = tokenizer.decode(body, skip_special_tokens=True), False
    if stop_at_header:
        kept, answer, found = cut_at_header(tokenizer, body)
        if found:
            # The row stopped at the header; an EOS after it is the padding of a finished row (pad = eos tokenizers).
            text, has_eos, stopped = answer, False, len(kept) < len(body)
            ids = kept
    r = {"query": list(query), "ids": ids, "text": normalize(text), "has_eos": has_eos, "stopped": stopped}
    if step_logprobs is not None:
        idx = torch.tensor(ids, dtype=torch.long, device=step_logprobs.device)
        r["logprobs"] = step_logprobs[torch.arange(len(ids)), idx].tolist()
    return r


def encode_pairs(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int) -> dict:
    """prompt + answer + EOS, tokenized exactly as TRL's RewardTrainer does (tokenizer(text)), right-padded."""
    tokenizer.padding_side = "right"
    texts = [format_prompt(p) + normalize(a) + tokenizer.eos_token for p, a in zip(prompts, answers)]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Index of the rightmost non-pad token: where a sequence-classification head reads its score (the rule
    transformers' *ForSequenceClassification use), so our shared-base reward head scores exactly like the RM."""
    non_pad = (input_ids != pad_token_id).int()
    idx = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (idx * non_pad).argmax(-1)


@torch.no_grad()
def score_texts(score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokenizer, prompts: Sequence[str],
                answers: Sequence[str], max_length: int, batch_size: int = 32) -> list[float]:
    scores: list[float] = []
    for i in range(0, len(prompts), batch_size):
        enc = encode_pairs(tokenizer, prompts[i:i + batch_size], answers[i:i + batch_size], max_length)
        scores.extend(score_fn(enc["input_ids"], enc["attention_mask"]).float().cpu().tolist())
    return scores
