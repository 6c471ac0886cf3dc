"""The optimizer side of a step: AdamW with its warm-up / linear schedule, clipping by the norm of the
whole model's gradient (one process, DDP or FSDP alike), and the guard against NaN / infinite steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from lit_dash.errors import ConfigError, RunStopped

LR_SCHEDULES = ("linear", "constant")


class NonFiniteLossError(RunStopped):
    """Several optimizer steps in a row had a NaN or infinite loss or gradient."""


def optim_problems(max_grad_norm: float | None, lr_schedule: str, max_nonfinite_steps: int) -> list[str]:
    """What is wrong with the optimizer's knobs, one message each."""
    errors = []
    if max_grad_norm is not None and not max_grad_norm > 0:
        errors.append(
            f"max_grad_norm must be > 0 (a gradient norm) or null (no clipping), got {max_grad_norm}"
        )
    if lr_schedule not in LR_SCHEDULES:
        errors.append(f"lr_schedule must be linear or constant, got {lr_schedule!r}")
    if max_nonfinite_steps < 1:
        errors.append(f"max_nonfinite_steps must be >= 1 (optimizer steps), got {max_nonfinite_steps}")
    return errors


def check_clipping_strategy(strategy: object, max_grad_norm: float | None) -> None:
    """Refuse clipping under DeepSpeed, which partitions the gradients and clips them itself."""
    if max_grad_norm is not None and isinstance(strategy, DeepSpeedStrategy):
        raise ConfigError(
            f"model.max_grad_norm={max_grad_norm} cannot clip under DeepSpeed: ZeRO keeps "
            "the gradients in its own partitions and clips them itself (its gradient_clipping setting); "
            "set model.max_grad_norm: null"
        )


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    lr_schedule: str,
    total_steps: int | None,
) -> dict:
    """AdamW over ``params`` and its per-step schedule (Lightning's ``configure_optimizers`` dict): a
    linear warm-up over ``warmup_steps``, then constant or a linear decay to 0 at ``total_steps``
    (constant when the length is unknown)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    linear = lr_schedule == "linear" and total_steps is not None

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if linear:
            return max(0.0, 1.0 - (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_global_norm(
    optimizer: torch.optim.Optimizer,
    root: torch.nn.Module,
    max_norm: float | None,
    clip_local: Callable[[float], None],
) -> float:
    """Clip to ``max_norm`` by the norm of the whole model's gradient, all ranks' shards together, and
    return that norm before clipping (logged as train/grad_norm).

    DDP / one process: every rank holds the full (all-reduced) gradient, so the local norm is the global
    one; ``clip_local(max_norm)`` clips (Lightning's ``clip_gradients``: the precision plugin; DTensor
    gradients under ModelParallelStrategy reduce their norm over the mesh). FSDP (``root`` the strategy's
    FSDP root): each rank holds a shard of each gradient, torch's clip would scale every rank by its own
    shard's norm, and Lightning's Trainer refuses norm clipping there; the root's ``clip_grad_norm_``
    all-reduces the norm.
    """
    if isinstance(root, FullyShardedDataParallel):
        return float(root.clip_grad_norm_(max_norm if max_norm is not None else math.inf))
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm is not None:
        clip_local(max_norm)
    return float(norm)


def nonfinite_warning(in_a_row: int, max_in_a_row: int, step: int, loss: float, grad_norm: float) -> str:
    """The warning for a skipped non-finite step, or :class:`NonFiniteLossError` when it is the
    ``max_in_a_row``-th in a row."""
    where = f"step {step}: loss {loss}, grad norm {grad_norm}"
    if in_a_row >= max_in_a_row:
        raise NonFiniteLossError(
            f"stopping: {in_a_row} optimizer steps in a row had a NaN or infinite loss or "
            f"gradient (last at {where}; model.max_nonfinite_steps={max_in_a_row}). "
            "None of them changed the weights, so the last checkpoint holds the last good ones. "
            "Try a lower model.lr, a model.max_grad_norm, model.precision: float32, or check the reward."
        )
    return (
        f"{where} is not finite; skipped this update ({in_a_row} in a row, the run stops at {max_in_a_row})"
    )
