"""The per-token KL penalty to the reference model: Schulman's estimators, and what each one's value and
gradient estimate when used as a loss on tokens sampled from the policy.

Pure tensor functions, like :mod:`lit_dash.losses` (which names them too). Shapes: ``logprobs [B, T]``
(the policy's log-probs of the sampled tokens), ``ref_logprobs [B, T]`` (the reference's of the same).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["KL_ESTIMATORS", "KL_GRADIENTS", "kl_penalty"]


def _kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def _kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()


def _kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def _kl_k3_plus(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    k2 = _kl_k2(logprobs, ref_logprobs)
    return k2 + (_kl_k3(logprobs, ref_logprobs) - k2).detach()  # k3's value, k2's gradient


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
    "k3+": _kl_k3_plus,
}
# what each estimator's expected gradient is, used as a loss on tokens sampled from pi
KL_GRADIENTS = {
    "k1": "zero (E_pi[grad log pi] = 0): no KL penalty at all",
    "k2": "grad KL(pi || ref)",
    "k3": "grad KL(ref || pi), the reverse direction",
    "k3+": "grad KL(pi || ref) (k2's gradient, k3's value)",
}


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3", clamp: float | None = None
) -> Tensor:
    """Per-token KL penalty to the reference, from tokens sampled from ``pi``.

    Shapes: ``logprobs [B, T]``, ``ref_logprobs [B, T]`` -> ``[B, T]`` (unmasked; aggregate with
    ``aggregate_loss`` like the policy loss).

    Schulman's estimators ("Approximating KL Divergence", 2020), with ``d = logprobs - ref_logprobs``.
    Two different claims hold for each: whether its *value* is an unbiased estimate of ``KL(pi || ref)``,
    and what its *gradient* is in expectation when it is used as a loss (``KL_GRADIENTS``):

    * ``k1 = d``: value unbiased (high variance, can be negative); gradient ``d grad log pi`` has
      expectation zero, so as a loss it penalises nothing (the module refuses it with kl_coef > 0);
    * ``k2 = d**2 / 2``: value biased (low variance, non-negative); gradient ``d grad log pi``, whose
      expectation is exactly ``grad KL(pi || ref)``;
    * ``k3 = exp(-d) + d - 1``: value unbiased (low variance, non-negative; GRPO's choice); gradient
      ``(1 - ref / pi) grad log pi``, whose expectation is ``grad KL(ref || pi)``, the reverse KL;
    * ``k3+``: k3's value with k2's gradient (straight-through: ``k2 + (k3 - k2).detach()``), so the
      logged value is k3's and the gradient that of ``KL(pi || ref)``.

    ``clamp`` (None: off) bounds each token's value to ``[-clamp, clamp]``; where it binds the token's
    gradient is zero. k3 grows like ``ref / pi`` on a token the reference finds far likelier than the
    policy (k3 > 10 needs ``ref / pi`` > ~12), which a clamp at 10 (verl's) cuts off.
    """
    try:
        fn = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(KL_ESTIMATORS)}") from None
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs shape {tuple(ref_logprobs.shape)} != logprobs shape {tuple(logprobs.shape)}"
        )
    if clamp is not None and not clamp > 0:
        raise ValueError(f"the KL clamp must be > 0 (or None for none), got {clamp}")
    kl = fn(logprobs, ref_logprobs)
    return kl if clamp is None else torch.clamp(kl, -clamp, clamp)
