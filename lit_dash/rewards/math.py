"""Exact-answer reward for math reasoning: is the completion's final ``\\boxed{}`` equal to the reference,
and is it a final answer rather than arithmetic left for the verifier (``\\boxed{23 + 73}`` for 96)?

Each completion gets a verdict (:func:`math_verdicts`): ``correct``, ``unevaluated`` (equivalent only once
its arithmetic is done; see :mod:`lit_dash.rewards.final_form`), ``wrong`` or ``no_answer``. The reward
(:func:`math_rewards`) pays 1.0 for ``correct`` only, unless ``require_final_form=False`` restores the
lenient rule that also pays ``unevaluated``.

Equivalence is decided by `math_verify <https://github.com/huggingface/Math-Verify>`_ (LaTeX -> SymPy and a
battery of comparisons), never by a hand-written normaliser. What this module adds is *containment*: a
policy under RL produces adversarial text sooner or later (``\\boxed{9^{9^{9^9}}}`` makes SymPy compute a
number with hundreds of millions of digits inside C code that no signal can interrupt), and math_verify's
own timeout uses ``signal.alarm``, which only works on the main thread. So every comparison runs in a small
pool of long-lived worker processes, a `pebble <https://pebble.readthedocs.io>`_ ``ProcessPool``:

* inside a worker, an interval timer (``setitimer``) stops Python-level slowness at 80% of ``timeout_s``;
* pebble gives each item a hard deadline of ``timeout_s`` from when a worker takes it; a worker that misses
  it is killed and replaced, and the item scores 0.0.

A comparison that runs out of time (either limit), or of recursion depth or memory inside SymPy, is a
property of the *answer*: it has a defined score, 0.0, and is counted (:func:`reward_events`; training logs
``train/reward_timeouts`` and ``train/reward_worker_restarts`` per step). A failure of the *machinery* is
never a score: workers that cannot start, a worker that dies on an item twice (the item is retried once
after the first death), a broken pool, a pickling error or any other exception raise
:class:`RewardWorkerError`. A reward that quietly calls right answers wrong trains on noise that looks like
signal, and the run's numbers still look plausible.

This works from any thread and from several threads at once (each item is its own future). Workers are
started with ``spawn`` (never a fork of a multi-threaded trainer with CUDA and vLLM in it) and warm up in
pebble's initializer, before they take work, so start-up time never counts against an item's deadline.
Spawn re-imports the caller's ``__main__`` in each worker: for ``lit-dash``, ``python -m``, notebooks and
pytest that is light, but a training *script* must keep its work under ``if __name__ == "__main__":`` (as
any multiprocessing code must) and its top-level imports are paid once per worker. A script that does not
gets a :class:`RewardWorkerError` saying so on its first reward call, not zeros. Cheap cases (no
``\\boxed{}``, an over-long answer, an answer that is character-for-character the reference) are answered
in the caller without any IPC.

math_verify behaviour worth knowing (checked in ``tests/test_rewards.py``): ``1,000``=``1000``,
``\\$18``=``18``, ``18.00``=``18``, ``\\dfrac{3}{4}``=``0.75``, ``90^\\circ``=``90``, ``x=5``=``5``,
``50\\%``=``0.5``, ``10\\text{ cm}``=``10`` all score 1; ``\\frac{1}{3}`` vs reference ``0.333`` scores 0
(floats are compared to 6 decimals), ``1e3`` vs ``1000`` scores 0 (``e`` is read as Euler's number), and
the unordered list ``1,2`` equals ``2,1`` (comma lists are read as sets).
"""

from __future__ import annotations

import re

from lit_dash.rewards.boxed import last_boxed
from lit_dash.rewards.verifier import (
    _OUT_OF_LIMITS,
    _POOL,
    CORRECT,
    NO_ANSWER,
    UNEVALUATED,
    VERDICTS,
    WRONG,
    RewardEvents,
    RewardWorkerError,
    _record,
    reward_events,
    warm_up_reward_workers,
)

__all__ = [
    "extract_answer",
    "has_answer",
    "math_reward",
    "math_rewards",
    "math_verdicts",
    "VERDICTS",
    "warm_up_reward_workers",
    "reward_events",
    "RewardEvents",
    "RewardWorkerError",
    "MAX_ANSWER_CHARS",
]

# A boxed answer longer than this is degenerate output, not mathematics (the longest MATH-500 answer has
# 53 characters); it scores 0 without ever reaching SymPy.
MAX_ANSWER_CHARS = 1000


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(completion: str, last_number_fallback: bool = False) -> str | None:
    """The final answer a completion commits to: its last ``\\boxed{}`` content, or ``None``.

    With ``last_number_fallback`` a completion without a (non-empty) box answers with its last number,
    the "last number matches" rule GSM8K-style evaluations use; a small model that writes "16 + 11 = 27"
    and never boxes then still earns a reward when it is right.
    """
    boxed = last_boxed(completion) or None
    if boxed is not None or not last_number_fallback or not isinstance(completion, str):
        return boxed
    numbers = _LAST_NUMBER.findall(completion[-2000:])
    return numbers[-1].rstrip(",") if numbers else None


def has_answer(completion: str) -> bool:
    """Whether the completion has a (non-empty) final ``\\boxed{}`` answer at all."""
    return extract_answer(completion) is not None


# ---------------------------------------------------------------------------------------- public API


def math_verdicts(
    completions: list[str], references: list[str], timeout_s: float = 2.0, last_number_fallback: bool = False
) -> list[str]:
    """One verdict per completion: ``correct``, ``unevaluated`` (equivalent to the reference only once the
    arithmetic it leaves is done, e.g. ``\\boxed{23 + 73}`` for 96), ``wrong`` or ``no_answer``.

    This is the RL hot path (hundreds of completions per step). Each item gets ``timeout_s`` of worker time
    once it is dispatched; with ``W`` workers a batch takes at most about ``ceil(n / W) * timeout_s``.
    Completions without a usable answer, or whose answer is character-for-character the reference, are
    judged in the caller without IPC, and repeated ``(answer, reference)`` pairs are verified once.

    A comparison that runs past ``timeout_s`` (or out of SymPy's recursion depth or memory) is ``wrong`` and
    counted in every open :func:`reward_events` scope; workers that cannot judge raise
    :class:`RewardWorkerError` (see the module docstring).
    """
    if len(completions) != len(references):
        raise ValueError(f"got {len(completions)} completions but {len(references)} references")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    verdicts = [NO_ANSWER] * len(completions)
    # Samples of one prompt often agree on the answer, so each distinct (answer, reference) is verified once.
    task_of: dict[tuple[str, str], list[int]] = {}
    for i, (completion, reference) in enumerate(zip(completions, references, strict=True)):
        if not isinstance(completion, str) or not isinstance(reference, str) or not reference.strip():
            verdicts[i] = WRONG if isinstance(completion, str) and has_answer(completion) else NO_ANSWER
            continue
        answer, reference = extract_answer(completion, last_number_fallback), reference.strip()
        if answer is None:
            continue
        if len(answer) > MAX_ANSWER_CHARS:
            verdicts[i] = WRONG
        elif answer == reference:  # the same LaTeX is the same answer, in the reference's own form
            verdicts[i] = CORRECT
        else:
            task_of.setdefault((answer, reference), []).append(i)
    timeouts = restarts = 0
    if task_of:
        tasks = list(task_of)
        judged, restarts = _POOL.run(tasks, timeout_s)
        for task, verdict in zip(tasks, judged, strict=True):
            if verdict == _OUT_OF_LIMITS:
                verdict, timeouts = WRONG, timeouts + len(task_of[task])
            for i in task_of[task]:
                verdicts[i] = verdict
    _record(len(completions), timeouts, restarts)
    return verdicts


def math_rewards(
    completions: list[str],
    references: list[str],
    timeout_s: float = 2.0,
    last_number_fallback: bool = False,
    require_final_form: bool = True,
) -> list[float]:
    """Batched :func:`math_reward`: 1.0 / 0.0 per completion, judged in parallel on the worker pool.

    With ``require_final_form`` (the default) an answer that equals the reference only once its arithmetic
    is done (``\\boxed{23 + 73}`` for 96) scores 0; ``False`` restores math_verify's lenient equivalence.
    """
    rewarded = (CORRECT, UNEVALUATED) if not require_final_form else (CORRECT,)
    verdicts = math_verdicts(completions, references, timeout_s, last_number_fallback)
    return [1.0 if v in rewarded else 0.0 for v in verdicts]


def math_reward(
    completion: str, reference: str, timeout_s: float = 2.0, require_final_form: bool = True
) -> float:
    """1.0 iff the completion's last ``\\boxed{}`` answer equals ``reference`` per math_verify (and, by
    default, is in final form: see :mod:`lit_dash.rewards.final_form`), else 0.0.

    ``reference`` is a plain answer (``"18"``, ``"\\frac{1}{2}"``, ``"(3, \\frac{\\pi}{2})"``). Never raises
    because of the completion's text and returns within about ``timeout_s``, from any thread; raises
    :class:`RewardWorkerError` when the worker processes fail (a score is never made up).
    """
    return math_rewards([completion], [reference], timeout_s, require_final_form=require_final_form)[0]
