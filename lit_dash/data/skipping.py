"""Prompt skipping: do not sample prompts whose recent groups taught nothing.

A group is *uniform* when its G completions all got the same reward: its GRPO advantages are all zero,
so (at kl_coef 0) it adds nothing to the gradient, and the filter drops it after paying for it. A prompt
whose last ``history`` sampled groups were all uniform is predicted uniform again and skipped, except with
probability ``explore`` (so a prompt the policy has learned, or forgotten, can come back). Each decision is
a pure function of (run seed, rollout index, problem id): a hash, no global RNG, so a run and its resume
take the same decisions. Skipped prompts record no outcome; their history stays as it was.

Whether the prediction holds is measured on the predicted-uniform prompts that were sampled anyway (by
``explore``, or because a rollout keeps one prompt): ``predicted_uniform_sampled`` counts them and
``predicted_uniform_confirmed`` those whose new group was uniform again, so a run shows how stale its
history is (a policy that learns fast makes yesterday's all-wrong prompts learnable today).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class PromptSkipping:
    """``data.prompt_skipping``: skip prompts predicted to teach nothing, before sampling them.

    Args:
        history: a prompt is predicted uniform when its last ``history`` sampled groups (>= 1) were all
            uniform (every completion the same reward).
        explore: probability (0 to 1) that a predicted-uniform prompt is sampled anyway; 0 skips it for
            good, 1 never skips.
    """

    history: int = 2
    explore: float = 0.2

    def problems(self) -> list[str]:
        """What is wrong with these settings, as messages naming the knob (empty: nothing)."""
        out = []
        if isinstance(self.history, bool) or not isinstance(self.history, int) or self.history < 1:
            out.append(f"prompt_skipping.history must be a whole number of groups >= 1, got {self.history!r}")
        if isinstance(self.explore, bool) or not isinstance(self.explore, int | float):
            out.append(f"prompt_skipping.explore must be a probability in [0, 1], got {self.explore!r}")
        elif not 0.0 <= self.explore <= 1.0:
            out.append(f"prompt_skipping.explore must be a probability in [0, 1], got {self.explore}")
        return out


def draw(seed: int, rollout_index: int, problem_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, rollout index, problem id)."""
    digest = hashlib.blake2b(f"{seed}:{rollout_index}:{problem_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class SkipHistory:
    """Each problem's recent group outcomes (True: uniform), and the skip decisions they lead to."""

    def __init__(self, config: PromptSkipping) -> None:
        self.config = config
        self.outcomes: dict[str, list[bool]] = {}  # problem id -> last `history` outcomes, oldest first
        self.skipped_prompts_total = 0
        self.predicted_uniform_sampled = 0  # sampled prompts that had been predicted uniform
        self.predicted_uniform_confirmed = 0  # ... whose new group was uniform again

    def predicted_uniform(self, problem_id: str) -> bool:
        recent = self.outcomes.get(problem_id, [])
        return len(recent) >= self.config.history and all(recent[-self.config.history :])

    def choose(self, problem_ids: Sequence[str], seed: int, rollout_index: int) -> list[bool]:
        """Which of a rollout's prompts to skip (True: skip). A predicted-uniform prompt is skipped when
        its draw is at or above ``explore``. At least one prompt is always sampled: when every prompt
        would be skipped, the one with the smallest draw is explored, so no rollout is empty."""
        draws = [draw(seed, rollout_index, pid) for pid in problem_ids]
        skip = [
            self.predicted_uniform(pid) and d >= self.config.explore
            for pid, d in zip(problem_ids, draws, strict=True)
        ]
        if skip and all(skip):
            skip[min(range(len(draws)), key=draws.__getitem__)] = False
        return skip

    def record(self, outcomes: Sequence[tuple[str, bool]]) -> None:
        """Add sampled groups' outcomes (problem id, uniform), in order; keep the last ``history``. A
        prompt predicted uniform before its outcome is added tests the prediction."""
        for pid, uniform in outcomes:
            if self.predicted_uniform(pid):
                self.predicted_uniform_sampled += 1
                self.predicted_uniform_confirmed += bool(uniform)
            recent = self.outcomes.setdefault(pid, [])
            recent.append(bool(uniform))
            del recent[: -self.config.history]

    def state_dict(self) -> dict:
        return {
            "outcomes": {pid: list(v) for pid, v in self.outcomes.items()},
            "skipped_prompts_total": self.skipped_prompts_total,
            "predicted_uniform_sampled": self.predicted_uniform_sampled,
            "predicted_uniform_confirmed": self.predicted_uniform_confirmed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.outcomes = {pid: [bool(x) for x in v] for pid, v in state["outcomes"].items()}
        self.skipped_prompts_total = int(state.get("skipped_prompts_total", 0))
        self.predicted_uniform_sampled = int(state.get("predicted_uniform_sampled", 0))
        self.predicted_uniform_confirmed = int(state.get("predicted_uniform_confirmed", 0))

    @property
    def confirmed_fraction(self) -> float:
        """Of the sampled predicted-uniform prompts so far, the fraction whose group was uniform again
        (NaN before the first)."""
        if not self.predicted_uniform_sampled:
            return float("nan")
        return self.predicted_uniform_confirmed / self.predicted_uniform_sampled
