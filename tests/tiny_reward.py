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
