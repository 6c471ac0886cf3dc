"""The LightningModule: loss split-invariance, the reference model only with KL, the reward hook,
log-probs at the sampling temperature, truncated importance sampling and the parity guard's message."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_tensors_near, fp32_sum_error
from support import NEUTRAL, worst

from lit_dash.data.buffer import RolloutBuffer, pad_micro_batch
from lit_dash.data.records import Problem
from lit_dash.engines import SamplingConfig
from lit_dash.errors import RunStopped
from lit_dash.module import DashModule, EngineParityError, default_parity_threshold
from lit_dash.rewards.examples import FormatBonusModule
from lit_dash.training.update import update_plan

VOCAB = 49152  # the tiny model has SmolLM2's tokenizer: the longest fp32 sum on a log-prob's path
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


def _grads_for(
    module: DashModule, micro_batches, local: bool = False
) -> tuple[float, dict[str, torch.Tensor]]:
    """Accumulated loss and gradients of a step; ``local`` normalises each micro-batch by its own counts
    (what the step-wide counts exist to avoid: the negative control)."""
    module.policy.zero_grad(set_to_none=True)
    counts = module.step_counts(micro_batches, max_new_tokens=10)
    total = 0.0
    for mb in micro_batches:
        loss, _ = module.micro_batch_loss(
            mb, module.step_counts([mb], max_new_tokens=10) if local else counts
        )
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


# (grad rtol, grad atol as a fraction of the largest gradient element). fp32 is exact up to summation
# order: two fp32 computations whose longest sums run over the vocabulary (tests/numerics.py; measured on
# the tiny model: max abs difference 4e-8, largest element 0.13, against the bound's 1.4e-5). bf16 autocast rounds
# differently for different padded widths: max abs difference 3e-4 (0.25% of the largest element), and
# rtol 0.02 / atol 1e-5 fails a few hundred of 6.3M elements, so 0.05 / 2% of the largest element.
SPLIT_TOLERANCES = {"float32": (0.0, 2 * fp32_sum_error(VOCAB)), "bfloat16": (5e-2, 2e-2)}


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("loss_agg", ["constant", "token_mean", "seq_mean"])
def test_step_loss_does_not_depend_on_the_micro_batch_split(tiny_engine, loss_agg, precision):
    """Exact in fp32 (pinned: ``auto`` would be bf16 on a bf16-native machine); within bf16's rounding
    in bf16. The negative control: per-micro-batch denominators change the gradient far beyond that."""
    module = DashModule(model="tiny-llama", loss_agg=loss_agg, precision=precision)
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
    # On-policy the loss VALUE is -sum(A x tokens) / count, 0 here (advantages sum to zero per group and
    # the completions are equally long); the gradient is not, and it carries the test.
    largest = max(float(g.abs().max()) for g in grads_whole.values())
    assert largest > 0
    rtol, atol_fraction = SPLIT_TOLERANCES[precision]
    atol = atol_fraction * largest
    assert loss_split == pytest.approx(loss_whole, rel=1e-3, abs=1e-6)
    for name, g in grads_whole.items():
        torch.testing.assert_close(grads_split[name], g, rtol=rtol, atol=atol)
    _, grads_local = _grads_for(module, split, local=True)
    largest = max(float((grads_local[n] - g).abs().max()) for n, g in grads_whole.items())
    assert largest > 10 * atol, "local denominators should change the step's gradient"


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
        ({"kl_coef": 0.04, "kl_estimator": "k1"}, "k1 with kl_coef > 0 penalises nothing"),
        ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
        ({"log_ratio_clamp": 0.0}, "log_ratio_clamp must be > 0"),
        ({"clip_ratio_c": 1.0}, "clip_ratio_c must be > 1"),
        ({"kl_clamp": -1.0}, "kl_clamp must be > 0"),
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
    assert update_plan(module.update_spec, sizes, most) == plan


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
    difference = worst(grads_on, grads_off)
    print(f"[neutrality {loss_agg}] max relative difference filter on vs off: {difference:.2e}")
    # another micro-batch split reorders fp32 sums whose longest runs over the vocabulary (tests/numerics.py)
    assert difference < 2 * fp32_sum_error(VOCAB)
    assert_tensors_near(grads_on, grads_off, VOCAB)

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
    assert_tensors_near(grads_kept, {n: g * factor for n, g in grads_off.items()}, VOCAB)
    # an L1 norm over 6.3M elements: independent fp32 errors average out (measured: equal to 7 digits)
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


# ---- log-probs at the sampling temperature, TIS, the parity guard (micro-batches built by hand) ---------


def _hand_micro_batch(temperature: float, engine_logprobs=None):
    prompts = [[1, 5, 9], [1, 7]]
    completions = [[11, 12, 13], [14, 15, 16, 17]]
    return pad_micro_batch(
        list(zip(prompts, completions, strict=True)),
        0,
        torch.tensor([1.0, -0.5]),
        [0, 1],
        temperature=temperature,
        engine_logprobs=engine_logprobs,
    )


def _reference_logprobs(model, mb, temperature):
    """log_softmax(logits / T) of the completion tokens, by a plain full forward (the module's own path
    runs the LM head on completion positions only)."""
    with torch.no_grad():
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits / temperature, -1).gather(-1, mb.input_ids[:, 1:, None]).squeeze(-1)
    return logp * mb.completion_mask


@pytest.fixture(scope="module")
def fp32_module():
    module = DashModule(model="tiny-llama", precision="float32", kl_coef=0.04)
    module.configure_model()
    with torch.no_grad():  # a reference that differs from the policy, so the KL test can tell them apart
        for p in module.reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module


def test_logprobs_entropy_kl_and_old_logprobs_use_the_sampling_temperature(fp32_module):
    module = fp32_module
    mb = _hand_micro_batch(1.3)
    logprobs, entropy = module(mb)
    expected = _reference_logprobs(module.policy, mb, 1.3)
    # two fp32 log-sum-exps over the vocabulary (tests/numerics.py)
    assert_tensors_near(logprobs.detach(), expected, VOCAB, relative=False)
    # negative control: the untempered log-probs are measurably different on this model
    assert (_reference_logprobs(module.policy, mb, 1.0) - expected).abs().max() > 1e-2
    # the PPO old log-probs (policy) and the KL's reference log-probs come from the same tempered softmax
    assert_tensors_near(module._logprobs_of(module.policy, mb), expected, VOCAB, relative=False)
    ref_expected = _reference_logprobs(module.reference, mb, 1.3)
    assert_tensors_near(module._logprobs_of(module.reference, mb), ref_expected, VOCAB, relative=False)
    assert (ref_expected - expected).abs().max() > 1e-3
    # entropy of softmax(logits / 1.3) at each completion position
    with torch.no_grad():
        logits = module.policy(input_ids=mb.input_ids).logits[:, :-1].float() / 1.3
    logp = torch.log_softmax(logits, -1)
    hand_entropy = -(logp.exp() * logp).sum(-1) * mb.completion_mask
    assert_tensors_near(entropy, hand_entropy, VOCAB, relative=False, scale=math.log(VOCAB))


def test_greedy_rollouts_train_at_temperature_one(fp32_module):
    mb = _hand_micro_batch(0.0)
    assert_tensors_near(
        fp32_module(mb)[0].detach(), _reference_logprobs(fp32_module.policy, mb, 1.0), VOCAB, relative=False
    )


def _loss_and_grads(module, mb):
    module.policy.zero_grad(set_to_none=True)
    counts = module.step_counts([mb], max_new_tokens=8)
    loss, stats = module.micro_batch_loss(mb, counts)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, stats, counts


def test_truncated_importance_sampling_hand_values():
    module = DashModule(model="tiny-llama", precision="float32", tis_cap=2.0)
    module.configure_model()
    plain = DashModule(model="tiny-llama", precision="float32")
    plain.policy = module.policy  # the same weights, without TIS
    mb = _hand_micro_batch(1.3)
    trainer_lp = _reference_logprobs(module.policy, mb, 1.3)
    # engine log-probs lower than the trainer's by 0.5 (row 0) and higher by 0.25 (row 1): weights
    # min(e^0.5, 2) = 1.6487 and e^-0.25 = 0.7788
    delta = torch.tensor([[0.5], [-0.25]])
    engine = (trainer_lp - delta) * mb.completion_mask
    mb.engine_logprobs = engine
    weights = torch.tensor([math.exp(0.5), math.exp(-0.25)])
    loss_plain, grads_plain, _, counts = _loss_and_grads(plain, mb)
    loss_tis, grads_tis, stats, _ = _loss_and_grads(module, mb)
    # on-policy the per-token loss is -A (ratio 1): sum over tokens of -A_row * w_row / normalizer
    tokens = mb.completion_mask.sum(-1)  # [3, 4]
    hand = float(-(mb.advantages * weights * tokens).sum() / counts["normalizer"])
    assert loss_tis == pytest.approx(hand, rel=1e-5)
    assert loss_plain == pytest.approx(
        float(-(mb.advantages * tokens).sum() / counts["normalizer"]), rel=1e-5
    )
    assert stats["tis_weight_mean"] == pytest.approx(float((weights * tokens).sum() / tokens.sum()), rel=1e-5)
    # the cap binds: a 2-nat gap gives weight 2.0, not e^2
    mb.engine_logprobs = (trainer_lp - 2.0) * mb.completion_mask
    loss_capped, _, _, _ = _loss_and_grads(module, mb)
    assert loss_capped == pytest.approx(
        float(-(mb.advantages * 2.0 * tokens).sum() / counts["normalizer"]), rel=1e-5
    )
    # one weight for every token: the gradient is exactly that multiple of the plain one (weights detached)
    mb.engine_logprobs = (trainer_lp - 0.3) * mb.completion_mask
    _, grads_uniform, _, _ = _loss_and_grads(module, mb)
    # the weight multiplies each token's term before the backward's sums: the same sums, rounded apart
    assert_tensors_near(grads_uniform, {n: g * math.exp(0.3) for n, g in grads_plain.items()}, VOCAB)


def test_tis_off_changes_nothing(fp32_module):
    """tis_cap None: the same loss and gradients whether or not (and whatever) engine log-probs came."""
    module = DashModule(model="tiny-llama", precision="float32")
    module.policy = fp32_module.policy
    without = _hand_micro_batch(1.3)
    loss_a, grads_a, stats_a, _ = _loss_and_grads(module, without)
    with_engine = _hand_micro_batch(1.3, engine_logprobs=[[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0, -7.0]])
    loss_b, grads_b, stats_b, _ = _loss_and_grads(module, with_engine)
    assert loss_a == loss_b
    for name, g in grads_a.items():
        assert torch.equal(grads_b[name], g)
    assert "tis_weight_mean" not in stats_b and stats_b["gap_tokens"] == 7.0  # the gap is still measured


def test_the_ratio_bounds_change_nothing_on_policy_and_bind_on_a_stale_ratio(fp32_module):
    """update dash (old log-probs None): the default log-ratio clamp and dual clip give the loss and the
    gradients bit for bit as with both off. With old log-probs 2 nats below the current ones (ratio
    e^2 = 7.4 > clip_ratio_c = 3), the negative-advantage row's loss is capped: the bounds now matter."""
    bounded = DashModule(model="tiny-llama", precision="float32", update="mini", ppo_mini_batches=2)
    unbounded = DashModule(
        model="tiny-llama", precision="float32", update="mini", ppo_mini_batches=2,
        log_ratio_clamp=None, clip_ratio_c=None,
    )  # fmt: skip
    bounded.policy = unbounded.policy = fp32_module.policy
    mb = _hand_micro_batch(1.3)
    stale = (bounded(mb)[0] - 2.0).detach()

    def loss_and_grads(module, old):
        module.policy.zero_grad(set_to_none=True)
        loss, stats = module.micro_batch_loss(mb, module.step_counts([mb], max_new_tokens=8), old)
        loss.backward()
        return (
            loss.detach(),
            stats,
            [p.grad.clone() for p in module.policy.parameters() if p.grad is not None],
        )

    on_b, stats_b, grads_b = loss_and_grads(bounded, None)
    on_u, _, grads_u = loss_and_grads(unbounded, None)
    assert torch.equal(on_b, on_u) and all(torch.equal(a, b) for a, b in zip(grads_b, grads_u, strict=True))
    assert stats_b["dual_clip_fraction"] == 0.0
    off_b, stats_stale, _ = loss_and_grads(bounded, stale)
    off_u, _, _ = loss_and_grads(unbounded, stale)
    # row 1 (A = -0.5, 4 tokens) of 7: capped at 0.5 x 3 = 1.5 per token instead of 0.5 x e^2 = 3.69
    assert stats_stale["dual_clip_fraction"] == pytest.approx(4 / 7)
    normalizer = 2 * 8  # two completions x max_new_tokens
    assert float(off_u - off_b) == pytest.approx(4 * 0.5 * (math.exp(2.0) - 3.0) / normalizer, rel=1e-5)


def test_tis_without_engine_logprobs_is_refused():
    module = DashModule(model="tiny-llama", precision="float32", tis_cap=2.0)
    module.configure_model()
    with pytest.raises(RunStopped, match="tis_cap needs the engine's log-probs"):
        _loss_and_grads(module, _hand_micro_batch(1.0))


def test_parity_guard_message_and_modes():
    from lit_dash.data.buffer import Rollout

    rollout = Rollout(
        [], [], [], torch.zeros(1), torch.zeros(1), torch.ones(1, dtype=torch.bool), [], 2, 8, temperature=1.3
    )
    strict = DashModule(model="tiny-llama", precision="float32", parity_check="error", parity_threshold=0.05)
    assert strict._check_parity(0.4, 0.2, 10.0, rollout) == {
        "train/engine_logprob_gap": pytest.approx(0.04),
        "train/engine_logprob_gap_max": 0.2,
    }
    with pytest.raises(EngineParityError) as err:
        strict._check_parity(0.6, 0.3, 10.0, rollout)
    message = str(err.value)
    for needed in (
        "0.0600 nats",
        "threshold 0.05",
        "not serving the policy's weights",
        "temperature",
        "1.3",
        "precision",
        "model.parity_check",
        "model.parity_threshold",
    ):
        assert needed in message, needed
    warn = DashModule(model="tiny-llama", precision="float32", parity_threshold=0.05)
    with pytest.warns(UserWarning, match="0.0600 nats"):
        warn._check_parity(0.6, 0.3, 10.0, rollout)
    off = DashModule(model="tiny-llama", precision="float32", parity_check="off", parity_threshold=0.05)
    assert off._check_parity(6.0, 3.0, 10.0, rollout)["train/engine_logprob_gap"] == pytest.approx(0.6)
    assert strict._check_parity(0.0, 0.0, 0.0, rollout) == {}  # no engine log-probs: nothing logged
    assert default_parity_threshold(torch.float32, torch.float32) == 0.02
    assert default_parity_threshold(torch.float32, torch.bfloat16) == 0.1
    assert default_parity_threshold(torch.bfloat16, torch.float32) == 0.1
    assert default_parity_threshold(torch.float32, None) == 0.1
    assert default_parity_threshold(torch.float32, torch.float32, truncated=True) == 0.1  # top-k / top-p
    truncated = Rollout(
        [], [], [], torch.zeros(1), torch.zeros(1), torch.ones(1, dtype=torch.bool), [], 2, 8, top_k=50
    )
    assert truncated.truncated_sampling and not rollout.truncated_sampling
    assert "top_k=50" in DashModule(model="tiny-llama")._parity_message(0.5, 1.0, 10, 0.1, truncated)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"parity_check": "loud"}, "parity_check must be one of"),
        ({"parity_threshold": 0.0}, "parity_threshold must be > 0"),
        ({"tis_cap": -1.0}, "tis_cap must be > 0"),
    ],
)
def test_bad_parity_and_tis_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DashModule(model="tiny-llama", **kwargs)
