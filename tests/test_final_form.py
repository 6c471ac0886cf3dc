"""The strict rule: an answer must be in final form, not arithmetic left for the verifier to do.

The completions below are of the two kinds a policy under RL writes: genuine answers, and the reward hack
the fp32 demo collapsed into (restating the question inside the box, which math_verify evaluates to the
reference). Every hack listed in the issue that found it is here, and so are the divisions that issue 30
found still paid (``\\boxed{144 \\div 2}`` and ``\\boxed{\\frac{144}{2}}`` for 72).
"""

from __future__ import annotations

import logging
import re

import pytest
from math_verify import parse
from support import SHARED_DATA

from lit_dash.data.sources import load_gsm8k, load_math500
from lit_dash.rewards import math_rewards, math_verdicts
from lit_dash.rewards.final_form import _MAX_ROOT_BASE, arithmetic_left, divisions_left
from lit_dash.rewards.math import CORRECT, NO_ANSWER, UNEVALUATED, WRONG, math_reward
from lit_dash.rewards.verifier import _parse_reference, _verdict

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
# Arithmetic left in other shapes (issue 30's list), and every way of leaving a division of two integers:
# latex2sympy folds those into one number while parsing, so final_form reads them from the text.
LEFT_FOR_THE_VERIFIER = [
    ("\\boxed{2 \\cdot 48}", "96"),
    ("\\boxed{10^2 - 4}", "96"),
    ("\\boxed{\\sqrt{9216}}", "96"),
    ("\\boxed{x = 23 + 73}", "96"),  # an equation counts by its right-hand side, which is a sum
    ("\\boxed{0.5 \\cdot 144}", "72"),
    ("\\boxed{12 \\times 6}", "72"),
    ("\\boxed{144 \\div 2}", "72"),
    ("\\boxed{144 ÷ 2}", "72"),
    ("\\boxed{3 \\div 4}", "\\frac{3}{4}"),  # \\div is an instruction to divide, even in lowest terms
    ("\\boxed{\\frac{144}{2}}", "72"),  # an integer fraction whose value is an integer
    ("\\boxed{\\dfrac{144}{2}}", "72"),
    ("\\boxed{\\frac{72}{1}}", "72"),
    ("\\boxed{144/2}", "72"),
    ("\\boxed{144:2}", "72"),
    ("\\boxed{{144 \\over 2}}", "72"),
    ("\\boxed{\\frac{6}{4}}", "\\frac{3}{2}"),  # not in lowest terms
    ("\\boxed{\\dfrac{6}{8}}", "\\frac{3}{4}"),
    ("\\boxed{6/4}", "1.5"),
    ("\\boxed{2:4}", "\\frac{1}{2}"),
    ("\\boxed{x = \\frac{144}{2}}", "72"),
    ("\\boxed{\\frac{144}{2}\\text{ cm}}", "72"),
    ("\\boxed{\\$\\frac{144}{2}}", "72"),
    ("\\boxed{(\\frac{6}{4}, 1)}", "(\\frac{3}{2}, 1)"),
    ("\\boxed{x = 1, y = \\frac{6}{4}}", "x = 1, y = \\frac{3}{2}"),
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
    ("\\boxed{3/4}", "\\frac34"),  # a fraction in lowest terms is final, however it is written
    ("\\boxed{-\\frac{1}{2}}", "-\\frac12"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{2\\frac{1}{2}}", "2.5"),  # a mixed number
    ("\\boxed{96.0}", "96"),
    ("\\boxed{(1, 2)}", "(1,2)"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{5\\text{ cm}}", "5"),
    ("\\boxed{\\$1,234.50}", "1234.5"),
    ("\\boxed{10^\\circ}", "10"),
    ("\\boxed{[-2, 5)}", "[-2,5)"),
    ("\\boxed{3x+2}", "2+3x"),
    ("\\boxed{\\frac{144}{2} = 72}", "72"),  # shows the division and commits to 72
    # a reference that leaves a division accepts the same division (spelled differently: the same string
    # would be judged equal in the caller, without reaching final_form)
    ("\\boxed{\\dfrac{6}{4}}", "\\frac{6}{4}"),
    ("\\boxed{6/4}", "\\frac{6}{4}"),
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


# These tests are about the verdicts, not the time limit (tests/test_rewards.py and test_reward_properties.py
# test that): a first tuple comparison takes math_verify up to 3.5 s of a loaded 2-core machine, and the
# default 2 s would then turn it into ``wrong``.
TIMEOUT_S = 10.0


@pytest.mark.parametrize(("completion", "reference"), HACKS + LEFT_FOR_THE_VERIFIER)
def test_unevaluated_expression_scores_zero_yet_is_equal(completion, reference):
    assert math_verdicts([completion], [reference], timeout_s=TIMEOUT_S) == [UNEVALUATED]
    assert math_reward(completion, reference, timeout_s=TIMEOUT_S) == 0.0
    # the lenient knob restores math_verify's equivalence, which pays the hack
    assert math_reward(completion, reference, timeout_s=TIMEOUT_S, require_final_form=False) == 1.0


@pytest.mark.parametrize(("completion", "reference"), GENUINE)
def test_final_answers_still_score(completion, reference):
    assert math_verdicts([completion], [reference], timeout_s=TIMEOUT_S) == [CORRECT]
    assert math_reward(completion, reference, timeout_s=TIMEOUT_S) == 1.0


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


# ------------------------------------------------------------------------------- the two halves, directly


@pytest.mark.parametrize(
    ("latex", "count"),
    [
        ("\\frac{144}{2}", 1),
        ("\\frac{6}{4}", 1),
        ("\\frac{5}{1}", 1),
        ("\\frac{0}{3}", 1),
        ("\\frac{-6}{4}", 1),
        ("\\frac{3}{4}", 0),
        ("-\\frac{1}{2}", 0),
        ("2\\frac{1}{2}", 0),
        ("144/2", 1),
        ("3/4", 0),
        ("2:4", 1),
        ("3:4", 0),
        ("144 \\div 2", 1),
        ("3\\div4", 1),
        ("3 ÷ 4", 1),
        ("{6 \\over 4}", 1),
        ("\\frac{6}{4} + 144 \\div 2 + \\frac{3}{4}", 2),
        ("\\frac{144}{2} = 72", 0),  # only an equation's right-hand side counts
        ("x = \\frac{144}{2}", 1),
        ("x = \\frac{6}{4}, y = \\frac{2}{4}", 2),  # ... of each part of a system
        ("\\text{6/4 cups}", 0),  # words are not arithmetic
        ("1.5/3", 0),  # a decimal division stays a SymPy product: arithmetic_left's part
        ("2^6/4", 0),  # 6 is an exponent here; the power is arithmetic_left's part
        ("\\frac{\\sqrt{3}}{2}", 0),
        ("\\frac{x}{4}", 0),
        ("", 0),
    ],
)
def test_divisions_left_counts_integer_divisions_in_the_text(latex, count):
    assert divisions_left(latex) == count


def _tree(latex: str):
    return parse(f"${latex}$", parsing_timeout=None)[0]


def test_the_root_guard_evaluates_roots_only_below_its_bound():
    """``_MAX_ROOT_BASE`` bounds the one evaluation final_form does: a root of a smaller integer counts as
    arithmetic when SymPy would simplify it, a root of a larger one is never evaluated and counts as final
    (the price of a check no answer can make slow)."""
    assert _MAX_ROOT_BASE == 10**12
    below, at = 999_999**2, 1_000_000**2  # 999998000001 < 10**12 <= 10**12
    assert at == _MAX_ROOT_BASE
    assert arithmetic_left(_tree(f"\\sqrt{{{below}}}")) == 1
    assert arithmetic_left(_tree(f"\\sqrt{{{at}}}")) == 0
    assert arithmetic_left(_tree("\\sqrt{3}")) == 0  # below the bound, but SymPy leaves it as it is
    # and through the reward: both roots are equal to their references, only the smaller one is refused
    verdicts = math_verdicts(
        [f"\\boxed{{\\sqrt{{{below}}}}}", f"\\boxed{{\\sqrt{{{at}}}}}"],
        ["999999", "1000000"],
        timeout_s=TIMEOUT_S,
    )
    assert verdicts == [UNEVALUATED, CORRECT]


# ------------------------------------------------------------------- every benchmark reference, boxed


def _references() -> dict[str, list[str]]:
    return {
        "MATH-500": [p.answer for p in load_math500(SHARED_DATA)],
        "GSM8K": [p.answer for p in load_gsm8k(SHARED_DATA)],
    }


def _left(reference: str) -> int:
    """The arithmetic final_form finds in a reference: its SymPy tree's, plus the divisions in its text."""
    expr, text = _parse_reference(reference)  # the worker's own (cached) parse of a reference
    return arithmetic_left(expr) + divisions_left(text)


_INTEGER_FRACTION = re.compile(r"(-?)\\frac\{(\d+)\}\{(\d+)\}")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")
def test_every_math500_and_gsm8k_reference_matches_itself_and_its_unreduced_form_does_not():
    """Each MATH-500 and GSM8K test reference, boxed, is ``correct`` against itself; the same value written
    as an unreduced fraction (``\\frac{2n}{2}`` for a GSM8K answer n, ``\\frac{2p}{2q}`` for a MATH-500
    reference ``\\frac{p}{q}``) is ``unevaluated``: equal, so the lenient rule would pay it, but refused.

    This calls ``_verdict``, the function each reward worker runs (math_verify's parse of both sides,
    ``verify``, then ``is_final_form``), in this process. Through ``math_verdicts`` a boxed reference
    against itself would never get there: an answer that is character-for-character its reference is judged
    ``correct`` in the caller. The pool adds only containment (per-item timeouts), which on a loaded machine
    could turn a slow item into ``wrong`` and make this 3,200-item check flaky. It took 15 s on 2 shared cores
    (36 s at a load average of 18).
    """
    for name in ("math_verify", "latex2sympy2_extended"):  # "Timeout is disabled" is expected here
        logging.getLogger(name).setLevel(logging.CRITICAL)
    references = _references()
    assert {name: len(refs) for name, refs in references.items()} == {"MATH-500": 500, "GSM8K": 1319}
    for name, refs in references.items():
        not_correct = [(ref, v) for ref in refs if (v := _verdict(ref, ref)) != CORRECT]
        assert not_correct == [], f"{name}: {len(refs) - len(not_correct)}/{len(refs)} match themselves"
    # Six references leave arithmetic themselves, and match themselves only through the reference rule.
    leave_some = [ref for ref in references["MATH-500"] if _left(ref)]
    assert leave_some == ["6 - 5i", "-\\frac{\\pi}{6}", "-13x+3", "6r^2-4r-24", "1 - 12i", "y = -2x"]

    gsm8k = references["GSM8K"]
    assert all(re.fullmatch(r"-?\d+", ref) for ref in gsm8k)  # the loader removed thousands separators
    unreduced = [f"\\frac{{{2 * int(ref)}}}{{2}}" for ref in gsm8k]
    assert [_verdict(a, ref) for a, ref in zip(unreduced, gsm8k, strict=True)] == [UNEVALUATED] * len(gsm8k)

    fractions = [(ref, m) for ref in references["MATH-500"] if (m := _INTEGER_FRACTION.fullmatch(ref))]
    assert len(fractions) == 48  # the MATH-500 references that are one integer fraction (3 negative)
    for ref, m in fractions:
        sign, p, q = m.group(1), int(m.group(2)), int(m.group(3))
        assert _verdict(f"{sign}\\frac{{{2 * p}}}{{{2 * q}}}", ref) == UNEVALUATED, ref
        assert _verdict(f"{sign}{p}/{q}", ref) == CORRECT, ref  # the same fraction, spelled with a slash
