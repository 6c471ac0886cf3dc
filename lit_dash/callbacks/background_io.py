"""Checkpoint writes off the training loop's critical path: :class:`BackgroundCheckpointIO`.

The caller's thread takes a snapshot of the checkpoint (every tensor copied: the step's weights and
optimizer state, a point-in-time copy, into buffers kept from the previous save: one checkpoint's size
in extra memory for the rest of the run)
and returns; one worker thread then writes it with :class:`AtomicCheckpointIO` (temporary file, fsync,
rename). Removals of older checkpoints and the ``last`` link go through the same worker, in the order
they were asked for, so a kill at any moment leaves what the synchronous path leaves: the newest complete
checkpoint on disk, with ``last`` pointing at a complete file (the new one once it is written, the
previous one until then). Nothing is deleted before the write that replaces it has its name.

:meth:`wait` blocks until every queued write is on disk and re-raises a write's error; StepCheckpoint
waits at the end of training and on SIGTERM, and ``teardown`` (Lightning, end of fit) waits too. A write
error surfaces at the next save or at the wait, not silently.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from lit_dash.callbacks.atomic_io import AtomicCheckpointIO


def _snapshot(tensor: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """A point-in-time copy of ``tensor``: into ``buffer`` when it has the same shape and dtype (no new
    allocation, so no page faults on the next save's gigabytes), else a clone."""
    tensor = tensor.detach()
    if buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype:
        return buffer.copy_(tensor)
    return tensor.clone()


class BackgroundCheckpointIO(AtomicCheckpointIO):
    """AtomicCheckpointIO whose writes, removals and queued calls run in order on one worker thread."""

    def __init__(self) -> None:
        super().__init__()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._buffers: dict[tuple, torch.Tensor] = {}  # the last snapshot's tensors, by place in the dict
        self._last_save: Future | None = None

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._raise_finished_errors()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lit_dash-ckpt")
        self._pending.append(self._executor.submit(fn, *args))

    def _raise_finished_errors(self) -> None:
        still = []
        for future in self._pending:
            if future.done():
                future.result()  # re-raises the worker's error here, in the training loop
            else:
                still.append(future)
        self._pending = still

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if self._last_save is not None:  # its buffers are reused: the previous write must be done first
            self._last_save.exception()  # waits; its error, if any, is raised by _submit below
        snapshot = self._copy(checkpoint, ())
        self._submit(super().save_checkpoint, snapshot, path, storage_options)
        self._last_save = self._pending[-1]

    def _copy(self, value: Any, place: tuple) -> Any:
        """``value`` with every tensor snapshotted (dicts, lists and tuples rebuilt, other values kept)."""
        if isinstance(value, torch.Tensor):
            self._buffers[place] = copied = _snapshot(value, self._buffers.get(place))
            return copied
        if isinstance(value, dict):
            out = {k: self._copy(v, (*place, k)) for k, v in value.items()}
            if type(value) is dict:
                return out
            try:  # OrderedDict and the like; a defaultdict (no factory given here) becomes a dict
                return type(value)(out)
            except TypeError:
                return out
        if isinstance(value, (list, tuple)):
            items = [self._copy(v, (*place, i)) for i, v in enumerate(value)]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuple
        return value

    def remove_checkpoint(self, path) -> None:
        self._submit(super().remove_checkpoint, path)

    def after_queued_writes(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the worker once every write asked for so far is on disk (the ``last`` link)."""
        self._submit(fn, *args)

    def wait(self) -> None:
        """Block until every queued write is done; re-raise the first error."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]  # waits for each, in order
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._last_save = None
        super().teardown()
