"""Benchmarks that run ``lit-dash`` commands, each in its own process, share this: one way to launch a
run, keep its console in ``<root>/output.log`` and fail with that log's end when the run fails."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_logged(command: list[str], root: Path, label: str) -> float:
    """Run ``command`` from the repository (on PYTHONPATH), its output into ``root/output.log``; return
    its wall seconds. Raises RuntimeError naming ``label`` with the log's last 15 lines if it fails."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"[{label}]: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with (root / "output.log").open("w") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        tail = "\n".join((root / "output.log").read_text().splitlines()[-15:])
        raise RuntimeError(f"{label} failed (exit {code}); end of {root}/output.log:\n{tail}")
    return wall
