"""The update: its knobs (:class:`UpdateSpec`), which micro-batches each optimizer step of a rollout
accumulates over (:func:`update_plan`), the step-wide denominators (:func:`step_counts`,
:func:`normalizer_weight`) and one micro-batch's share of the step loss (:func:`micro_batch_loss`).

Pure functions of tensors and numbers, like :mod:`lit_dash.losses` (verl's ``core_algos``): the module's
hooks run the forward passes and the backward, and pass in what these need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from lit_dash import losses
from lit_dash.data.batches import MicroBatch
from lit_dash.errors import ConfigError, RunStopped

UPDATE_MODES = ("dash", "multi", "mini")
NORMALIZE_OVER = ("rollout", "kept")
KL_OVER = ("kept", "sampled")
GAP_KEYS = ("gap_sum", "gap_max", "gap_tokens")  # the on-policy parity gap's share in a micro-batch's stats


@dataclass(frozen=True)
class UpdateSpec:
    """The knobs that shape an update, as ``model.init_args`` names them (see DashModule's docstring)."""

    update: str = "dash"
    ppo_epochs: int = 1
    ppo_mini_batches: int = 1
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg: str = "constant"
    normalize_over: str = "rollout"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    tis_cap: float | None = None
    log_ratio_clamp: float | None = 20.0
    clip_ratio_c: float | None = 3.0
    kl_clamp: float | None = None
    kl_over: str = "kept"

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> UpdateSpec:
        """The spec of a module's hyper-parameters, read when used: tests and benchmarks change them."""
        return cls(**{f.name: hparams[f.name] for f in fields(cls)})

    def problems(self) -> list[str]:
        """What is wrong with these knobs, one message each (empty when they can work)."""
        errors = []
        if self.kl_coef < 0:
            errors.append(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in losses.KL_ESTIMATORS:
            errors.append(
                f"kl_estimator must be one of {tuple(losses.KL_ESTIMATORS)}, got {self.kl_estimator!r}"
            )
        if self.loss_agg not in losses.LOSS_AGG_MODES:
            errors.append(f"loss_agg must be one of {losses.LOSS_AGG_MODES}, got {self.loss_agg!r}")
        if self.update not in UPDATE_MODES:
            errors.append(f"update must be one of {UPDATE_MODES}, got {self.update!r}")
        if self.normalize_over not in NORMALIZE_OVER:
            errors.append(f"normalize_over must be one of {NORMALIZE_OVER}, got {self.normalize_over!r}")
        if self.ppo_epochs < 1 or self.ppo_mini_batches < 1:
            errors.append("ppo_epochs and ppo_mini_batches must be >= 1")
        if self.tis_cap is not None and not self.tis_cap > 0:
            errors.append(f"tis_cap must be > 0 (a ratio cap, e.g. 2.0) or null (no TIS), got {self.tis_cap}")
        if self.kl_coef > 0 and self.kl_estimator == "k1":
            errors.append(
                "kl_estimator k1 with kl_coef > 0 penalises nothing: used as a loss, k1 = log pi - log ref "
                "has zero expected gradient (E_pi[grad log pi] = 0), only noise; use k3+ or k2 (gradient of "
                "KL(pi || ref)) or k3 (gradient of KL(ref || pi))"
            )
        if self.kl_over not in KL_OVER:
            errors.append(f"kl_over must be one of {KL_OVER}, got {self.kl_over!r}")
        elif self.kl_over == "sampled" and self.normalize_over == "kept":
            errors.append(
                "kl_over: sampled puts the dropped completions' KL in the loss, whose denominators "
                "normalize_over: kept leaves them out of: use normalize_over: rollout with kl_over: sampled"
            )
        if self.log_ratio_clamp is not None and not self.log_ratio_clamp > 0:
            errors.append(f"log_ratio_clamp must be > 0 (nats, e.g. 20) or null, got {self.log_ratio_clamp}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            errors.append(
                f"clip_ratio_c must be > 1 (the dual clip, e.g. 3) or null, got {self.clip_ratio_c}"
            )
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            errors.append(f"kl_clamp must be > 0 (per-token KL, e.g. 10) or null, got {self.kl_clamp}")
        return errors

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps every rollout takes (skipped ones included): 1, ppo_epochs or ppo_mini_batches."""
        return {"dash": 1, "multi": self.ppo_epochs, "mini": self.ppo_mini_batches}[self.update]

    def skipping_problems(self) -> list[str]:
        """What is wrong with these knobs beside ``data.prompt_skipping``, if anything."""
        if self.loss_agg == "token_mean" and self.normalize_over == "rollout":
            return [
                "loss_agg: token_mean with normalize_over: rollout divides by every sampled token, and a "
                "skipped prompt's completions are never sampled: their tokens could only be guessed (at "
                "the rollout's mean length, a biased guess, as uniform all-wrong groups run long). Use "
                "loss_agg: constant or seq_mean (they count completions: exact), normalize_over: kept, or "
                "data.prompt_skipping: null"
            ]
        return []

    @property
    def logs_dual_clip(self) -> bool:
        """Whether steps log train/dual_clip_fraction: off-policy modes with the dual clip on (on-policy
        the ratio is exactly 1 and it never binds)."""
        return self.update != "dash" and self.clip_ratio_c is not None

    @property
    def trains_dropped_rows(self) -> bool:
        """The buffer also cuts the completions filtering dropped into micro-batches, with advantage 0:
        their KL term is trained (kl_over: sampled, with kl_coef > 0)."""
        return self.kl_over == "sampled" and self.kl_coef > 0

    @property
    def rollout_slices(self) -> int:
        """Slices the rollout buffer cuts the kept completions into: one per optimizer step in mini mode."""
        return self.ppo_mini_batches if self.update == "mini" else 1


def budget_problems(max_rollouts: int | None) -> list[str]:
    """What is wrong with ``model.max_rollouts``, if anything."""
    if max_rollouts is not None and max_rollouts < 1:
        return [f"max_rollouts must be >= 1 (rollouts) or null, got {max_rollouts}"]
    return []


def apply_rollout_budget(trainer: Any, max_rollouts: int | None, spec: UpdateSpec) -> None:
    """``max_rollouts`` as the trainer's ``max_steps`` (max_rollouts x steps per rollout), so fit stops,
    and a resumed fit knows where it stands, in Lightning's own terms; a different ``max_steps`` set
    too is a conflict."""
    if max_rollouts is None or trainer is None:
        return
    steps = max_rollouts * spec.steps_per_rollout
    if trainer.max_steps not in (-1, steps):
        raise ConfigError(
            f"model.max_rollouts={max_rollouts} (= {steps} optimizer steps with update={spec.update}) and "
            f"trainer.max_steps={trainer.max_steps} are two budgets that disagree: set one "
            "(trainer.max_steps: -1 lets max_rollouts decide)"
        )
    trainer.fit_loop.epoch_loop.max_steps = steps


def update_plan(spec: UpdateSpec, slice_sizes: list[int], most: list[int] | None = None) -> list[list[int]]:
    """Which micro-batches each optimizer step of this rollout accumulates over.

    ``slice_sizes``: this rank's micro-batches per slice, in order (one slice, unless update=mini cut
    one per step); ``most``: the most any rank has per slice (default: these). A slice's step runs
    ``most`` backward calls on every rank; an index past this rank's micro-batches is a zero loss.
    An empty slice (nothing kept on any rank) is an empty step.
    """
    most = list(slice_sizes) if most is None else list(most)
    chunks, start, pad = [], 0, sum(slice_sizes)
    for local, width in zip(slice_sizes, most, strict=True):
        chunks.append(list(range(start, start + local)) + list(range(pad, pad + width - local)))
        start, pad = start + local, pad + width - local
    if spec.update == "multi":
        return chunks * spec.ppo_epochs
    return chunks


def step_counts(micro_batches: list[MicroBatch], max_new_tokens: int) -> dict[str, float]:
    """Step-wide denominators, so the loss does not depend on how the step is split into micro-batches."""
    counts = [losses.global_loss_counts(mb.completion_mask) for mb in micro_batches]
    seqs = float(sum(float(n_seqs) for _, n_seqs in counts))
    return {
        "global_tokens": float(sum(float(n_tokens) for n_tokens, _ in counts)),
        "global_seqs": seqs,
        "normalizer": seqs * max_new_tokens,
    }


def normalizer_weight(
    spec: UpdateSpec, counts: dict[str, float], sampled: tuple[float, float] | None
) -> float:
    """The factor that turns a loss normalised by the kept ``counts`` (:func:`step_counts`) into one
    normalised over the completions sampled before filtering, ``sampled`` = (completions, tokens) of
    this step (or of its share of the rollout): kept denominator / sampled denominator. 1 with
    ``normalize_over: kept`` or without ``sampled``. The logged entropy, KL and clip fraction stay
    means over the kept tokens."""
    if spec.normalize_over == "kept" or sampled is None:
        return 1.0
    seqs, tokens = sampled
    token_mean = spec.loss_agg == "token_mean"
    kept, total = (counts["global_tokens"], tokens) if token_mean else (counts["global_seqs"], seqs)
    return kept / total if total > 0 else 1.0


def zero_totals(spec: UpdateSpec) -> dict[str, float]:
    """A step's logged sums before any micro-batch adds to them (the same keys whether it trains or not)."""
    totals = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
    if spec.logs_dual_clip:
        totals["dual_clip_fraction"] = 0.0
    if spec.tis_cap is not None:
        totals["tis_weight_mean"] = 0.0
    if spec.kl_coef > 0:  # set by the step (the module's _accumulate), not summed over micro-batches
        totals["kl_effective_coef"] = 0.0
    return totals


def add_stats(totals: dict[str, float], stats: dict[str, float]) -> None:
    """Add a micro-batch's stats into the step's ``totals``: sums, but the largest gap for ``gap_max``."""
    for key, value in stats.items():
        if key == "gap_max":
            totals[key] = max(totals.get(key, 0.0), value)
        else:
            totals[key] = totals.get(key, 0.0) + value


def micro_batch_loss(
    spec: UpdateSpec,
    mb: MicroBatch,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    counts: dict[str, float],
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the step loss (summing over the step's micro-batches gives the step
    loss), and its share of the logged statistics.

    ``logprobs`` and ``entropy`` are the policy's, ``[b, L-1]`` (the module's forward); ``counts`` the
    step-wide denominators (:func:`step_counts`, over all ranks). On-policy (``old_logprobs`` None) this
    forward is the step's first, so it also measures the gap to the engine's log-probs (``gap_sum``,
    ``gap_max``, ``gap_tokens`` in the stats; PPO measures it on the old log-probs instead). With
    ``tis_cap`` each token's policy-gradient term is weighted by ``min(exp(old - engine), tis_cap)``, the
    old log-probs being the current ones on-policy.
    """
    device = logprobs.device
    mask = mb.completion_mask.to(device)
    per_token, clip_frac, dual_frac = losses.policy_loss(
        logprobs,
        old_logprobs,
        mb.advantages.to(device),
        mask,
        spec.clip_eps_low,
        spec.clip_eps_high,
        log_ratio_clamp=spec.log_ratio_clamp,
        clip_ratio_c=spec.clip_ratio_c,
        return_dual_clip_fraction=True,
    )
    share = float(mask.sum()) / max(counts["global_tokens"], 1.0)
    stats = {
        "clip_fraction": float(clip_frac) * share,
        "entropy": float((entropy * mask).sum()) / max(counts["global_tokens"], 1.0),
        "kl": 0.0,
    }
    if spec.logs_dual_clip:
        stats["dual_clip_fraction"] = float(dual_frac) * share
    engine_lp = mb.engine_logprobs.to(device) if mb.engine_logprobs is not None else None
    if old_logprobs is None and engine_lp is not None:
        gap_sum, gap_max, gap_tokens = losses.logprob_gap(logprobs, engine_lp, mask)
        stats.update(gap_sum=float(gap_sum), gap_max=float(gap_max), gap_tokens=float(gap_tokens))
    if spec.tis_cap is not None:
        if engine_lp is None:
            raise RunStopped(
                "model.tis_cap needs the engine's log-probs of the sampled tokens, and this rollout has "
                "none (the engine reported no log-probs): use the vllm or hf engine, or set tis_cap: null"
            )
        old = old_logprobs if old_logprobs is not None else logprobs.detach()
        weights = losses.truncated_importance_weights(old, engine_lp, spec.tis_cap)
        per_token = per_token * weights
        stats["tis_weight_mean"] = float((weights * mask).sum()) / max(counts["global_tokens"], 1.0)
    if spec.kl_coef > 0:
        kl = losses.kl_penalty(logprobs, ref_logprobs, spec.kl_estimator, spec.kl_clamp)
        per_token = per_token + spec.kl_coef * kl
        stats["kl"] = float((kl.detach() * mask).sum()) / max(counts["global_tokens"], 1.0)
    loss = losses.aggregate_loss(per_token, mask, spec.loss_agg, **counts)
    stats["loss"] = float(loss.detach())
    return loss, stats
