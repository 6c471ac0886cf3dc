"""The rollout buffer on the real vLLM engine (tiny model): grouping, advantages, filtering, micro-batches."""

from __future__ import annotations

import pytest
import torch

from lit_dash.advantages import group_advantages, overlong_penalty
from lit_dash.data.buffer import RewardError, RolloutBuffer, pad_micro_batch, slice_rows
from lit_dash.data.records import Problem
from lit_dash.engines import SamplingConfig
from lit_dash.engines.base import Completion

PROBLEMS = [Problem(question=f"What is {i} + 1?", answer=str(i + 1), source_id=f"t:{i}") for i in range(4)]
PROMPTS = [p.question for p in PROBLEMS]


def parity_reward(completions, problems):
    """Deterministic given the text: 1.0 when the completion has an even number of characters."""
    return [float(len(c) % 2 == 0) for c in completions]


def _buffer(engine, **kw):
    defaults = dict(
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=12), group_size=4, micro_batch_size=3
    )
    defaults.update(kw)
    return RolloutBuffer(engine=engine, **defaults)


def test_rollout_groups_advantages_and_filtering(tiny_engine):
    rollout = _buffer(tiny_engine, filter_threshold=0.1).collect(PROBLEMS, PROMPTS, parity_reward)
    assert len(rollout.completions) == 16
    assert [c.prompt_index for c in rollout.completions] == [i for i in range(4) for _ in range(4)]
    expected_rewards = torch.tensor(parity_reward([c.text for c in rollout.completions], None))
    torch.testing.assert_close(rollout.rewards, expected_rewards)
    for g in range(4):
        r = rollout.rewards[4 * g : 4 * g + 4]
        a = rollout.advantages[4 * g : 4 * g + 4]
        if r.max() == r.min():
            assert torch.all(a == 0) and not rollout.kept[4 * g : 4 * g + 4].any()
        else:
            torch.testing.assert_close(a, (r - r.mean()) / (r.std() + 1e-4))
            assert rollout.kept[4 * g : 4 * g + 4].all()
    kept_rows = sorted(row for mb in rollout.micro_batches for row in mb.rows)
    assert kept_rows == rollout.kept.nonzero().flatten().tolist()
    assert all(mb.num_completions <= 3 for mb in rollout.micro_batches)


def test_micro_batch_masks_line_up_with_completion_tokens(tiny_engine):
    rollout = _buffer(tiny_engine, filter_threshold=None).collect(PROBLEMS, PROMPTS, parity_reward)
    widths = [mb.input_ids.shape[1] for mb in rollout.micro_batches]
    assert widths == sorted(widths), "micro-batches are length-sorted"
    for mb in rollout.micro_batches:
        for i, row in enumerate(mb.rows):
            completion = rollout.completions[row].token_ids
            positions = mb.completion_mask[i].nonzero().flatten()
            assert len(positions) == len(completion)
            # mask position t predicts token t+1 of the sequence: those tokens are exactly the completion
            assert mb.input_ids[i, positions + 1].tolist() == completion
            assert float(mb.advantages[i]) == float(rollout.advantages[row])
            # the engine's log-prob of each completion token sits on the position that predicts it
            engine_lp = rollout.completions[row].logprobs
            assert len(engine_lp) == len(completion)
            assert mb.engine_logprobs[i, positions].tolist() == pytest.approx(engine_lp, abs=1e-6)
            assert float(mb.engine_logprobs[i].abs().sum()) == pytest.approx(
                sum(-lp for lp in engine_lp), rel=1e-5
            )
        assert mb.temperature == rollout.temperature == 1.0


def test_pad_micro_batch_lays_engine_logprobs_on_the_completion_mask():
    mb = pad_micro_batch(
        [([1, 2], [3, 4, 5]), ([1], [6])], 0, torch.zeros(2), [0, 1], 0.7, [[-0.1, -0.2, -0.3], [-0.4]]
    )
    # row 0: 5 tokens, completion predicted from positions 1..3; row 1: 2 tokens, position 0
    assert mb.completion_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    expected = torch.tensor([[0, -0.1, -0.2, -0.3], [-0.4, 0, 0, 0]])
    torch.testing.assert_close(mb.engine_logprobs, expected)
    assert mb.temperature == 0.7
    assert pad_micro_batch([([1], [2])], 0, torch.zeros(1), [0]).engine_logprobs is None
    with pytest.raises(ValueError, match="2 tokens but 1 engine log-probs"):
        pad_micro_batch([([1], [2, 3])], 0, torch.zeros(1), [0], engine_logprobs=[[-0.5]])


def test_nothing_survives_when_every_group_is_constant(tiny_engine):
    rollout = _buffer(tiny_engine, filter_threshold=0.1).collect(
        PROBLEMS, PROMPTS, lambda c, p: [1.0] * len(c)
    )
    assert rollout.num_kept == 0 and rollout.micro_batches == []
    stats = rollout.stats()
    assert stats["kept_fraction"] == 0.0 and stats["zero_variance_group_fraction"] == 1.0
    # the parity probe: one micro-batch (3 completions) of what was dropped, with the engine's log-probs
    probe = rollout.parity_probe
    assert probe is not None and probe.num_completions == 3 and probe.engine_logprobs is not None
    assert probe.engine_logprobs[probe.completion_mask == 0].abs().sum() == 0
    kept = _buffer(tiny_engine, filter_threshold=None).collect(PROBLEMS, PROMPTS, parity_reward)
    assert kept.parity_probe is None  # a step that trains measures the gap on its own forward


def test_per_micro_batch_mode_makes_one_engine_call_per_micro_batch(tiny_engine):
    rollout = _buffer(
        tiny_engine, rollout_mode="per_micro_batch", micro_batch_size=8, filter_threshold=None
    ).collect(PROBLEMS, PROMPTS, parity_reward)
    assert rollout.engine_calls == 2  # 16 completions, 8 per call, whole groups of 4
    assert [c.prompt_index for c in rollout.completions] == [i for i in range(4) for _ in range(4)]


def test_token_budget_caps_padded_tokens(tiny_engine):
    rollout = _buffer(
        tiny_engine, filter_threshold=None, micro_batch_size=16, max_tokens_per_micro_batch=40
    ).collect(PROBLEMS, PROMPTS, parity_reward)
    for mb in rollout.micro_batches:
        assert mb.input_ids.numel() <= 40 or mb.num_completions == 1


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda c, p: [1.0], "returned 1 values for 16"),
        (lambda c, p: [float("nan")] * len(c), "returned nan for completion 0 "),
        (lambda c, p: [1 / 0], "raised ZeroDivisionError: division by zero on completion 0 "),
    ],
)
def test_bad_rewards_stop_with_a_message(tiny_engine, bad, match):
    with pytest.raises(RewardError, match=match):
        _buffer(tiny_engine).collect(PROBLEMS, PROMPTS, bad)


# three groups of 4: constant; [0, .5, .5, 1] (middle two A = 0); [0, 0, 0, 1], whose negatives sit at
# |r - mean| / (std + 1e-4) = .25 / .5001 = 0.49990 group stds and the positive at 1.49970
CRAFTED = [1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0, 1.0]


def crafted_reward(completions, problems):
    return CRAFTED[: len(completions)]


@pytest.mark.parametrize("scale_rewards", [True, False])
@pytest.mark.parametrize("threshold, third_group", [(0.4995, [8, 9, 10, 11]), (0.5, [11])])
def test_exactly_the_rows_above_the_threshold_reach_the_micro_batches(
    tiny_engine, scale_rewards, threshold, third_group
):
    """The threshold is in group-std units: scaled or not, the same rows are kept, and only those."""
    rollout = _buffer(tiny_engine, filter_threshold=threshold, scale_rewards=scale_rewards).collect(
        PROBLEMS[:3], PROMPTS[:3], crafted_reward
    )
    expected = [4, 7, *third_group]
    assert sorted(row for mb in rollout.micro_batches for row in mb.rows) == expected
    assert rollout.kept.nonzero().flatten().tolist() == expected
    raw = torch.tensor(CRAFTED) - torch.tensor([1.0] * 4 + [0.5] * 4 + [0.25] * 4)
    for mb in rollout.micro_batches:  # the loss sees the advantages the scaling asked for
        for i, row in enumerate(mb.rows):
            want = float(rollout.advantages[row])
            assert float(mb.advantages[i]) == want
            assert (want == float(raw[row])) == (not scale_rewards)
    assert rollout.sampled_completions == 12  # the pre-filter counts stay with the rollout
    assert rollout.sampled_tokens == sum(len(c.token_ids) for c in rollout.completions)


def test_slice_rows_by_hand():
    """Contiguous runs in the order given, sizes differing by at most one, empty runs when rows are few."""
    assert slice_rows([0, 1, 2, 3, 4, 5, 6], 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert slice_rows([9, 2, 7, 4], 2) == [[9, 2], [7, 4]]  # the order given, never sorted
    assert slice_rows([5, 8], 4) == [[], [5], [], [8]]
    assert slice_rows([], 2) == [[], []]


def test_slices_are_runs_of_the_kept_rows_in_rollout_order(tiny_engine):
    """update=mini: S slices of the kept rows in rollout order (never by length), sizes differing by at
    most one, each in micro-batches."""
    rollout = _buffer(tiny_engine, filter_threshold=None, slices=6).collect(PROBLEMS, PROMPTS, parity_reward)
    assert rollout.slice_sizes == [1] * 6  # 16 rows -> 2, 3, 3, 2, 3, 3 rows; each fits one micro-batch of 3
    per_slice = [sorted(mb.rows) for mb in rollout.micro_batches]
    assert per_slice == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12], [13, 14, 15]]
    two = _buffer(tiny_engine, filter_threshold=None, slices=2).collect(PROBLEMS, PROMPTS, parity_reward)
    assert two.slice_sizes == [3, 3]  # 8 rows per slice, micro-batches of at most 3
    assert sorted(r for mb in two.micro_batches[:3] for r in mb.rows) == list(range(8))
    few = _buffer(tiny_engine, filter_threshold=0.1, slices=6).collect(
        PROBLEMS, PROMPTS, lambda c, p: [0.0, 0.0, 0.0, 1.0] + [0.0] * (len(c) - 4)
    )
    assert few.slice_sizes == [0, 1, 1, 0, 1, 1]  # 4 kept rows over 6 slices: two are empty


# ---- DAPO dynamic sampling --------------------------------------------------------------------------


def _first_of_group_reward(group_size):
    """Problems whose id ends in an odd number get [1, 0, ..., 0] per group (informative); the others
    score 0 everywhere (a constant group the filter drops whole)."""

    def reward(completions, problems):
        return [
            float(int(p.source_id.split(":")[1]) % 2 == 1 and k % group_size == 0)
            for k, p in enumerate(problems)
        ]

    return reward


class _RefillSource:
    def __init__(self):
        self.problems = [
            Problem(question=f"What is {i} + 2?", answer=str(i + 2), source_id=f"r:{i}") for i in range(40)
        ]
        self.taken = 0

    def __call__(self, n):
        batch = self.problems[self.taken : self.taken + n]
        self.taken += n
        return batch, [p.question for p in batch]


def test_dynamic_sampling_refills_the_rollout_with_informative_groups(tiny_engine):
    refill = _RefillSource()
    rollout = _buffer(tiny_engine, filter_threshold=0.1, dynamic_sampling_calls=3).collect(
        PROBLEMS, PROMPTS, _first_of_group_reward(4), refill=refill
    )
    # first call: t:1 and t:3 informative, 2 missing at a rate of 1/2 per prompt -> one extra call on
    # 4 prompts, of which r:1 and r:3 are informative: the target of 4 groups is reached, no second call
    assert rollout.refill_engine_calls == 1 and rollout.engine_calls == 2
    assert rollout.refill_prompts == 4 and refill.taken == 4
    assert [p.source_id for p in rollout.problems] == ["t:1", "t:3", "r:1", "r:3"]
    assert len(rollout.completions) == 16 and len(rollout.prompt_token_ids) == 4
    assert [c.prompt_index for c in rollout.completions] == [i for i in range(4) for _ in range(4)]
    assert rollout.rewards.tolist() == [1.0, 0.0, 0.0, 0.0] * 4
    assert rollout.num_kept == 16  # every group informative: the filter keeps all (|A| = 1.5 or 0.5)
    # each kept completion's prompt ids are its own problem's (the refilled groups were re-indexed)
    for c in rollout.completions:
        text = tiny_engine.tokenizer.decode(rollout.prompt_token_ids[c.prompt_index])
        assert rollout.problems[c.prompt_index].question in text
    stats = rollout.stats()
    assert stats["refill_engine_calls"] == 1.0 and stats["refill_prompts"] == 4.0
    assert stats["first_call_reward_mean"] == 2 / 16 and stats["reward_mean"] == 4 / 16
    # negative control: the same rollout without dynamic sampling trains on 2 informative groups of 4
    plain = _buffer(tiny_engine, filter_threshold=0.1).collect(
        PROBLEMS, PROMPTS, _first_of_group_reward(4), refill=_RefillSource()
    )
    assert plain.num_kept == 8 and plain.refill_engine_calls == 0 and plain.engine_calls == 1


def test_dynamic_sampling_stops_at_its_cap_and_keeps_the_rollout_size(tiny_engine):
    refill = _RefillSource()
    rollout = _buffer(tiny_engine, filter_threshold=0.1, dynamic_sampling_calls=2).collect(
        PROBLEMS, PROMPTS, lambda c, p: [0.0] * len(c), refill=refill
    )
    # nothing is ever informative: two extra calls of P = 4 prompts each, then the cap stops it and the
    # first call's groups stand, so the rollout still holds P x G completions (the denominators' count)
    assert rollout.refill_engine_calls == 2 and rollout.engine_calls == 3 and refill.taken == 8
    assert [p.source_id for p in rollout.problems] == ["t:0", "t:1", "t:2", "t:3"]
    assert len(rollout.completions) == 16 and rollout.num_kept == 0 and rollout.micro_batches == []
    assert rollout.parity_probe is not None


def test_the_math_rewards_timeouts_and_restarts_are_the_steps_own(tiny_engine, monkeypatch):
    """Counted in the step's reward calls, logged through Rollout.stats as train/reward_*, warned once."""
    from lit_dash.rewards import math_rewards, warm_up_reward_workers
    from lit_dash.rewards import verifier as reward_module

    monkeypatch.setattr(reward_module, "_SOFT_FRACTION", 100.0)  # only the hard kill stops it: 1 restart
    warm_up_reward_workers()

    def one_hangs(completions, problems):
        texts = ["\\boxed{9^{9^{9^{9^9}}}}"] + ["so \\boxed{5}"] * (len(completions) - 1)
        return math_rewards(texts, ["5"] * len(completions), timeout_s=0.5)

    buffer = _buffer(tiny_engine)
    with pytest.warns(UserWarning, match=r"1 of the 16 completions .* \(6%, above 5%\)"):
        rollout = buffer.collect(PROBLEMS, PROMPTS, one_hangs)
    assert rollout.rewards.tolist() == [0.0] + [1.0] * 15
    stats = rollout.stats()
    assert (stats["reward_timeouts"], stats["reward_worker_restarts"]) == (1.0, 1.0)
    monkeypatch.undo()
    warm_up_reward_workers()
    stats = buffer.collect(PROBLEMS, PROMPTS, parity_reward).stats()  # a step without the math reward
    assert (stats["reward_timeouts"], stats["reward_worker_restarts"]) == (0.0, 0.0)  # per step


# ---- truncated completions (data.truncated) -------------------------------------------------------------

# two groups of G = 4, max_new_tokens 10: lengths and rewards by hand, "T" = cut off at 10 tokens
HAND_LENGTHS = [3, 10, 7, 10, 4, 4, 8, 2]
HAND_TRUNCATED = [False, True, False, True, False, False, False, False]
HAND_REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # group 1 is uniform: all right


def _hand_rollout(truncated: str = "keep", lengths=HAND_LENGTHS, **kw):
    completions = [
        Completion(prompt_index=i // 4, text="x", token_ids=[5] * n, logprobs=[], truncated=cut)
        for i, (n, cut) in enumerate(zip(lengths, HAND_TRUNCATED, strict=True))
    ]
    buffer = RolloutBuffer(
        engine=None,  # assemble scores nothing and samples nothing: the rewards are given
        sampling=SamplingConfig(max_new_tokens=10),
        group_size=4,
        micro_batch_size=8,
        truncated=truncated,
        **kw,
    )
    problems = PROBLEMS[:2]
    return buffer.assemble(problems, [[1, 2], [1, 3]], completions, None, rewards=torch.tensor(HAND_REWARDS))


def test_overlong_penalty_by_hand():
    # L = 10, buffer 4: 0 up to 6 tokens, then -1/4 per token to -1 at 10
    lengths = torch.tensor([0, 6, 7, 8, 10])
    assert overlong_penalty(lengths, 10, 4).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(lengths, 10, 10).tolist() == pytest.approx([0.0, -0.6, -0.7, -0.8, -1.0])
    for bad in (0, 11):
        with pytest.raises(ValueError, match="overlong buffer must be 1..max_new_tokens"):
            overlong_penalty(lengths, 10, bad)


def test_truncated_keep_trains_on_cut_off_completions():
    rollout = _hand_rollout("keep")
    # group 0: [1, 0, 1, 0], mean .5, unbiased std .57735: A = +-.866; group 1 uniform: dropped
    assert rollout.kept.tolist() == [True] * 4 + [False] * 4
    assert rollout.advantages[:4].tolist() == pytest.approx([0.8659, -0.8659, 0.8659, -0.8659], abs=1e-4)
    assert rollout.sampled_completions == 8 and rollout.sampled_tokens == 48
    assert rollout.stats()["truncated_fraction"] == 0.25


def test_truncated_mask_leaves_cut_off_completions_out_of_the_loss_and_its_denominators():
    keep, mask = _hand_rollout("keep"), _hand_rollout("mask")
    assert mask.kept.tolist() == [True, False, True, False] + [False] * 4
    assert sorted(r for mb in mask.micro_batches for r in mb.rows) == [0, 2]
    # the cut-off rows still count in their group's mean and std (as TRL's): the advantages are keep's
    assert torch.equal(mask.advantages, keep.advantages)
    assert mask.sampled_completions == 6 and mask.sampled_tokens == 48 - 20
    assert mask.counted_completions == 6.0


def test_truncated_penalty_shapes_the_rewards_before_advantages():
    rollout = _hand_rollout("penalty", overlong_buffer_tokens=5)
    # L = 10, buffer 5: penalties 0, -1, -.4, -1 | 0, 0, -.6, 0
    penalties = [0.0, -1.0, -0.4, -1.0, 0.0, 0.0, -0.6, 0.0]
    assert rollout.overlong_penalties.tolist() == pytest.approx(penalties)
    assert rollout.rewards.tolist() == HAND_REWARDS  # the rewards (and accuracy) stay the answers' own
    shaped = torch.tensor(HAND_REWARDS) + torch.tensor(penalties)
    torch.testing.assert_close(rollout.advantages, group_advantages(shaped, 4))
    # group 1, [1, 1, .4, 1]: mean .85, std .3, so the 8-token answer gets -.45 / .3001
    assert float(rollout.advantages[6]) == pytest.approx(-0.45 / 0.3001, rel=1e-4)
    assert rollout.kept.all()  # group 1 is no longer uniform
    assert rollout.stats()["overlong_penalty_mean"] == pytest.approx(-3.0 / 8)
    # the default buffer, 10 / 5 = 2 tokens: only the cut-off completions are penalised
    assert _hand_rollout("penalty").overlong_penalties.tolist() == [0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0]


def test_bad_truncated_settings_are_refused():
    with pytest.raises(ValueError, match="truncated must be one of"):
        _hand_rollout("drop")
    with pytest.raises(ValueError, match="overlong_buffer_tokens must be 1..10"):
        _hand_rollout("penalty", overlong_buffer_tokens=11)


def test_train_dropped_micro_batches_the_dropped_completions_at_advantage_zero():
    """model.kl_over: sampled: group 1 (uniform, dropped) is trained for its KL term, at advantage 0."""
    plain, both = _hand_rollout(), _hand_rollout(train_dropped=True)
    assert torch.equal(both.kept, plain.kept) and torch.equal(both.advantages, plain.advantages)
    assert sorted(r for mb in plain.micro_batches for r in mb.rows) == [0, 1, 2, 3]
    rows = {r: float(mb.advantages[i]) for mb in both.micro_batches for i, r in enumerate(mb.rows)}
    assert sorted(rows) == list(range(8))
    assert [rows[r] for r in range(8)] == [float(a) for a in plain.advantages[:4]] + [0.0] * 4


def test_kept_completions_without_tokens_leave_nothing_to_train():
    """Completions of zero tokens are never kept: a step whose kept rows were all empty is the explicit
    no-op step (no micro-batch), not a 0 / 0 loss the non-finite guard has to catch."""
    empty_winners = [0, 10, 0, 10, 4, 4, 8, 2]  # group 0's right answers have no tokens
    rollout = _hand_rollout(lengths=empty_winners)
    assert rollout.kept.tolist() == [False, True, False, True] + [False] * 4
    all_empty = _hand_rollout(lengths=[0] * 8)
    assert not all_empty.kept.any() and all_empty.micro_batches == [] and all_empty.slice_sizes == [0]
    assert _hand_rollout().kept[:4].all()  # the control: with tokens, group 0 is kept


def test_mini_slices_follow_the_rollout_not_the_lengths():
    """Two slices of the hand rollout's 8 completions (lengths 3, 10, 7, 10 | 4, 4, 8, 2): prompt 0's group,
    then prompt 1's. Cut by length (as the buffer once did), slice 0 would be the four shortest."""
    rollout = _hand_rollout(filter_threshold=None, slices=2)
    assert rollout.slice_sizes == [1, 1]
    assert [sorted(mb.rows) for mb in rollout.micro_batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    by_length = slice_rows(sorted(range(8), key=lambda r: HAND_LENGTHS[r]), 2)
    assert [sorted(part) for part in by_length] == [[0, 4, 5, 7], [1, 2, 3, 6]]  # the control differs
