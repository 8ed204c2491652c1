"""PPO math on hand-written tensors (OpenRLHF-style) and against plain Python loops (cleanrl-style)."""

import math

import pytest
import torch

from rlhf_ablate.ppo import math as pm


def _random_masked(batch=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 3, T, 5, 2][:batch])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    rewards = torch.randn(batch, T, generator=g, dtype=torch.float64)
    values = torch.randn(batch, T, generator=g, dtype=torch.float64)
    return rewards, values, mask, lengths


# ---------------------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------------------

def test_masked_mean_var_hand_computed_and_padding_ignored():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # valid: 1, 2, 3 -> mean 2, population var 2/3, unbiased var 1
    assert pm.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert pm.masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    assert pm.masked_var(x, mask).item() == pytest.approx(1.0)
    assert pm.masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 3.0])
    # changing padded values changes nothing
    y = x.clone()
    y[mask == 0] = 1e6
    assert pm.masked_var(y, mask).item() == pytest.approx(1.0)


def test_masked_mean_empty_row_is_nan_and_empty_mask_raises():
    x = torch.ones(2, 3)
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]])
    per_row = pm.masked_mean(x, mask, dim=1)
    assert per_row[0].item() == 1.0 and math.isnan(per_row[1].item())
    with pytest.raises(ValueError):
        pm.masked_mean(x, torch.zeros(2, 3))


def test_masked_whiten_mean0_var1_over_valid_and_zero_padding():
    x = torch.tensor([[1.0, 2.0, 9.0, 0.0], [4.0, 5.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = pm.masked_whiten(x, mask)
    valid = w[mask.bool()]
    # hand computed: values 1,2,9,4,5 mean 4.2, unbiased var (10.24+4.84+23.04+0.04+0.64)/4 = 9.7
    assert valid.tolist() == pytest.approx([(v - 4.2) / math.sqrt(9.7) for v in [1, 2, 9, 4, 5]], abs=1e-6)
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert valid.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~mask.bool()] == 0).all()
    # shift_mean=False keeps the mean, rescales only
    w2 = pm.masked_whiten(x, mask, shift_mean=False)
    assert w2[mask.bool()].mean().item() == pytest.approx(4.2)
    assert pm.whiten(torch.tensor([1.0, 2.0, 9.0, 4.0, 5.0], dtype=torch.float64)).tolist() == \
        pytest.approx(valid.tolist())


# ---------------------------------------------------------------------------------------------------------
# masks, logprobs, entropy
# ---------------------------------------------------------------------------------------------------------

def test_first_eos_mask_and_last_valid_index():
    eos = 2
    responses = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 8, 9], [5, 6, 7, 8, 9]])
    mask, has_eos = pm.first_eos_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, False]
    assert pm.last_valid_index(mask).tolist() == [2, 1, 4]
    with pytest.raises(ValueError):
        pm.last_valid_index(torch.tensor([[1, 0], [0, 0]]))


def test_logprobs_and_entropy_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 11, generator=g)
    labels = torch.randint(0, 11, (3, 4), generator=g)
    dist = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(pm.logprobs_from_logits(logits, labels), dist.log_prob(labels), atol=1e-5)
    assert torch.allclose(pm.entropy_from_logits(logits), dist.entropy(), atol=1e-5)
    # bf16 logits are computed in float32
    lp16 = pm.logprobs_from_logits(logits.bfloat16(), labels)
    assert lp16.dtype == torch.float32
    assert torch.allclose(lp16, dist.log_prob(labels), atol=0.1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_token_logprobs_chunked_equal_full_log_softmax_values_and_gradients(chunk):
    """ppo.math.token_logprobs against torch's log_softmax on the whole tensor: values, the entropy, and the gradient
    of a weighted sum (the backward recomputes each chunk's softmax), at temperature 0.7, whatever the chunk size."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 13, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 13, (2, 5), generator=g)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    ref_in = logits.clone().requires_grad_(True)
    logp_all = torch.log_softmax(ref_in.float() / 0.7, -1)
    expect = logp_all.gather(-1, labels[..., None]).squeeze(-1)
    (expect * w).sum().backward()
    x = logits.float().clone().requires_grad_(True)
    got, ent = pm.token_logprobs(x, labels, temperature=0.7, chunk=chunk, with_entropy=True)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expect.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, -(logp_all.exp() * logp_all).sum(-1).detach(), atol=1e-5, rtol=0)
    assert not ent.requires_grad
    (got * w.float()).sum().backward()
    torch.testing.assert_close(x.grad.double(), ref_in.grad, atol=1e-5, rtol=0)


def test_token_logprobs_keep_half_precision_logits_and_match_no_grad_bitwise():
    """bf16 logits: float32 results close to float32 math, a bf16 gradient (no float32 [N, V] copy kept), and the
    no-grad call (the rollout's log-probs) bitwise equal to the grad-mode call (the update's): the PPO ratio is 1."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 6, 50, generator=g) * 2).bfloat16()
    labels = torch.randint(0, 50, (4, 6), generator=g)
    x = logits.clone().requires_grad_(True)
    got, none = pm.token_logprobs(x, labels, chunk=5)
    assert none is None and got.dtype == torch.float32
    torch.testing.assert_close(got.detach(), pm.logprobs_from_logits(logits.float(), labels), atol=1e-5, rtol=0)
    got.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and x.grad.shape == logits.shape
    with torch.no_grad():
        again, _ = pm.token_logprobs(logits, labels, chunk=5)
    assert torch.equal(again, got.detach())
    with pytest.raises(ValueError):
        pm.token_logprobs(logits, labels, chunk=0)


# ---------------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------------

def test_kl_estimators_hand_computed_and_zero_when_equal():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = lp - ref  # [0.5, -1.0, 0.0]
    assert pm.kl_penalty(lp, ref, "k1").tolist() == pytest.approx(d.tolist())
    assert pm.kl_penalty(lp, ref, "k2").tolist() == pytest.approx((0.5 * d ** 2).tolist())
    k3 = [math.exp(-v) - 1 + v for v in d.tolist()]
    assert pm.kl_penalty(lp, ref, "k3").tolist() == pytest.approx(k3)
    for est in ("k1", "k2", "k3"):
        assert (pm.kl_penalty(lp, lp, est) == 0).all()
    with pytest.raises(ValueError, match="estimator"):
        pm.kl_penalty(lp, ref, "k4")


def test_k3_nonnegative_everywhere_even_extreme():
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(1000, generator=g) * 10
    ref = torch.randn(1000, generator=g) * 10
    k3 = pm.kl_penalty(lp, ref, "k3")
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()
    assert (pm.kl_penalty(lp, ref, "k1") < 0).any()  # k1 is not: that is the point of k3


def test_k1_k3_monte_carlo_match_true_kl_of_two_categoricals():
    g = torch.Generator().manual_seed(3)
    p_logits = torch.tensor([2.0, 0.5, -1.0, 0.0, 1.0])
    q_logits = torch.tensor([0.5, 1.0, 0.0, -0.5, 1.5])
    logp_all = torch.log_softmax(p_logits, -1)
    logq_all = torch.log_softmax(q_logits, -1)
    true_kl = (logp_all.exp() * (logp_all - logq_all)).sum().item()
    samples = torch.multinomial(logp_all.exp(), 200_000, replacement=True, generator=g)
    lp, lq = logp_all[samples], logq_all[samples]
    for est in ("k1", "k3"):
        est_kl = pm.kl_penalty(lp, lq, est).mean().item()
        assert est_kl == pytest.approx(true_kl, rel=0.03), est
    # k3's per-sample variance is lower than k1's here (Schulman 2020)
    assert pm.kl_penalty(lp, lq, "k3").var() < pm.kl_penalty(lp, lq, "k1").var()


# ---------------------------------------------------------------------------------------------------------
# rewards and GAE
# ---------------------------------------------------------------------------------------------------------

def test_per_token_rewards_score_on_last_valid_token():
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0, -9.0], [-0.5, -9.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    scores = torch.tensor([10.0, -3.0])
    rewards, kl = pm.per_token_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator="k1")
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 1.0, 0.0], [-0.5, 0.0, 0.0, 0.0]]))
    expected = torch.tensor([[-0.05, 0.0, -0.1 + 10.0, 0.0], [0.05 - 3.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)
    # k3 with a tensor kl_coef: score placement unchanged, penalty non-positive on valid tokens
    r3, kl3 = pm.per_token_rewards(scores, lp, ref, mask, kl_coef=torch.tensor(0.1), estimator="k3")
    assert (kl3 >= 0).all() and (kl3[mask == 0] == 0).all()
    assert torch.allclose(r3 - (-0.1 * kl3), torch.tensor([[0.0, 0.0, 10.0, 0.0], [-3.0, 0.0, 0.0, 0.0]]))


def test_per_token_rewards_empty_response_gets_nothing():
    """An empty response (no valid token) has no token to hold its score: its row stays 0, the others as usual."""
    lp = torch.zeros(3, 3)
    ref = torch.full((3, 3), -1.0)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    rewards, kl = pm.per_token_rewards(torch.tensor([2.0, 5.0, -1.0]), lp, ref, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.5, 1.5, 0.0], [0.0, 0.0, 0.0], [-1.5, 0.0, 0.0]]))
    assert (kl[1] == 0).all()


def _gae_python_loop(rewards, values, lengths, gamma, lam):
    """cleanrl-style reference: one row at a time, only over the valid tokens, V after the end = 0."""
    adv = torch.zeros_like(rewards)
    for b, n in enumerate(lengths.tolist()):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_matches_plain_python_loop(gamma, lam):
    rewards, values, mask, lengths = _random_masked()
    adv, ret = pm.compute_gae(rewards, values, mask, gamma, lam)
    expected = _gae_python_loop(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-10)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-10)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_lambda1_gamma1_returns_are_reward_to_go():
    # With gamma = lam = 1, returns = sum of future rewards inside the response, whatever the values.
    rewards, values, mask, lengths = _random_masked(seed=4)
    _, ret = pm.compute_gae(rewards, values, mask, 1.0, 1.0)
    r = rewards * mask
    to_go = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1]) * mask
    assert torch.allclose(ret, to_go, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------

def test_policy_loss_hand_computed_clipfrac_and_zero_grad_where_clipped():
    # ratios: 1.1 (inside), 1.5 (outside, A>0 -> clipped to 1.2), 0.5 (outside, A<0 -> clipped to 0.8),
    #         0.5 (outside but A>0: unclipped term is smaller -> not clipped), padding
    ratios = torch.tensor([[1.1, 1.5, 0.5], [0.5, 1.0, 3.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 2.0, -1.0], [1.0, 5.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    old = torch.zeros(2, 3, dtype=torch.float64)
    new = torch.log(ratios).requires_grad_(True)
    loss, stats = pm.policy_loss(new, old, adv, mask, cliprange=0.2)
    per_token = [-1.0 * 1.1, -2.0 * 1.2, 1.0 * 0.8, -1.0 * 0.5]
    assert loss.item() == pytest.approx(sum(per_token) / 4)
    assert stats["clipfrac"].item() == pytest.approx(2 / 4)
    logr = torch.log(ratios)[mask.bool()]
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (logr ** 2).mean().item())
    assert stats["approx_kl_k3"].item() == pytest.approx(((logr.exp() - 1) - logr).mean().item())
    assert stats["ratio_max"].item() == pytest.approx(1.5)  # padding (3.0) ignored
    assert stats["ratio_min"].item() == pytest.approx(0.5)
    loss.backward()
    grad = new.grad
    # d/dlogp of -A*ratio/4 = -A*ratio/4 where unclipped; exactly 0 where clipped and on padding
    assert grad[0, 0].item() == pytest.approx(-1.0 * 1.1 / 4)
    assert grad[0, 1].item() == 0.0 and grad[0, 2].item() == 0.0
    assert grad[1, 0].item() == pytest.approx(-1.0 * 0.5 / 4)
    assert grad[1, 1].item() == 0.0 and grad[1, 2].item() == 0.0


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[0.3, -1.2, 2.0]])
    lp = torch.tensor([[-0.7, -1.1, -2.0]])
    loss, stats = pm.policy_loss(lp, lp, adv, torch.ones(1, 3), 0.2)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_value_loss_clipping_hand_computed():
    old = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    new = torch.tensor([[0.1, 1.0, 1.0, 5.0]], requires_grad=True)
    ret = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = pm.value_loss(new, old, ret, mask, cliprange_value=0.2)
    # token 0: new 0.1 in range: (0.1)^2 both -> 0.01
    # token 1: new 1.0 clipped to 0.2: unclipped err 0, clipped err 0.64 -> max 0.64, clipped wins
    # token 2: new == old: 4 both
    assert loss.item() == pytest.approx(0.5 * (0.01 + 0.64 + 4.0) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    loss.backward()
    assert new.grad[0, 1].item() == 0.0  # the clipped branch does not depend on new
    assert new.grad[0, 3].item() == 0.0  # padding


# ---------------------------------------------------------------------------------------------------------
# controllers, normaliser, EOS penalty
# ---------------------------------------------------------------------------------------------------------

def test_adaptive_kl_controller_moves_by_clipped_proportional_error():
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=9.0, n_steps=100)  # error 0.5 clipped to 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=6.6, n_steps=100)  # error 0.1, inside the clip
    assert c.value == pytest.approx(0.1 * (1 + 0.1 * 100 / 10000))
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(current_kl=0.0, n_steps=100)  # error -1 clipped to -0.2
    assert c.value == pytest.approx(0.1 * (1 - 0.2 * 100 / 10000))
    assert c.value < 0.1
    f = pm.FixedKLController(0.05)
    f.update(100.0, 100)
    assert f.value == 0.05


def test_reward_normalizer_mean0_std1_on_reference():
    ref = torch.tensor([3.0, 5.0, 10.0, -2.0, 4.0])
    norm = pm.RewardNormalizer(ref)
    z = norm(ref)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert norm.state() == {"mean": pytest.approx(4.0), "std": pytest.approx(ref.std(unbiased=False).item())}
    # the same kl_coef means the same: a reward model with 100x the scale gives identical normalised scores
    assert torch.allclose(pm.RewardNormalizer(ref * 100 + 7)(ref * 100 + 7), z, atol=1e-5)
    with pytest.raises(ValueError, match="same score"):
        pm.RewardNormalizer([1.0, 1.0, 1.0])


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, 3.0])
    has_eos = torch.tensor([True, False, True])
    assert pm.missing_eos_penalty(scores, has_eos, 1.5).tolist() == [1.0, 0.5, 3.0]
    assert pm.missing_eos_penalty(scores, has_eos, 0.0).tolist() == scores.tolist()
