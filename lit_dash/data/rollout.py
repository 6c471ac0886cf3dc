"""One optimizer step's worth of on-policy data, as the rollout buffer (:mod:`lit_dash.data.buffer`)
builds it: the problems, their completions, rewards, advantages and keep mask, the micro-batches, and the
counts the loss's denominators and the logged statistics are made of.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lit_dash.advantages import zero_variance_groups
from lit_dash.data.batches import MicroBatch
from lit_dash.data.records import Problem
from lit_dash.engines.base import Completion

__all__ = ["Rollout", "in_loss"]


def in_loss(completion: Completion, mask_truncated: bool) -> bool:
    """Whether the loss can hold a completion: at least one token (an empty one adds nothing to any sum,
    and a step of only empty ones would divide 0 by 0), and not cut off under ``data.truncated: mask``."""
    return bool(completion.token_ids) and not (mask_truncated and completion.truncated)


@dataclass
class Rollout:
    """One optimizer step's worth of on-policy data and its statistics."""

    problems: list[Problem]
    prompt_token_ids: list[list[int]]
    completions: list[Completion]
    rewards: torch.Tensor
    advantages: torch.Tensor
    kept: torch.Tensor
    micro_batches: list[MicroBatch]
    group_size: int
    max_new_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    engine_calls: int = 1
    slice_sizes: list[int] | None = None  # micro-batches per slice, in order; None: one slice of all
    temperature: float = 1.0  # the sampling temperature (its micro-batches carry it too)
    top_k: int = -1  # the sampling's truncation: the engine's log-probs are renormalised over what it kept
    top_p: float = 1.0
    # when filtering kept nothing: one micro-batch of dropped completions, for the engine parity check only
    parity_probe: MicroBatch | None = None
    # dynamic sampling (DAPO): extra engine calls, prompts they sampled, and the first call's mean reward
    refill_engine_calls: int = 0
    refill_prompts: int = 0
    first_call_reward_mean: float | None = None
    # prompt skipping: problems of the step's batch that were predicted uniform and not sampled
    skipped_problems: list[Problem] = field(default_factory=list)
    # the math reward's own events in this step's reward calls (see lit_dash.rewards.reward_events)
    reward_timeouts: int = 0  # completions scored 0 because their comparison ran out of time or memory
    reward_worker_restarts: int = 0  # verifier processes replaced (killed on a hard timeout, or died)
    # data.truncated: mask leaves cut-off completions out of the loss and its denominators; penalty adds
    # DAPO's soft overlong penalty (these, [B], in [-1, 0]) to the rewards before advantages
    masked_truncated: bool = False
    overlong_penalties: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.slice_sizes is None:
            self.slice_sizes = [len(self.micro_batches)]

    @property
    def truncated_sampling(self) -> bool:
        """True when top-k or top-p shaped the sampling (the parity gap then holds the removed mass)."""
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def num_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def sampled_completions(self) -> int:
        """Completions sampled for this step before filtering (with at least one token): what the loss's
        denominators count with ``normalize_over: rollout``. Truncated ones are not counted under
        ``data.truncated: mask``: they are in neither the loss nor its denominators."""
        return sum(1 for c in self.completions if in_loss(c, self.masked_truncated))

    @property
    def sampled_tokens(self) -> int:
        """Completion tokens of every completion sampled for this step, before filtering (truncated ones
        left out under ``data.truncated: mask``)."""
        return sum(len(c.token_ids) for c in self.completions if in_loss(c, self.masked_truncated))

    @property
    def skipped_prompts(self) -> int:
        return len(self.skipped_problems)

    @property
    def skipped_completions(self) -> int:
        """Completions not generated because their prompts were skipped (G per skipped prompt)."""
        return self.skipped_prompts * self.group_size

    @property
    def counted_completions(self) -> float:
        """What ``normalize_over: rollout`` divides by: the sampled completions, and G zero-advantage ones
        per skipped prompt (so a correctly skipped uniform group leaves the update as it was)."""
        return float(self.sampled_completions + self.skipped_completions)

    @property
    def counted_tokens(self) -> float:
        """The token denominator (``loss_agg: token_mean``) over the same completions: a skipped completion
        counts at the mean length of this rollout's sampled ones (an estimate: its length is unknown, and
        biased; the module refuses token_mean with normalize_over: rollout and prompt skipping)."""
        mean = self.sampled_tokens / self.sampled_completions if self.sampled_completions else 0.0
        return self.sampled_tokens + self.skipped_completions * mean

    def stats(self) -> dict[str, float]:
        """Scalars for the logger: units in the names (completions, tokens, groups)."""
        lengths = torch.tensor([len(c.token_ids) for c in self.completions], dtype=torch.float32)
        zero_var = zero_variance_groups(self.rewards, self.group_size)
        padded = sum(mb.padded_tokens for mb in self.micro_batches)
        real = sum(mb.num_tokens for mb in self.micro_batches)
        kept_adv = self.advantages[self.kept]
        return {
            "reward_mean": float(self.rewards.mean()),
            "kept_fraction": self.num_kept / len(self.completions),
            "kept_completions": float(self.num_kept),
            "abs_advantage_mean": float(kept_adv.abs().mean()) if len(kept_adv) else 0.0,
            "zero_variance_group_fraction": float(zero_var.float().mean()),
            "completion_tokens_mean": float(lengths.mean()),
            "completion_tokens_max": float(lengths.max()),
            "truncated_fraction": sum(c.truncated for c in self.completions) / len(self.completions),
            **(
                {"overlong_penalty_mean": float(self.overlong_penalties.mean())}
                if self.overlong_penalties is not None
                else {}
            ),
            "padding_fraction": 1.0 - real / padded if padded else 0.0,
            "micro_batches": float(len(self.micro_batches)),
            "engine_calls": float(self.engine_calls),
            "refill_engine_calls": float(self.refill_engine_calls),
            "refill_prompts": float(self.refill_prompts),
            "sampled_completions": float(len(self.completions)),
            "skipped_prompts": float(self.skipped_prompts),
            "skipped_completions": float(self.skipped_completions),
            "reward_timeouts": float(self.reward_timeouts),
            "reward_worker_restarts": float(self.reward_worker_restarts),
            # the policy's reward on prompts it did not choose: the first engine call's groups, before
            # dynamic sampling swapped any out (reward_mean is over the groups trained on)
            "first_call_reward_mean": float(
                self.rewards.mean() if self.first_call_reward_mean is None else self.first_call_reward_mean
            ),
        }
