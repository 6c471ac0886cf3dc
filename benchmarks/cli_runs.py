"""Benchmarks that run ``lit-dash`` commands, each in its own process, share this: one way to launch a
run, keep its console in ``<root>/output.log`` and fail with that log's end when the run fails; a fresh
folder per run and the heavy files dropped after reading; the ``--`` that passes arguments on to every
``lit-dash fit``; and the JSON report of settings and results."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
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


def split_fit_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(the script's own arguments, those after ``--``, which go to every ``lit-dash fit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def fresh_root(root: Path) -> Path:
    """An empty folder for one run (a previous run's there is removed)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root


def drop_heavy(root: Path) -> None:
    """Remove a run's checkpoints and exports once its figures are read (gigabytes on the 135M model)."""
    for heavy in [*root.rglob("checkpoints"), *root.rglob("export")]:
        shutil.rmtree(heavy, ignore_errors=True)


def write_report(args: argparse.Namespace, name: str, rows: list[dict]) -> Path:
    """``<args.out>/<name>.json``: the script's settings (its arguments) and its result rows."""
    out = args.out / f"{name}.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "config")}
    report = {"settings": {**settings, "config": str(args.config)}, "results": rows}
    out.write_text(json.dumps(report, indent=2, default=str))
    return out


def fit_base_command(config: Path, steps: int, seed: int, root: Path) -> list[str]:
    """``lit-dash fit`` of ``config`` for ``steps`` optimizer steps at ``seed``, logging under ``root``,
    without the progress bar (the console goes to a log file): what a benchmark's settings add to."""
    cmd = [sys.executable, "-m", "lit_dash.cli", "fit", "--config", str(config)]
    cmd += ["--trainer.max_steps", str(steps), "--seed_everything", str(seed)]
    return cmd + ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
