"""prompts_per_rollout: auto: candidate sizes, the pick rule (hand-computed), and a real measurement."""

from __future__ import annotations

import pytest

from lit_dash.data.calibration import (
    ThroughputPoint,
    candidate_prompt_counts,
    format_points,
    measure,
    pick_prompt_count,
)
from lit_dash.data.datamodule import RolloutDataModule
from lit_dash.engines import SamplingConfig


def test_candidates_double_until_the_completion_cap():
    assert candidate_prompt_counts(group_size=8, max_completions=256) == [1, 2, 4, 8, 16, 32]
    assert candidate_prompt_counts(group_size=4, max_completions=64, min_prompts=4) == [4, 8, 16]
    assert candidate_prompt_counts(group_size=8, max_completions=100) == [1, 2, 4, 8]  # 16 x 8 > 100
    with pytest.raises(ValueError, match="max completions"):
        candidate_prompt_counts(group_size=8, max_completions=4)


def test_pick_is_the_smallest_size_within_ten_percent_of_the_best():
    # tokens/s = completions x 16 / seconds: 64, 128, 180, 200 (best), 190
    points = {
        1: ThroughputPoint(8, 16, 2.0),
        2: ThroughputPoint(16, 16, 2.0),
        4: ThroughputPoint(32, 16, 512 / 180),
        8: ThroughputPoint(64, 16, 1024 / 200),
        16: ThroughputPoint(128, 16, 2048 / 190),
    }
    assert points[8].tokens_per_s == pytest.approx(200.0)
    assert pick_prompt_count(points) == 4  # 180 >= 0.9 x 200; 128 is not
    assert pick_prompt_count(points, fraction=0.95) == 8  # 190 >= 190 too, but 8 is smaller
    assert pick_prompt_count(points, fraction=1.0) == 8
    table = format_points(points, 4, group_size=8)
    assert "| 4 | 32 | 180 | chosen |" in table


def test_auto_is_a_knob_and_other_words_are_refused():
    RolloutDataModule(prompts_per_rollout="auto", group_size=4, micro_batch_size=8)
    with pytest.raises(ValueError, match="prompts_per_rollout must be a number of prompts or auto"):
        RolloutDataModule(prompts_per_rollout="max")
    with pytest.raises(ValueError, match="auto_max_completions"):
        RolloutDataModule(
            prompts_per_rollout="auto", group_size=8, micro_batch_size=8, auto_max_completions=4
        )


def test_measure_times_one_call_per_size_on_the_real_engine(tiny_engine, monkeypatch):
    """One untimed warm-up call, then one call per size, each of fixed-length completions (8 tokens,
    the end-of-sequence token ignored), so tokens per second compare across sizes."""
    calls = []
    generate = tiny_engine.generate

    def counted(prompts, n, sampling, **kw):
        result = generate(prompts, n, sampling, **kw)
        calls.append((len(prompts), n, sorted({len(c.token_ids) for c in result.completions})))
        return result

    monkeypatch.setattr(tiny_engine, "generate", counted)
    prompts = [f"Question {i}: what is {i} + 1?" for i in range(4)]
    points = measure(
        tiny_engine, prompts, 4, [1, 2, 4], SamplingConfig(temperature=1.0), tokens_per_completion=8
    )
    assert calls == [(1, 1, [8]), (1, 4, [8]), (2, 4, [8]), (4, 4, [8])]
    assert sorted(points) == [1, 2, 4]
    assert [(p.completions, p.tokens_per_completion) for p in points.values()] == [(4, 8), (8, 8), (16, 8)]
    assert all(p.seconds > 0 for p in points.values())


def test_auto_parses_through_the_cli():
    from pathlib import Path

    from lit_dash.cli import build_cli

    tiny = str(Path(__file__).resolve().parent / "configs" / "tiny.yaml")
    cli = build_cli(["--config", tiny, "--data.prompts_per_rollout", "auto"], run=False)
    assert cli.datamodule.prompts_per_rollout == "auto"
    cli = build_cli(["--config", tiny, "--data.prompts_per_rollout", "3"], run=False)
    assert cli.datamodule.prompts_per_rollout == 3
