"""A worked example of a new reward: subclass the module and override ``reward``.

    lit-dash fit --config configs/demo.yaml --model lit_dash.rewards.examples.FormatBonusModule

(that path, the documented one, re-exports this one: the example subclasses the module, so
it lives above it, not in the ``rewards`` leaf package)

Correct answers still score 1.0; a wrong answer that is at least put in ``\\boxed{}`` earns a small
bonus, which gives the policy a gradient toward the answer format even when no sample in a group is right.
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_dash.data.records import Problem
from lit_dash.module import DashModule
from lit_dash.rewards import extract_answer


class FormatBonusModule(DashModule):
    """Math reward plus ``format_bonus`` for a boxed (but wrong) answer.

    Args:
        format_bonus: reward for a completion with a ``\\boxed{}`` answer that is not correct.
        **kwargs: everything DashModule takes.
    """

    def __init__(self, format_bonus: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.format_bonus = format_bonus

    def reward(self, completions: list[str], problems: list[Problem]) -> Sequence[float]:
        correct = super().reward(completions, problems)
        return [
            1.0 if r >= 1.0 else (self.format_bonus if extract_answer(c) is not None else 0.0)
            for c, r in zip(completions, correct, strict=True)
        ]
