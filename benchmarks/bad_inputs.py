"""Run ``lit-dash fit`` on bad input, as a user would, and tabulate the message each run ends with.

Each case is the tiny test config (tests/configs/tiny.yaml: tiny-llama, arithmetic, real vLLM) plus
command-line flags, and sometimes a broken data file or a user reward module written to a scratch folder.
Input errors end before any model loads or engine starts (the seconds column shows it); the reward and
loss cases need a running job, so they start the engine and take longer.

    .venv/bin/python benchmarks/bad_inputs.py [--only NAME,...] [--markdown table.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TINY = REPO / "tests" / "configs" / "tiny.yaml"

USER_MODULE = """
import math
from lit_dash.module import DashModule

class RaisingReward(DashModule):
    def reward(self, completions, problems):
        return [float(c.split("=")[1]) for c in completions]  # IndexError on a completion without "="

class NaNReward(DashModule):
    def reward(self, completions, problems):
        return [math.nan if len(c) % 3 == 0 else 0.0 for c in completions]

class PerPromptReward(DashModule):
    def reward(self, completions, problems):
        return [0.0] * (len(completions) // 4)  # one value per prompt instead of per completion

class NaNLoss(DashModule):
    def micro_batch_loss(self, *args, **kwargs):
        loss, stats = super().micro_batch_loss(*args, **kwargs)
        return loss * math.nan, stats
"""


def _files(root: Path) -> dict[str, Path]:
    files = {
        "broken.jsonl": '{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": "#### 4"}\n'
        '{"question": "3+3?", "answer": "#### 6"\n',
        "no_answer.jsonl": '{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": "4"}\n',
        "empty.jsonl": "\n",
        "my_rewards.py": USER_MODULE,
    }
    out = {}
    for name, text in files.items():
        (root / name).write_text(text)
        out[name] = root / name
    return out


def cases(files: dict[str, Path]) -> list[tuple[str, str, list[str]]]:
    """(name, what is wrong, CLI flags after ``fit --config tiny.yaml``)."""
    return [
        ("unknown_model", "unknown model alias", ["--model.init_args.model", "smollm3-135m"]),
        ("missing_model", "missing model folder", ["--model.init_args.model", "./checkpoints/my-sft"]),
        (
            "missing_file",
            "missing data file",
            ["--data.train", json.dumps({"source": "gsm8k", "path": str(DATA / "gsm8k_trian.jsonl")})],
        ),
        (
            "missing_folder",
            "missing data folder",
            ["--data.train", json.dumps({"source": "gsm8k", "path": "../shared/dta"})],
        ),
        (
            "malformed_jsonl",
            "malformed JSONL",
            ["--data.train", json.dumps({"source": "gsm8k", "path": str(files["broken.jsonl"])})],
        ),
        (
            "no_reference",
            "a row with no reference answer",
            ["--data.train", json.dumps({"source": "gsm8k", "path": str(files["no_answer.jsonl"])})],
        ),
        (
            "empty_dataset",
            "an empty dataset",
            ["--data.train", json.dumps({"source": "gsm8k", "path": str(files["empty.jsonl"])})],
        ),
        ("group_size", "group_size < 2", ["--data.group_size", "1", "--data.filter_threshold", "0.1"]),
        ("micro_batch", "micro_batch_size larger than the rollout", ["--data.micro_batch_size", "64"]),
        ("threshold", "negative filter_threshold", ["--data.filter_threshold", "-0.1"]),
        ("kl_coef", "negative kl_coef", ["--model.init_args.kl_coef", "-0.01"]),
        ("context", "max_new_tokens beyond the context", ["--data.sampling.max_new_tokens", "4096"]),
        (
            "max_model_len",
            "engine.max_model_len below the budget",
            ["--data.engine.max_model_len", "64", "--data.max_prompt_tokens", "128"],
        ),
        ("raising_reward", "a reward that raises", ["--model", "my_rewards.RaisingReward"]),
        ("nan_reward", "a reward that returns NaN", ["--model", "my_rewards.NaNReward"]),
        ("count_reward", "a reward with one value per prompt", ["--model", "my_rewards.PerPromptReward"]),
        (
            "nan_loss",
            "a NaN loss at every step",
            ["--model", "my_rewards.NaNLoss", "--trainer.max_steps", "5"],
        ),
    ]


def _model_flags(flags: list[str]) -> list[str]:
    """``--model my_rewards.X`` replaces the config's class; keep tiny.yaml's model settings."""
    if "--model" not in flags:
        return flags
    return flags + ["--model.init_args.model", "tiny-llama", "--model.init_args.lr", "1.0e-4"]


def run_case(flags: list[str], workdir: Path, timeout_s: float) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), str(workdir)]))
    cmd = [sys.executable, "-m", "lit_dash.cli", "fit", "--config", str(TINY)]
    cmd += ["--trainer.default_root_dir", str(workdir / "runs"), "--trainer.callbacks", "[]"]
    cmd += _model_flags(flags)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return proc.returncode, lines[-1] if lines else "(no message)", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args()
    only = {n for n in args.only.split(",") if n}
    rows = ["| bad input | flags | exit | seconds | message |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = _files(workdir)
        for name, what, flags in cases(files):
            if only and name not in only:
                continue
            code, message, seconds = run_case(flags, workdir, args.timeout_s)
            shown = " ".join(flags).replace(str(workdir), "<tmp>").replace(str(DATA), "<data>")
            message = message.replace(str(workdir), "<tmp>").replace(str(DATA), "<data>")
            row = f"| {what} | `{shown}` | {code} | {seconds:.0f} | `{message}` |"
            rows.append(row)
            print(row, flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
