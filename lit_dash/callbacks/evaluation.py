"""Held-out evaluation during training: at step 0 and every ``every_n_rollouts`` rollouts (or every
``every_n_steps`` optimizer steps), and at the end."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_dash.callbacks.cadence import Cadence, steps_per_rollout
from lit_dash.evaluation import EvalResult, format_results


def publish(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Put evaluation figures where Lightning's callbacks look: ``trainer.callback_metrics``, as the
    tensors ``self.log`` would leave there. ``ModelCheckpoint(monitor="eval/<set>/accuracy")`` (which runs
    after this callback: Lightning moves checkpoint callbacks last) then ranks the step's checkpoint by
    it, and ``ckpt_path="best"`` finds the best. ``self.log`` itself is not allowed in on_train_start or
    on_train_end, where the first and last evaluations run."""
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})


class MathEvaluation(L.Callback):
    """Runs the datamodule's eval sets greedily (the same :class:`Evaluator` as ``lit-dash validate``) and
    logs ``eval/<set>/accuracy``, ``eval/<set>/length`` etc. (and ``eval/<set>/pass@k``, ``maj@k`` with
    ``data.eval_samples``) to the logger and to ``trainer.callback_metrics`` (so ModelCheckpoint and
    EarlyStopping can monitor them). Keeps every result in ``history``.

    Under DDP each rank scores its share of every set (every world-th problem, no duplicates) and the
    shares are gathered, so every rank holds the whole set's result and rank 0 logs it and writes the JSONL
    once, as ``lit-dash validate`` does.

    Args:
        every_n_steps: evaluate after the rollout whose optimizer steps reach or cross a multiple of this
            (default 10 when every_n_rollouts is not set either).
        every_n_rollouts: evaluate after every this many rollouts (prompt batches), whatever the update
            mode; set this or every_n_steps.
        at_start: evaluate before the first rollout.
        at_end: evaluate after the last.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_rollouts: int | None = None,
        at_start: bool = True,
        at_end: bool = True,
    ) -> None:
        self.cadence = Cadence(every_n_steps, every_n_rollouts, default_steps=10, owner="MathEvaluation")
        self.every_n_steps = self.cadence.every_n_steps
        self.every_n_rollouts = every_n_rollouts
        self.at_start = at_start
        self.at_end = at_end
        self.history: list[tuple[int, EvalResult]] = []
        self._last_step = -1

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.datamodule.evaluators:
            return
        self._last_step = step
        synced_before = pl_module.phase_seconds.get("weight_sync", 0.0)
        start = time.perf_counter()
        results = pl_module.evaluate()  # may sync the weights first; that time is weight_sync, not evaluation
        seconds = time.perf_counter() - start
        nested_sync = pl_module.phase_seconds.get("weight_sync", 0.0) - synced_before
        pl_module._add_time("evaluation", seconds - nested_sync)
        metrics = {}
        for r in results:
            self.history.append((step, r))
            metrics.update(r.metrics())
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
        publish(trainer, metrics)
        rank_zero_info(f"\n[lit_dash] evaluation at step {step} ({seconds:.0f} s)\n{format_results(results)}")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cadence.due(trainer.global_step, steps_per_rollout(pl_module)):
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self._run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        names = dict.fromkeys(r.name for _, r in self.history)
        lines = []
        for name in names:
            first, last = self.first_and_last(name)
            sampled = ""
            if last.k is not None:
                sampled = f"; pass@{last.k} {first.pass_at_k:.1%} -> {last.pass_at_k:.1%}, maj@{last.k} " + (
                    f"{first.maj_at_k:.1%} -> {last.maj_at_k:.1%}"
                )
            lines.append(
                f"  {name}: {first.accuracy:.1%} -> {last.accuracy:.1%} "
                f"({last.num_problems} problems, greedy; boxed {first.boxed_fraction:.0%} -> "
                f"{last.boxed_fraction:.0%}, boxed and right {first.boxed_correct_fraction:.0%} -> "
                f"{last.boxed_correct_fraction:.0%}; unevaluated expressions equal to the reference "
                f"{first.unevaluated_fraction:.1%} -> {last.unevaluated_fraction:.1%}; mean length "
                f"{first.mean_completion_tokens:.0f} -> {last.mean_completion_tokens:.0f} tokens{sampled})"
            )
        if lines:
            rank_zero_info("[lit_dash] held-out accuracy, first -> last evaluation:\n" + "\n".join(lines))

    def first_and_last(self, name: str) -> tuple[EvalResult, EvalResult] | None:
        rows = [r for _, r in self.history if r.name == name]
        return (rows[0], rows[-1]) if rows else None
