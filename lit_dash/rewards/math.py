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

import atexit
import concurrent.futures as cf
import logging
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pebble

from lit_dash.errors import RunStopped
from lit_dash.rewards.boxed import last_boxed

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
_OUT_OF_LIMITS = "out_of_limits"  # internal: ran out of time, recursion or memory; scored as WRONG, counted


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
    """One item, in a worker: its verdict, or ``_OUT_OF_LIMITS`` when the comparison ran out of time (the
    soft timer), of recursion depth or of memory.

    Those three are properties of the answer, not of the machinery: a policy under RL writes
    ``\\boxed{9^{9^{9^9}}}`` or a fraction nested 300 deep sooner or later, and SymPy then runs long, recurses
    past the interpreter's limit or allocates without end on every worker that tries it. So they get a
    defined score (0.0, like a wrong answer) and are counted as timeouts, where retrying or stopping the run
    would only repeat the cost. (math_verify itself already treats errors inside its own parse and compare
    as "not equal", its documented ``raise_on_error=False``.) Any other exception here is a bug or a broken
    install: it propagates to the parent, which raises :class:`RewardWorkerError` rather than score it.
    """
    try:
        signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
        try:
            return _verdict(answer, reference)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except (_SoftTimeout, RecursionError, MemoryError):
        return _OUT_OF_LIMITS


# ------------------------------------------------------------------------------------- parent side


class RewardWorkerError(RunStopped):
    """The reward's worker processes failed, so an answer could not be judged.

    Raised, never scored: 0.0 for an answer nobody compared is a wrong reward for a right answer, and a
    training run on such rewards looks like a model that learns slowly, not like a broken reward.
    """


@dataclass
class RewardEvents:
    """What the math reward counted in one :func:`reward_events` scope.

    Attributes:
        completions: completions judged by :func:`math_verdicts` (the denominator of the timeout fraction).
        timeouts: of those, completions scored 0.0 because their comparison ran past ``timeout_s`` (the
            in-worker timer or the hard kill) or SymPy ran out of recursion depth or memory on the answer.
        worker_restarts: worker processes replaced: killed on a hard timeout, or died on an item.
    """

    completions: int = 0
    timeouts: int = 0
    worker_restarts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, completions: int, timeouts: int, worker_restarts: int) -> None:
        with self._lock:  # a scope's context may be copied into several threads
            self.completions += completions
            self.timeouts += timeouts
            self.worker_restarts += worker_restarts


# The scopes open in this context, innermost last. A ContextVar, not a global: each thread has its own
# context, so concurrent callers (an evaluation beside a training step) never count each other's calls.
_SCOPES: ContextVar[tuple[RewardEvents, ...]] = ContextVar("lit_dash_reward_events", default=())


@contextmanager
def reward_events() -> Iterator[RewardEvents]:
    """Count the timeouts and worker restarts of the math reward calls made inside this scope.

    The rollout buffer opens one per training step, which is how ``train/reward_timeouts`` and
    ``train/reward_worker_restarts`` are that step's own counts. Scopes nest (every open one counts a
    call). Counting is per context: a thread started inside the scope counts into it only when it runs in
    a copy of the scope's context (``contextvars.copy_context().run``).
    """
    events = RewardEvents()
    token = _SCOPES.set((*_SCOPES.get(), events))
    try:
        yield events
    finally:
        _SCOPES.reset(token)


def _record(completions: int, timeouts: int, worker_restarts: int) -> None:
    for events in _SCOPES.get():
        events.add(completions, timeouts, worker_restarts)


def _rerun_main() -> str | None:
    """What spawn runs again in each new worker before it can take work: the main script's path or
    module name; ``None`` when nothing is (``python -c``, a REPL, a notebook, ``python -m pkg``).

    This mirrors :mod:`multiprocessing.spawn` (``get_preparation_data`` and the ``_fixup_main_*``
    functions), without calling it: it would fix the process's default start method as a side effect.
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return None if name == "__main__" or name.endswith(".__main__") else f"module {name}"
    path = getattr(main, "__file__", None)
    if path is None or os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None
    return os.path.abspath(path)


_GUARD_FIX = "put its work under `if __name__ == '__main__':` (imports and definitions may stay at top level)"


def _check_not_bootstrapping() -> None:
    """Refuse to start workers from inside a spawn bootstrap, with the fix, instead of multiprocessing's
    generic RuntimeError: this is an unguarded script, re-run in a reward worker, calling the reward."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # what spawn itself checks
        raise RewardWorkerError(
            "the math reward was called while this script was being imported again to start a worker "
            f"process (spawn re-runs the main script in each reward worker): {_GUARD_FIX}"
        )


class _VerifierPool:
    """A `pebble <https://pebble.readthedocs.io>`_ process pool of verifier workers, started lazily.

    pebble owns the processes: per-item deadlines (counted from when a worker takes the item), killing a
    worker that misses one, replacing dead workers, shutting down at exit. What this class adds: spawn
    (never a fork of a multi-threaded trainer), a warm-up that can be waited for (each worker releases
    ``ready`` once warm, and every worker pebble replaced is owed one more release), a fresh pool after a
    fork or if pebble declares the pool broken between calls, one retry of an item whose worker died, and
    an error that names the cause (:class:`RewardWorkerError`) for everything that is not a verdict.
    """

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.hard_timeouts = 0  # items whose worker had to be killed: a health signal worth logging
        self.restarts = 0  # workers replaced (hard timeouts and deaths), over the process's life
        self._lock = threading.Lock()
        self._pool: pebble.ProcessPool | None = None
        self._pid: int | None = None
        self._ready: Any = None
        self._started = self._warm = 0  # workers started (replacements included) / seen warm

    def after_fork_in_child(self) -> None:
        """A forked child (e.g. a fork-started data loader) must neither use nor stop the parent's pool."""
        self._lock = threading.Lock()  # the parent's lock may have been held by another thread
        self._pool, self._pid = None, None

    def _get(self) -> tuple[pebble.ProcessPool, int]:
        """The pool, started if need be, and how many workers were replaced to get it (a pool pebble
        declared broken between calls, e.g. after an idle worker was killed, is replaced whole)."""
        _check_not_bootstrapping()
        replaced = 0
        with self._lock:
            if self._pool is not None and self._pid == os.getpid() and self._pool.active:
                return self._pool, 0
            if self._pool is not None and self._pid == os.getpid():  # broken: pebble gave up on it
                logger.warning("the reward worker pool broke between calls; starting a fresh one")
                self._pool.stop()
                replaced = self.num_workers
                self.restarts += replaced
            ctx = multiprocessing.get_context("spawn")
            self._ready = ctx.Semaphore(0)
            self._pool = pebble.ProcessPool(
                max_workers=self.num_workers, initializer=_worker_init, initargs=(self._ready,), context=ctx
            )
            self._pid, self._started, self._warm = os.getpid(), self.num_workers, 0
            if not self._pool.active:  # reading it starts the workers now
                raise RewardWorkerError("the reward worker pool did not start")
            return self._pool, replaced

    def _count_ready(self) -> int:
        """Workers of the current pool seen warm so far (taking every release that is waiting)."""
        with self._lock:
            while self._ready is not None and self._ready.acquire(block=False):
                self._warm += 1
            return self._warm

    def _failure(self, error: BaseException) -> RewardWorkerError:
        """The error for a pool pebble declared broken (every worker exited), with its likely cause."""
        if self._count_ready() > 0:
            return RewardWorkerError(
                f"the reward worker pool broke ({error!r}): its workers exited, so the answers sent to "
                "them were not judged; their tracebacks, if any, are on stderr above"
            )
        rerun = _rerun_main()
        if rerun is not None:
            return RewardWorkerError(
                f"reward workers could not start: every one exited before it was ready ({error!r}), so no "
                f"answer was judged. The likely cause: this script ({rerun}) runs again in each reward "
                "worker, since spawn starts a worker by re-running the main script, and it failed there "
                f"(see the tracebacks on stderr above). The fix: {_GUARD_FIX}."
            )
        return RewardWorkerError(
            f"reward workers could not start: every one exited before it was ready ({error!r}), so no "
            "answer was judged; their tracebacks are on stderr above. Check that "
            "`python -c 'import math_verify'` works in this environment"
        )

    def warm_up(self, timeout_s: float) -> None:
        """Start the workers and wait until every one has finished importing and warming up; raise at once
        (not at the deadline) when they exit instead."""
        pool, _ = self._get()
        deadline = time.monotonic() + timeout_s
        while self._count_ready() < self._started:
            if not pool.active:
                raise self._failure(BrokenProcessPool("All workers expired"))
            if time.monotonic() > deadline:
                raise RewardWorkerError(
                    f"reward workers did not start within {timeout_s:.0f} s; "
                    "check that `python -c 'import math_verify'` works in this environment"
                )
            time.sleep(0.05)

    def shutdown(self) -> None:
        with self._lock:
            pool, mine, self._pool, self._pid = self._pool, self._pid == os.getpid(), None, None
        if pool is not None and mine:
            pool.stop()
            pool.join(timeout=10)

    def _replaced(self, hard_timeout: bool) -> None:
        with self._lock:  # pebble killed or lost the worker and starts a replacement
            self._started += 1
            self.restarts += 1
            self.hard_timeouts += hard_timeout

    def _round(
        self, judge: Callable[..., str], tasks: list[tuple[str, str]], timeout_s: float
    ) -> tuple[list[tuple[str | None, BaseException | None]], int]:
        """One attempt at every task: ``(verdict, None)``, or ``(None, the ProcessExpired)`` when the item's
        worker died on it, and how many of its workers were replaced; everything else that is not a
        verdict raises :class:`RewardWorkerError`. Counts are this call's own, whatever other threads do."""
        pool, replaced = self._get()
        soft_s = max(0.001, _SOFT_FRACTION * timeout_s)
        futures: list[cf.Future] = []
        try:
            try:
                for a, r in tasks:
                    futures.append(pool.schedule(judge, args=(a, r, soft_s), timeout=timeout_s))
            except RuntimeError as error:  # pebble: "Unexpected error within the Pool" (it broke)
                raise self._failure(error) from error
            # pebble bounds each item once a worker has it; this bounds waiting for workers at all.
            _, late = cf.wait(futures, timeout=_STARTUP_TIMEOUT_S + len(tasks) * timeout_s)
            if late:
                raise RewardWorkerError(
                    f"reward workers took no work for {_STARTUP_TIMEOUT_S:.0f} s; "
                    "check that `python -c 'import math_verify'` works in this environment"
                )
            out: list[tuple[str | None, BaseException | None]] = []
            for (answer, reference), future in zip(tasks, futures, strict=True):
                error = future.exception()
                if error is None:
                    out.append((future.result(), None))
                elif isinstance(error, TimeoutError):  # the hard deadline: a defined score, counted
                    self._replaced(hard_timeout=True)
                    replaced += 1
                    out.append((_OUT_OF_LIMITS, None))
                elif isinstance(error, pebble.ProcessExpired):
                    self._replaced(hard_timeout=False)
                    replaced += 1
                    out.append((None, error))
                elif isinstance(error, BrokenProcessPool):
                    raise self._failure(error) from error
                else:  # a pickling error, or an exception from the verifier itself
                    raise RewardWorkerError(
                        f"the math reward could not judge the answer {answer[:80]!r} against the reference "
                        f"{reference[:80]!r}: {type(error).__name__}: {error} (a bug or a broken install, "
                        "not a property of the answer; the worker's traceback is chained below)"
                    ) from error
            return out, replaced
        finally:
            for future in futures:  # only matters on an exception (e.g. KeyboardInterrupt)
                future.cancel()

    def run(
        self, tasks: list[tuple[str, str]], timeout_s: float, judge: Callable[..., str] | None = None
    ) -> tuple[list[str], int]:
        """Verdicts on ``(answer, reference)`` pairs, in order (``_OUT_OF_LIMITS`` for an item that ran past
        ``timeout_s`` of worker time, counted from when a worker took it), and how many workers had to be
        replaced meanwhile.

        An item whose worker died on it (a segfault in C code, the out-of-memory killer) is retried once, in
        the pool pebble has refilled with a fresh worker; a second death raises. ``judge`` replaces
        :func:`_judge` (same signature, importable by a spawned worker) for tests of the failure paths.
        """
        judge = judge or _judge
        results, restarts = self._round(judge, tasks, timeout_s)
        died = [i for i, (_, error) in enumerate(results) if error is not None]
        if died:
            for idx in died:
                logger.warning("reward item %d: its worker died (%r); retrying it once", idx, results[idx][1])
            again, more = self._round(judge, [tasks[i] for i in died], timeout_s)
            restarts += more
            for idx, (verdict, error) in zip(died, again, strict=True):
                if error is not None:
                    first = results[idx][1]
                    answer, reference = tasks[idx]
                    raise RewardWorkerError(
                        f"a reward worker died on the answer {answer[:80]!r} (reference {reference[:80]!r}) "
                        f"twice, with exit codes {first.exitcode} and {error.exitcode} (negative: killed by "
                        "that signal, e.g. -9 by the out-of-memory killer); the answer was not judged, "
                        "and scoring it 0.0 would be a guess. Check the machine's memory (dmesg) and "
                        "LIT_DASH_REWARD_WORKERS"
                    ) from error
                results[idx] = (verdict, None)
        return [verdict for verdict, _ in results], restarts


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
