"""A training step's logged scalars, on this rank: the rollout's, the update's, the counters and the
datamodule's; :func:`lit_dash.world_metrics.world_values` then makes them the world's."""

from __future__ import annotations

from lit_dash.contract import RolloutData
from lit_dash.data.buffer import Rollout


def step_metrics(
    stats: dict[str, float],
    totals: dict[str, float],
    grad_norm: float,
    lr: float,
    skipped_steps: int,
    nonfinite_steps: int,
    data: RolloutData,
    rollout: Rollout,
) -> dict[str, float]:
    """``stats`` (the rollout's ``train/`` figures) with the update's ``totals``, the step's gradient norm
    and learning rate, the skip counters and prompt skipping's history (the world's, on every rank)."""
    metrics = dict(stats)
    metrics.update({f"train/{k}": v for k, v in totals.items()})
    metrics["train/grad_norm"] = grad_norm
    metrics["train/lr"] = lr
    metrics["train/skipped_steps"] = float(skipped_steps)
    metrics["train/nonfinite_steps"] = float(nonfinite_steps)
    # optional members of the contract (a minimal datamodule, e.g. a test's replay, may lack them)
    metrics["train/skipped_long_prompts"] = float(getattr(data, "skipped_long_prompts", 0))
    history = getattr(data, "skip_history", None)
    metrics["train/skipped_prompts_total"] = float(history.skipped_prompts_total if history else 0)
    metrics["train/skipped_completions_total"] = metrics["train/skipped_prompts_total"] * float(
        rollout.group_size
    )
    if history is not None:  # does "uniform before" predict "uniform again"? (data.skipping)
        metrics["train/predicted_uniform_sampled_total"] = float(history.predicted_uniform_sampled)
        if history.predicted_uniform_sampled:  # the same on every rank: every rank logs it or none
            metrics["train/predicted_uniform_confirmed_fraction"] = history.confirmed_fraction
    return metrics


def rollout_weights(rollout: Rollout) -> dict[str, float]:
    """What this rank's rollout ratios are fractions or means of (the weights of their world means)."""
    completions = len(rollout.completions)
    return {
        "completions": float(completions),
        "kept": float(rollout.num_kept),
        "groups": completions / rollout.group_size,
        "padded_tokens": float(sum(mb.input_ids.numel() for mb in rollout.micro_batches)),
    }
