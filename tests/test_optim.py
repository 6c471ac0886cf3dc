"""The optimizer and its schedule (lit_dash/training/optim.py), by hand: warm-up, decay, weight decay."""

from __future__ import annotations

import pytest
import torch

from lit_dash.training.optim import build_optimizer


def _lrs(steps: int, **kw) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    built = build_optimizer([param], **{"lr": 1.0, "weight_decay": 0.0, **kw})
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_linear_warm_up_then_linear_decay_to_zero_by_hand():
    # warm-up 2 of 6 steps: 1/2, 2/2, then 1 - (k - 2) / 4 for k = 2..5: 1, .75, .5, .25; 0 at step 6
    assert _lrs(7, warmup_steps=2, lr_schedule="linear", total_steps=6) == pytest.approx(
        [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    )
    assert _lrs(4, warmup_steps=2, lr_schedule="constant", total_steps=6) == [0.5, 1.0, 1.0, 1.0]
    assert _lrs(3, warmup_steps=0, lr_schedule="linear", total_steps=None) == [1.0, 1.0, 1.0]  # no length


def test_weight_decay_is_decoupled_and_scaled_by_the_learning_rate():
    """AdamW: with a zero gradient a weight shrinks by lr x weight_decay each step, and not without it."""
    for decay, expected in ((0.1, 2.0 * (1 - 0.01 * 0.1) ** 3), (0.0, 2.0)):
        param = torch.nn.Parameter(torch.full((3,), 2.0))
        built = build_optimizer(
            [param], lr=0.01, weight_decay=decay, warmup_steps=0, lr_schedule="constant", total_steps=None
        )
        for _ in range(3):
            param.grad = torch.zeros_like(param)
            built["optimizer"].step()
        assert param.detach().tolist() == pytest.approx([expected] * 3, rel=1e-6)
