"""The LightningModule: loss split-invariance, the reference model only with KL, the reward hook."""

from __future__ import annotations

import pytest
import torch

from lit_dash.data.buffer import RolloutBuffer
from lit_dash.data.records import Problem
from lit_dash.engines import SamplingConfig
from lit_dash.module import DashModule
from lit_dash.rewards.examples import FormatBonusModule

PROBLEMS = [Problem(question=f"What is {i} + 2?", answer=str(i + 2), source_id=f"t:{i}") for i in range(3)]


def _rollout(engine, micro_batch_size: int):
    """The same sampled completions, re-cut into micro-batches of a given size."""
    buffer = RolloutBuffer(
        engine=engine,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=10),
        group_size=4,
        micro_batch_size=micro_batch_size,
        filter_threshold=None,
    )
    return buffer


def _grads_for(module: DashModule, micro_batches) -> tuple[float, dict[str, torch.Tensor]]:
    module.policy.zero_grad(set_to_none=True)
    counts = module.step_counts(micro_batches, max_new_tokens=10)
    total = 0.0
    for mb in micro_batches:
        loss, _ = module.micro_batch_loss(mb, counts)
        loss.backward()
        total += float(loss)
    return total, {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_agg", ["constant", "token_mean", "seq_mean"])
def test_step_loss_does_not_depend_on_the_micro_batch_split(tiny_engine, loss_agg):
    module = DashModule(model="tiny-llama", loss_agg=loss_agg)
    module.configure_model()
    prompts = [p.question for p in PROBLEMS]
    rollout = _rollout(tiny_engine, 12).collect(
        PROBLEMS, prompts, lambda c, p: [float(i % 2) for i in range(len(c))]
    )
    assert rollout.advantages.abs().sum() > 0, "need a non-trivial advantage to test anything"
    rows = list(range(12))
    whole = RolloutBuffer._micro_batches(
        _rollout(tiny_engine, 12),
        rows,
        rollout.prompt_token_ids,
        rollout.completions,
        rollout.advantages,
    )
    split = RolloutBuffer._micro_batches(
        _rollout(tiny_engine, 5),
        rows,
        rollout.prompt_token_ids,
        rollout.completions,
        rollout.advantages,
    )
    assert len(whole) == 1 and len(split) == 3
    loss_whole, grads_whole = _grads_for(module, whole)
    loss_split, grads_split = _grads_for(module, split)
    # On-policy, seq_mean's loss VALUE is -mean(A) = 0 (advantages sum to zero per group); its gradient is not.
    assert sum(float(g.abs().sum()) for g in grads_whole.values()) > 0
    assert loss_split == pytest.approx(loss_whole, rel=1e-4, abs=1e-7)
    for name, g in grads_whole.items():
        torch.testing.assert_close(grads_split[name], g, rtol=1e-3, atol=1e-6)


def test_reference_model_is_loaded_only_with_kl():
    without = DashModule(model="tiny-llama", kl_coef=0.0)
    without.configure_model()
    assert without.reference is None
    with_kl = DashModule(model="tiny-llama", kl_coef=0.04)
    with_kl.configure_model()
    assert with_kl.reference is not None
    assert not any(p.requires_grad for p in with_kl.reference.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kl_coef": -0.1}, "kl_coef must be >= 0"),
        ({"loss_agg": "sum"}, "loss_agg must be one of"),
        ({"update": "ppo"}, "update must be one of"),
        ({"model": "no-such-model"}, "unknown model 'no-such-model'"),
    ],
)
def test_bad_module_settings_fail_before_loading(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DashModule(**kwargs)


def test_custom_reward_subclass_changes_the_reward():
    module = FormatBonusModule(model="tiny-llama", format_bonus=0.25)
    problems = [Problem(question="1+1?", answer="2", source_id="x")] * 3
    rewards = module.reward(["so \\boxed{2}", "hmm \\boxed{3}", "no answer"], problems)
    assert list(rewards) == [1.0, 0.25, 0.0]
    assert list(DashModule.reward(module, ["hmm \\boxed{3}"], problems[:1])) == [0.0]


@pytest.mark.parametrize(
    "kwargs, plan",
    [
        ({"update": "dash"}, [[0, 1, 2]]),  # one optimizer step over every kept micro-batch
        ({"update": "multi", "ppo_epochs": 2}, [[0, 1, 2], [0, 1, 2]]),  # K passes, one step each
        ({"update": "mini", "ppo_mini_batches": 2}, [[0, 2], [1]]),  # S steps on disjoint slices
    ],
)
def test_update_plan_per_mode(kwargs, plan):
    module = DashModule(model="tiny-llama", **kwargs)
    assert module._update_plan(3) == plan
