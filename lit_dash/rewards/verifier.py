"""The verifier's containment: a small pool of long-lived worker processes that judge ``(answer, reference)``
pairs with math_verify, and the counts of what ran out of limits.

Why a pool (see :mod:`lit_dash.rewards.math` for the whole story): math_verify's own timeout uses
``signal.alarm``, which only works on the main thread, and SymPy on adversarial text (``\\boxed{9^{9^{9^9}}}``)
can run inside C code no signal interrupts. So each comparison runs in a `pebble
<https://pebble.readthedocs.io>`_ ``ProcessPool`` worker, with an in-worker interval timer at
``_SOFT_FRACTION`` of ``timeout_s`` and pebble's hard kill at ``timeout_s``. Out of time, recursion or memory is
a property of the answer (scored 0.0, counted in :func:`reward_events`); a failure of the machinery raises
:class:`RewardWorkerError`, never a score.

Worker side: :func:`_verdict` (math_verify's parse and verify, then the final-form check) and :func:`_judge`
(the same under the soft timer). Parent side: :class:`_VerifierPool` (one per process, ``_POOL``) and the
event scopes.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import logging
import multiprocessing
import os
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

__all__ = [
    "CORRECT",
    "UNEVALUATED",
    "WRONG",
    "NO_ANSWER",
    "VERDICTS",
    "RewardEvents",
    "RewardWorkerError",
    "reward_events",
    "warm_up_reward_workers",
]

logger = logging.getLogger(__name__)

_SOFT_FRACTION = 0.8  # in-worker timer, as a fraction of timeout_s; the hard kill comes at timeout_s
_STARTUP_TIMEOUT_S = 120.0  # a worker that is not ready by then means a broken install, not a slow item


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


def warm_up_reward_workers(timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
    """Start the verifier processes now and wait for them (a second or two), e.g. in a trainer's setup.

    Otherwise the first reward call pays the start-up; either way start-up never counts as an item timeout.
    """
    _POOL.warm_up(timeout_s)
