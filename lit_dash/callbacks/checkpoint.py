"""Lightning's ModelCheckpoint, with a folder a resume can find, two saves it does not make by itself, and
files that are complete or absent.

- One folder per run directory: ``<default_root_dir>/checkpoints`` unless ``dirpath`` is given. Lightning's
  default is the logger's ``version_N/checkpoints``, and a resumed run gets a new version, so
  ``--ckpt_path last`` looked in the new, empty folder and silently started from scratch.
- At the end of training: with ``every_n_train_steps`` set, ModelCheckpoint saves only on multiples of
  N (and ``last.ckpt`` only when nothing was saved before), so a run whose ``max_steps`` is not a
  multiple of N would lose its final steps.
- On a cadence that counts rollouts: ``every_n_rollouts`` saves after every N rollouts (prompt batches),
  whatever the update mode; ``every_n_train_steps`` saves when a rollout's optimizer steps reach or
  cross a multiple of N (with ``update: multi`` a rollout takes ppo_epochs steps at once, and
  ModelCheckpoint's ``global_step % N == 0`` would skip most multiples).
- On SIGTERM (a scheduler's pre-emption, ``kill``): Lightning finishes the current step and exits; this
  saves ``last.ckpt`` at that step boundary first, so ``--ckpt_path last`` resumes from there. Other
  exceptions save nothing: a crash mid-step leaves the last good checkpoint as it was.
- Every single-file write is atomic (:class:`~lit_dash.callbacks.atomic_io.AtomicCheckpointIO`, installed
  in place of Lightning's default CheckpointIO); ``save_last="link"`` (the default here) makes ``last.ckpt``
  a symlink to the newest checkpoint, replaced atomically, instead of a second full copy.
- ``background_writes: true`` takes each write off the training loop's critical path
  (:class:`~lit_dash.callbacks.background_io.BackgroundCheckpointIO`: a snapshot on the training thread,
  the atomic write, the removal of the checkpoint it replaces and the ``last`` link, in that order, on one
  worker thread); training waits for it at the end and on SIGTERM.
- ``--ckpt_path last`` resumes from the newest *complete* checkpoint of the folder, whatever its name (a
  kill between the step file and ``last`` left no ``last``, and Lightning then trained from step 0). A
  folder with checkpoint-looking files but no complete one is an error naming them; an absent or empty
  folder starts a new run, with an info line. Leftover temporary files are deleted at setup.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lit_dash.callbacks.atomic_io import AtomicCheckpointIO, is_temporary, replace_link, scan
from lit_dash.callbacks.background_io import BackgroundCheckpointIO
from lit_dash.callbacks.cadence import Cadence, steps_per_rollout
from lit_dash.errors import ConfigError


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments, plus ``every_n_rollouts``; ``save_last`` defaults to ``"link"``)
    that also saves at the end of training and on SIGTERM, writes atomically, and resumes from the newest
    complete checkpoint. ``background_writes``: write on a worker thread while training goes on (the
    snapshot costs one checkpoint's size in memory while it is written)."""

    def __init__(
        self,
        *args,
        every_n_rollouts: int | None = None,
        save_last: bool | Literal["link"] | None = "link",
        background_writes: bool = False,
        **kwargs,
    ) -> None:
        kwargs["save_last"] = save_last
        self.background_writes = background_writes
        steps = kwargs.get("every_n_train_steps")
        self.cadence = None
        if steps or every_n_rollouts is not None:
            self.cadence = Cadence(steps or None, every_n_rollouts, default_steps=1, owner="StepCheckpoint")
            if kwargs.get("train_time_interval") is not None or kwargs.get("every_n_epochs"):
                raise ConfigError(
                    "StepCheckpoint: every_n_train_steps / every_n_rollouts, every_n_epochs and "
                    "train_time_interval are mutually exclusive"
                )
            kwargs["every_n_train_steps"] = 0  # this class decides when; 0 (not None) adds no epoch trigger
        super().__init__(*args, **kwargs)
        self.every_n_rollouts = every_n_rollouts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cadence is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.cadence.due(trainer.global_step, steps_per_rollout(pl_module)):
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _default_dirpath(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._default_dirpath(trainer)
        io = trainer.strategy.checkpoint_io
        if self.background_writes:
            if type(io) not in (TorchCheckpointIO, AtomicCheckpointIO, BackgroundCheckpointIO):
                raise ConfigError(
                    f"StepCheckpoint(background_writes: true) writes through lit_dash's checkpoint IO; this "
                    f"trainer has its own ({type(io).__name__}): drop the plugin or background_writes"
                )
            if type(io) is not BackgroundCheckpointIO:
                trainer.strategy.checkpoint_io = BackgroundCheckpointIO()
        elif type(io) is TorchCheckpointIO:  # Lightning's default: not atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero:
            for leftover in scan(self.dirpath).incomplete:
                if is_temporary(leftover.name):  # ours; a truncated .ckpt is left for the user to judge
                    rank_zero_info(f"[lit_dash] removing {leftover}, a checkpoint write that was interrupted")
                    leftover.unlink()
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """What ``ckpt_path="last"`` resumes from (resolved before setup): the newest complete checkpoint in
        the folder, an error when there are only incomplete ones, nothing (a new run) when there are none."""
        self._default_dirpath(trainer)
        found = scan(self.dirpath, self.FILE_EXTENSION)
        newest = found.newest()
        if newest is None and found.incomplete:
            names = ", ".join(p.name for p in found.incomplete)
            raise ConfigError(
                f"--ckpt_path last: {self.dirpath} holds no complete checkpoint, only {names} (interrupted "
                "writes, truncated files or links to missing files). Resume from a checkpoint file with --ckpt_path PATH, or move the folder "
                "away to start a new run; this does not train from step 0 over an existing run"
            )
        if newest is None:
            rank_zero_info(
                f"[lit_dash] --ckpt_path last: no checkpoint in {self.dirpath}; starting a new run"
            )
            return set()
        if found.incomplete:
            rank_zero_warn(
                f"--ckpt_path last: skipping incomplete {', '.join(p.name for p in found.incomplete)}; "
                f"resuming from {newest.name}"
            )
        rank_zero_info(f"[lit_dash] --ckpt_path last: resuming from {newest}")
        return {str(newest)}

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        # a link to a file older than this step would resume from stale weights: save a full copy instead
        if self.save_last == "link" and self._last_global_step_saved != trainer.global_step:
            self._last_checkpoint_saved = ""
        super()._save_last_checkpoint(trainer, monitor_candidates)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            io = trainer.strategy.checkpoint_io
            if isinstance(io, BackgroundCheckpointIO):  # once the file it points at has its name
                io.after_queued_writes(replace_link, filepath, linkpath)
            else:
                replace_link(filepath, linkpath)
        trainer.strategy.barrier()

    @staticmethod
    def _wait_for_writes(trainer: L.Trainer) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, BackgroundCheckpointIO):
            io.wait()

    def _save_now(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved == trainer.global_step or trainer.global_step == 0:
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:  # e.g. monitor "step": keep the newest k
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer)
        self._wait_for_writes(trainer)
        super().on_train_end(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and self.save_last:
            self._save_now(trainer)
            self._wait_for_writes(trainer)
            rank_zero_info(
                f"[lit_dash] SIGTERM: saved {self.last_model_path} at step {trainer.global_step}; "
                "resume with --ckpt_path last"
            )
        else:  # a crash: the writes already queued (earlier steps' checkpoints) still finish
            try:
                self._wait_for_writes(trainer)
            except Exception as err:  # noqa: BLE001  the crash that brought us here is the one to report
                rank_zero_warn(f"a background checkpoint write failed too: {err!r}")
        super().on_exception(trainer, pl_module, exception)
