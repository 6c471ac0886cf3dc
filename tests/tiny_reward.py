"""A test-only reward subclass, loaded by the CLI by class path (as a user's ``my_pkg.MyModule`` would be).

The tiny random model never answers arithmetic correctly, so the math reward is always 0 and no
advantage is ever non-zero; a text-parity reward gives mixed groups and so a real gradient.
"""

from __future__ import annotations

from lit_dash.module import DashModule


class ParityRewardModule(DashModule):
    def reward(self, completions, problems):
        return [float(len(c) % 2 == 0) for c in completions]


class RankOneKeepsNothing(ParityRewardModule):
    """Rank 1 scores every completion 0: each of its groups is constant, so with filtering on it keeps
    nothing, while rank 0 keeps its parity-rewarded completions (the DDP no-hang case)."""

    def reward(self, completions, problems):
        if self.global_rank == 1:
            return [0.0] * len(completions)
        return super().reward(completions, problems)


class NoRankThenRankOneKeepsNothing(ParityRewardModule):
    """Both DDP no-op cases in one run: every rank scores its first rollout 0 (every group constant: with
    filtering on, no rank keeps anything, a counted no-op step everywhere); at the fourth rollout rank 1
    alone scores every completion 0, so it keeps nothing while rank 0 trains (both must still take the
    step together: the DDP no-hang case). Every other rollout, and evaluation, get the parity reward."""

    RANK_ONE_ALONE = 3  # the global step while the fourth rollout trains

    def training_step(self, problems, batch_idx):
        step = self.global_step
        self._constant_reward = step == 0 or (step == self.RANK_ONE_ALONE and self.global_rank == 1)
        try:
            return super().training_step(problems, batch_idx)
        finally:
            self._constant_reward = False

    def reward(self, completions, problems):
        if getattr(self, "_constant_reward", False):
            return [0.0] * len(completions)
        return super().reward(completions, problems)


class AnswerParityModule(ParityRewardModule):
    """Pays every completion of a problem whose reference answer is even: an accuracy strictly between 0
    and 1 that depends on which problems were scored (and how often), whatever the model says."""

    def reward(self, completions, problems):
        return [float(int(p.answer) % 2 == 0) for p in problems]
