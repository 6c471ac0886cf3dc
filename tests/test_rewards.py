"""math_reward / math_rewards: equivalence via math_verify, containment of adversarial completions."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import pytest
from support import SHARED_DATA

from lit_dash.rewards import extract_answer, math_reward, math_rewards
from lit_dash.rewards import verifier as reward_module
from lit_dash.rewards.math import has_answer, warm_up_reward_workers

# Slack on top of timeout_s for IPC, killing and replacing a worker on a loaded 2-core CI box.
SLACK_S = 1.5
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


def boxed(answer: str) -> str:
    return f"Some reasoning first. So the final answer is $\\boxed{{{answer}}}$."


@pytest.fixture(scope="module", autouse=True)
def warm_pool():
    """Start the worker pool once, so start-up time does not count against any test's timing bound."""
    warm_up_reward_workers()
    assert math_reward(boxed("1.0"), "1") == 1.0


def rows(name: str, n: int) -> list[dict]:
    with (SHARED_DATA / name).open(encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(n)]


# ----------------------------------------------------------------------------------------- extraction


def test_extract_answer():
    assert extract_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert extract_answer("first \\boxed{1}, final \\boxed{2}") == "2"
    assert extract_answer("The answer is 5.") is None
    assert extract_answer("\\boxed{}") is None
    assert has_answer("\\boxed{5}") and not has_answer("5")


# ------------------------------------------------------------------------------------- real answers


@needs_data
def test_math500_reference_solutions_score_one():
    data = rows("math500_test.jsonl", 50)
    solutions, answers = [r["solution"] for r in data], [r["answer"] for r in data]
    assert math_rewards(solutions, answers) == [1.0] * 50
    # Rewritten answers (\dfrac, trailing space) must go through math_verify rather than string equality.
    rewritten = [boxed(a.replace("\\frac", "\\dfrac") + " ") for a in answers]
    assert math_rewards(rewritten, answers) == [1.0] * 50
    # Answers paired with the next problem's reference: only genuinely equal answers may score.
    shifted = answers[1:] + answers[:1]
    scores = math_rewards(solutions, shifted)
    matches = [(a, b) for s, a, b in zip(scores, answers, shifted, strict=True) if s]
    assert matches == [("5", "x=5")]  # rows 23 and 24 really do both have the answer 5


@needs_data
def test_gsm8k_worked_answers_score_one():
    data = rows("gsm8k_test.jsonl", 30)
    worked = [r["answer"].split("####") for r in data]
    # raw "#### 2,125"-style answer inside the box vs the comma-free reference the loader produces
    completions = [w + f"The answer is $\\boxed{{{a.strip()}}}$." for w, a in worked]
    references = [a.strip().replace(",", "") for _, a in worked]
    assert math_rewards(completions, references) == [1.0] * 30
    wrong = [boxed(str(int(r) + 1)) for r in references]
    assert math_rewards(wrong, references) == [0.0] * 30


# ------------------------------------------------------------------------------------------ tricky forms


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("1,000", "1000", 1.0),
        ("1000", "1,000", 1.0),
        ("1,\\!000", "1000", 1.0),
        ("\\$18", "18", 1.0),
        ("18", "\\$18", 1.0),
        ("\\$18.00", "18", 1.0),
        ("18.00", "18", 1.0),
        ("18.0", "18", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("0.5", "\\frac{1}{2}", 1.0),
        ("1/2", "\\frac{1}{2}", 1.0),
        ("\\dfrac{3}{4}", "0.75", 1.0),
        ("\\tfrac34", "\\frac{3}{4}", 1.0),
        ("\\frac{2}{4}", "\\frac{1}{2}", 0.0),  # equal, but not in lowest terms (tests/test_final_form.py)
        ("90^\\circ", "90", 1.0),
        ("90", "90^\\circ", 1.0),
        ("x=5", "5", 1.0),
        ("x = 5", "5", 1.0),
        ("50\\%", "0.5", 1.0),
        ("10\\text{ cm}", "10", 1.0),
        ("2\\sqrt{2}", "\\sqrt{8}", 1.0),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", 1.0),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
        ("\\{2,1\\}", "\\{1,2\\}", 1.0),
        ("[1,2)", "[1, 2)", 1.0),
        ("\\text{(C)}", "C", 1.0),
        ("(x+1)^2", "x^2+2x+1", 1.0),
        ("-3", "-3", 1.0),
        # wrong answers
        ("17", "18", 0.0),
        ("3", "-3", 0.0),
        ("2.0001", "2", 0.0),
        ("(1,2]", "[1,2)", 0.0),
        ("\\frac{1}{3}", "0.3", 0.0),
        ("\\pi", "3.14159", 0.0),
        ("(1,2)", "(2,1)", 0.0),
        # documented math_verify behaviours that a person might score differently
        ("1e3", "1000", 0.0),  # "e" is Euler's number, so 1e3 is 3e
        ("\\frac{1}{3}", "0.333", 0.0),  # floats compare to 6 decimals: 0.333 is not 1/3
        ("1,2", "2,1", 1.0),  # a bare comma list is read as a set
        ("x = 58,500", "58,500", 0.0),  # after "x =", the comma is no longer a thousands separator
    ],
)
def test_tricky_forms(answer, reference, expected):
    assert math_reward(boxed(answer), reference) == expected


@pytest.mark.parametrize(
    "completion",
    ["", "The answer is 18.", "\\boxed{}", "\\boxed{18", "garbage \x00\xff \\\\ }{ $$ $", "\\boxed{ }"],
)
def test_no_answer_scores_zero(completion):
    assert math_reward(completion, "18") == 0.0


def test_empty_reference_scores_zero():
    assert math_reward(boxed("5"), "") == 0.0
    assert math_reward(boxed("5"), "   ") == 0.0


# ------------------------------------------------------------------------------------------ containment

ADVERSARIAL = [
    "\\boxed{" * 5000,
    "\\boxed{" * 5000 + "1" + "}" * 5000,
    "\\boxed{" + "9" * 100_000 + "}",
    "9" * 100_000,
    "\\boxed{9^9^9^9^9}",
    "\\boxed{9^{9^{9^{9^9}}}}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{" + "\\frac{" * 300 + "1" + "}{2}" * 300 + "}",
    "\\boxed{" + "\\sqrt{" * 400 + "2" + "}" * 400 + "}",
    "\\boxed{\\begin{pmatrix}" + "1&" * 400 + "1\\end{pmatrix}}",
    "\\boxed{\\int_0^\\infty e^{-x^{x^x}} dx}",
]


def test_adversarial_completions_score_zero_within_bound():
    timeout_s = 0.5
    for text in ADVERSARIAL:
        start = time.monotonic()
        assert math_reward(text, "5", timeout_s=timeout_s) == 0.0
        assert time.monotonic() - start < timeout_s + SLACK_S, text[:40]


def test_hard_timeout_kills_and_replaces_worker(monkeypatch):
    """With the in-worker timer disabled, only the parent's kill can stop a runaway computation."""
    monkeypatch.setattr(reward_module, "_SOFT_FRACTION", 100.0)
    kills = reward_module._POOL.hard_timeouts
    start = time.monotonic()
    assert math_reward("\\boxed{9^{9^{9^{9^9}}}}", "5", timeout_s=0.5) == 0.0
    assert time.monotonic() - start < 0.5 + SLACK_S
    assert reward_module._POOL.hard_timeouts == kills + 1
    monkeypatch.undo()
    warm_up_reward_workers()  # wait for the replacement, so later timing tests see a full pool
    assert math_reward(boxed("\\frac{1}{2}"), "0.5") == 1.0  # the pool recovered


def test_timeout_works_off_the_main_thread():
    out: list[float] = []
    thread = threading.Thread(
        target=lambda: out.append(math_reward("\\boxed{10^{10^{10}}}", "5", timeout_s=0.5))
    )
    start = time.monotonic()
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and out == [0.0]
    assert time.monotonic() - start < 0.5 + SLACK_S


def test_concurrent_callers_in_a_thread_pool():
    cases = [
        ("\\boxed{9^{9^{9^{9^9}}}}", 0.0),
        (boxed("5"), 1.0),
        ("\\boxed{10^{10^{10}}}", 0.0),
        (boxed("4"), 0.0),
    ]
    start = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(lambda c: math_reward(c[0], "5", timeout_s=0.5), cases))
    assert results == [want for _, want in cases]
    # two pathological items may have to share the workers, hence 2x the timeout
    assert time.monotonic() - start < 2 * 0.5 + SLACK_S


# ------------------------------------------------------------------------------------------------ batch


def test_batched_matches_single():
    # default timeout: a short one can turn slow-but-legitimate parses into 0.0 on a loaded machine
    refs = ["18", "\\frac{1}{2}", "3", "(1,2)", "18", "7", "\\frac{1}{2}"]
    comps = [
        boxed("18.00"),
        boxed("0.5"),
        "no answer",
        boxed("(1, 2)"),
        boxed("17"),
        "\\boxed{}",
        boxed("0.5"),
    ]
    batched = math_rewards(comps, refs)
    assert batched == [math_reward(c, r) for c, r in zip(comps, refs, strict=True)]
    assert batched == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_batched_duplicates_and_validation():
    comps = [boxed("0.5")] * 40 + [boxed("1/3")] * 40
    assert math_rewards(comps, ["\\frac{1}{2}"] * 80) == [1.0] * 40 + [0.0] * 40
    assert math_rewards([], []) == []
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        math_rewards(["a", "b"], ["a"])


# ------------------------------------------------------------------ last-number fallback (demo reward)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("16 + 11 = 27\n\nThe answer is within \\boxed{}.", "27"),  # empty box: fall back to the last number
        ("So we get \\boxed{5}, not 7", "5"),  # a real box always wins
        ("In total 1,000 apples.", "1,000"),
        ("It is -3.5 degrees", "-3.5"),
        ("no digits here", None),
    ],
)
def test_last_number_fallback_extraction(completion, expected):
    assert extract_answer(completion, last_number_fallback=True) == expected


def test_fallback_is_off_by_default_and_scores_when_on():
    completions = ["16 + 11 = 27", "16 + 11 = 28", "so 1,000."]
    references = ["27", "27", "1000"]
    assert math_rewards(completions, references) == [0.0, 0.0, 0.0]  # the paper's rule: boxed only
    assert math_rewards(completions, references, last_number_fallback=True) == [1.0, 0.0, 1.0]
