"""GapTrend, the parity guard's rising-gap test, on hand-made gap sequences."""

from __future__ import annotations

import pytest

from lit_dash.training.gap_trend import GapTrend


def _first_flag(gaps, floor=0.0, **kwargs):
    trend = GapTrend(**kwargs)
    for step, gap in enumerate(gaps, start=1):
        if trend.update(gap, floor) is not None:
            return step
    return None


def test_the_stale_bf16_engine_of_the_demo_is_flagged_at_its_fourth_step():
    # the bisection's logged gaps: every one under the bf16 level threshold of 0.1 but the last
    assert _first_flag([0.03, 0.10, 0.13, 0.18], floor=0.01) == 4
    # measured on a bf16-native CPU, seed 1, mixed precisions (weights leaving the bf16 grid): an fp32
    # trainer beside a bf16 engine, and a bf16 trainer beside an fp32 engine (still rising, barely, at 4)
    assert _first_flag([0.0323, 0.0944, 0.1668, 0.2363], floor=0.01) == 4
    assert _first_flag([0.0288, 0.0985, 0.1591, 0.162], floor=0.01) == 4


def test_kernel_noise_is_not_a_trend():
    synced_bf16 = [0.0359, 0.0392, 0.0421, 0.0377, 0.0398, 0.0423, 0.038, 0.0406]  # the demo, 2 seeds
    assert _first_flag(synced_bf16, floor=0.01) is None
    # three rises in a row, but by 17% only: not the 2x of a drift
    assert _first_flag([0.036, 0.039, 0.041, 0.042], floor=0.01) is None
    # fp32 noise may double, three times in a row, and stays far under the floor
    assert _first_flag([1e-7, 2e-7, 4e-7, 8e-7], floor=0.002) is None
    assert _first_flag([1e-7, 2e-7, 4e-7, 8e-7], floor=0.0) == 4  # negative control: no floor, flagged


def test_a_fall_breaks_the_run_and_the_count_restarts():
    gaps = [0.03, 0.06, 0.05, 0.08, 0.12, 0.2]
    assert _first_flag(gaps, floor=0.01) == 6  # 0.05 -> 0.08 -> 0.12 -> 0.2: three rises, 4x
    assert _first_flag(gaps[:5], floor=0.01) is None


def test_steps_zero_is_off_and_bad_settings_are_refused():
    assert _first_flag([0.01, 0.1, 1.0, 10.0, 100.0], steps=0) is None
    with pytest.raises(ValueError, match="steps must be >= 0"):
        GapTrend(steps=-1)
    with pytest.raises(ValueError, match="factor must be > 1"):
        GapTrend(factor=1.0)


def test_the_history_survives_a_checkpoint():
    trend = GapTrend()
    for gap in (0.03, 0.10, 0.13):
        assert trend.update(gap, 0.01) is None
    resumed = GapTrend()
    resumed.load_state_dict(trend.state_dict())
    message = resumed.update(0.18, 0.01)
    assert message is not None and "0.0300, 0.1000, 0.1300, 0.1800" in message and "6.0x" in message
    assert GapTrend().update(0.18, 0.01) is None  # negative control: without the history, nothing


def test_a_level_warning_repeats_only_when_the_gap_doubles():
    """warn mode: the first gap over the threshold warns; the same or a smaller one again does not;
    one past twice the last warned gap warns again (0.06, 0.07, 0.05, 0.13: warnings at 0.06 and 0.13)."""
    import warnings

    from lit_dash.training.parity import ParityGuard

    guard = ParityGuard()
    warned = []
    for mean in (0.06, 0.07, 0.05, 0.13):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guard.check((mean * 10, mean, 10.0), "warn", 0.05, lambda m, *_: f"gap {m:.2f}")
        warned += [str(w.message).split(" (")[0] for w in caught if "gap" in str(w.message)]
    assert warned == ["gap 0.06", "gap 0.13"]
