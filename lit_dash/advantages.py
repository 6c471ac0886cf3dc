"""Group-relative advantages and which completions to keep: pure tensor functions, as in
:mod:`lit_dash.losses` (which names them too).

The rollout buffer calls these before any forward pass of the trainer: a completion the filter drops
costs nothing more. Shapes: ``rewards [B]`` group-contiguous (the ``G`` completions of prompt ``p`` on
rows ``p*G .. p*G+G-1``, so ``B = P * G``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["filter_mask", "group_advantages", "keep_mask", "overlong_penalty", "zero_variance_groups"]


def _as_float(x: Tensor) -> Tensor:
    return x if torch.is_floating_point(x) else x.to(torch.get_default_dtype())


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Reshape group-contiguous ``rewards [B]`` to ``[P, G]`` after validating the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size}); "
            "rewards must be laid out group-contiguous with B = P * G"
        )
    return _as_float(rewards).view(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages (GRPO).

    Shapes: ``rewards [B]`` (group-contiguous, ``B = P * G``) -> ``advantages [B]``.

    ``A_i = r_i - mean_g(r)``, and when ``scale_by_std`` additionally divided by ``std_g(r) + eps`` with the
    *unbiased* standard deviation (``torch.std`` default, Bessel correction 1). The group mean is the
    critic-free baseline of GRPO; Dr. GRPO argues for ``scale_by_std=False`` because the std division
    up-weights nearly-solved / nearly-failed prompts. An all-equal group gives exactly zero advantages in
    both variants (enforced explicitly, so float rounding in the mean cannot leak through).

    Raises ``ValueError`` if ``B`` is not a multiple of ``group_size``, or if ``scale_by_std`` and
    ``group_size < 2`` (the unbiased std of a single sample is undefined).
    """
    if scale_by_std and group_size < 2:
        raise ValueError(f"scale_by_std=True needs group_size >= 2 (unbiased std), got {group_size}")
    grouped = _grouped(rewards, group_size)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    # A group of identical rewards must give exactly 0 (the float mean of e.g. [0.3, 0.3, 0.3] is not
    # exactly 0.3, and dividing that rounding error by a ~0 std would amplify it).
    all_equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    adv = adv.masked_fill(all_equal, 0.0)
    return adv.reshape(-1)


def zero_variance_groups(rewards: Tensor, group_size: int, atol: float = 1e-6) -> Tensor:
    """Which groups have (numerically) identical rewards.

    Shapes: ``rewards [B]`` (group-contiguous, ``B = P * G``) -> ``[P]`` bool.

    Such groups carry no learning signal (every advantage is zero), which is what DASH's preemptive
    sampling is designed to skip. The test is ``max - min <= atol`` rather than ``std == 0`` so it is robust
    to float noise in the rewards (e.g. partial-credit rewards computed in float32).
    """
    grouped = _grouped(rewards, group_size)
    spread = grouped.max(dim=1).values - grouped.min(dim=1).values
    return spread <= atol


def filter_mask(advantages: Tensor, threshold: float) -> Tensor:
    """Keep-mask for DASH's gradient filtering.

    Shapes: ``advantages [B]`` -> ``[B]`` bool.

    Keeps samples with ``|A| > threshold`` (strict). The paper uses ``threshold = 0.1``, i.e. drops
    ``|A| <= 0.1``, since such samples cost a full forward/backward but barely move the parameters.
    ``threshold = 0`` drops exactly the zero-advantage samples; any ``threshold < 0`` keeps everything
    (``|A| >= 0 > threshold``), which is how filtering is switched off.
    """
    return advantages.abs() > threshold


def keep_mask(rewards: Tensor, group_size: int, threshold: float, eps: float = 1e-4) -> Tensor:
    """Keep-mask for gradient filtering, in units of each group's spread.

    Shapes: ``rewards [B]`` (group-contiguous, ``B = P * G``) -> ``[B]`` bool.

    Keeps ``|r - mean_g(r)| > threshold * (std_g(r) + eps)``, i.e. ``filter_mask`` of the std-scaled
    advantages (``group_advantages(..., scale_by_std=True)``), whatever advantages the loss then uses.
    So the threshold means the same with or without ``scale_rewards``: on raw advantages ``r - mean``
    (Dr. GRPO) a fixed 0.1 would drop one side of a group, e.g. G=16 with one success has negatives at
    ``|A| = 1/16`` (dropped) and the positive at ``15/16`` (kept), a biased update; in std units both sides
    sit at ``0.25`` and ``3.75`` and both are kept. All-equal groups give 0 and are dropped for any
    ``threshold >= 0``. Needs ``group_size >= 2`` (the unbiased std).
    """
    return filter_mask(group_advantages(rewards, group_size, scale_by_std=True, eps=eps), threshold)


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer_tokens: int) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward before advantages.

    Shapes: ``lengths [B]`` (completion tokens) -> ``[B]``, each in ``[-1, 0]``: 0 up to
    ``max_new_tokens - buffer_tokens``, then falling linearly to -1 at ``max_new_tokens`` (a completion
    the engine cut off), ``-(length - (L - buffer)) / buffer``. So a correct answer that nearly ran out of
    room earns less than a short one, and a truncated one gets -1 whatever it said.
    """
    if not 1 <= buffer_tokens <= max_new_tokens:
        raise ValueError(
            f"the overlong buffer must be 1..max_new_tokens ({max_new_tokens}) tokens, got {buffer_tokens}"
        )
    over = _as_float(lengths) - (max_new_tokens - buffer_tokens)
    return -(over / buffer_tokens).clamp(0.0, 1.0)
