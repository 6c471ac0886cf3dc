"""A few completions of the latest rollout as TensorBoard text: what the reward numbers mean in words."""

from __future__ import annotations

import lightning as L


class CompletionSamples(L.Callback):
    def __init__(self, every_n_steps: int = 10, num_samples: int = 4) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        experiment = getattr(trainer.logger, "experiment", None)
        if rollout is None or trainer.global_step % self.every_n_steps or not hasattr(experiment, "add_text"):
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
