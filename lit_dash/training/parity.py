"""The engine parity guard: does the engine sample from the policy being trained?

Every step compares the log-prob the engine gave each sampled token with the policy's on its first
forward, before the update. A gap well above rounding means the engine serves other weights (a skipped
weight sync), another temperature or another precision, and the step would train on samples from a
different policy; the guard warns, stops the run, or only logs (``model.parity_check``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_dash import losses
from lit_dash.data.batches import MicroBatch
from lit_dash.data.buffer import Rollout
from lit_dash.errors import RunStopped
from lit_dash.training.gap_trend import GapTrend

PARITY_CHECKS = ("warn", "error", "off")
# Default parity thresholds (mean |engine - trainer| log-prob per token, nats), measured on the
# SmolLM2-135M model at temperatures 0.7-1.3: fp32 engine + fp32 trainer 6e-6; a bf16 engine (trainer
# fp32 or bf16) 0.03-0.05; fp32 with top-k 50 at T 0.9 0.03 (the truncated mass alone). A wrong
# temperature gave 0.3-0.7, weights off by N(0, 1e-3) noise 0.05-0.07.
PARITY_THRESHOLD_FP32 = 0.02
PARITY_THRESHOLD_LOW_PRECISION = 0.1

GapParts = tuple[float, float, float]  # (sum of |gap| over tokens, largest |gap|, tokens)


class EngineParityError(RunStopped):
    """The engine's log-probs of its own samples are far from the policy's: it is not sampling from the
    policy being trained."""


def parity_problems(parity_check: str, parity_threshold: float | None) -> list[str]:
    """What is wrong with the guard's knobs, one message each."""
    errors = []
    if parity_check not in PARITY_CHECKS:
        errors.append(f"parity_check must be one of {PARITY_CHECKS}, got {parity_check!r}")
    if parity_threshold is not None and not parity_threshold > 0:
        errors.append(f"parity_threshold must be > 0 (nats per token) or null, got {parity_threshold}")
    return errors


def default_parity_threshold(
    precision: torch.dtype, engine_dtype: torch.dtype | None, truncated: bool = False
) -> float:
    """The parity threshold when none is set: tight when trainer and engine both compute in fp32 and
    sampling is not truncated; looser when either rounds to 16 bits (an unknown engine dtype counts as
    16-bit) or top-k / top-p truncate sampling (the removed mass then counts in the gap)."""
    if precision == torch.float32 and engine_dtype in (torch.float32, torch.float64) and not truncated:
        return PARITY_THRESHOLD_FP32
    return PARITY_THRESHOLD_LOW_PRECISION


def threshold_for(
    parity_threshold: float | None,
    precision: torch.dtype,
    engine_dtype: torch.dtype | None,
    rollout: Rollout | None,
) -> float:
    """``model.parity_threshold`` when set, else :func:`default_parity_threshold` for this trainer
    precision, engine dtype and the rollout's sampling (truncated by top-k / top-p or not)."""
    if parity_threshold is not None:
        return float(parity_threshold)
    truncated = rollout is not None and rollout.truncated_sampling
    return default_parity_threshold(precision, engine_dtype, truncated)


def gap_sums(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> GapParts:
    """Combine per-micro-batch (sum, max, tokens) of the log-prob gap."""
    return (
        float(sum(float(s) for s, _, _ in parts)),
        max((float(m) for _, m, _ in parts), default=0.0),
        float(sum(float(t) for _, _, t in parts)),
    )


def micro_batch_gaps(
    micro_batches: list[MicroBatch], logprobs: dict[int, torch.Tensor], device: torch.device
) -> GapParts:
    """The engine/trainer gap (sum, max, tokens) of the trainer's ``logprobs`` (by micro-batch index,
    ``[b, L-1]`` each) over the micro-batches whose engine reported log-probs."""
    parts = [
        losses.logprob_gap(logprobs[i], mb.engine_logprobs.to(device), mb.completion_mask.to(device))
        for i, mb in enumerate(micro_batches)
        if mb.engine_logprobs is not None
    ]
    return gap_sums(parts)


def parity_message(
    step: int,
    mean: float,
    gap_max: float,
    tokens: float,
    threshold: float,
    threshold_is_set: bool,
    rollout: Rollout,
    precision: torch.dtype,
    engine_dtype: object,
) -> str:
    """What the guard says when the gap is above its threshold: the figures, the likely causes, the knobs."""
    engine_dtype = str(engine_dtype).removeprefix("torch.")
    precision = str(precision).removeprefix("torch.")
    truncation = ""
    if rollout.truncated_sampling:
        truncation = (
            f"; top-k / top-p truncation (top_k={rollout.top_k}, top_p={rollout.top_p}): the engine "
            "renormalises over the kept tokens, the trainer does not, so the removed mass counts in the gap"
        )
    chosen = "model.parity_threshold" if threshold_is_set else "default for this precision and sampling"
    return (
        f"step {step}: the engine's log-probs of its own samples differ from the policy's by "
        f"{mean:.4f} nats per token on average (max {gap_max:.3f}, over {int(tokens)} tokens), above the "
        f"threshold {threshold} ({chosen}): the engine is not sampling from the policy being trained. "
        "Likely causes: the engine is not serving the policy's weights (a weight sync skipped or not "
        "taking effect; see time/weight_sync); the trainer's temperature is not the sampling temperature "
        f"(the rollout says {rollout.temperature}); a precision mismatch (trainer {precision}, engine "
        f"{engine_dtype}: pin model.precision and data.engine.dtype to float32 to tell){truncation}. "
        "To change the check: model.parity_check (warn / error / off) and model.parity_threshold; "
        "model.tis_cap corrects a small, expected mismatch."
    )


@dataclass
class ParityGuard:
    """The guard's state across steps: the last step's figures, the largest gap warned about, and the
    recent gaps (a gap rising step after step under the level threshold is a stale engine's signature)."""

    last_gap: dict[str, float] | None = None  # the last step's parity figures (mean, max, tokens)
    warned_at: float = 0.0  # the largest gap warned about so far (warn mode)
    trend: GapTrend = field(default_factory=GapTrend)
    trend_warned: bool = False

    def check(
        self, world_gap: GapParts, parity_check: str, threshold: float, message: Callable[..., str]
    ) -> dict[str, float]:
        """The step's figures to log, from the world's ``(sum, max, tokens)`` of the gap; above
        ``threshold`` the guard acts by ``parity_check``. ``message(mean, max, tokens, threshold)``
        words a mismatch."""
        gap_sum, gap_max, gap_tokens = world_gap
        if gap_tokens == 0:  # the engine reported no log-probs: nothing to compare
            self.last_gap = None
            return {}
        mean = gap_sum / gap_tokens
        self.last_gap = {"mean": mean, "max": gap_max, "tokens": gap_tokens}
        figures = {"train/engine_logprob_gap": mean, "train/engine_logprob_gap_max": gap_max}
        rising = self.trend.update(mean, floor=threshold / 10)  # fp32 noise doubling from 1e-7 is no trend
        if parity_check != "off" and rising is not None and mean <= threshold:
            text = (
                f"engine/trainer parity: {rising}. Pin model.precision and data.engine.dtype to the same "
                "dtype to tell the two apart; model.parity_check: off silences this"
            )
            if parity_check == "error":
                raise EngineParityError(text)
            if not self.trend_warned:
                self.trend_warned = True
                rank_zero_warn(text + " (model.parity_check: warn; warned once)")
        if parity_check == "off" or mean <= threshold:
            return figures
        text = message(mean, gap_max, gap_tokens, threshold)
        if parity_check == "error":
            raise EngineParityError(text)
        if mean > 2 * self.warned_at:  # warn again only when the gap has doubled since the last one
            self.warned_at = mean
            rank_zero_warn(text + " (model.parity_check: warn; warns again if the gap doubles)")
        return figures
