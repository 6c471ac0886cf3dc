"""Lightning's ModelCheckpoint, with a folder a resume can find and two saves it does not make by itself.

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
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lit_dash.callbacks.cadence import Cadence, steps_per_rollout
from lit_dash.errors import ConfigError


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments, plus ``every_n_rollouts``) that also saves at the end of training
    and on SIGTERM."""

    def __init__(self, *args, every_n_rollouts: int | None = None, **kwargs) -> None:
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
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        self._default_dirpath(trainer)  # ckpt_path="last" is resolved before setup
        return super()._find_last_checkpoints(trainer)

    def _save_now(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved == trainer.global_step or trainer.global_step == 0:
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_now(trainer)
        super().on_train_end(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and self.save_last:
            self._save_now(trainer)
            rank_zero_info(
                f"[lit_dash] SIGTERM: saved {self.last_model_path} at step {trainer.global_step}; "
                "resume with --ckpt_path last"
            )
        super().on_exception(trainer, pl_module, exception)
