"""The reward audit: which rewarded answers restate the question or leave arithmetic undone, and the two
warnings (hack fractions; training reward up while the strict held-out accuracy stays flat).

The rollouts here are real :class:`Rollout` objects whose completions are the two kinds a policy writes
(honest answers and the hack the fp32 demo collapsed into), scored by the real math reward, lenient
(``require_final_form=False``, which CAN be gamed) and strict (the default, the negative control).
The hooks themselves run in a real fit in tests/test_tensorboard.py and tests/test_independent_check.py.
"""

from __future__ import annotations

import pytest
import torch

from lit_dash.callbacks.reward_audit import (
    RewardAudit,
    audit_rollout,
    format_rows,
    pick_samples,
    restates_question,
)
from lit_dash.data.buffer import Rollout
from lit_dash.data.records import Problem
from lit_dash.engines.base import Completion
from lit_dash.evaluation import EvalResult
from lit_dash.rewards import math_rewards

Q = "What is 23 + 73?"

RESTATED = [  # (answer, question, reference)
    ("23 + 73", Q, "96"),
    ("73+23", Q, "96"),
    ("(23)+(73)", Q, "96"),
    ("23 \\times 73", Q, "96"),
    ("\\left(23 + 73\\right)", Q, "96"),
    ("$23 + 73$", Q, "96"),
    ("23 + 23", Q, "96"),  # every number from the question, repeats allowed
    ("73", Q, "96"),  # a copied number that is not the answer
    ("-23", Q, "96"),
    ("23.0", Q, "96"),
    ("48/2 + 48", "What is 48 / 2 + 48?", "72"),
    ("2^{10}", "What is 2^{10}?", "1024"),
]
NOT_RESTATED = [
    ("96", Q, "96"),
    ("96.", Q, "96"),
    ("23 + 73 = 96", Q, "96"),  # an equation commits to its right-hand side, a new number
    ("23 + 73 + 1", Q, "96"),  # 1 is not in the question
    ("\\frac{23}{73}", "What is 23 / 73?", "\\frac{23}{73}"),  # a lone integer fraction is final
    ("23/73", "What is 23 / 73?", "\\frac{23}{73}"),
    ("x + 23", Q, "96"),  # a variable: an expression, not restated arithmetic
    ("5", "What is 0 + 5?", "5"),  # a question number that IS the answer
    ("1,000", "What is 1,000 + 0?", "1000"),
    ("23+", Q, "96"),  # one number: nothing restated
    (None, Q, "96"),
    ("", Q, "96"),
]


@pytest.mark.parametrize("answer,question,reference", RESTATED)
def test_restated_answers(answer, question, reference):
    assert restates_question(answer, question, reference)


@pytest.mark.parametrize("answer,question,reference", NOT_RESTATED)
def test_answers_that_do_not_restate_the_question(answer, question, reference):
    assert not restates_question(answer, question, reference)


PROBLEMS = [
    Problem(question="What is 23 + 73?", answer="96", source_id="a:0"),
    Problem(question="What is 51 + 12?", answer="63", source_id="a:1"),
]
GROUPS = [  # 4 completions per problem: two hacks, one honest answer, one wrong
    [
        "\\boxed{23 + 73}",
        "The sum is \\boxed{73 + 23}.",
        "23 + 73 = 96. The answer is \\boxed{96}.",
        "\\boxed{95}",
    ],
    ["\\boxed{51 + 12}", "\\boxed{63}", "51 + 12 = 63, so \\boxed{63}", "I think \\boxed{12}"],
]


def _rollout(reward_fn) -> Rollout:
    texts = [t for group in GROUPS for t in group]
    index = [i for i, group in enumerate(GROUPS) for _ in group]
    completions = [Completion(i, t, [1, 2, 3], [], False) for i, t in zip(index, texts, strict=True)]
    rewards = torch.tensor(reward_fn(texts, [PROBLEMS[i].answer for i in index]), dtype=torch.float32)
    return Rollout(
        problems=PROBLEMS,
        prompt_token_ids=[[1, 2]] * len(PROBLEMS),
        completions=completions,
        rewards=rewards,
        advantages=torch.zeros(len(texts)),
        kept=torch.ones(len(texts), dtype=torch.bool),
        micro_batches=[],
        group_size=4,
        max_new_tokens=64,
    )


def lenient(texts, refs):
    return math_rewards(texts, refs, require_final_form=False)


def strict(texts, refs):
    return math_rewards(texts, refs)


def test_a_gameable_reward_shows_up_in_the_audit_and_warns():
    rollout = _rollout(lenient)
    assert rollout.rewards.tolist() == [1, 1, 1, 0, 1, 1, 1, 0]  # the lenient reward pays all three hacks
    audit = audit_rollout(rollout)
    assert audit["num_rewarded"] == 6
    m = audit["metrics"]
    assert m["audit/rewarded_fraction"] == pytest.approx(6 / 8)
    assert m["audit/unevaluated_fraction"] == pytest.approx(3 / 6)  # 23 + 73, 73 + 23, 51 + 12
    assert m["audit/restated_fraction"] == pytest.approx(3 / 6)
    hacks = [r for r in audit["rewarded"] if r["verdict"] == "unevaluated"]
    assert {r["extracted"] for r in hacks} == {"23 + 73", "73 + 23", "51 + 12"}
    assert all(r["restated"] for r in hacks)

    callback = RewardAudit(min_rewarded=4)
    message = callback.check_hack_fractions(7, audit)
    assert message is not None
    assert "step 7" in message and "6 completions" in message and "50% are unevaluated" in message
    assert "require_final_form" in message and "What is 23 + 73?" in message
    assert callback.check_hack_fractions(8, audit) is None  # once per run

    shown = pick_samples(audit["rewarded"], 3)  # the hacks first, one per question before a repeat
    assert [r["extracted"] for r in shown] == ["23 + 73", "51 + 12", "73 + 23"]
    text = format_rows(shown)
    assert text.count("**question**") == 3 and text.count("**verdict** unevaluated") == 3
    assert "restates the question" in text and "**reference** 63" in text


def test_the_strict_reward_pays_no_hack_and_the_audit_stays_quiet():
    rollout = _rollout(strict)
    assert rollout.rewards.tolist() == [0, 0, 1, 0, 0, 1, 1, 0]
    audit = audit_rollout(rollout)
    assert audit["metrics"]["audit/unevaluated_fraction"] == 0.0
    assert audit["metrics"]["audit/restated_fraction"] == 0.0
    assert {r["verdict"] for r in audit["rewarded"]} == {"correct"}
    assert RewardAudit(min_rewarded=1).check_hack_fractions(1, audit) is None


def test_a_custom_reward_that_pays_copied_numbers_is_restated_not_unevaluated():
    def pays_question_numbers(texts, refs):  # pays any boxed number that appears in the question
        return [float(any(n in t for n in ("\\boxed{23}", "\\boxed{73}", "\\boxed{12}"))) for t in texts]

    audit = audit_rollout(_rollout(pays_question_numbers))
    assert audit["num_rewarded"] == 1  # "I think \boxed{12}"
    assert audit["metrics"]["audit/restated_fraction"] == 1.0
    assert audit["metrics"]["audit/unevaluated_fraction"] == 0.0
    assert audit["rewarded"][0]["verdict"] == "wrong"


def test_nothing_rewarded_logs_only_the_rewarded_fraction():
    audit = audit_rollout(_rollout(lambda texts, refs: [0.0] * len(texts)))
    assert audit["metrics"] == {"audit/rewarded_fraction": 0.0}


def _eval(step, correct, accuracy):
    return step, EvalResult("arithmetic", 100, accuracy, 20.0, 1.0, 0.0, 100.0, 0.0, correct)


def test_reward_up_while_strict_accuracy_is_flat_warns_once():
    callback = RewardAudit(reward_window=3, reward_rise=0.2, eval_rise=0.05)
    # the lenient held-out accuracy rose with the reward; the strict one (verdict correct) did not
    history = [_eval(0, 0.13, 0.13), _eval(4, 0.14, 0.70), _eval(8, 0.15, 1.0)]
    callback.reward_means = [0.1, 0.15, 0.2, 0.5]
    assert callback.check_divergence(history) is None  # fewer than 2 x 3 steps
    callback.reward_means = [0.1, 0.15, 0.2, 0.6, 0.8, 0.9]
    assert callback.check_divergence(history[:1]) is None  # one evaluation: nothing to compare
    message = callback.check_divergence(history)
    assert message is not None
    assert "0.15" in message and "0.77" in message  # the two reward means
    assert "13.0% (step 0) -> 15.0% (step 8)" in message and "require_final_form" in message
    assert callback.check_divergence(history) is None  # once per run


@pytest.mark.parametrize(
    "rewards,strict_accuracy",
    [
        ([0.1, 0.15, 0.2, 0.6, 0.8, 0.9], (0.13, 0.40)),  # the reward rose and so did the strict accuracy
        ([0.5, 0.5, 0.6, 0.6, 0.6, 0.65], (0.13, 0.13)),  # the reward barely moved
    ],
)
def test_no_divergence_warning_when_the_rule_does_not_hold(rewards, strict_accuracy):
    callback = RewardAudit()
    callback.reward_means = rewards
    history = [_eval(0, strict_accuracy[0], 0.1), _eval(8, strict_accuracy[1], 0.9)]
    assert callback.check_divergence(history) is None


def test_state_survives_a_checkpoint():
    a = RewardAudit()
    a.reward_means, a.warned_hack = [0.1, 0.2], True
    b = RewardAudit()
    b.load_state_dict(a.state_dict())
    assert b.reward_means == [0.1, 0.2] and b.warned_hack and not b.warned_divergence
