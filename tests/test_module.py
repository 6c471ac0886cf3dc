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
        ({"normalize_over": "all"}, "normalize_over must be one of"),
        ({"max_rollouts": 0}, "max_rollouts must be >= 1"),
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
    "kwargs, sizes, most, plan",
    [
        ({"update": "dash"}, [3], None, [[0, 1, 2]]),  # one optimizer step over every kept micro-batch
        ({"update": "multi", "ppo_epochs": 2}, [3], None, [[0, 1, 2], [0, 1, 2]]),  # K passes, one step each
        # S steps on the buffer's S slices (micro-batches per slice), in order
        ({"update": "mini", "ppo_mini_batches": 3}, [1, 2, 1], None, [[0], [1, 2], [3]]),
        ({"update": "mini", "ppo_mini_batches": 3}, [1, 0, 1], None, [[0], [], [1]]),  # empty: a no-op step
        # another rank holds more per slice: the extra calls are indices past this rank's (zero losses)
        ({"update": "mini", "ppo_mini_batches": 3}, [1, 0, 2], [2, 1, 2], [[0, 3], [4], [1, 2]]),
        ({"update": "dash"}, [1], [3], [[0, 1, 2]]),
    ],
)
def test_update_plan_per_mode(kwargs, sizes, most, plan):
    module = DashModule(model="tiny-llama", **kwargs)
    assert module._update_plan(sizes, most) == plan


@pytest.mark.parametrize(
    "kwargs, steps, slices",
    [
        ({}, 1, 1),
        ({"update": "multi", "ppo_epochs": 3}, 3, 1),
        ({"update": "mini", "ppo_mini_batches": 32}, 32, 32),
    ],
)
def test_optimizer_steps_per_rollout(kwargs, steps, slices):
    module = DashModule(model="tiny-llama", **kwargs)
    assert module.steps_per_rollout == steps and module.rollout_slices == slices


# rewards by row: a constant group; [0, .5, .5, 1] whose middle two have A = 0 exactly; two mixed groups
NEUTRAL = [1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
NEUTRAL_PROBLEMS = PROBLEMS + [Problem(question="What is 9 + 2?", answer="11", source_id="t:9")]


def _step_grads(module: DashModule, rollout) -> dict[str, torch.Tensor]:
    """The step's gradient as _accumulate makes it on one process: kept counts, then normalizer_weight."""
    module.policy.zero_grad(set_to_none=True)
    counts = module.step_counts(rollout.micro_batches, max_new_tokens=10)
    weight = module.normalizer_weight(counts, (rollout.sampled_completions, rollout.sampled_tokens))
    for mb in rollout.micro_batches:
        loss, _ = module.micro_batch_loss(mb, counts)
        (loss * weight).backward()
    return {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def neutral_samples(tiny_engine):
    buffer = _rollout(tiny_engine, 4)
    prompt_ids, completions, _ = buffer._generate([p.question for p in NEUTRAL_PROBLEMS])
    return prompt_ids, completions


@pytest.mark.parametrize("loss_agg", ["constant", "token_mean", "seq_mean"])
def test_dropping_zero_advantage_rows_leaves_the_gradient_as_it_was(tiny_engine, neutral_samples, loss_agg):
    """normalize_over=rollout at kl_coef 0: filter on (threshold 0.1 drops exactly the A = 0 rows) gives
    the gradient of filter off; normalize_over=kept (the negative control) gives it x sampled / kept."""
    torch.manual_seed(0)
    module = DashModule(model="tiny-llama", loss_agg=loss_agg, precision="float32", normalize_over="rollout")
    module.configure_model()
    prompt_ids, completions = neutral_samples

    def rollout(threshold):
        buffer = _rollout(tiny_engine, 4)
        buffer.filter_threshold = threshold
        return buffer.assemble(NEUTRAL_PROBLEMS, prompt_ids, completions, lambda c, p: NEUTRAL)

    on, off = rollout(0.1), rollout(None)
    assert on.num_kept == 10 and off.num_kept == 16  # the constant group and [0, .5, .5, 1]'s middle two
    assert torch.all(off.advantages[~on.kept] == 0)
    grads_off, grads_on = _step_grads(module, off), _step_grads(module, on)
    assert sum(float(g.abs().sum()) for g in grads_off.values()) > 0
    worst = max(
        float((grads_on[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in grads_off.items()
    )
    print(f"[neutrality {loss_agg}] max relative difference filter on vs off: {worst:.2e}")
    assert worst < 1e-5  # float rounding of a different micro-batch split, relative to each tensor's scale
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))

    module.hparams.normalize_over = "kept"  # the negative control: denominators count the 10 kept rows only
    grads_kept = _step_grads(module, on)
    dropped_tokens = sum(len(completions[i].token_ids) for i in range(16) if not on.kept[i])
    kept_tokens = on.sampled_tokens - dropped_tokens
    factor = on.sampled_tokens / kept_tokens if loss_agg == "token_mean" else 16 / 10
    off_norm = sum(float(g.abs().sum()) for g in grads_off.values())
    kept_norm = sum(float(g.abs().sum()) for g in grads_kept.values())
    print(
        f"[negative control {loss_agg}] |grad kept| / |grad off| = {kept_norm / off_norm:.6f}, factor {factor:.6f}"
    )
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_kept[name], g * factor, rtol=1e-5, atol=1e-5 * float(g.abs().max()))
    assert kept_norm / off_norm == pytest.approx(factor, rel=1e-5) and factor > 1.0


def test_two_budgets_that_disagree_fail_before_the_engine_starts(tmp_path):
    import lightning as L

    from lit_dash.data.datamodule import RolloutDataModule
    from lit_dash.errors import ConfigError

    module = DashModule(model="tiny-llama", update="multi", ppo_epochs=3, max_rollouts=4)
    data = RolloutDataModule(prompts_per_rollout=2, group_size=2, micro_batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"max_rollouts=4 \(= 12 optimizer steps with update=multi\) and "):
        trainer.fit(module, datamodule=data)
    assert data.engine is None and module.policy is None, "nothing was loaded"
