"""The training prompts as an endless, seeded, resumable stream of prompt batches."""

from __future__ import annotations

import random

from torch.utils.data import IterableDataset

from lit_dash.data.records import Problem
from lit_dash.data.sources import DataError


class PromptStream(IterableDataset):
    """An endless, seeded stream of prompt batches (P problems each), reshuffled every epoch.

    Batch ``k`` of the stream is a pure function of (problems, P, seed, k): epoch ``k // batches_per_epoch``
    is shuffled with ``seed`` and that epoch, and the batch is its ``k % batches_per_epoch``-th slice.
    So a resumed run starts the stream at the number of batches training consumed (``start_batch``) and
    draws exactly the prompts an uninterrupted run would have drawn. The stream's own read position is
    no use for that: the DataLoader fetches a batch ahead of the training step.
    """

    def __init__(
        self, problems: list[Problem], prompts_per_rollout: int, seed: int, start_batch: int = 0
    ) -> None:
        if len(problems) < prompts_per_rollout:
            raise DataError(
                f"{len(problems)} training problems (this rank's share) cannot fill one batch of "
                f"prompts_per_rollout={prompts_per_rollout} prompts: add problems or lower prompts_per_rollout"
            )
        self.problems = problems
        self.prompts_per_rollout = prompts_per_rollout
        self.seed = seed
        self.start_batch = start_batch
        self.batches_per_epoch = len(problems) // prompts_per_rollout
        self._epoch_order: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.problems)))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def batch(self, index: int) -> list[Problem]:
        """Batch ``index`` (0-based) of the stream."""
        epoch, k = divmod(index, self.batches_per_epoch)
        p = self.prompts_per_rollout
        return [self.problems[i] for i in self._order(epoch)[k * p : (k + 1) * p]]

    def __iter__(self):
        index = self.start_batch
        while True:
            yield self.batch(index)
            index += 1
