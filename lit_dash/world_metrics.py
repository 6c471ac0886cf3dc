"""A training step's logged scalars over all ranks: each rank holds its own rollout, and the logged value
must be the world's, not rank 0's.

Every scalar has one reduction (:data:`TRAIN_REDUCTIONS`):

* ``sum``: a count (kept completions, micro-batches), or a rank's share of a quantity already divided by a
  world-wide denominator (the loss, entropy, KL and clip fraction are this rank's token sums over the
  world's token count, so the world value is their sum);
* ``max``: the largest over ranks (the longest completion);
* ``same``: already equal on every rank (the learning rate, the gradient norm after DDP's all-reduce,
  step counters, figures reduced where they were computed): passed through;
* a weight name (``completions``, ``kept``, ``groups``, ``padded_tokens``): a ratio, logged as
  world-sum(value x weight) / world-sum(weight), the ratio over the world's rollout (not the mean of the
  ranks' ratios, which differ when ranks keep different numbers of completions). A zero world weight
  logs 0.

The reduction runs through one torchmetrics :class:`~torchmetrics.Metric` whose states carry torchmetrics'
own ``dist_reduce_fx`` (sum and max): two gathered states per step, whatever the number of scalars, and
nothing to do on one process.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

SAME = "same"
# weights: what each ratio is a fraction or mean of, on one rank's rollout
WEIGHTS = ("completions", "kept", "groups", "padded_tokens", "ranks")

TRAIN_REDUCTIONS: dict[str, str] = {
    # the rollout (Rollout.stats and the accuracy)
    "train/reward_mean": "completions",
    "train/accuracy": "completions",
    "train/kept_fraction": "completions",
    "train/kept_completions": "sum",
    "train/abs_advantage_mean": "kept",
    "train/zero_variance_group_fraction": "groups",
    "train/completion_tokens_mean": "completions",
    "train/completion_tokens_max": "max",
    "train/truncated_fraction": "completions",
    "train/overlong_penalty_mean": "completions",
    "train/padding_fraction": "padded_tokens",
    "train/micro_batches": "sum",
    "train/engine_calls": "sum",
    "train/refill_engine_calls": "sum",
    "train/refill_prompts": "sum",
    "train/first_call_reward_mean": "completions",  # the first call sampled P x G, as many as trained
    "train/sampled_completions": "sum",
    "train/skipped_prompts": "sum",  # prompt skipping: prompts not sampled this step
    "train/skipped_completions": "sum",  # ... and the completions that saved (G per prompt)
    "train/reward_timeouts": "sum",  # the math reward's, in this step's reward calls
    "train/reward_worker_restarts": "sum",
    # the update: this rank's sums over world-wide denominators (module.micro_batch_loss)
    "train/loss": "sum",
    "train/kl": "sum",
    "train/clip_fraction": "sum",
    "train/dual_clip_fraction": "sum",
    "train/entropy": "sum",
    "train/tis_weight_mean": "sum",
    # equal on every rank already
    "train/loss_denominator_completions": SAME,
    "train/kl_effective_coef": SAME,
    "train/engine_logprob_gap": SAME,
    "train/engine_logprob_gap_max": SAME,
    "train/optimizer_steps_per_rollout": SAME,
    "train/grad_norm": SAME,
    "train/lr": SAME,
    "train/skipped_steps": SAME,
    "train/nonfinite_steps": SAME,
    "train/skipped_long_prompts": SAME,
    "train/skipped_prompts_total": SAME,  # the datamodule's world total (gathered every step)
    "train/skipped_completions_total": SAME,
    "train/predicted_uniform_sampled_total": SAME,
    "train/predicted_uniform_confirmed_fraction": SAME,
}
DEFAULT_REDUCTION = "ranks"  # a scalar a subclass adds: the mean of the ranks' values


class WorldSums(Metric):
    """Sums and maxima of fixed-length vectors over ranks (torchmetrics syncs them on ``compute``)."""

    full_state_update = False

    def __init__(self, num_sums: int, num_maxes: int) -> None:
        super().__init__()
        self.add_state("sums", torch.zeros(num_sums, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "maxes", torch.full((num_maxes,), -torch.inf, dtype=torch.float64), dist_reduce_fx="max"
        )

    def update(self, sums: torch.Tensor, maxes: torch.Tensor) -> None:
        self.sums += sums.to(self.sums)
        self.maxes = torch.maximum(self.maxes, maxes.to(self.maxes))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sums, self.maxes


def reduction_of(name: str) -> str:
    return TRAIN_REDUCTIONS.get(name, DEFAULT_REDUCTION)


def world_values(
    values: dict[str, float], weights: dict[str, float], device: torch.device | str = "cpu"
) -> dict[str, float]:
    """``values`` (this rank's scalars) as the world's, by :data:`TRAIN_REDUCTIONS`; ``weights`` are this
    rank's completions, kept completions, groups and padded tokens. A collective: every rank calls it
    with the same names (the same keys in the same order)."""
    weights = {**weights, "ranks": 1.0}
    missing = [w for w in WEIGHTS if w not in weights]
    if missing:
        raise ValueError(f"world_values needs the weights {missing}")
    how = {name: reduction_of(name) for name in values}
    summed = [n for n in values if how[n] not in ("max", SAME)]
    maxed = [n for n in values if how[n] == "max"]
    sums = [values[n] * (weights[how[n]] if how[n] != "sum" else 1.0) for n in summed]
    sums += [weights[w] for w in WEIGHTS]
    metric = WorldSums(len(sums), len(maxed)).to(device)
    metric.update(
        torch.tensor(sums, dtype=torch.float64), torch.tensor([values[n] for n in maxed], dtype=torch.float64)
    )
    # (compute squeezes a one-element state to a scalar)
    world_sums, world_maxes = (t.reshape(-1).tolist() for t in metric.compute())
    world_weight = dict(zip(WEIGHTS, world_sums[len(summed) :], strict=True))
    out = {n: float(v) for n, v in values.items() if how[n] == SAME}
    out.update(zip(maxed, world_maxes, strict=True))
    for name, total in zip(summed, world_sums, strict=False):
        if how[name] == "sum":
            out[name] = total
        else:
            weight = world_weight[how[name]]
            out[name] = total / weight if weight > 0 else 0.0
    return {n: out[n] for n in values}
