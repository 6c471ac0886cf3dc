"""A few completions of the latest rollout as TensorBoard text: what the reward numbers mean in words."""

from __future__ import annotations

import lightning as L

from lit_dash.callbacks.cadence import Cadence, steps_per_rollout


class CompletionSamples(L.Callback):
    """Every ``every_n_rollouts`` rollouts or ``every_n_steps`` optimizer steps (default 10 steps), the first
    completion of ``num_samples`` groups of the latest rollout."""

    def __init__(
        self, every_n_steps: int | None = None, num_samples: int = 4, every_n_rollouts: int | None = None
    ) -> None:
        self.cadence = Cadence(every_n_steps, every_n_rollouts, default_steps=10, owner="CompletionSamples")
        self.num_samples = num_samples

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        experiment = getattr(trainer.logger, "experiment", None)
        due = self.cadence.due(trainer.global_step, steps_per_rollout(pl_module))
        if rollout is None or not due or not hasattr(experiment, "add_text"):
            return
        rows = []
        for c in rollout.completions[: self.num_samples * rollout.group_size : rollout.group_size]:
            i = rollout.completions.index(c)
            p = rollout.problems[c.prompt_index]
            rows.append(
                f"**prompt** {p.question}  \n**reference** {p.answer}  \n**reward** {float(rollout.rewards[i]):g}"
                f" | **advantage** {float(rollout.advantages[i]):+.2f}  \n```\n{c.text}\n```"
            )
        experiment.add_text("samples/completions", "\n\n---\n\n".join(rows), global_step=trainer.global_step)
