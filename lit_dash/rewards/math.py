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

This works from any thread and from several threads at once (each item is its own future). Workers are
started with ``spawn`` (never a fork of a multi-threaded trainer with CUDA and vLLM in it) and warm up in
pebble's initializer, before they take work, so start-up time never counts against an item's deadline.
Spawn re-imports the caller's ``__main__`` in each worker: for ``lit-dash``, ``python -m``, notebooks and
pytest that is light, but a training *script* must keep its work under ``if __name__ == "__main__":`` (as
any multiprocessing code must) and its top-level imports are paid once per worker. Cheap cases (no
``\\boxed{}``, an over-long answer, an answer that is character-for-character the reference) are answered
in the caller without any IPC.

math_verify behaviour worth knowing (checked in ``tests/test_rewards.py``): ``1,000``=``1000``,
``\\$18``=``18``, ``18.00``=``18``, ``\\dfrac{3}{4}``=``0.75``, ``90^\\circ``=``90``, ``x=5``=``5``,
``50\\%``=``0.5``, ``10\\text{ cm}``=``10`` all score 1; ``\\frac{1}{3}`` vs reference ``0.333`` scores 0
(floats are compared to 6 decimals), ``1e3`` vs ``1000`` scores 0 (``e`` is read as Euler's number), and
the unordered list ``1,2`` equals ``2,1`` (comma lists are read as sets).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from functools import lru_cache
from typing import Any

import pebble

from lit_dash.rewards.boxed import last_boxed

__all__ = [
    "extract_answer",
    "has_answer",
    "math_reward",
    "math_rewards",
    "math_verdicts",
    "VERDICTS",
    "warm_up_reward_workers",
    "MAX_ANSWER_CHARS",
]

logger = logging.getLogger(__name__)

# A boxed answer longer than this is degenerate output, not mathematics (the longest MATH-500 answer has
# 53 characters); it scores 0 without ever reaching SymPy.
MAX_ANSWER_CHARS = 1000
_SOFT_FRACTION = 0.8  # in-worker timer, as a fraction of timeout_s; the hard kill comes at timeout_s
_STARTUP_TIMEOUT_S = 120.0  # a worker that is not ready by then means a broken install, not a slow item


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


# ------------------------------------------------------------------------------------ worker process


class _SoftTimeout(BaseException):
    """Raised by the in-worker timer; a BaseException so math_verify's ``except Exception`` can't eat it."""


@lru_cache(maxsize=8192)
def _parse_reference(reference: str) -> Any:
    # References repeat across a GRPO group (G samples per prompt), so parse each once per worker.
    from math_verify import parse

    return parse(f"${reference}$", parsing_timeout=None)


CORRECT, UNEVALUATED, WRONG, NO_ANSWER = "correct", "unevaluated", "wrong", "no_answer"
VERDICTS = (CORRECT, UNEVALUATED, WRONG, NO_ANSWER)


def _verdict(answer: str, reference: str) -> str:
    """``correct``: equivalent and in final form; ``unevaluated``: equivalent only once the arithmetic it
    leaves is done (``23 + 73`` for 96); ``wrong`` otherwise."""
    from math_verify import parse, verify

    from lit_dash.rewards.final_form import is_final_form

    gold = _parse_reference(reference)
    pred = parse(f"$\\boxed{{{answer}}}$", parsing_timeout=None)
    if not gold or not pred or not verify(gold, pred, timeout_seconds=None):
        return WRONG
    return CORRECT if is_final_form(pred, gold) else UNEVALUATED


def _on_timer(signum: int, frame: Any) -> None:
    raise _SoftTimeout


def _worker_init(ready: Any) -> None:
    """Runs once in each new worker, before it takes an item, so start-up never counts as item time."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pebble's terminate() must stop C code at once
    signal.signal(signal.SIGALRM, _on_timer)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # "Timeout is disabled" etc. are expected here
    _verdict("1", "1")  # warm-up: the first parse compiles regexes and fills SymPy caches (~0.3 s)
    ready.release()


def _judge(answer: str, reference: str, soft_timeout_s: float) -> str:
    """One item, in a worker: the verdict, or ``wrong`` on the soft timeout or any error."""
    try:
        signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
        try:
            return _verdict(answer, reference)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException:  # noqa: BLE001 - _SoftTimeout, RecursionError, MemoryError...: all wrong
        return WRONG


# ------------------------------------------------------------------------------------- parent side


class _VerifierPool:
    """A `pebble <https://pebble.readthedocs.io>`_ process pool of verifier workers, started lazily.

    pebble owns the processes: per-item deadlines (counted from when a worker takes the item), killing a
    worker that misses one, replacing dead workers, shutting down at exit. What this class adds: spawn
    (never a fork of a multi-threaded trainer), a warm-up that can be waited for (each worker releases
    ``ready`` once warm, and every worker pebble replaced is owed one more release), and a fresh pool
    after a fork or if pebble declares the pool broken.
    """

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.hard_timeouts = 0  # items whose worker had to be killed: a health signal worth logging
        self._lock = threading.Lock()
        self._pool: pebble.ProcessPool | None = None
        self._pid: int | None = None
        self._ready: Any = None
        self._started = self._warm = 0  # workers started (replacements included) / seen warm

    def after_fork_in_child(self) -> None:
        """A forked child (e.g. a fork-started data loader) must neither use nor stop the parent's pool."""
        self._lock = threading.Lock()  # the parent's lock may have been held by another thread
        self._pool, self._pid = None, None

    def _get(self) -> pebble.ProcessPool:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid() and self._pool.active:
                return self._pool
            if self._pool is not None and self._pid == os.getpid():  # broken: pebble gave up on it
                self._pool.stop()
            ctx = multiprocessing.get_context("spawn")
            self._ready = ctx.Semaphore(0)
            self._pool = pebble.ProcessPool(
                max_workers=self.num_workers, initializer=_worker_init, initargs=(self._ready,), context=ctx
            )
            self._pid, self._started, self._warm = os.getpid(), self.num_workers, 0
            if not self._pool.active:  # reading it starts the workers now
                raise RuntimeError("the reward worker pool did not start")
            return self._pool

    def warm_up(self, timeout_s: float) -> None:
        """Start the workers and wait until every one has finished importing and warming up."""
        self._get()
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._warm >= self._started:
                    return
                ready = self._ready
            if not ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise RuntimeError(
                    f"reward workers did not start within {timeout_s:.0f} s; "
                    "check that math_verify imports in a fresh interpreter"
                )
            with self._lock:
                if ready is self._ready:
                    self._warm += 1

    def shutdown(self) -> None:
        with self._lock:
            pool, mine, self._pool, self._pid = self._pool, self._pid == os.getpid(), None, None
        if pool is not None and mine:
            pool.stop()
            pool.join(timeout=10)

    def run(self, tasks: list[tuple[str, str]], timeout_s: float) -> list[str]:
        """Verdicts on ``(answer, reference)`` pairs, in order; each gets ``timeout_s`` of worker time from
        when a worker takes it (one that misses it is ``wrong``)."""
        pool = self._get()
        soft_s = max(0.001, _SOFT_FRACTION * timeout_s)
        futures = [pool.schedule(_judge, args=(a, r, soft_s), timeout=timeout_s) for a, r in tasks]
        try:
            # pebble bounds each item once a worker has it; this bounds waiting for workers at all.
            _, late = cf.wait(futures, timeout=_STARTUP_TIMEOUT_S + len(tasks) * timeout_s)
            if late:
                raise RuntimeError(
                    f"reward workers took no work for {_STARTUP_TIMEOUT_S:.0f} s; "
                    "check that math_verify imports in a fresh interpreter"
                )
            results = []
            for idx, future in enumerate(futures):
                error = future.exception()
                if error is None:
                    results.append(future.result())
                    continue
                results.append(WRONG)
                if isinstance(error, (TimeoutError, cf.TimeoutError, pebble.ProcessExpired)):
                    with self._lock:  # pebble killed or lost the worker and starts a replacement
                        self._started += 1
                        self.hard_timeouts += not isinstance(error, pebble.ProcessExpired)
                    logger.debug("reward item %d: %r; worker replaced", idx, error)
                else:  # e.g. BrokenProcessPool: the next call starts a fresh pool
                    logger.warning("reward item %d failed in the worker pool: %r", idx, error)
            return results
        finally:
            for future in futures:  # only matters on an exception (e.g. KeyboardInterrupt)
                future.cancel()


def _default_workers() -> int:
    env = os.environ.get("LIT_DASH_REWARD_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(8, os.cpu_count() or 1))


_POOL = _VerifierPool(_default_workers())
atexit.register(_POOL.shutdown)
os.register_at_fork(after_in_child=_POOL.after_fork_in_child)


# ---------------------------------------------------------------------------------------- public API


def warm_up_reward_workers(timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
    """Start the verifier processes now and wait for them (a second or two), e.g. in a trainer's setup.

    Otherwise the first reward call pays the start-up; either way start-up never counts as an item timeout.
    """
    _POOL.warm_up(timeout_s)


def math_verdicts(
    completions: list[str], references: list[str], timeout_s: float = 2.0, last_number_fallback: bool = False
) -> list[str]:
    """One verdict per completion: ``correct``, ``unevaluated`` (equivalent to the reference only once the
    arithmetic it leaves is done, e.g. ``\\boxed{23 + 73}`` for 96), ``wrong`` or ``no_answer``.

    This is the RL hot path (hundreds of completions per step). Each item gets ``timeout_s`` of worker time
    once it is dispatched; with ``W`` workers a batch takes at most about ``ceil(n / W) * timeout_s``.
    Completions without a usable answer, or whose answer is character-for-character the reference, are
    judged in the caller without IPC, and repeated ``(answer, reference)`` pairs are verified once.
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
    if task_of:
        tasks = list(task_of)
        for task, verdict in zip(tasks, _POOL.run(tasks, timeout_s), strict=True):
            for i in task_of[task]:
                verdicts[i] = verdict
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
    on any completion text and returns within about ``timeout_s``, from any thread.
    """
    return math_rewards([completion], [reference], timeout_s, require_final_form=require_final_form)[0]
