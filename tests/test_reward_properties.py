"""Property-based tests (hypothesis): the reward parser survives random and adversarial completions.

A policy under RL writes anything sooner or later: unbalanced braces, ``\\boxed{`` ten thousand times,
unicode, LaTeX that SymPy would chew on for hours. last_boxed / extract_answer must never raise and stay
linear; math_rewards must never raise, return one 0.0/1.0 per completion, and come back within its timeout.
Example counts are small so this file takes seconds; each property still sees fresh inputs on every run.
"""

from __future__ import annotations

import math
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_dash.data.sources import last_boxed
from lit_dash.rewards import extract_answer, math_rewards, warm_up_reward_workers
from lit_dash.rewards import verifier as reward_module

SLACK_S = 1.5  # IPC, killing and replacing a worker on a loaded 2-core machine
TIMEOUT_S = 0.5
RESTART_S = 8.0  # a fresh verifier worker imports SymPy and math_verify: ~1 s idle, more under load
FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=8)

FRAGMENTS = [
    "\\boxed{", "\\boxed ", "\\boxed", "\\fbox{", "{", "}", "\\{", "\\}", "\\", "\\\\", "$", "$$",
    "\\frac{", "}{", "^{", "_", "9", "1", "42", "-", ",", ".", ";", " ", "\n", "\t", "x", "=", "!",
    "\\left(", "\\right)", "\\sqrt{", "\\text{", "\\begin{pmatrix}", "&", "\\end{pmatrix}",
    "é", "∑", "½", "😀", "\u200b", "\x00", "\ufeff", "ℵ", "\\infty",
]  # fmt: skip
fragment_soup = st.lists(st.sampled_from(FRAGMENTS), max_size=200).map("".join)
repeated = st.builds(
    lambda fragment, times, tail: fragment * times + tail,
    st.sampled_from(FRAGMENTS),
    st.integers(min_value=0, max_value=20_000),
    fragment_soup,
)
completions = st.one_of(st.text(max_size=3000), fragment_soup, repeated)
no_backslash = st.text(max_size=300).filter(lambda s: "\\" not in s)


def _balanced(text: str) -> bool:
    """Unescaped braces close in order (an independent scanner, not the parser's own regex)."""
    depth, i = 0, 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return False
        i += 1
    return depth == 0


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    warm_up_reward_workers()  # start-up never counts against a timing bound below


# ---- last_boxed / extract_answer: pure Python, must be total and linear ----------------------------


@FAST
@given(completions)
def test_last_boxed_returns_a_piece_of_the_text_or_none(text):
    answer = last_boxed(text)
    assert answer is None or (isinstance(answer, str) and answer in text and len(answer) < len(text))


@FAST
@given(st.lists(st.sampled_from([f for f in FRAGMENTS if not f.isspace() and f != "\\boxed "]), max_size=200))
def test_a_braced_answer_has_balanced_braces(pieces):
    text = "".join(pieces)  # no whitespace, so every box found is the braced form
    answer = last_boxed(text)
    assert answer is None or _balanced(answer)


@FAST
@given(no_backslash, st.from_regex(r"-?\d{1,6}(\.\d{1,3})?", fullmatch=True), no_backslash)
def test_the_last_box_is_found_whatever_surrounds_it(before, number, after):
    assert last_boxed(f"{before}\\boxed{{{number}}}{after}") == number
    assert extract_answer(f"{before}\\boxed{{{number}}}{after}", last_number_fallback=True) == number


@FAST
@given(completions)
def test_last_number_fallback_returns_a_number_of_the_text(text):
    answer = extract_answer(text, last_number_fallback=True)
    assert answer is None or answer in text
    if answer is not None and last_boxed(text) is None:
        assert re.fullmatch(r"-?\d[\d,]*(\.\d+)?", answer)


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 10_000,
        "\\boxed{" * 10_000 + "1" + "}" * 10_000,
        "{" * 200_000,
        "\\" * 200_001,
        "\\boxed" * 20_000,
        "\\boxed 1" * 20_000,
        ("\\boxed{\\{" * 5_000) + "}" * 5_000,
        "9" * 500_000,
    ],
    ids=[
        "open-boxes",
        "nested-boxes",
        "open-braces",
        "backslashes",
        "bare-boxed",
        "bare-forms",
        "mixed",
        "digits",
    ],
)
def test_degenerate_completions_parse_in_linear_time(text):
    start = time.monotonic()
    extract_answer(text, last_number_fallback=True)
    last_boxed(text)
    assert time.monotonic() - start < 1.0


# ---- math_rewards: the worker pool with its hard timeout -------------------------------------------


def _timed_rewards(texts: list[str], reference: str) -> tuple[list[float], float]:
    """Scores and wall seconds, after any worker killed by the previous example has been replaced (its
    start-up is not part of this batch's timeout)."""
    warm_up_reward_workers()
    start = time.monotonic()
    kills = reward_module._POOL.hard_timeouts
    scores = math_rewards(texts, [reference] * len(texts), timeout_s=TIMEOUT_S)
    seconds = time.monotonic() - start
    kills = reward_module._POOL.hard_timeouts - kills
    assert kills <= len(set(texts))  # only an item that ran out its own time gets its worker killed
    # Each item gets TIMEOUT_S from dispatch; a killed worker's replacement must start (import SymPy)
    # before it takes the next item, which on a loaded 2-core machine can take seconds.
    bound = math.ceil(len(texts) / reward_module._POOL.num_workers) * TIMEOUT_S + SLACK_S + kills * RESTART_S
    assert seconds < bound, f"{len(texts)} items, {kills} workers killed: {seconds:.1f} s"
    return scores, seconds


@FAST
@given(
    st.lists(completions, min_size=1, max_size=6),
    st.sampled_from(["5", "\\frac{1}{2}", "x^2+1", "(1,2)", "", "\\infty"]),
)
def test_math_rewards_on_anything_is_zero_or_one_within_the_timeout(texts, reference):
    scores, _ = _timed_rewards(texts, reference)
    assert len(scores) == len(texts) and set(scores) <= {0.0, 1.0}


tower = st.integers(min_value=2, max_value=6).map(lambda depth: "9^{" * depth + "9" + "}" * depth)
slow_latex = st.one_of(
    tower,
    st.integers(min_value=10**4, max_value=10**7).map(lambda n: f"{n}!"),
    st.integers(min_value=3, max_value=12).map(lambda k: f"\\binom{{10^{{{k}}}}}{{10^{{{k - 1}}}}}"),
    st.integers(min_value=10**3, max_value=10**6).map(lambda n: f"(x+1)^{{{n}}}"),
    st.integers(min_value=50, max_value=400).map(lambda n: "\\frac{" * n + "1" + "}{2}" * n),
    st.integers(min_value=2, max_value=5).map(lambda d: "10^{" * d + "10" + "}" * d),
)


@SLOW
@given(st.lists(slow_latex, min_size=1, max_size=3), st.sampled_from(["5", "x^2+1"]))
def test_latex_that_makes_sympy_slow_is_cut_off_at_the_timeout(answers, reference):
    texts = [f"so the answer is \\boxed{{{a}}}." for a in answers]
    scores, _ = _timed_rewards(texts, reference)
    assert len(scores) == len(texts) and set(scores) <= {0.0, 1.0}


@SLOW
@given(
    no_backslash, st.sampled_from([("\\frac{1}{2}", "0.5"), ("1,000", "1000"), ("x=5", "5")]), no_backslash
)
def test_a_right_answer_still_scores_one_inside_noise(before, pair, after):
    answer, reference = pair
    assert math_rewards([f"{before}\\boxed{{{answer}}}{after}"], [reference], timeout_s=2.0) == [1.0]
