"""DDP through Lightning on the CPU (gloo): a real ``lit_dash.cli fit`` with two ranks, each with its own
vLLM engine and its own share of the prompts; one rank keeps nothing after filtering, yet both take the
same optimizer steps and hold identical weights after every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.engine
def test_two_ranks_stay_in_step_when_one_keeps_nothing(tmp_path):
    steps = 2
    cmd = [
        sys.executable,
        "-m",
        "lit_dash.cli",
        "fit",
        "--config",
        str(REPO / "tests" / "configs" / "tiny.yaml"),
        "--model.class_path",
        "tiny_reward.RankOneKeepsNothing",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        str(steps),
        "--trainer.default_root_dir",
        str(tmp_path),
        "--data.filter_threshold",
        "0.1",
        "--data.engine.kv_cache_gib",
        "0.25",
        "--trainer.callbacks+=recorders.WeightChecksum",
        f"--trainer.callbacks.path={tmp_path}/weights",
        "--trainer.callbacks+=recorders.PromptLog",
        f"--trainer.callbacks.path={tmp_path}/prompts",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    log = tmp_path / "fit.log"
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=400)
    assert proc.returncode == 0, log.read_text()[-4000:]

    rank0, rank1 = (_records(tmp_path / f"weights.rank{r}.jsonl") for r in (0, 1))
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2]
    assert all(r["kept"] == 0 and r["micro_batches"] == 0 for r in rank1), "rank 1's rewards are constant"
    assert all(r["kept"] > 0 for r in rank0), "rank 0's parity reward gives mixed groups"
    assert rank1[-1]["skipped_steps"] == 0, "rank 0 kept completions: not a no-op step for anyone"
    for a, b in zip(rank0, rank1, strict=True):  # identical weights after every step ...
        assert a["sum"] == b["sum"] and a["weighted"] == b["weighted"], (a, b)
    assert rank1[0]["weighted"] != rank1[1]["weighted"], "... and rank 1 moved with rank 0's gradient"

    prompts0, prompts1 = (_records(tmp_path / f"prompts.rank{r}.jsonl") for r in (0, 1))
    seen0 = {i for r in prompts0 for i in r["ids"]}
    seen1 = {i for r in prompts1 for i in r["ids"]}
    assert seen0 and seen1 and not seen0 & seen1, "each rank draws from its own share of the prompts"
