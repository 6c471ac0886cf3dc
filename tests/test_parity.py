"""The engine/trainer parity guard with the real vLLM engine (tiny model): a correct run stays under the
threshold in float32 and in bfloat16; an engine that does not serve the policy's weights, or a trainer at
the wrong temperature, shows a gap many times larger, and the guard stops the run."""

from __future__ import annotations

import pytest
import torch
from support import PARITY_TEMPERATURE as TEMPERATURE
from support import Gaps, NoSync, restore_engine_weights
from support import parity_fit as _fit
from tiny_reward import ParityRewardModule

from lit_dash import losses
from lit_dash.data.buffer import RolloutBuffer
from lit_dash.data.records import Problem
from lit_dash.engines import SamplingConfig
from lit_dash.module import EngineParityError


class PerturbedPolicy(ParityRewardModule):
    """The policy starts away from the weights on disk (which the engine serves)."""

    def configure_model(self) -> None:
        fresh = self.policy is None
        super().configure_model()
        if fresh:
            torch.manual_seed(1)
            with torch.no_grad():
                for p in self.policy.parameters():
                    p.add_(torch.randn_like(p) * 0.01)


class NothingKept(PerturbedPolicy):
    """Every reward 0: with filtering on, every step keeps nothing (a no-op step)."""

    def reward(self, completions, problems):
        return [0.0] * len(completions)


@pytest.fixture(params=["float32", "bfloat16"])
def engine_and_precision(request, tiny_model_path):
    engine = request.getfixturevalue("tiny_engine" if request.param == "float32" else "tiny_engine_bf16")
    yield engine, request.param
    restore_engine_weights(engine, tiny_model_path)  # the fit trained into the shared engine


def test_a_synced_run_stays_under_the_threshold(engine_and_precision):
    """fp32 trainer + fp32 engine: ~1e-7 nats; bf16 trainer + bf16 engine: ~1e-3 (tiny model, measured)."""
    engine, precision = engine_and_precision
    module = ParityRewardModule(
        model="tiny-llama", lr=1e-3, precision=precision, parity_check="error", seed=0
    )
    gaps = Gaps()
    trainer = _fit(engine, module, [gaps])
    assert trainer.global_step == 2 and len(gaps.mean) == 2
    threshold = module.parity_threshold()
    assert threshold == (0.02 if precision == "float32" else 0.1)
    bound = 1e-4 if precision == "float32" else 1e-2  # well inside the threshold
    assert all(0 <= g < bound for g in gaps.mean), gaps.mean
    assert all(m < 10 * bound for m in gaps.max), gaps.max
    assert module.last_engine_gap["tokens"] >= 16  # every kept completion token was compared


def test_ppo_measures_the_gap_on_the_old_logprobs_and_tis_weights_are_one(tiny_engine, tiny_model_path):
    """update: mini takes the gap from the old log-probs (before the first of its updates); with engine and
    trainer in fp32 every TIS weight is exp(~0) = 1."""
    module = ParityRewardModule(
        model="tiny-llama", lr=1e-3, precision="float32", parity_check="error", update="mini",
        ppo_mini_batches=2, tis_cap=2.0, seed=0,
    )  # fmt: skip
    gaps = Gaps()
    try:
        trainer = _fit(tiny_engine, module, [gaps], steps=4)
    finally:
        restore_engine_weights(tiny_engine, tiny_model_path)
    assert trainer.global_step == 4 and len(gaps.mean) == 2  # 2 optimizer steps per rollout
    assert all(g < 1e-4 for g in gaps.mean), gaps.mean
    assert float(trainer.callback_metrics["train/tis_weight_mean"]) == pytest.approx(1.0, abs=1e-3)
    # the guard measured every slice the rollout's steps train, not the first alone
    rollout = module.last_rollout
    tokens = [float(mb.completion_mask.sum()) for mb in rollout.micro_batches]
    first_slice = sum(tokens[: rollout.slice_sizes[0]])
    assert module.last_engine_gap["tokens"] == sum(tokens) > first_slice


def test_a_skipped_weight_sync_trips_the_guard(tiny_engine):
    """The policy is not what the engine serves (no sync): the first step's gap is far above 0.02."""
    module = PerturbedPolicy(model="tiny-llama", precision="float32", parity_check="error", seed=0)
    with pytest.raises(EngineParityError, match="not serving the policy's weights") as err:
        _fit(tiny_engine, module, [NoSync()])
    assert module.global_step == 0  # stopped before the first update
    assert module.last_engine_gap["mean"] > 5 * module.parity_threshold()
    assert "threshold 0.02" in str(err.value)


def test_a_step_that_keeps_nothing_still_checks_the_engine(tiny_engine):
    """Filtering drops every completion: no training forward, yet the gap is measured on a probe
    micro-batch of the dropped completions, so a stale engine is caught there too."""
    module = NothingKept(model="tiny-llama", precision="float32", parity_check="error", seed=0)
    with pytest.raises(EngineParityError, match="not serving the policy's weights"):
        _fit(tiny_engine, module, [NoSync()], filter_threshold=0.1)
    assert module.skipped_steps == 1 and module.last_engine_gap["tokens"] > 0


def test_a_skipped_weight_sync_only_warns_by_default(tiny_engine):
    module = PerturbedPolicy(model="tiny-llama", precision="float32", seed=0)
    gaps = Gaps()
    with pytest.warns(UserWarning, match="engine's log-probs of its own samples differ"):
        _fit(tiny_engine, module, [NoSync(), gaps], steps=1)
    assert gaps.mean[0] > 0.1


def test_a_wrong_trainer_temperature_shows_a_larger_gap(tiny_engine):
    module = ParityRewardModule(model="tiny-llama", precision="float32")
    module.configure_model()
    buffer = RolloutBuffer(
        engine=tiny_engine,
        sampling=SamplingConfig(temperature=TEMPERATURE, max_new_tokens=12),
        group_size=4,
        micro_batch_size=8,
        filter_threshold=None,
    )
    problems = [Problem(question="What is 2 + 3?", answer="5", source_id="p:0")] * 2
    rollout = buffer.collect(problems, [p.question for p in problems], lambda c, p: [0.0] * len(c))
    assert rollout.temperature == TEMPERATURE

    def gap(temperature: float) -> float:
        total = tokens = 0.0
        for mb in rollout.micro_batches:
            assert mb.engine_logprobs.shape == mb.completion_mask.shape
            mb.temperature = temperature
            trainer_lp = module._logprobs_of(module.policy, mb)
            s, _, n = losses.logprob_gap(trainer_lp, mb.engine_logprobs, mb.completion_mask)
            total, tokens = total + float(s), tokens + float(n)
        return total / tokens

    right, wrong = gap(TEMPERATURE), gap(1.0)
    assert right < 1e-4
    assert wrong > 100 * right and wrong > 0.01, (right, wrong)


def test_a_gap_that_rises_every_step_trips_the_guard_under_the_level_threshold(tiny_engine):
    """A stale engine whose gap stays under the level threshold is still stopped: at lr 3e-5 the policy
    drifts from the weights the engine keeps by 0, 0.009, 0.015, 0.017 nats (measured), under a threshold
    of 0.05: three rises in a row to at least twice where they started (lit_dash/training/gap_trend.py)."""
    module = ParityRewardModule(
        model="tiny-llama", lr=3e-5, precision="float32", parity_check="error", parity_threshold=0.05, seed=0
    )
    with pytest.raises(EngineParityError, match="rose at each of the last 3 steps") as err:
        _fit(tiny_engine, module, [NoSync()], steps=8)
    assert 3 <= module.global_step < 8 and "different precisions" in str(err.value)


def test_a_synced_run_shows_no_trend(tiny_engine, tiny_model_path):
    """Negative control: the same fit with the engine synced runs all its steps in error mode (its gap
    stays near 1e-7, under the trend's floor of a tenth of the threshold)."""
    module = ParityRewardModule(
        model="tiny-llama", lr=3e-5, precision="float32", parity_check="error", parity_threshold=0.05, seed=0
    )
    try:
        trainer = _fit(tiny_engine, module, [], steps=6)
        assert trainer.global_step == 6
    finally:
        restore_engine_weights(tiny_engine, tiny_model_path)
