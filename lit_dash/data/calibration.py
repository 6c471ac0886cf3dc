"""``prompts_per_rollout: auto``: measure the engine's throughput and size the rollout at its knee.

Preemptive sampling pays off when one engine call is large enough to run at the engine's best
throughput, and every completion beyond that only makes the step longer. The knee depends on the
machine (a GPU keeps gaining up to hundreds of sequences, two CPU cores flatten out early), so it is
measured, once, at the start of fit: one timed call per candidate rollout size, on real training
prompts, with fixed-length completions. The rollout gets the smallest size that reaches
``fraction`` of the best measured throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lit_dash.engines.base import Engine, SamplingConfig


@dataclass(frozen=True)
class ThroughputPoint:
    """One timed engine call: ``completions`` sequences of ``tokens_per_completion`` tokens each."""

    completions: int
    tokens_per_completion: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.completions * self.tokens_per_completion / self.seconds if self.seconds > 0 else 0.0


def candidate_prompt_counts(group_size: int, max_completions: int, min_prompts: int = 1) -> list[int]:
    """Prompt counts P = 1, 2, 4, ... whose P x group_size completions fit in ``max_completions``."""
    if group_size < 1 or max_completions < group_size:
        raise ValueError(
            f"auto rollout sizing needs max completions ({max_completions}) >= group_size ({group_size})"
        )
    counts, p = [], 1
    while p * group_size <= max_completions:
        if p >= min_prompts:
            counts.append(p)
        p *= 2
    return counts or [max(1, max_completions // group_size)]


def pick_prompt_count(points: dict[int, ThroughputPoint], fraction: float = 0.9) -> int:
    """The smallest prompt count whose throughput is at least ``fraction`` of the best one measured."""
    if not points:
        raise ValueError("no throughput measurements to pick a rollout size from")
    best = max(point.tokens_per_s for point in points.values())
    return min(p for p, point in points.items() if point.tokens_per_s >= fraction * best)


def measure(
    engine: Engine,
    prompts: list[str],
    group_size: int,
    prompt_counts: list[int],
    sampling: SamplingConfig,
    tokens_per_completion: int = 16,
) -> dict[int, ThroughputPoint]:
    """Time one engine call per prompt count (after one untimed warm-up call), fixed-length completions."""
    timed = SamplingConfig(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_new_tokens=tokens_per_completion,
        ignore_eos=True,
    )
    engine.generate(prompts[:1], 1, timed)
    points = {}
    for count in prompt_counts:
        batch = [prompts[i % len(prompts)] for i in range(count)]
        start = time.perf_counter()
        engine.generate(batch, group_size, timed)
        points[count] = ThroughputPoint(
            count * group_size, tokens_per_completion, time.perf_counter() - start
        )
    return points


def format_points(points: dict[int, ThroughputPoint], chosen: int, group_size: int) -> str:
    lines = ["prompts_per_rollout: auto: engine throughput by rollout size"]
    lines.append("| prompts | completions | tokens/s | |")
    lines.append("|---:|---:|---:|---|")
    for count, point in sorted(points.items()):
        mark = "chosen" if count == chosen else ""
        lines.append(f"| {count} | {count * group_size} | {point.tokens_per_s:.0f} | {mark} |")
    return "\n".join(lines)
