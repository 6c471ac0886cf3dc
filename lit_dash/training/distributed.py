"""What keeps ranks in step: reductions of step figures, one gradient all-reduce per optimizer step,
zero-loss backward passes for ranks that kept fewer micro-batches, and gathering eval records.

Every function is a no-op on one process (``trainer`` None or a world of 1).
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel

from lit_dash.evaluation import unshard


def _world(trainer: L.Trainer | None) -> int:
    return 1 if trainer is None else trainer.world_size


def reduce_over_ranks(
    trainer: L.Trainer | None, values: list[float], op: str, device: torch.device
) -> list[float]:
    """Sum or max of each value over all ranks, through the strategy (a no-op on one process)."""
    if _world(trainer) == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    return trainer.strategy.reduce(tensor, reduce_op=op).tolist()


def grad_sync(trainer: L.Trainer, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for every backward but the last of an optimizer step: one all-reduce per step."""
    model = trainer.strategy.model
    if last or trainer.world_size == 1 or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def zero_loss(
    policy: torch.nn.Module, device: torch.device, autocast: contextlib.AbstractContextManager
) -> torch.Tensor:
    """Exactly 0, yet through a forward of every policy parameter, so its backward reaches them all
    (what DDP's all-reduce waits for) and adds nothing to any gradient."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with autocast:
        logits = policy(input_ids=ids).logits
    return logits.float().sum() * 0.0


def gather_shares(trainer: L.Trainer | None, records: list[dict]) -> list[dict]:
    """Every rank's share of an eval set's records (see :func:`lit_dash.evaluation.shard`), merged back
    into the set's order; on one process, ``records`` itself."""
    if _world(trainer) == 1:
        return records
    shares: list[list[dict]] = [[] for _ in range(trainer.world_size)]
    torch.distributed.all_gather_object(shares, records)  # text records: an object gather
    return unshard(shares)
