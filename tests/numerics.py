"""fp32 rounding bounds for the tests' numeric comparisons: derived from the sizes of the sums involved,
not tuned on one CPU.

Two fp32 computations of the same quantity that differ only in the order of their sums (chunked against
unchunked log-probs, another micro-batch split, another kernel: AVX2, AVX-512, AMX and CUDA each block
their reductions differently) are each within the rounding error of the exact value, so their difference
is within twice that. For a sum of ``n`` terms in fp32 the error is at most ``gamma_n = n u / (1 - n u)``
times the sum of the terms' magnitudes (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
eq. 3.5), with ``u = 2**-24`` fp32's unit roundoff. That worst case assumes every rounding goes the same
way; with rounding errors that are independent and of mean zero the bound is ``lambda sqrt(n) u`` except
with probability at most ``2 exp(-lambda**2 / 2)`` (Higham and Mary, *A new approach to probabilistic
rounding error analysis*, SIAM J. Sci. Comput. 41(5), 2019, thm. 2.4). ``lambda = 4`` makes the exception
rarer than 1 in 1,000 per sum.

What ``n`` is: the longest reduction on the path to the compared value. For a language model's log-probs
and their gradients that is the vocabulary (the log-sum-exp in forward, ``d hidden = d logits @ W_head``
in backward: 49,152 terms on SmolLM2's vocabulary, against 128-256 for the tiny model's other matmuls).

The scale a bound multiplies: a log-prob's error is absolute (the log-sum-exp of positive terms has a
relative error of at most that of its sum, which becomes an absolute error in log space); a gradient's is
relative to the tensor's largest entry, because the terms of its sums are of the tensor's own size.
Measured against a float64 computation of the tiny model's chunked log-prob gradients: 1.03e-5 of each
tensor's largest entry on an AMD EPYC with AVX-512 + BF16 and with ``ATEN_CPU_CAPABILITY=avx2`` alike (the
bound at n = 49,152 is 5.3e-5); about 4e-6 on an Intel Xeon with AVX-512F. A bug (a chunk at the wrong
temperature, targets shifted by one) moves them by 1e-2 or more.
"""

from __future__ import annotations

import math

import torch

FP32_UNIT_ROUNDOFF = 2.0**-24
LAMBDA = 4.0  # the probabilistic bound fails with probability <= 2 exp(-8) = 6.7e-4 per sum


def fp32_sum_error(n_terms: int, lam: float = LAMBDA) -> float:
    """The relative rounding error of an fp32 sum of ``n_terms`` terms: ``lam sqrt(n) u``."""
    if n_terms < 1:
        raise ValueError(f"n_terms must be >= 1, got {n_terms}")
    return lam * math.sqrt(n_terms) * FP32_UNIT_ROUNDOFF


def assert_tensors_near(
    actual: dict[str, torch.Tensor] | torch.Tensor,
    expected: dict[str, torch.Tensor] | torch.Tensor,
    n_terms: int,
    *,
    relative: bool = True,
    sides: int = 2,
    scale: float | None = None,
) -> None:
    """Each tensor of ``actual`` within ``sides`` fp32 rounding errors of ``expected``'s.

    ``sides=2`` compares two fp32 computations (each may be off by one error); ``sides=1`` compares an fp32
    result with an exact (float64) one. ``relative``: the bound scales with each tensor's largest entry
    (gradients); otherwise it is absolute, times ``scale`` when given (log-probs, entropies).
    """
    if isinstance(expected, torch.Tensor):
        actual, expected = {"tensor": actual}, {"tensor": expected}
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        size = float(want.abs().max()) if relative else (1.0 if scale is None else scale)
        assert size > 0, f"{name}: nothing to compare (all zero)"
        atol = sides * fp32_sum_error(n_terms) * size
        torch.testing.assert_close(
            got.double(), want.double(), rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
