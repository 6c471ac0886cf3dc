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
pool of long-lived worker processes:

* inside a worker, an interval timer (``setitimer``) stops Python-level slowness at 80% of ``timeout_s``;
* in the caller, each item has a hard deadline of ``timeout_s`` from dispatch; a worker that misses it is
  killed (SIGKILL) and replaced, and the item scores 0.0.

This works from any thread (the caller only waits on pipes) and from several threads at once (workers are
checked out per call). Workers are fresh ``python`` subprocesses (never a fork of a multi-threaded trainer
with CUDA and vLLM in it), and they are warmed up once before they take work, so start-up time never
counts against an item's deadline. Cheap cases (no ``\\boxed{}``, an over-long answer, an answer that is
character-for-character the reference) are answered in the caller without any IPC.

math_verify behaviour worth knowing (checked in ``tests/test_rewards.py``): ``1,000``=``1000``,
``\\$18``=``18``, ``18.00``=``18``, ``\\dfrac{3}{4}``=``0.75``, ``90^\\circ``=``90``, ``x=5``=``5``,
``50\\%``=``0.5``, ``10\\text{ cm}``=``10`` all score 1; ``\\frac{1}{3}`` vs reference ``0.333`` scores 0
(floats are compared to 6 decimals), ``1e3`` vs ``1000`` scores 0 (``e`` is read as Euler's number), and
the unordered list ``1,2`` equals ``2,1`` (comma lists are read as sets).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from typing import Any

from lit_dash.data.sources import last_boxed

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
_POLL_S = 0.05  # how often a caller with work left looks for workers freed by other threads


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


def _worker_entry(read_fd: int, write_fd: int) -> None:
    """Serve ``(answer, reference, soft_timeout_s)`` requests until the pipe closes."""
    import signal

    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us

    def on_timer(signum: int, frame: Any) -> None:
        raise _SoftTimeout

    signal.signal(signal.SIGALRM, on_timer)
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # "Timeout is disabled" etc. are expected here
    _verdict("1", "1")  # warm-up: the first parse compiles regexes and fills SymPy caches (~0.3 s)
    outbox.send("ready")
    while True:
        try:
            msg = inbox.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        answer, reference, soft_timeout_s = msg
        verdict = WRONG
        try:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            try:
                verdict = _verdict(answer, reference)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException:  # noqa: BLE001 - _SoftTimeout, RecursionError, MemoryError...: all wrong
            verdict = WRONG
        outbox.send(verdict)


# ------------------------------------------------------------------------------------- parent side


class _Worker:
    """One verifier subprocess, talked to over a pair of pipes wrapped as multiprocessing Connections.

    A plain ``python -c`` subprocess rather than a multiprocessing Process: forking a multi-threaded trainer
    is unsafe, and the spawn/forkserver start methods re-import the caller's ``__main__``, which breaks
    unguarded user scripts and notebooks.
    """

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # same imports as the parent
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _WORKER_BOOT, str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self.conn = Connection(from_child_r, writable=False)
        self.ready = False
        self.started = time.monotonic()

    def send(self, msg: Any) -> None:
        self._send.send(msg)

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._send.close()
        self.conn.close()


_WORKER_BOOT = (
    "import sys; from lit_dash.rewards.math import _worker_entry; _worker_entry(*map(int, sys.argv[1:]))"
)


@dataclass
class _Slot:
    """A worker checked out by one call, with the item it is working on (None while warming up)."""

    worker: _Worker
    idx: int | None = None
    deadline: float = 0.0


class _VerifierPool:
    """Worker processes shared by all threads; each call checks workers out, so calls never interleave."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._pid: int | None = None
        self.hard_timeouts = 0  # items whose worker had to be killed: a health signal worth logging

    def after_fork_in_child(self) -> None:
        """A forked child (e.g. a fork-started data loader) must neither use nor kill the parent's workers."""
        self._cond = threading.Condition()  # the parent's lock may have been held by another thread
        self._idle, self._all, self._pid = [], set(), None

    def _ensure_started(self) -> None:  # caller holds the lock
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._idle, self._all = [], set()
        for _ in range(self.num_workers):
            self._add_worker()

    def _add_worker(self) -> None:  # caller holds the lock
        w = _Worker()
        self._all.add(w)
        self._idle.append(w)
        self._cond.notify()

    def _checkout(self, block: bool) -> _Worker | None:
        with self._cond:
            self._ensure_started()
            while not self._idle:
                if not block:
                    return None
                self._cond.wait()
            return self._idle.pop()

    def _release(self, w: _Worker) -> None:
        with self._cond:
            if w in self._all:
                self._idle.append(w)
                self._cond.notify()

    def _replace(self, w: _Worker) -> None:
        w.kill()
        with self._cond:
            self._all.discard(w)
            if self._pid == os.getpid():
                self._add_worker()

    def warm_up(self, timeout_s: float) -> None:
        """Start the workers and wait until every idle one has finished importing and warming up."""
        with self._cond:
            self._ensure_started()
            cold = [w for w in self._idle if not w.ready]
            for w in cold:
                self._idle.remove(w)
        deadline = time.monotonic() + timeout_s
        dead: list[_Worker] = []
        try:
            for w in cold:
                if not w.conn.poll(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"reward workers did not start within {timeout_s:.0f} s")
                try:
                    w.ready = w.conn.recv() == "ready"
                except (EOFError, OSError):
                    dead.append(w)
        finally:
            for w in cold:
                if w in dead:
                    self._replace(w)
                else:
                    self._release(w)
        if dead:
            raise RuntimeError("a reward worker exited during start-up; check that math_verify imports")

    def shutdown(self) -> None:
        with self._cond:
            workers, self._all, self._idle, self._pid = list(self._all), set(), [], None
        for w in workers:
            w.kill()

    def run(self, tasks: list[tuple[str, str]], timeout_s: float) -> list[str]:
        """Verdicts on ``(answer, reference)`` pairs; each gets ``timeout_s`` of worker time from dispatch
        (one that misses it is ``wrong``)."""
        results = [WRONG] * len(tasks)
        todo = deque(range(len(tasks)))
        active: dict[Connection, _Slot] = {}

        def dispatch(slot: _Slot) -> None:
            slot.idx = todo.popleft()
            answer, reference = tasks[slot.idx]
            slot.worker.send((answer, reference, max(0.001, _SOFT_FRACTION * timeout_s)))
            slot.deadline = time.monotonic() + timeout_s

        def start(slot: _Slot) -> None:
            if slot.worker.ready:
                dispatch(slot)
            else:
                slot.idx, slot.deadline = None, slot.worker.started + _STARTUP_TIMEOUT_S

        try:
            while todo or active:
                if not todo:  # nothing left to hand out: give back workers that are still warming up
                    for conn in [c for c, s in active.items() if s.idx is None]:
                        self._release(active.pop(conn).worker)
                    if not active:
                        break
                warming = sum(1 for s in active.values() if s.idx is None)
                while len(todo) > warming:
                    w = self._checkout(block=not active)
                    if w is None:
                        break
                    slot = _Slot(w)
                    active[w.conn] = slot
                    start(slot)
                    warming += slot.idx is None
                now = time.monotonic()
                wait_s = max(0.0, min(s.deadline for s in active.values()) - now)
                if todo:
                    wait_s = min(wait_s, _POLL_S)
                for conn in wait(list(active), timeout=wait_s):
                    slot = active[conn]
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):  # the worker died (OOM killer, segfault): item scores 0
                        del active[conn]
                        self._replace(slot.worker)
                        continue
                    if msg == "ready":
                        slot.worker.ready = True
                    elif slot.idx is not None:
                        results[slot.idx] = str(msg)
                    if todo:
                        dispatch(slot)
                    else:
                        del active[conn]
                        self._release(slot.worker)
                now = time.monotonic()
                for conn, slot in list(active.items()):
                    if slot.deadline > now:
                        continue
                    del active[conn]
                    self._replace(slot.worker)
                    if slot.idx is None:
                        raise RuntimeError(
                            f"reward worker did not start within {_STARTUP_TIMEOUT_S:.0f} s; "
                            "check that math_verify imports in a fresh interpreter"
                        )
                    self.hard_timeouts += 1
                    logger.debug(
                        "reward item %d hit the %.2f s timeout; worker replaced", slot.idx, timeout_s
                    )
        finally:
            # Only reached with slots left on an exception (e.g. KeyboardInterrupt): a busy worker would
            # later send a stale answer, so it is replaced rather than returned.
            for slot in active.values():
                if slot.idx is None:
                    self._release(slot.worker)
                else:
                    self._replace(slot.worker)
        return results


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
