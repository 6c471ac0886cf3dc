"""When an "every N" callback fires, in optimizer steps or in rollouts.

One training step is one rollout (one prompt batch), and it takes ``steps_per_rollout`` optimizer steps:
1 with ``update: dash``, ``ppo_epochs`` with ``multi``, ``ppo_mini_batches`` with ``mini``. So a callback
sees ``global_step`` jump by that many at a time, and ``global_step % N == 0`` would miss most multiples
of N (K=3, N=50: only every 150). Steps fire when a rollout's jump crosses a multiple of N; rollouts are
counted directly.
"""

from __future__ import annotations

from lit_dash.errors import ConfigError


def steps_per_rollout(pl_module) -> int:
    """Optimizer steps one training step takes (1 for modules that do not say)."""
    return int(getattr(pl_module, "steps_per_rollout", 1))


class Cadence:
    """Every ``every_n_steps`` optimizer steps or every ``every_n_rollouts`` rollouts (one of the two;
    neither: every ``default_steps`` steps)."""

    def __init__(
        self, every_n_steps: int | None, every_n_rollouts: int | None, default_steps: int, owner: str
    ) -> None:
        if every_n_steps is not None and every_n_rollouts is not None:
            raise ConfigError(f"{owner}: set every_n_steps or every_n_rollouts, not both")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_rollouts", every_n_rollouts)):
            if value is not None and value < 1:
                raise ConfigError(f"{owner}: {name} must be >= 1, got {value}")
        if every_n_steps is None and every_n_rollouts is None:
            every_n_steps = default_steps
        self.every_n_steps = every_n_steps
        self.every_n_rollouts = every_n_rollouts

    def due(self, global_step: int, steps_per_rollout: int = 1) -> bool:
        """After the training step that brought the optimizer step count to ``global_step``."""
        if self.every_n_rollouts is not None:
            rollouts, partial = divmod(global_step, steps_per_rollout)
            return partial == 0 and rollouts > 0 and rollouts % self.every_n_rollouts == 0
        before = max(0, global_step - steps_per_rollout)
        return global_step // self.every_n_steps != before // self.every_n_steps

    def __repr__(self) -> str:
        if self.every_n_rollouts is not None:
            return f"every {self.every_n_rollouts} rollouts"
        return f"every {self.every_n_steps} optimizer steps"
