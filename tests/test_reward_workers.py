"""An infrastructure failure of the math reward is never a score (issue 31), on real worker processes.

Workers that cannot start, a worker that dies on an item twice, a broken pool, an exception in the
verifier: all raise :class:`RewardWorkerError`. A comparison past its timeout keeps its defined score, 0.0,
and is counted, per caller, in :func:`reward_events`.
"""

from __future__ import annotations

import contextvars
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import reward_faults
from support import REPO

from lit_dash.rewards import RewardWorkerError, math_rewards, reward_events, warm_up_reward_workers
from lit_dash.rewards import verifier as reward_module
from lit_dash.rewards.verifier import _OUT_OF_LIMITS, _judge, _VerifierPool

HANG = "\\boxed{9^{9^{9^{9^9}}}}"  # SymPy computes a number with hundreds of millions of digits
SLACK_S = 1.5  # on top of timeout_s for IPC, killing and replacing a worker on a loaded 2-core box

# The script: nine correct answers, three of which the caller answers itself (the same LaTeX as
# the reference) and six of which need the workers. It calls math_rewards, which DashModule.reward calls,
# so that each run does not pay for importing torch and Lightning twice.
SCRIPT = """\
import lit_dash
from lit_dash.rewards import math_rewards

{guard}print("LIT_DASH", lit_dash.__file__)
{indent}completions = ["so \\\\boxed{{96}}"] * 3 + ["so \\\\boxed{{\\\\frac{{3}}{{4}}}}"] * 3 + ["so \\\\boxed{{1+x^2}}"] * 3
{indent}references = ["96"] * 3 + ["0.75"] * 3 + ["x^2+1"] * 3
{indent}print("SCORES", math_rewards(completions, references))
"""


def run_script(tmp_path, guarded: bool) -> subprocess.CompletedProcess:
    guard, indent = ('if __name__ == "__main__":\n    ', "    ") if guarded else ("", "")
    script = tmp_path / ("guarded.py" if guarded else "unguarded.py")
    script.write_text(SCRIPT.format(guard=guard, indent=indent))
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "LIT_DASH_REWARD_WORKERS": "1"}
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )


# ------------------------------------------------------------------------- workers that cannot start


def test_an_unguarded_script_fails_loudly_instead_of_scoring_zeros(tmp_path):
    start = time.monotonic()
    result = run_script(tmp_path, guarded=False)
    assert result.returncode != 0, result.stdout
    assert "SCORES" not in result.stdout  # no scores at all, rather than six wrong zeros
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("lit_dash.rewards.verifier.RewardWorkerError: reward workers could not start")
    assert f"this script ({tmp_path / 'unguarded.py'}) runs again in each reward worker" in last_line
    assert "put its work under `if __name__ == '__main__':`" in last_line
    # the worker's own traceback, above, says the same from where the script called the reward
    assert "the math reward was called while this script was being imported again" in result.stderr
    assert time.monotonic() - start < 60  # at once, not after the 120 s start-up deadline


def test_the_guarded_script_scores_all_nine(tmp_path):
    """The negative control: the same script, guarded, gets nine 1.0s from real workers."""
    result = run_script(tmp_path, guarded=True)
    assert result.returncode == 0, result.stderr
    assert f"LIT_DASH {REPO / 'lit_dash' / '__init__.py'}" in result.stdout  # this checkout's code
    assert f"SCORES {[1.0] * 9}" in result.stdout


# ------------------------------------------------------------------------------ a worker that dies


@pytest.fixture
def pool():
    """A one-worker pool of its own, so killing its workers leaves the shared pool alone."""
    own = _VerifierPool(1)
    own.warm_up(120)
    yield own
    own.shutdown()


def test_a_worker_killed_mid_item_gets_the_item_retried_on_a_fresh_worker(pool, tmp_path):
    marker = tmp_path / "died"
    verdicts, restarts = pool.run([(str(marker), "5")], 30.0, judge=reward_faults.die_the_first_time)
    assert marker.exists()  # a worker really took the item and died on it
    assert verdicts == ["correct"] and restarts == 1
    assert pool.run([("x", "5")], 30.0) == (["wrong"], 0)  # the refilled pool works as before


def test_a_worker_that_dies_twice_on_an_item_raises(pool, tmp_path):
    pids = tmp_path / "pids"
    with pytest.raises(RewardWorkerError, match=r"died on the answer .* twice, with exit codes -9 and -9"):
        pool.run([(str(pids), "5")], 30.0, judge=reward_faults.die_every_time)
    first, second = pids.read_text().split()
    assert first != second  # the retry ran on a fresh worker, not on the dead one


def test_a_pool_that_broke_between_calls_is_replaced_and_counted(pool):
    """An idle worker killed (the out-of-memory killer, say): pebble gives the pool up; no item was lost."""
    (pid,), _ = pool.run([("a", "5")], 30.0, judge=reward_faults.report_pid)
    os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pool._pool.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pool._pool.active  # pebble declared it broken
    with reward_events() as events:
        assert pool.run([("a", "5")], 30.0, judge=reward_faults.report_pid)[1] == 1
        assert math_rewards(["so \\boxed{0.5}"], ["\\frac{1}{2}"]) == [1.0]  # the shared pool: untouched
    assert events.worker_restarts == 0  # the own pool's restart is its own, not the shared pool's


def test_an_exception_in_the_verifier_raises_and_is_not_scored(pool):
    with pytest.raises(
        RewardWorkerError, match=r"ValueError: no rule for 'x\^2' .*not a property of the answer"
    ):
        pool.run([("x^2", "5")], 30.0, judge=reward_faults.raise_value_error)


def test_a_result_that_cannot_be_sent_back_raises(pool):
    with pytest.raises(RewardWorkerError, match="could not judge the answer 'a'"):
        pool.run([("a", "5")], 30.0, judge=reward_faults.return_unpicklable)


# ----------------------------------------------------------------- answers that exhaust the verifier


@pytest.mark.parametrize("error", [RecursionError, MemoryError])
def test_recursion_and_memory_errors_are_the_answers_not_the_machinerys(monkeypatch, error):
    """SymPy on an adversarial answer: the defined score, counted as a timeout. Anything else raises."""

    def verdict(answer, reference):
        raise error("too deep")

    monkeypatch.setattr(reward_module, "_verdict", verdict)
    assert _judge("1", "1", 1.0) == _OUT_OF_LIMITS
    monkeypatch.setattr(reward_module, "_verdict", lambda a, r: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):  # a bug in the verdict is raised, not scored 0
        _judge("1", "1", 1.0)


def test_a_hanging_comparison_scores_zero_and_is_counted():
    warm_up_reward_workers()
    start = time.monotonic()
    with reward_events() as events:
        scores = math_rewards([HANG, "so \\boxed{0.5}", HANG], ["5", "\\frac{1}{2}", "5"], timeout_s=0.5)
    assert scores == [0.0, 1.0, 0.0]
    assert time.monotonic() - start < 2 * 0.5 + SLACK_S
    # the two hanging completions are one (answer, reference) item, judged once, and both count
    assert (events.completions, events.timeouts) == (3, 2)
    assert events.worker_restarts <= 1  # 1 when the in-worker timer could not stop it and pebble killed it


def test_a_hard_timeout_counts_a_timeout_and_a_restart(monkeypatch):
    monkeypatch.setattr(reward_module, "_SOFT_FRACTION", 100.0)  # only the kill can stop it now
    warm_up_reward_workers()
    with reward_events() as outer, reward_events() as inner:
        assert math_rewards([HANG], ["5"], timeout_s=0.5) == [0.0]
    assert (inner.timeouts, inner.worker_restarts) == (outer.timeouts, outer.worker_restarts) == (1, 1)
    monkeypatch.undo()
    warm_up_reward_workers()  # wait for the replacement, so later timing tests see a full pool
    with reward_events() as after:
        assert math_rewards(["so \\boxed{0.5}"], ["\\frac{1}{2}"]) == [1.0]
    assert (after.timeouts, after.worker_restarts) == (0, 0)


def test_concurrent_callers_count_only_their_own_timeouts(monkeypatch):
    """A training step's counts are its own while another thread hits timeouts at the same time."""
    monkeypatch.setattr(reward_module, "_SOFT_FRACTION", 100.0)
    warm_up_reward_workers()
    counts: dict[str, tuple[int, int, int]] = {}
    barrier = threading.Barrier(2)

    def caller(name: str, completions: list[str]) -> None:
        with reward_events() as events:
            barrier.wait()
            math_rewards(completions, ["5"] * len(completions), timeout_s=0.5)
        counts[name] = (events.completions, events.timeouts, events.worker_restarts)

    threads = [
        threading.Thread(target=caller, args=("hangs", [HANG])),
        threading.Thread(target=caller, args=("clean", ["so \\boxed{5.0}", "so \\boxed{4}"] * 3)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert counts == {"hangs": (1, 1, 1), "clean": (6, 0, 0)}
    monkeypatch.undo()
    warm_up_reward_workers()


def test_a_thread_counts_into_a_scope_only_in_a_copy_of_its_context():
    with reward_events() as events:
        context = contextvars.copy_context()
        threads = [
            threading.Thread(target=math_rewards, args=(["so \\boxed{5}"], ["5"])),  # a fresh context
            threading.Thread(target=context.run, args=(math_rewards, ["so \\boxed{5}"] * 2, ["5"] * 2)),
        ]
        for thread in threads:
            thread.start()
            thread.join(timeout=30)
    assert events.completions == 2


def test_the_timeout_warning_names_the_fraction_once():
    from lit_dash.data.buffer import RolloutBuffer
    from lit_dash.rewards import RewardEvents

    buffer = RolloutBuffer(engine=None, sampling=None)
    buffer._check_reward_timeouts(RewardEvents(completions=100, timeouts=5))  # 5%: not above it
    with pytest.warns(UserWarning, match=r"6 of the 100 completions .* \(6%, above 5%\) scored 0.0"):
        buffer._check_reward_timeouts(RewardEvents(completions=100, timeouts=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buffer._check_reward_timeouts(RewardEvents(completions=100, timeouts=50))  # once per buffer


def test_a_reward_error_from_the_workers_is_not_bisected_or_blamed_on_a_completion():
    from lit_dash.data.records import Problem
    from lit_dash.rewards.scoring import score_completions

    calls = []

    def reward(completions, problems):
        calls.append(len(completions))
        raise RewardWorkerError("reward workers could not start")

    problems = [Problem(question="q", answer="1", source_id=f"t:{i}") for i in range(8)]
    with pytest.raises(RewardWorkerError, match="^reward workers could not start$"):
        score_completions(reward, ["x"] * 8, problems)
    assert calls == [8]  # passed through as it was, once
