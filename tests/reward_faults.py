"""Judges that fail the way real verifier workers do, for ``_VerifierPool.run(..., judge=...)``.

They run in real spawn-started worker processes, so they live in a module a worker can import (``tests/``
is on the ``sys.path`` spawn hands down). Each has ``_judge``'s signature: ``(answer, reference,
soft_timeout_s) -> verdict``; ``answer`` carries what the fault needs (a marker file's path).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path


def die_the_first_time(answer: str, reference: str, soft_timeout_s: float) -> str:
    """SIGKILL its own worker mid-item, unless the marker file says a worker already died on this item."""
    marker = Path(answer)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return "correct"


def die_every_time(answer: str, reference: str, soft_timeout_s: float) -> str:
    """SIGKILL its own worker mid-item, recording the pid of each worker that took it."""
    with open(answer, "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
    return "correct"


def raise_value_error(answer: str, reference: str, soft_timeout_s: float) -> str:
    """A bug in the verifier: an ordinary exception, not a property of the answer."""
    raise ValueError(f"no rule for {answer!r}")


def return_unpicklable(answer: str, reference: str, soft_timeout_s: float) -> object:
    """A result the worker cannot send back (a lock does not pickle)."""
    return threading.Lock()


def report_pid(answer: str, reference: str, soft_timeout_s: float) -> str:
    """The worker's pid, as the verdict (so a test can kill that worker while it is idle)."""
    return str(os.getpid())
