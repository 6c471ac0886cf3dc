"""Why a bf16 copy of a model that starts on the bf16 grid stops following small updates, and the fix.

A model stored in bf16 (SmolLM2-135M from its GGUF file: every weight) loads as float32 master weights
that lie exactly on the bf16 grid. bf16 keeps 8 significant bits, so a weight near 0.05 sits in a cell
about 4e-4 wide; an AdamW step at lr 3e-5 moves it by at most 3e-5. Cast back to bf16 by round-to-nearest
(the bf16 engine's weights on every push, and the trainer's matmul weights under bf16 autocast) it stays
where it started until it has moved half a cell: on the 135M model 84% of the weights cannot change at all
in the first 4 steps. Every weight starts at the centre of its cell, so they all stall together, then
jump together; the bf16 copy does not follow the policy.

A weight that starts at a random place inside its cell does follow it on average: round-to-nearest of
``w + delta`` then moves by ``delta`` in expectation over the starting offset, the effect stochastic
rounding has, with no randomness at push time (the trainer's autocast and the engine's push round the
same master weights to the same bf16 values). :func:`dither_within_bf16_cells` moves each on-grid weight
to a seeded uniform offset strictly inside its own cell, so the bf16 model is bit for bit the one that was
loaded, and the float32 one differs from it by less than half a bf16 step per weight.
"""

from __future__ import annotations

import torch

__all__ = ["dither_within_bf16_cells", "on_bf16_grid"]

# strictly inside the half-cell, so round-to-nearest gives the starting value back; the margin left out
# biases the average move by margin x cell / step, so it is small (2^-12 of the cell)
HALF_CELL = 0.5 - 2.0**-12


def on_bf16_grid(tensor: torch.Tensor) -> bool:
    """Whether every value of a float tensor is exactly representable in bf16."""
    t = tensor.detach()
    return bool(torch.equal(t.to(torch.bfloat16).to(t.dtype), t))


def _cell_offsets(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniform offset inside each value's bf16 cell: up to half the spacing to the next bf16 value
    away from zero, or to the previous one towards zero (half as far below a power of two); 0 for 0."""
    mantissa, exponent = torch.frexp(w)  # |w| = |mantissa| 2^exponent, |mantissa| in [0.5, 1)
    away = torch.ldexp(torch.ones_like(w), exponent - 8)  # bf16: 8 significant bits
    towards = torch.where(mantissa.abs() == 0.5, away / 2, away)
    r = (torch.rand(w.shape, generator=generator, dtype=torch.float32) * 2 - 1).to(w.dtype) * HALF_CELL
    magnitude = torch.where(r >= 0, r * away, r * towards)
    return torch.where(w == 0, torch.zeros_like(w), magnitude * torch.sign(w))


@torch.no_grad()
def dither_within_bf16_cells(model: torch.nn.Module, seed: int) -> int:
    """Move every float32 parameter that lies on the bf16 grid to a seeded random place inside its bf16
    cells (in named-parameter order, so the same seed gives the same offsets to two copies of a model).
    Returns how many parameters moved. Their bf16 casts are unchanged (checked)."""
    generator = torch.Generator().manual_seed(seed)
    moved = 0
    for _, param in model.named_parameters():
        if param.dtype != torch.float32 or not on_bf16_grid(param):
            continue
        original = param.detach().to(torch.bfloat16)
        param.add_(_cell_offsets(param.detach().cpu(), generator).to(param.device))
        if not torch.equal(param.detach().to(torch.bfloat16), original):
            raise RuntimeError("a bf16 cell offset changed the rounded weight: the cell arithmetic is wrong")
        moved += 1
    return moved
