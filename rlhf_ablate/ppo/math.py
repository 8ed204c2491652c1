"""PPO math for RLHF: tensors in, tensors out, no model.

Everything the PPO loop (``rlhf_ablate/stages/ppo.py``) computes between "we have logprobs, values and scores" and
"we have a loss" lives here, so that each piece is tested alone on hand-written tensors (OpenRLHF ``models/loss.py``
style; cleanrl ``ppo.py`` names).

Conventions (shared by every function below):
- Response tensors are ``[batch, T]`` and right-padded. ``mask`` is 1 (or True) on valid response tokens, the EOS
  token included, and 0 on padding. ``first_eos_mask`` builds it from generated ids.
- Masked statistics ignore padding entirely; outputs at padded positions are 0 (never garbage that a later
  ``.mean()`` could pick up).
- Names follow the papers and TRL's PPOv2 trainer (``trl/trainer/ppov2_trainer.py``, removed from TRL in 2026):
  ``cliprange``, ``cliprange_value``, ``gamma``, ``lam``, ``kl_coef``, ``approx_kl``, ``clipfrac``.

Reference: Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
Summarization" (cited below as "N+ details"), and Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences" (the adaptive KL controller).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3"]

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "whiten",
    "first_eos_mask",
    "last_valid_index",
    "logprobs_from_logits",
    "entropy_from_logits",
    "token_logprobs",
    "kl_penalty",
    "per_token_rewards",
    "compute_gae",
    "policy_loss",
    "value_loss",
    "FixedKLController",
    "AdaptiveKLController",
    "RewardNormalizer",
    "missing_eos_penalty",
]


# ---------------------------------------------------------------------------------------------------------
# Masked statistics and whitening
# ---------------------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1.

    With ``dim=None`` a scalar over all valid entries (raises if there are none). With ``dim`` the mean along that
    dimension; a slice with no valid entry gives NaN rather than a silent 0, so an empty response cannot pass as a
    zero statistic.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        n = mask.sum()
        if n.item() == 0:
            raise ValueError("masked_mean: the mask has no valid entries")
        return (x * mask).sum() / n
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the valid entries (scalar). ``unbiased`` applies Bessel's correction n/(n-1), as in
    TRL's ``masked_var``; it needs at least two valid entries."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n.item() < 2:
            raise ValueError("masked_var(unbiased=True) needs at least two valid entries")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the valid entries of ``x`` to mean 0 and (unbiased) variance 1; padding comes out as 0.

    ``shift_mean=False`` only rescales (keeps the mean). TRL uses that for reward whitening, because shifting the
    per-token rewards' mean would change the KL/score balance (N+ details, "reward whitening"); advantages are
    whitened with the shift.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def whiten(x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``masked_whiten`` for a tensor with no padding (e.g. one score per sequence)."""
    return masked_whiten(x, torch.ones_like(x), shift_mean=shift_mean, eps=eps)


# ---------------------------------------------------------------------------------------------------------
# Masks and per-token quantities from logits
# ---------------------------------------------------------------------------------------------------------

def first_eos_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, has_eos)`` for generated response ids ``[batch, T]``.

    ``mask`` is 1 up to and including the first EOS and 0 after it (generate() pads finished rows, often with the
    EOS id itself, so only the first EOS counts). Rows without EOS are all valid and get ``has_eos=False``: those
    are the truncated responses that ``missing_eos_penalty`` punishes (N+ details: EOS penalty).
    """
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(dim=1)
    # Number of EOS tokens strictly before each position; a position is valid while that count is 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (eos_before == 0).long()
    return mask, has_eos


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row (``[batch]``). Every row must have at least one."""
    valid = mask.bool()
    if not valid.any(dim=1).all():
        raise ValueError("last_valid_index: a row of the mask has no valid token (empty response)")
    T = mask.shape[1]
    # argmax returns the first maximum, so search the flipped mask for the first (i.e. last) valid position.
    return T - 1 - torch.argmax(valid.flip(dims=[1]).long(), dim=1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position: ``logits [..., V]``, ``labels [...]`` -> ``[...]``.

    Computed as ``logit[label] - logsumexp(logits)`` so the full ``[..., V]`` log-softmax is never materialised
    (TRL's ``selective_log_softmax``). For half precision the logsumexp is taken in float32, which is what keeps
    PPO's ratio ``exp(new - old)`` near 1 at step 0.
    """
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    picked = torch.gather(work, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(work, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution per position: ``[..., V]`` -> ``[...]`` (nats)."""
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    logp = F.log_softmax(work, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """``log softmax(logits / temperature)[label]`` and the entropy, over chunks of rows of ``logits [N, V]``.

    Memory (issue 9): the logits stay in their own dtype (bf16 under autocast); only one ``[chunk, V]`` float32
    slice exists at a time, in the forward and in the backward, which recomputes the softmax of each chunk from the
    saved logits and its log-normaliser instead of keeping a float32 ``[N, V]`` log-softmax for autograd. The
    gradient ``[N, V]`` is written in the logits' dtype. The same code computes the rollout's log-probs (no grad) and
    the update's, so at the first minibatch the two are bitwise equal and the PPO ratio is exactly 1.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk, with_entropy):  # type: ignore[override]
        n = logits.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        ent = torch.empty(n, dtype=torch.float32, device=logits.device) if with_entropy else None
        for s in range(0, n, chunk):
            x = logits[s:s + chunk].float() / temperature
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            logp[s:s + chunk] = x.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if ent is not None:
                p = torch.exp(x - lse[s:s + chunk, None])
                ent[s:s + chunk] = lse[s:s + chunk] - (p * x).sum(-1)
        ctx.save_for_backward(logits, labels, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        if ent is None:
            ent = torch.zeros(0, device=logits.device)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], chunk):
            g = grad_logp[s:s + chunk, None].float()
            # d logp / d x = onehot(label) - softmax(x); x = logits / t
            d = torch.exp(logits[s:s + chunk].float() / t - lse[s:s + chunk, None]).mul_(-g)
            d.scatter_add_(-1, labels[s:s + chunk, None], g)
            grad[s:s + chunk] = d.div_(t)
        return grad, None, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk: int = 1024,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logprobs, entropy)`` of ``labels [...]`` under ``softmax(logits / temperature)``, ``logits [..., V]``.

    Float32 results whatever the logits' dtype, computed ``chunk`` rows at a time (see ``_ChunkedTokenLogprobs``);
    differentiable in the log-probs, never in the entropy (a statistic). N+ details: divide by the sampling
    temperature, so the log-probs are those of the distribution the rollout sampled from.
    """
    if chunk < 1:
        raise ValueError(f"token_logprobs: chunk must be >= 1, got {chunk}")
    shape = labels.shape
    flat = logits.reshape(-1, logits.shape[-1])
    logp, ent = _ChunkedTokenLogprobs.apply(flat, labels.reshape(-1), float(temperature), int(chunk),
                                            bool(with_entropy))
    return logp.view(shape), (ent.view(shape) if with_entropy else None)


# ---------------------------------------------------------------------------------------------------------
# KL penalty and per-token rewards
# ---------------------------------------------------------------------------------------------------------

# exp() of a float32 log-ratio overflows past ~88; a ratio beyond e^20 is already a diverged policy.
_K3_LOGRATIO_CLAMP = 20.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' logprobs.

    Schulman, "Approximating KL Divergence" (2020), with samples drawn from the policy:
    - ``k1 = logp - ref_logp``: unbiased, high variance, can be negative per token (the N+ details / TRL choice);
    - ``k2 = 0.5 * (logp - ref_logp)^2``: biased, low variance, >= 0;
    - ``k3 = (r - 1) - log r`` with ``r = exp(ref_logp - logp)``: unbiased and >= 0 per token.
    The k3 log-ratio is clamped to +-20 so ``exp`` cannot overflow (OpenRLHF clamps similarly).
    """
    logratio = logprobs - ref_logprobs
    if estimator == "k1":
        return logratio
    if estimator == "k2":
        return 0.5 * logratio ** 2
    if estimator == "k3":
        log_r = (-logratio).clamp(-_K3_LOGRATIO_CLAMP, _K3_LOGRATIO_CLAMP)
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, kl)``, both ``[batch, T]`` and 0 on padding.

    Every valid token gets ``-kl_coef * kl``; the sequence score (``scores [batch]``, already normalised and
    EOS-penalised) is added at the LAST valid token of its row (N+ details: per-token KL penalty, score on the
    EOS token); a row without valid tokens gets nothing. ``kl`` is returned so the loop can log ``objective/kl`` as its per-sequence sum.
    """
    m = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * m
    rewards = -kl_coef * kl
    rewards = rewards.clone()
    # An empty response (no valid token) has no token to credit: its score is dropped rather than put on padding.
    nonempty = mask.bool().any(dim=1)
    rows = torch.nonzero(nonempty).squeeze(1)
    rewards[rows, last_valid_index(mask[nonempty])] += scores[nonempty].to(rewards.dtype)
    return rewards, kl


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------

def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses: ``(advantages, returns)``, ``[batch, T]``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``; ``A_t = delta_t + gamma * lam * A_{t+1}``. Values (and rewards) after
    the last valid token are treated as 0, so the last valid token bootstraps from nothing: the episode ends at EOS
    (TRL PPOv2 masks values with ``padding_mask_p1`` the same way). ``returns = advantages + values`` are the value
    targets. Both outputs are 0 on padding. Advantages are NOT whitened here; the loop calls ``masked_whiten``.
    """
    m = mask.to(values.dtype)
    rewards = rewards * m
    values = values * m
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * m
    returns = (advantages + values) * m
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------

# The step-0 ratio under bf16 autocast (docs/stack.md, "bf16 and the step-0 ratio"; an estimate from bf16's 8-bit
# mantissa, not a GPU measurement). Scoring (rollout micro-batch) and the update (train micro-batch) run different batch
# shapes, so different kernels round the logits to bf16 separately; in fp32 on the CPU the ratio is exactly 1.
BF16_STEP0_RATIO_MEAN_TOL = 0.01   # |mean ratio - 1| over a micro-batch's response tokens


def bf16_step0_token_bound(max_abs_logit: float) -> float:
    """Worst-case |log ratio| of one token at step 0 under bf16: in each of the two passes the token's log-prob moves
    by at most half a bf16 ulp (2^-9 relative) of its own logit and of the log-sum-exp's dominant one, so by at most
    2^-8 * max|z| per pass and 2^-7 * max|z| between them (0.23 nats for logits up to 30)."""
    return 2 ** -7 * max_abs_logit


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017), token-level masked mean as in TRL PPOv2.

    ``loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`` over valid tokens. Where the clipped term
    wins, the loss is constant in ``new_logprobs`` and its gradient there is exactly 0.

    ``stats`` (detached scalars):
    - ``clipfrac``: fraction of valid tokens where the clipped term is strictly larger (i.e. the clip is active);
    - ``approx_kl``: ``0.5 * mean(logratio^2)`` over valid tokens, TRL PPOv2's estimate of KL(old || new);
    - ``approx_kl_k3``: the k3 estimate ``mean((ratio - 1) - logratio)``, for comparison with other codebases;
    - ``ratio_mean``, ``ratio_max``, ``ratio_min`` over valid tokens.
    """
    logratio = new_logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        valid = mask.bool()
        stats = {
            "clipfrac": masked_mean((pg_losses2 > pg_losses).to(ratio.dtype), mask),
            "approx_kl": 0.5 * masked_mean(logratio ** 2, mask),
            "approx_kl_k3": masked_mean((ratio - 1) - logratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": ratio[valid].max(),
            "ratio_min": ratio[valid].min(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (N+ details: value clipping): ``(loss, clipfrac)``.

    ``V_clip = old + clamp(new - old, -c, c)``; ``loss = 0.5 * mean(max((new - R)^2, (V_clip - R)^2))`` over
    valid tokens. ``clipfrac`` is the fraction of valid tokens where the clipped error is strictly larger.
    """
    vclipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (vclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    clipfrac = masked_mean((vf_losses2 > vf_losses1).to(new_values.dtype), mask).detach()
    return loss, clipfrac


# ---------------------------------------------------------------------------------------------------------
# KL controllers (Ziegler et al. 2019, section 2.2; lm-human-preferences `AdaptiveKLController`)
# ---------------------------------------------------------------------------------------------------------

class FixedKLController:
    """A constant ``kl_coef``. ``update`` is a no-op so the loop treats both controllers alike."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        return None


class AdaptiveKLController:
    """Ziegler et al. 2019's proportional controller towards a target KL.

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n_steps / horizon``. ``current_kl`` is
    the mean per-sequence KL (nats per response, summed over tokens) of the last rollout and ``n_steps`` the
    number of episodes in it, the same units as ``ppo.kl_target`` and ``ppo.kl_horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------------------
# Score post-processing (N+ details: reward normalisation, EOS penalty)
# ---------------------------------------------------------------------------------------------------------

class RewardNormalizer:
    """Maps RM scores to ``(score - mean) / std`` with mean and std of the initial (SFT) policy's samples.

    N+ details (reward normalisation): after this, the SFT policy's rewards have mean 0 and std 1 whatever the
    reward model's scale, so one ``kl_coef`` means the same across reward models (LoRA ranks, base models, data
    versions) of a sweep. ``std`` is the population standard deviation, so the reference scores map to exactly
    mean 0, std 1 (population). Call the instance on a tensor of scores.
    """

    def __init__(self, reference_scores: torch.Tensor | Sequence[float], eps: float = 1e-8):
        ref = torch.as_tensor(reference_scores, dtype=torch.float64).flatten()
        if ref.numel() < 2:
            raise ValueError("RewardNormalizer needs at least two reference scores")
        if not torch.isfinite(ref).all():
            raise ValueError("RewardNormalizer: reference scores contain NaN or inf")
        self.mean = float(ref.mean())
        self.std = float(ref.std(unbiased=False))
        if self.std < eps:
            raise ValueError(
                f"RewardNormalizer: the reward model gives the same score ({self.mean:.4g}) to all "
                f"{ref.numel()} reference samples; it cannot rank anything, so normalising would divide by 0")

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std

    def state(self) -> dict[str, float]:
        """For ``metrics.json`` / ``history.json``: the constants used, so a run can be reproduced."""
        return {"mean": self.mean, "std": self.std}


def missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """Subtract ``penalty`` from the score of every response without EOS (N+ details: EOS penalty; TRL's
    ``missing_eos_penalty``). Returns a new tensor; ``penalty=0`` leaves scores unchanged."""
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)
