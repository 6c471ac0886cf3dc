"""A progress bar in lit_dash's units: optimizer steps of ``max_steps`` (and rollouts when a rollout takes
several steps), with the engine's progress inside a long sampling or evaluation call.

On a terminal: one tqdm bar on stderr, redrawn in place; while the engine runs, its description says what
for (``sampling 45/96``), and Lightning's log lines (evaluation tables) print above it. Off a
terminal (a file, CI): no carriage returns at all; one line per rollout, and inside a phase that has run
longer than ``heartbeat_s`` one line every ``heartbeat_s`` seconds. Rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from lit_dash import console
from lit_dash.callbacks.cadence import steps_per_rollout

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class RolloutProgress(ProgressBar):
    """``lit-dash`` adds this unless the config lists a progress bar or sets ``enable_progress_bar: false``.

    Args:
        heartbeat_s: off a terminal, a phase (an engine call) that has run this long prints its progress,
            and again every this many seconds.
        tty: draw a bar (True) or print lines (False); null: whether stderr is a terminal.
    """

    def __init__(self, heartbeat_s: float = 10.0, tty: bool | None = None) -> None:
        super().__init__()
        self.heartbeat_s = heartbeat_s
        self.tty = tty
        self._enabled = True
        self.bar = None  # the training bar (terminal)
        self.phase_bar = None  # an engine call's bar outside training (terminal, lit-dash validate)
        self._redirect: contextlib.ExitStack | None = None
        self._total_steps: int | None = None
        self._per_rollout = 1
        self._step_started = 0.0
        self._train_started = 0.0
        self._steps_at_start = 0
        self._last_beat = 0.0
        self._step = 0

    # ---- ProgressBar ----------------------------------------------------------------------------------

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args, **kwargs) -> None:
        from tqdm import tqdm

        tqdm.write(" ".join(map(str, args)), file=sys.stderr)

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not trainer.is_global_zero:
            self.disable()
        if self.tty is None:
            self.tty = sys.stderr.isatty()

    # ---- training -------------------------------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if not self._enabled:
            return
        print(console.run_summary(trainer, pl_module, log_dir), file=sys.stderr, flush=True)
        console.set_status_sink(self._status)  # the evaluation at step 0 may run before on_train_start

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._enabled:
            return
        self._total_steps = trainer.max_steps if trainer.max_steps > 0 else None
        self._per_rollout = steps_per_rollout(pl_module)
        self._steps_at_start = self._step = trainer.global_step
        self._train_started = self._step_started = time.perf_counter()
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(
                total=self._total_steps,
                initial=trainer.global_step,
                desc=self._desc(),
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar}| {elapsed}<{remaining}{postfix}",
            )
            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(
                logging_redirect_tqdm([logging.getLogger(n) for n in _LIGHTNING_LOGGERS], tqdm_class=tqdm)
            )
        console.set_status_sink(self._status)

    @staticmethod
    def _desc(activity: str = "") -> str:
        return activity or "training"

    def _figures(self, trainer, pl_module) -> str:
        metrics = self.get_metrics(trainer, pl_module)
        parts = []
        for key, fmt in (("reward", "reward {:.3f}"), ("kept", "kept {:.0%}")):
            if key in metrics:
                parts.append(fmt.format(float(metrics[key])))
        return ", ".join(parts)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        self._step = trainer.global_step
        figures = self._figures(trainer, pl_module)
        if self.bar is not None:
            self.bar.n = self._step
            self.bar.set_description_str(self._desc(), refresh=False)
            self.bar.set_postfix_str(figures, refresh=False)
            self.bar.refresh()
        else:
            now = time.perf_counter()
            print(
                f"[lit_dash] {self._position()} | {figures} | {self._timing(now)}",
                file=sys.stderr,
                flush=True,
            )

    def _position(self) -> str:
        total = self._total_steps if self._total_steps is not None else "?"
        text = f"step {self._step}/{total}"
        if self._per_rollout > 1:
            rollouts = self._total_steps // self._per_rollout if self._total_steps is not None else "?"
            text += f" (rollout {self._step // self._per_rollout}/{rollouts})"
        return text

    def _timing(self, now: float) -> str:
        step_s = now - self._step_started
        done = self._step - self._steps_at_start
        text = f"{step_s:.0f} s this step"
        if done > 0 and self._total_steps is not None and self._step < self._total_steps:
            left = (now - self._train_started) / done * (self._total_steps - self._step)
            text += f", ~{left / 60:.0f} min left" if left >= 90 else f", ~{left:.0f} s left"
        return text

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None
        for bar in (self.bar, self.phase_bar):
            if bar is not None:
                bar.close()
        self.bar = self.phase_bar = None
        console.set_status_sink(None)

    # ---- lit-dash validate ----------------------------------------------------------------------------

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._enabled and not trainer.training:
            console.set_status_sink(self._status)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.training:
            self._close()

    # ---- an engine call's progress (console.engine_progress) -------------------------------------------

    def _status(self, label: str | None, done: int, total: int, elapsed: float) -> None:
        if self.bar is not None:  # training, on a terminal: the bar says what the engine is doing
            self.bar.set_description_str(self._desc(f"{label} {done}/{total}" if label else ""))
            return
        if self.tty:
            self._phase_bar(label, done, total)
            return
        now = time.perf_counter()
        if label is None:
            self._last_beat = 0.0
        elif elapsed >= self.heartbeat_s and now - self._last_beat >= self.heartbeat_s:
            self._last_beat = now
            print(
                f"[lit_dash]   {label}: {done}/{total} completions ({elapsed:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    def _phase_bar(self, label: str | None, done: int, total: int) -> None:
        if label is None:
            if self.phase_bar is not None:
                self.phase_bar.close()
                self.phase_bar = None
            return
        if self.phase_bar is None:
            from tqdm import tqdm

            self.phase_bar = tqdm(total=total, desc=label, unit="completion", file=sys.stderr, leave=False)
        self.phase_bar.set_description_str(label, refresh=False)
        self.phase_bar.n = done
        self.phase_bar.refresh()
