"""The parity guard's second test: a gap that rises step after step, even below the level threshold.

An engine that serves stale weights (a push that does not take, a packed copy of a layer that a reload
does not refresh) drifts away from the policy as the policy moves, so its gap grows with every optimizer
step. So does a trainer and an engine of different precisions on weights that start on the bf16 grid:
the demo's SmolLM2 is dequantized from a 4-bit GGUF, every initial weight is exact in bf16, and each
AdamW step moves the fp32 master weights off that grid, so the bf16 side's rounding grows from nothing to
half an ulp of every weight (measured on the demo, fp32 trainer + bf16 engine: 0.03, 0.09, 0.17, 0.24
nats; bf16 trainer + fp32 engine: 0.03, 0.10, 0.16, 0.16), mostly under the 16-bit level threshold of 0.1.
Kernel noise does not look like that: a bf16 engine beside a bf16 trainer wanders around one level
(0.036-0.042 on the demo, AMD EPYC with AVX512-BF16), and an fp32 pair stays near 1e-7.

So the guard also flags ``steps`` rises in a row that end at least ``factor`` times where they started and
above ``floor`` (a tenth of the level threshold: fp32 noise doubling from 1e-7 to 2e-7 is no signal).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GapTrend:
    """Per-step engine/trainer gaps, and whether the latest ones rise like a stale engine's.

    Args:
        steps: rises in a row that count as a trend (0 = off).
        factor: how much the last gap must exceed the first of the run of rises.
    """

    steps: int = 3
    factor: float = 2.0
    history: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0 (0 = off), got {self.steps}")
        if self.factor <= 1.0:
            raise ValueError(f"factor must be > 1, got {self.factor}")

    def update(self, gap: float, floor: float = 0.0) -> str | None:
        """Record one step's mean gap; a sentence describing the trend when there is one (ending above
        ``floor``, nats per token), else None."""
        self.history.append(float(gap))
        del self.history[: -(self.steps + 1)]
        if self.steps == 0 or len(self.history) < self.steps + 1:
            return None
        run = self.history
        rising = all(b > a for a, b in zip(run[:-1], run[1:], strict=True))
        if not rising or run[-1] < self.factor * run[0] or run[-1] <= floor:
            return None
        shown = ", ".join(f"{g:.4f}" for g in run)
        return (
            f"the gap rose at each of the last {self.steps} steps ({shown} nats per token), "
            f"{run[-1] / max(run[0], 1e-12):.1f}x in all: an engine falling behind the policy (stale weights), "
            "or a trainer and an engine of different precisions (model.precision against data.engine.dtype) "
            "whose weights leave the bf16 grid, look like this; kernel noise does not"
        )

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [float(g) for g in state.get("history", [])]
