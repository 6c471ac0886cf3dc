"""Wall time of every phase of every step, as ``time/<phase>`` scalars and a CSV a notebook can read."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning as L

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

    Args:
        filename: CSV written under the trainer's log_dir, one row per optimizer step.
    """

    def __init__(self, filename: str = "timing.csv") -> None:
        self.filename = filename
        self.rows: list[dict[str, float]] = []
        self._start = 0.0
        self.path: Path | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Runs after the callbacks listed before it (weight sync, evaluation), so list it last.
        total = time.perf_counter() - self._start
        phases = dict(getattr(pl_module, "phase_seconds", {}))
        row = {"step": float(trainer.global_step), "total": total}
        row.update({p: phases.get(p, 0.0) for p in PHASES})
        row["other"] = max(0.0, total - sum(row[p] for p in PHASES))
        rollout = getattr(pl_module, "last_rollout", None)
        if rollout is not None:
            gen = max(phases.get("generation", 0.0), 1e-9)
            row["generation_tokens_per_s"] = sum(len(c.token_ids) for c in rollout.completions) / gen
            trained = sum(mb.num_tokens for mb in rollout.micro_batches)
            row["train_tokens_per_s"] = (
                trained / max(phases.get("forward_backward", 0.0), 1e-9) if trained else 0.0
            )
            row["kept_completions"] = float(rollout.num_kept)
        self.rows.append(row)
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"time/{k}": v for k, v in row.items() if k != "step"}, step=trainer.global_step
            )
        self._write(trainer)

    def _write(self, trainer) -> None:
        if trainer.global_rank != 0:
            return
        self.path = Path(trainer.log_dir or ".") / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.rows[0])
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore", restval=0.0)
            writer.writeheader()
            writer.writerows(self.rows)
