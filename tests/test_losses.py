"""Hand-computed checks for lit_dash.losses (tiny tensors, float64 where exactness matters)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lit_dash.losses import (
    KL_ESTIMATORS,
    KL_GRADIENTS,
    LOSS_AGG_MODES,
    aggregate_loss,
    entropy_from_logits,
    filter_mask,
    global_loss_counts,
    group_advantages,
    keep_mask,
    kl_penalty,
    logprob_gap,
    logprob_temperature,
    policy_loss,
    token_logprobs,
    truncated_importance_weights,
    zero_variance_groups,
)

D = torch.float64
LN2 = math.log(2.0)


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------- advantages

# Three groups of G=4:
#   [1,0,0,0]: mean 0.25, deviations [.75,-.25,-.25,-.25], unbiased var (.5625 + 3*.0625)/3 = .25, std .5
#   [1,1,1,1]: mean 1, deviations 0, std 0
#   [1,1,0,0]: mean .5, deviations [.5,.5,-.5,-.5], unbiased var (4*.25)/3 = 1/3, std sqrt(1/3)
REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_group_advantages_scaled_by_unbiased_std():
    adv = group_advantages(t(REWARDS), group_size=4)
    s1 = 0.5 + 1e-4
    s3 = math.sqrt(1.0 / 3.0) + 1e-4
    expected = [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1]  # [1.49970006, -0.49990002, ...]
    expected += [0.0, 0.0, 0.0, 0.0]
    expected += [0.5 / s3, 0.5 / s3, -0.5 / s3, -0.5 / s3]  # +-0.86587...
    assert_close(adv, t(expected))
    assert adv.shape == (12,)


def test_group_advantages_eps_and_dtype():
    # eps changes the value: 0.75 / (0.5 + 0.25) = 1.0
    adv = group_advantages(t([1.0, 0.0, 0.0, 0.0]), 4, eps=0.25)
    assert_close(adv, t([1.0, -1 / 3, -1 / 3, -1 / 3]))
    # integer / bool rewards are accepted and give float advantages
    adv_int = group_advantages(torch.tensor([1, 0, 0, 0]), 4, scale_by_std=False)
    assert adv_int.is_floating_point()
    assert_close(adv_int, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_group_advantages_without_std():
    adv = group_advantages(t(REWARDS), group_size=4, scale_by_std=False)
    expected = [0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, -0.5, -0.5]
    assert_close(adv, t(expected))


def test_group_advantages_all_equal_group_is_zero_and_filtered_out():
    # G=3, group 0 all equal. In float32 the mean of [0.9, 0.9, 0.9] is off by one ulp (6e-8), which the
    # std division would blow up to ~6e-4; the result must still be exactly 0 and dropped even at
    # threshold 0.
    for dtype in (torch.float32, D):
        rewards = t([0.9, 0.9, 0.9, 1.0, 0.0, 0.0], dtype)
        for scale in (True, False):
            adv = group_advantages(rewards, 3, scale_by_std=scale)
            assert torch.equal(adv[:3], torch.zeros(3, dtype=dtype))
            for threshold in (0.1, 0.0):
                keep = filter_mask(adv, threshold)
                assert keep.tolist() == [False, False, False, True, True, True]


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(t([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(t([1.0, 0.0]), 1)
    # G=1 without std is allowed (all advantages zero)
    assert torch.equal(group_advantages(t([1.0, 0.0]), 1, scale_by_std=False), torch.zeros(2, dtype=D))
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


def test_zero_variance_groups():
    rewards = t([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    assert zero_variance_groups(rewards, 2).tolist() == [True, False, True, True]
    assert zero_variance_groups(rewards, 4).tolist() == [False, False]
    # float noise well below the tolerance still counts as "all equal"; a real difference does not
    noisy = torch.tensor([0.3, 0.3 + 1e-8, 0.3 - 1e-8, 0.3, 0.3, 0.31], dtype=torch.float32)
    assert zero_variance_groups(noisy, 3).tolist() == [True, False]
    with pytest.raises(ValueError, match=r"not a multiple of group_size \(3\)"):
        zero_variance_groups(rewards, 3)


def test_filter_mask_thresholds():
    adv = t([0.5, -0.5, 0.1, -0.1, 0.05, 0.0, 0.11, -0.2])
    assert filter_mask(adv, 0.1).tolist() == [True, True, False, False, False, False, True, True]
    assert filter_mask(adv, 0.0).tolist() == [True, True, True, True, True, False, True, True]
    assert filter_mask(adv, -1.0).all()


def test_keep_mask_constant_group_and_zero_advantage_middle():
    rewards = t([1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 1.0])
    # group 2: mean .5, unbiased std sqrt(.5/3) = .408248; z = +-.5 / .408348 = +-1.22445, middle two 0
    for threshold in (0.0, 0.1, 1.2):
        assert keep_mask(rewards, 4, threshold).tolist() == [False] * 4 + [True, False, False, True]
    assert keep_mask(rewards, 4, 1.23).tolist() == [False] * 8


def test_keep_mask_is_the_same_with_or_without_std_scaling():
    # G=16, one success: mean 1/16, unbiased std exactly 0.25; raw A = -1/16 (x15) and 15/16
    rewards = torch.zeros(16, dtype=D)
    rewards[3] = 1.0
    raw = group_advantages(rewards, 16, scale_by_std=False)
    assert_close(raw[0], t(-0.0625))
    assert_close(raw[3], t(0.9375))
    # the bug this replaces: a fixed 0.1 on raw advantages drops every negative and keeps the positive
    assert filter_mask(raw, 0.1).tolist() == [i == 3 for i in range(16)]
    # in std units the negatives sit at 0.0625 / (0.25 + 1e-4) = 0.2499000 and the positive at 3.7485
    assert keep_mask(rewards, 16, 0.1).all()
    scaled = group_advantages(rewards, 16, scale_by_std=True)
    assert_close(scaled[0], t(-0.0625 / 0.2501))
    assert_close(scaled[3], t(0.9375 / 0.2501))
    assert torch.equal(keep_mask(rewards, 16, 0.1), filter_mask(scaled, 0.1))
    # just below / just above the negatives' 0.2499000: kept / dropped; the positive always kept
    assert keep_mask(rewards, 16, 0.2498).all()
    assert keep_mask(rewards, 16, 0.2500).tolist() == [i == 3 for i in range(16)]
    assert keep_mask(rewards.float(), 16, 0.2498).all()  # float32 rewards: the same kept set


# -------------------------------------------------------------------------------------------- policy loss


def _logs(ratios):
    return torch.log(t(ratios))


def test_policy_loss_clipped_surrogate_asymmetric():
    # eps_low = 0.2 -> lower bound 0.8 ; eps_high = 0.28 -> upper bound 1.28
    # row 0, A = +2, ratios [1.0, 1.5, 0.5, 1.1]:
    #   r=1.0: min(2, 2) = 2             -> loss -2      (not clipped)
    #   r=1.5: min(3, 1.28*2=2.56)       -> loss -2.56   (clip binds)
    #   r=0.5: min(1, 0.8*2=1.6) = 1     -> loss -1      (inside pessimistic bound: not binding)
    #   r=1.1: min(2.2, 2.2)             -> loss -2.2    (inside the interval)
    # row 1, A = -1, ratios [1.5, 0.5, 1.25, 3.0(pad)]:
    #   r=1.5: min(-1.5, -1.28) = -1.5   -> loss 1.5     (not binding)
    #   r=0.5: min(-0.5, -0.8) = -0.8    -> loss 0.8     (clip binds)
    #   r=1.25: 1.25 < 1.28, inside      -> loss 1.25
    #   r=3.0: padding; min(-3, -1.28)   -> loss 3 (not masked here), must not count in clip fraction
    ratios = [[1.0, 1.5, 0.5, 1.1], [1.5, 0.5, 1.25, 3.0]]
    old = torch.zeros(2, 4, dtype=D)
    logp = _logs(ratios)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    loss, clip_frac = policy_loss(logp, old, t([2.0, -1.0]), mask, clip_eps_low=0.2, clip_eps_high=0.28)
    expected = t([[-2.0, -2.56, -1.0, -2.2], [1.5, 0.8, 1.25, 3.0]])
    assert_close(loss, expected)
    assert_close(clip_frac, t(2.0 / 7.0))

    # symmetric default eps=0.2: upper bound 1.2; r=1.25 with A=-1 still not binding (pessimistic side),
    # r=1.5 with A=+2 -> 1.2*2 = 2.4 binds; r=0.5 with A=-1 -> -0.8 binds
    loss_sym, frac_sym = policy_loss(logp, old, t([2.0, -1.0]), mask)
    assert_close(loss_sym[0, 1], t(-2.4))
    assert_close(loss_sym[1, 2], t(1.25))
    assert_close(frac_sym, t(2.0 / 7.0))


def test_policy_loss_clip_fraction_counts_both_bounds():
    # A=+1, ratio 2 (binds at 1.2); A=-1, ratio 0.1 (binds at 0.8); A=+1, ratio 1 (not); padding ignored
    logp = _logs([[2.0, 1.0], [0.1, 5.0]])
    adv = t([[1.0, 1.0], [-1.0, 1.0]])  # [B, T] advantages are accepted too
    mask = t([[1, 1], [1, 0]])
    loss, frac = policy_loss(logp, torch.zeros(2, 2, dtype=D), adv, mask)
    assert_close(loss, t([[-1.2, -1.0], [0.8, -1.2]]))
    assert_close(frac, t(2.0 / 3.0))
    # fully empty mask -> clip fraction 0, not nan
    _, frac0 = policy_loss(logp, torch.zeros(2, 2, dtype=D), adv, torch.zeros(2, 2, dtype=D))
    assert frac0.item() == 0.0


def test_policy_loss_gradient_zero_where_clip_binds():
    logp = _logs([[1.5, 1.0]]).requires_grad_(True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2, dtype=D), t([2.0]), torch.ones(1, 2))
    loss.sum().backward()
    # d(-r*A)/d logp = -r*A = -2 at r=1 ; clipped token (r=1.5) has zero gradient
    assert_close(logp.grad, t([[0.0, -2.0]]))


def test_policy_loss_on_policy_gradient_is_vanilla_pg():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, dtype=D, requires_grad=True)
    ids = torch.randint(0, 5, (3, 4))
    adv = t([1.5, -0.5, 0.25])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])

    logp = token_logprobs(logits, ids)
    loss, frac = policy_loss(logp, None, adv, mask)
    assert frac.item() == 0.0
    assert_close(loss, -adv[:, None].expand(3, 4))  # ratio exactly 1
    (g_ppo,) = torch.autograd.grad((loss * mask).sum(), logits)

    logp2 = token_logprobs(logits, ids)
    (g_pg,) = torch.autograd.grad(-(adv[:, None] * logp2 * mask).sum(), logits)
    assert_close(g_ppo, g_pg)
    assert g_pg.abs().sum() > 0

    # and directly w.r.t. a leaf logprobs tensor: d loss / d logp = -A per token
    leaf = torch.randn(3, 4, dtype=D, requires_grad=True)
    loss_leaf, _ = policy_loss(leaf, None, adv, mask)
    loss_leaf.sum().backward()
    assert_close(leaf.grad, -adv[:, None].expand(3, 4))


def test_the_log_ratio_clamp_keeps_a_stale_token_finite():
    """A = -1, log-ratio 100 in fp32: exp overflows to inf and the unbounded loss is inf; clamped at 20
    the ratio is e^20 and the loss e^20 (dual clip off), with no gradient (the clamp binds)."""
    logp = torch.tensor([[100.0, 0.1]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2)
    unbounded, _ = policy_loss(logp, old, adv, mask, log_ratio_clamp=None, clip_ratio_c=None)
    assert math.isinf(unbounded[0, 0].item())
    clamped, _ = policy_loss(logp, old, adv, mask, clip_ratio_c=None)  # the default clamp, 20
    assert_close(clamped.detach(), torch.tensor([[math.exp(20.0), math.exp(0.1)]]))
    clamped.sum().backward()
    assert_close(logp.grad, torch.tensor([[0.0, math.exp(0.1)]]))  # d(-r A)/d logp = r for A = -1
    with pytest.raises(ValueError, match="log_ratio_clamp must be > 0"):
        policy_loss(logp, old, adv, mask, log_ratio_clamp=0.0)


def test_the_dual_clip_caps_negative_advantage_tokens_at_c_times_abs_a():
    # A = -2: r = 5 -> unbounded loss 10, dual clip (c = 3) caps it at 6, gradient 0; r = 2 -> 4, under
    # the cap, gradient -r A = 4; A = +1, r = 5: the epsilon clip gives -1.2, untouched by the dual clip
    logp = _logs([[5.0, 2.0], [5.0, 1.0]]).requires_grad_()
    adv, mask = t([-2.0, 1.0]), t([[1, 1], [1, 0]])
    loss, frac, dual = policy_loss(
        logp, torch.zeros(2, 2, dtype=D), adv, mask, return_dual_clip_fraction=True
    )
    assert_close(loss.detach(), t([[6.0, 4.0], [-1.2, -1.0]]))
    assert_close(dual, t(1.0 / 3.0))  # one of the three masked tokens
    assert_close(frac, t(1.0 / 3.0))  # the epsilon clip: the A = +1, r = 5 token alone
    loss.sum().backward()
    assert_close(logp.grad, t([[0.0, 4.0], [0.0, -1.0]]))
    off, _, dual_off = policy_loss(
        logp, torch.zeros(2, 2, dtype=D), adv, mask, clip_ratio_c=None, return_dual_clip_fraction=True
    )
    assert_close(off[0, 0].detach(), t(10.0))  # the control: no cap
    assert dual_off.item() == 0.0
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        policy_loss(logp, None, adv, mask, clip_ratio_c=1.0)


def test_the_bounds_leave_on_policy_and_in_range_tokens_bit_identical():
    torch.manual_seed(0)
    adv, mask = torch.randn(4), torch.ones(4, 6)
    for old in (None, torch.randn(4, 6) * 0.3):  # on-policy, and off-policy with ratios in range
        grads = []
        for bounds in ({}, {"log_ratio_clamp": None, "clip_ratio_c": None}):
            logp = (torch.randn(4, 6, generator=torch.Generator().manual_seed(1)) * 0.3).requires_grad_()
            loss, frac = policy_loss(logp, old, adv, mask, **bounds)
            loss.sum().backward()
            grads.append((loss.detach(), frac, logp.grad))
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)
    # the control: a ratio past c with a negative advantage is changed by the default bounds
    logp = torch.full((1, 1), 2.0)
    bounded, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    unbounded, _ = policy_loss(
        logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), clip_ratio_c=None
    )
    assert not torch.equal(bounded, unbounded)


def test_policy_loss_shape_validation():
    with pytest.raises(ValueError, match=r"old_logprobs shape \(2, 4\) != logprobs shape \(2, 3\)"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"advantages \[B\]=3 but logprobs has B=2"):
        policy_loss(torch.zeros(2, 3), None, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) does not match \(2, 3\)"):
        policy_loss(torch.zeros(2, 3), None, torch.zeros(2), torch.ones(2, 4))


# --------------------------------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    # logp = [ln .5, ln .25], ref = [ln .25, ln .5]  ->  d = logp - ref = [ln2, -ln2]
    logp = torch.log(t([[0.5, 0.25]]))
    ref = torch.log(t([[0.25, 0.5]]))
    assert_close(kl_penalty(logp, ref, "k1"), t([[LN2, -LN2]]))
    assert_close(kl_penalty(logp, ref, "k2"), t([[0.5 * LN2**2, 0.5 * LN2**2]]))  # 0.2402265
    # k3 = exp(ref-logp) - (ref-logp) - 1 = [0.5 + ln2 - 1, 2 - ln2 - 1] = [0.1931472, 0.3068528]
    assert_close(kl_penalty(logp, ref, "k3"), t([[LN2 - 0.5, 1.0 - LN2]]))
    assert_close(kl_penalty(logp, ref), kl_penalty(logp, ref, "k3"))  # default
    for kind in KL_ESTIMATORS:
        assert torch.equal(kl_penalty(logp, logp, kind), torch.zeros(1, 2, dtype=D))


def test_kl_estimators_unbiased_k1_k3():
    # pi = [.5, .25, .25], ref = [.25, .25, .5]: KL = .5 ln2 + 0 + .25 ln(.5) = .25 ln2
    g = torch.Generator().manual_seed(0)
    pi, ref = t([0.5, 0.25, 0.25]), t([0.25, 0.25, 0.5])
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    lp, lr = pi.log()[samples][None], ref.log()[samples][None]
    true_kl = 0.25 * LN2
    assert abs(kl_penalty(lp, lr, "k1").mean().item() - true_kl) < 0.01
    assert abs(kl_penalty(lp, lr, "k3").mean().item() - true_kl) < 0.01
    assert (kl_penalty(lp, lr, "k3") >= 0).all()


def test_kl_gradients_by_hand():
    # d/dlogp of k3 = exp(ref - logp) - (ref - logp) - 1 is 1 - exp(ref - logp); of k1: 1; of k2: logp - ref
    logp = t([[-1.0, -2.0, -0.5]]).requires_grad_()
    ref = t([[-1.5, -1.0, -0.5]])
    kl_penalty(logp, ref, "k3").sum().backward()
    # 1 - exp(-0.5) = 0.3934693, 1 - exp(1) = -1.7182818, 1 - exp(0) = 0
    assert_close(logp.grad, t([[0.3934693402873666, -1.718281828459045, 0.0]]))
    logp.grad = None
    kl_penalty(logp, ref, "k2").sum().backward()
    assert_close(logp.grad, t([[0.5, -1.0, 0.0]]))
    logp.grad = None
    kl_penalty(logp, ref, "k1").sum().backward()
    assert_close(logp.grad, t([[1.0, 1.0, 1.0]]))


def test_k3_plus_has_k3s_value_and_k2s_gradient():
    logp = t([[-1.0, -2.0, -0.5]]).requires_grad_()
    ref = t([[-1.5, -1.0, -0.5]])
    value = kl_penalty(logp, ref, "k3+")
    assert torch.equal(value.detach(), kl_penalty(logp, ref, "k3").detach())
    value.sum().backward()
    assert_close(logp.grad, t([[0.5, -1.0, 0.0]]))  # logp - ref, k2's (not k3's 0.39, -1.72, 0)


def test_kl_clamp_bounds_the_value_and_stops_the_gradient_where_it_binds():
    # logp = -5, ref = 0: k3 = e^5 - 5 - 1 = 142.41; logp = -1, ref = -1.5: k3 = 0.1065 (in range)
    logp = t([[-5.0, -1.0]]).requires_grad_()
    ref = t([[0.0, -1.5]])
    assert_close(kl_penalty(logp, ref, "k3").detach(), t([[math.exp(5) - 6, math.exp(-0.5) - 0.5]]))
    clamped = kl_penalty(logp, ref, "k3", clamp=10.0)
    assert_close(clamped.detach(), t([[10.0, math.exp(-0.5) - 0.5]]))
    clamped.sum().backward()
    assert_close(logp.grad, t([[0.0, 1 - math.exp(-0.5)]]))  # in range: k3's own gradient
    with pytest.raises(ValueError, match="clamp must be > 0"):
        kl_penalty(logp, ref, "k3", clamp=0.0)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "k3+"])
def test_kl_gradients_against_the_exact_gradient_on_a_categorical_policy(kind):
    """Each estimator as a loss, averaged over 400k tokens sampled from pi = softmax(theta), against the
    exact gradients of KL(pi || ref) and KL(ref || pi) (autograd of the closed forms). k2 and k3+ give
    the first, k3 the second, k1 zero (KL_GRADIENTS); the other directions are the controls, each more
    than 20 standard errors away."""
    gen = torch.Generator().manual_seed(0)
    theta = t([0.8, -0.3, 0.1, -1.2, 0.5]).requires_grad_()
    ref_logp = torch.log_softmax(t([-0.5, 0.4, 0.9, -0.2, 0.0]), dim=0)
    logp = torch.log_softmax(theta, dim=0)
    pi = logp.exp()
    forward = torch.autograd.grad((pi * (logp - ref_logp)).sum(), theta, retain_graph=True)[0]
    reverse = torch.autograd.grad((ref_logp.exp() * (ref_logp - logp)).sum(), theta, retain_graph=True)[0]
    n = 400_000
    samples = torch.multinomial(pi.detach(), n, replacement=True, generator=gen)
    estimate_loss = kl_penalty(logp[samples][None], ref_logp[samples][None], kind).mean()
    estimate = torch.autograd.grad(estimate_loss, theta)[0]
    # the standard error of each entry, from the per-sample gradients c_s (e_s - pi) of the same loss
    lp_s = logp.detach()[samples].clone().requires_grad_()
    (coef,) = torch.autograd.grad(kl_penalty(lp_s[None], ref_logp[samples][None], kind).sum(), lp_s)
    with torch.no_grad():
        per_sample = coef[:, None] * (torch.nn.functional.one_hot(samples, 5).to(D) - pi.detach())
        stderr = per_sample.std(dim=0) / math.sqrt(n)
    expected = {"k1": torch.zeros(5, dtype=D), "k2": forward, "k3": reverse, "k3+": forward}[kind]
    assert ((estimate - expected).abs() <= 5 * stderr + 1e-12).all(), (kind, estimate, expected, stderr)
    for name, other in {"zero": torch.zeros(5, dtype=D), "forward": forward, "reverse": reverse}.items():
        if not torch.allclose(other, expected):
            assert ((estimate - other).abs() > 20 * stderr).any(), f"{kind} cannot tell {name} apart"
    assert set(KL_GRADIENTS) == set(KL_ESTIMATORS)  # every estimator says what its gradient is


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ------------------------------------------------------------------------------------------- aggregation

# padded batch; padding positions hold garbage (100, inf, nan) that must never leak
PAD_LOSS = [
    [1.0, 2.0, 3.0],
    [4.0, 5.0, 100.0],
    [6.0, float("inf"), float("nan")],
    [100.0, 100.0, 100.0],
]
PAD_MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]]


def test_aggregate_token_mean():
    # (1+2+3+4+5+6) / 6 tokens = 3.5
    assert_close(aggregate_loss(t(PAD_LOSS), t(PAD_MASK), "token_mean"), t(3.5))
    assert_close(aggregate_loss(t(PAD_LOSS), torch.tensor(PAD_MASK).bool(), "token_mean"), t(3.5))
    # global count overrides the local one: 21 / 10
    assert_close(aggregate_loss(t(PAD_LOSS), t(PAD_MASK), "token_mean", global_tokens=10), t(2.1))


def test_aggregate_seq_mean():
    # per-sequence means: 6/3 = 2, 9/2 = 4.5, 6/1 = 6; the empty 4th row is excluded -> 12.5 / 3
    assert_close(aggregate_loss(t(PAD_LOSS), t(PAD_MASK), "seq_mean"), t(12.5 / 3))
    assert_close(aggregate_loss(t(PAD_LOSS), t(PAD_MASK), "seq_mean", global_seqs=5), t(2.5))


def test_aggregate_constant():
    # Dr. GRPO / DASH: normalizer = rows x max_completion_length = 4 x 4 = 16 -> 21 / 16
    assert_close(aggregate_loss(t(PAD_LOSS), t(PAD_MASK), "constant", normalizer=16), t(21 / 16))
    with pytest.raises(ValueError, match="normalizer"):
        aggregate_loss(t(PAD_LOSS), t(PAD_MASK), "constant")


def test_aggregate_modes_differ_and_validation():
    vals = {m: aggregate_loss(t(PAD_LOSS), t(PAD_MASK), m, normalizer=16).item() for m in LOSS_AGG_MODES}
    assert len(set(vals.values())) == 3
    with pytest.raises(ValueError, match="token_mean"):
        aggregate_loss(t(PAD_LOSS), t(PAD_MASK), "sum")
    with pytest.raises(ValueError, match=r"mask shape \(4, 2\) does not match \(4, 3\)"):
        aggregate_loss(t(PAD_LOSS), t(PAD_MASK)[:, :2], "token_mean")
    # empty mask without global counts -> 0 (not nan)
    zeros = torch.zeros(2, 3, dtype=D)
    assert aggregate_loss(t(PAD_LOSS)[:2], zeros, "token_mean").item() == 0.0
    assert aggregate_loss(t(PAD_LOSS)[:2], zeros, "seq_mean").item() == 0.0


def test_global_loss_counts():
    tokens, seqs = global_loss_counts(torch.tensor(PAD_MASK).bool())
    assert tokens.item() == 6
    assert seqs.item() == 3


def _split_batch():
    torch.manual_seed(1)
    B, T = 6, 5
    lengths = torch.tensor([5, 2, 0, 3, 1, 4])  # includes an empty row
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(D)
    old = torch.randn(B, T, dtype=D) * 0.3
    logp = old + torch.randn(B, T, dtype=D) * 0.3  # ratios spread around 1 -> some tokens clip
    adv = t([1.0, -2.0, 0.5, 0.7, -0.3, 1.2])
    return logp, old, adv, mask


def _step_loss(logp_leaf, old, adv, mask, mode, splits, use_global):
    kwargs = {"normalizer": mask.shape[0] * mask.shape[1]}  # constant: all rows of the step x T
    if use_global:
        tokens, seqs = global_loss_counts(mask)
        kwargs.update(global_tokens=tokens, global_seqs=seqs)
    total = torch.zeros((), dtype=D)
    start = 0
    for n in splits:
        rows = slice(start, start + n)
        start += n
        per_tok, _ = policy_loss(logp_leaf[rows], old[rows], adv[rows], mask[rows], 0.2, 0.28)
        mb = aggregate_loss(per_tok, mask[rows], mode, **kwargs)
        mb.backward()  # gradient accumulation, one backward per micro-batch
        total = total + mb.detach()
    return total


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("splits", [[2, 4], [1, 1, 4]])
def test_aggregate_split_invariance(mode, splits):
    logp, old, adv, mask = _split_batch()

    full_leaf = logp.clone().requires_grad_(True)
    per_tok, clip_frac = policy_loss(full_leaf, old, adv, mask, 0.2, 0.28)
    assert 0 < clip_frac.item() < 1  # the clipped branch is exercised
    full = aggregate_loss(per_tok, mask, mode, normalizer=mask.numel())
    full.backward()

    split_leaf = logp.clone().requires_grad_(True)
    total = _step_loss(split_leaf, old, adv, mask, mode, splits, use_global=True)

    assert_close(total, full.detach())
    assert_close(split_leaf.grad, full_leaf.grad)
    assert full_leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean"])
def test_local_means_are_not_split_invariant(mode):
    # sanity check that the invariance test can fail: local denominators give a different step loss
    logp, old, adv, mask = _split_batch()
    full_leaf = logp.clone().requires_grad_(True)
    per_tok, _ = policy_loss(full_leaf, old, adv, mask, 0.2, 0.28)
    full = aggregate_loss(per_tok, mask, mode)
    local = _step_loss(logp.clone().requires_grad_(True), old, adv, mask, mode, [2, 4], use_global=False)
    assert not torch.allclose(local, full.detach())


# ------------------------------------------------------------------------------------------ logit utils


def test_entropy_uniform_is_log_v():
    logits = torch.zeros(2, 3, 7)
    assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(7.0)))
    # shift invariance: uniform regardless of the constant
    assert_close(entropy_from_logits(logits + 123.0), torch.full((2, 3), math.log(7.0)))


def test_entropy_hand_value_and_stability():
    # p = [.5, .25, .25]: H = .5 ln2 + 2 * .25 ln4 = 1.5 ln2
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]])) + 10.0
    assert_close(entropy_from_logits(logits), torch.tensor([[1.5 * LN2]]))
    # a near one-hot distribution in bf16: finite and ~0 (log(softmax) would give nan)
    sharp = torch.tensor([[[1000.0, 0.0, 0.0]]], dtype=torch.bfloat16)
    h = entropy_from_logits(sharp)
    assert h.dtype == torch.float32 and torch.isfinite(h).all() and h.abs().item() < 1e-6


def test_entropy_chunking_matches():
    torch.manual_seed(2)
    logits = torch.randn(5, 3, 11)
    p = logits.softmax(-1)
    manual = -(p * p.log()).sum(-1)
    assert_close(entropy_from_logits(logits, chunk_size=2), manual)
    assert_close(entropy_from_logits(logits, chunk_size=None), manual)


def test_token_logprobs_hand_values():
    # row logits = log([.5, .25, .25]) + c ; picking ids 0, 1, 2 -> log .5, log .25, log .25
    base = torch.log(torch.tensor([0.5, 0.25, 0.25])) + 3.0
    logits = base.expand(1, 3, 3).clone()
    ids = torch.tensor([[0, 1, 2]])
    assert_close(token_logprobs(logits, ids), torch.log(torch.tensor([[0.5, 0.25, 0.25]])))


def test_token_logprobs_matches_manual_and_chunks():
    torch.manual_seed(3)
    logits = torch.randn(5, 4, 13, dtype=torch.bfloat16)
    ids = torch.randint(0, 13, (5, 4))
    manual = torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
    for chunk in (1, 2, 8, None):
        out = token_logprobs(logits, ids, chunk_size=chunk)
        assert out.dtype == torch.float32
        assert_close(out, manual)
    with pytest.raises(ValueError, match=r"token_ids shape \(5, 3\) does not match logits \[B, T\] \(5, 4\)"):
        token_logprobs(logits, ids[:, :3])


# ------------------------------------------------------------------------------------- temperature, TIS

LN3 = math.log(3.0)


@pytest.mark.parametrize("temperature", [2.0, 0.5, 1.3])
def test_token_logprobs_and_entropy_at_a_temperature(temperature):
    # rows [T ln3, 0] and [0, T ln3]: divided by T, p = [3/4, 1/4] and [1/4, 3/4]; token 0 is picked
    logits = t([[[temperature * LN3, 0.0], [0.0, temperature * LN3]]])
    ids = torch.tensor([[0, 0]])
    expected = t([[math.log(0.75), math.log(0.25)]])
    assert_close(token_logprobs(logits, ids, temperature=temperature), expected)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623351446...
    assert_close(entropy_from_logits(logits, temperature=temperature), t([[h, h]]))
    # negative control: at T = 1 the same logits give other numbers (unless T is 1)
    untempered = token_logprobs(logits, ids)
    assert not torch.allclose(untempered, expected)


def test_temperature_zero_counts_as_one():
    logits = t([[[LN3, 0.0]]])
    ids = torch.tensor([[1]])
    assert logprob_temperature(0.0) == 1.0 and logprob_temperature(0.7) == 0.7
    assert_close(token_logprobs(logits, ids, temperature=0.0), t([[math.log(0.25)]]))
    assert torch.isfinite(entropy_from_logits(logits, temperature=0.0)).all()
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        logprob_temperature(-1.0)


def test_temperature_is_applied_after_the_upcast():
    # bf16 logits / T in bf16 would round; the float32 division must match the float32 reference
    torch.manual_seed(4)
    logits = torch.randn(2, 3, 17, dtype=torch.bfloat16) * 4
    ids = torch.randint(0, 17, (2, 3))
    manual = torch.log_softmax(logits.float() / 1.3, -1).gather(-1, ids[..., None]).squeeze(-1)
    assert_close(token_logprobs(logits, ids, temperature=1.3), manual, rtol=0, atol=1e-6)


def test_logprob_gap_hand_values():
    trainer = t([[-1.0, -2.0, -3.0], [-0.5, -9.0, 0.0]])
    engine = t([[-1.1, -2.0, -2.5], [-0.25, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])  # the -9 vs 0 position is padding and must not count
    total, worst, tokens = logprob_gap(trainer, engine, mask)
    assert_close(total, t(0.1 + 0.0 + 0.5 + 0.25))
    assert_close(worst, t(0.5))
    assert tokens.item() == 4
    total, worst, tokens = logprob_gap(trainer, engine, torch.zeros(2, 3))
    assert total.item() == worst.item() == tokens.item() == 0
    with pytest.raises(ValueError, match="engine_logprobs shape"):
        logprob_gap(trainer, engine[:, :2], mask)


def test_truncated_importance_weights_hand_values():
    old = torch.log(t([[0.5, 0.9, 0.1]])).requires_grad_(True)
    engine = torch.log(t([[0.25, 0.9, 0.4]]))
    # ratios pi_old / pi_engine: 2 (capped to 1.5), 1, 0.25 (a lower ratio is never raised)
    w = truncated_importance_weights(old, engine, cap=1.5)
    assert_close(w, t([[1.5, 1.0, 0.25]]))
    assert not w.requires_grad  # constants: no gradient flows through the weights
    assert_close(truncated_importance_weights(old, engine, cap=10.0), t([[2.0, 1.0, 0.25]]))
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(old, engine, cap=0.0)
