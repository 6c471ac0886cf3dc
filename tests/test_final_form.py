"""The strict rule: an answer must be in final form, not arithmetic left for the verifier to do.

The completions below are of the two kinds a policy under RL writes: genuine answers, and the reward hack
the fp32 demo collapsed into (restating the question inside the box, which math_verify evaluates to the
reference). Every hack listed in the issue that found it is here.
"""

from __future__ import annotations

import pytest

from lit_dash.rewards import math_rewards, math_verdicts
from lit_dash.rewards.math import CORRECT, NO_ANSWER, UNEVALUATED, WRONG, math_reward

# (completion as the 135M model wrote it, reference)
HACKS = [
    ("\\boxed{23 + 73}", "96"),
    ("The sum of 75 and 83 is \\boxed{75 + 83}.", "158"),
    ("To add, we compute \\boxed{51 + 12}", "63"),
    ("\\boxed{100 - 4}", "96"),
    ("\\boxed{20 \\times 4 + 16}", "96"),
    ("\\boxed{48/2 + 48}", "72"),
    ("\\boxed{\\frac{48}{2}+48}", "72"),
    ("\\boxed{4 \\cdot 24}", "96"),
    ("\\boxed{2^{10}}", "1024"),
    ("\\boxed{1 + 2 + \\sqrt{3}}", "3 + \\sqrt{3}"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
]
GENUINE = [
    ("51 + 12 = 63. The answer is \\boxed{63}.", "63"),
    ("\\boxed{96}", "96"),
    ("\\boxed{23 + 73 = 96}", "96"),  # an equation commits to its right-hand side, like x = 5
    ("\\boxed{-4}", "-4"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{\\$18}", "18"),
    ("\\boxed{18.00}", "18"),
    ("\\boxed{10\\text{ cm}}", "10"),
    ("\\boxed{50\\%}", "0.5"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("\\boxed{\\dfrac{6}{8}}", "\\frac{3}{4}"),  # a simple fraction is final, reduced or not
    ("\\boxed{3/4}", "\\frac34"),
    ("\\boxed{-\\frac{1}{2}}", "-\\frac12"),
    # MATH references that are expressions still match their equivalents
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\sqrt{3}/2}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{x^2+1}", "x^2+1"),
    ("\\boxed{1+x^2}", "x^2+1"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac{1}{2}\\pi"),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{2^{10}}", "2^{10}"),  # no more arithmetic than the reference itself leaves
    ("\\boxed{3 + \\sqrt{3}}", "3 + \\sqrt{3}"),
]


@pytest.mark.parametrize(("completion", "reference"), HACKS)
def test_unevaluated_expression_scores_zero_yet_is_equal(completion, reference):
    assert math_reward(completion, reference) == 0.0
    assert math_verdicts([completion], [reference]) == [UNEVALUATED]
    # the lenient knob restores math_verify's equivalence, which pays the hack
    assert math_reward(completion, reference, require_final_form=False) == 1.0


@pytest.mark.parametrize(("completion", "reference"), GENUINE)
def test_final_answers_still_score(completion, reference):
    assert math_reward(completion, reference) == 1.0
    assert math_verdicts([completion], [reference]) == [CORRECT]


def test_verdicts_batch_all_four_kinds_and_match_the_rewards():
    completions = ["\\boxed{96}", "\\boxed{23 + 73}", "\\boxed{95}", "no answer here", "23 + 73 is 96"]
    references = ["96"] * 5
    assert math_verdicts(completions, references) == [CORRECT, UNEVALUATED, WRONG, NO_ANSWER, NO_ANSWER]
    assert math_verdicts(completions, references, last_number_fallback=True)[-1] == CORRECT
    assert math_rewards(completions, references) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert math_rewards(completions, references, require_final_form=False) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_the_fallback_last_number_is_never_an_unevaluated_expression():
    # an unboxed restatement ends on one of the question's numbers, not on the sum
    assert math_rewards(["23 + 73"], ["96"], last_number_fallback=True) == [0.0]
