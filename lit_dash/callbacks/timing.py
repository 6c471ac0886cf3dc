"""Wall time of every phase of every step, as ``time/<phase>`` scalars and a CSV a notebook can read."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L

from lit_dash.hardware import process_memory_mib

PHASES = (
    "generation",
    "reward",
    "filtering",
    "ref_old_logprobs",
    "forward_backward",
    "optimizer",
    "weight_sync",
    "evaluation",
)


class TimingProfile(L.Callback):
    """Collects the phase seconds the module and callbacks record; ``other`` is step time not in a phase.

    A step's row spans from its batch start to the next one (or the end of training), so it includes the
    weight sync and evaluation that callbacks run after the optimizer step.

    Args:
        filename: CSV written under the trainer's log_dir, one row per optimizer step.
    """

    def __init__(self, filename: str = "timing.csv") -> None:
        self.filename = filename
        self.rows: list[dict[str, float]] = []
        self._start = 0.0
        self._pending_step: int | None = None
        self.path: Path | None = None
        self._overhead = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._finish(trainer, pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Other callbacks (weight sync, evaluation) may run after this one in the same hook, so the row is
        # completed at the next step's start (or at train end), whatever the callback order.
        self._pending_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module)

    def _finish(self, trainer, pl_module) -> None:
        if self._pending_step is None:
            return
        finish_start = time.perf_counter()
        total = finish_start - self._start
        phases = dict(getattr(pl_module, "phase_seconds", {}))
        row = {"step": float(self._pending_step), "total": total}
        row.update({p: phases.get(p, 0.0) for p in PHASES})
        row["other"] = max(0.0, total - sum(row[p] for p in PHASES))
        rollout = getattr(pl_module, "last_rollout", None)
        if rollout is not None:
            gen = max(phases.get("generation", 0.0), 1e-9)
            row["generation_tokens_per_s"] = sum(len(c.token_ids) for c in rollout.completions) / gen
            trained = sum(mb.num_tokens for mb in rollout.micro_batches)
            fb = phases.get("forward_backward", 0.0)
            row["train_tokens_per_s"] = trained / fb if trained and fb > 0 else 0.0
            row["kept_completions"] = float(rollout.num_kept)
        # this process's resident memory (the in-process vLLM engine included): now, and the peak so far
        memory = process_memory_mib()
        row["rss_mib"] = memory.get("VmRSS", 0.0)
        row["peak_rss_mib"] = memory.get("VmHWM", 0.0)
        self.rows.append(row)
        # the profiler's own cost (this method, CSV rewrite included) lands in the next row: measured, not assumed
        row["profiler_s"] = self._overhead
        if trainer.logger is not None:
            metrics = {f"time/{k}": v for k, v in row.items() if k != "step"}
            trainer.logger.log_metrics(metrics, step=self._pending_step)
        self._pending_step = None
        self._write(trainer)
        self._overhead = time.perf_counter() - finish_start

    def _write(self, trainer) -> None:
        log_dir = trainer.log_dir  # a broadcast from rank 0 under DDP: every rank must ask, or they hang
        if trainer.global_rank != 0:
            return
        self.path = Path(log_dir or ".") / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.rows[0])
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore", restval=0.0)
            writer.writeheader()
            writer.writerows(self.rows)
