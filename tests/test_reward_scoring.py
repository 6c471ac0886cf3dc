"""A broken reward stops the run with a message naming the reward and the sample (no engine needed)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dash.data.records import Problem
from lit_dash.module import DashModule
from lit_dash.rewards.scoring import RewardError, reward_name, score_completions

TEXTS = ["The answer is 4.", "", "so \\boxed{7}", "I think 12", "x" * 200, "ok 5", "hmm", "fine 9"]
PROBLEMS = [Problem(question=f"q{i}", answer=str(i), source_id=f"toy.jsonl:{i + 1}") for i in range(8)]


class WordRatioModule(DashModule):
    def reward(self, completions, problems):
        return [1.0 / len(c.split()) for c in completions]  # ZeroDivisionError on the empty completion


def per_prompt(completions, problems):
    return [0.0] * (len(completions) // 4)


def test_reward_names_say_class_and_method():
    module = WordRatioModule(model="tiny-llama")
    assert reward_name(module.reward) == f"{__name__}.WordRatioModule.reward"
    assert reward_name(per_prompt) == f"{__name__}.per_prompt"


def test_a_raising_reward_names_the_failing_completion():
    module = WordRatioModule(model="tiny-llama")
    with pytest.raises(RewardError) as info:
        score_completions(module.reward, TEXTS, PROBLEMS)
    assert str(info.value) == (
        f"reward {__name__}.WordRatioModule.reward raised ZeroDivisionError: float division by zero on "
        "completion 1 (problem 'toy.jsonl:2', text starts ''); fix the reward, or make it score such "
        "completions 0.0"
    )
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # the user's traceback is kept


def test_the_failing_completion_is_found_anywhere_in_the_batch():
    calls = []

    def no_boxes(completions, problems):
        calls.append(len(completions))
        if any("boxed" in c for c in completions):
            raise KeyError("no judge for boxed answers")
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"raised KeyError: 'no judge for boxed answers' on completion 2 "):
        score_completions(no_boxes, TEXTS, PROBLEMS)
    assert len(calls) <= 1 + 2 * math.ceil(math.log2(len(TEXTS)))  # bisection, not one call per sample


def test_a_failure_that_needs_the_whole_batch_says_so():
    def needs_eight(completions, problems):
        if len(completions) == 8:
            raise RuntimeError("batch too large for the judge")
        return [0.0] * len(completions)

    with pytest.raises(
        RewardError, match="on a batch of 8 completions \\(no single completion makes it raise"
    ):
        score_completions(needs_eight, TEXTS, PROBLEMS)


@pytest.mark.parametrize(
    "values, match",
    [
        ([0.0, 1.0], r"returned 2 values for 8 completions; it must return one float per completion"),
        (None, r"returned a NoneType, expected a sequence of 8 floats"),
        (3.0, r"returned a float, expected a sequence of 8 floats"),
        (
            [0.0, 0.0, math.nan] + [0.0] * 5,
            r"returned nan for completion 2 \(problem 'toy.jsonl:3'.*1 of 8 were not",
        ),
        ([0.0] * 4 + [math.inf] * 4, r"returned inf for completion 4 .*'xxxxxxxx.*4 of 8 were not\)"),
        ([0.0, None] + [0.0] * 6, r"returned None \(a NoneType, not a number\) for completion 1"),
        (["1.0"] * 8, r"returned '1.0' \(a str, not a number\) for completion 0"),
        (torch.zeros(8, 2), r"\(a Tensor, not a number\) for completion 0"),
    ],
)
def test_unusable_values_are_refused_with_the_sample(values, match):
    with pytest.raises(RewardError, match=match):
        score_completions(lambda c, p: values, TEXTS, PROBLEMS)


def test_a_wrong_count_from_a_per_prompt_reward_names_it():
    with pytest.raises(
        RewardError, match=rf"reward {__name__}.per_prompt returned 2 values for 8 completions"
    ):
        score_completions(per_prompt, TEXTS, PROBLEMS)


def test_good_rewards_become_a_float_tensor():
    values = [True, 0, 1, 0.5, torch.tensor(2.0), -1, 0, 3]
    out = score_completions(lambda c, p: values, TEXTS, PROBLEMS)
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 0.0, 1.0, 0.5, 2.0, -1.0, 0.0, 3.0]
