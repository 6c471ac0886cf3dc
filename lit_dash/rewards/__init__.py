"""Rewards for RL fine-tuning: exact-answer checking of math completions, answers in final form."""

from lit_dash.rewards.math import (
    RewardEvents,
    RewardWorkerError,
    extract_answer,
    has_answer,
    math_reward,
    math_rewards,
    math_verdicts,
    reward_events,
    warm_up_reward_workers,
)

__all__ = [
    "math_reward",
    "math_rewards",
    "math_verdicts",
    "extract_answer",
    "has_answer",
    "warm_up_reward_workers",
    "reward_events",
    "RewardEvents",
    "RewardWorkerError",
]
