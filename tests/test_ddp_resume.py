"""Resume under DDP: each rank gets its own RNG states back. Two gloo ranks on the CPU, one launch
(tests/ddp_resume_run.py): a 2-step fit with a checkpoint per step, then a resume from step 1 on the same
ranks, then the control, a resume from a copy of that checkpoint with the ranks' RNG states swapped.

The resumed step 2 samples, on each rank, exactly the completions the uninterrupted step 2 sampled; with
the states swapped neither rank does. In the same launch, a step whose loss is not finite on rank 1 only
is skipped by both ranks. (One process resuming a two-rank checkpoint, and its warning, is in
tests/test_auto_size_and_nan_gradient.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import torch
from support import REPO, TESTS, cli_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_rank_resumes_its_own_random_stream_and_all_ranks_skip_together(tmp_path):
    port = str(_free_port())
    env = cli_env(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        WORLD_SIZE="2",
        NODE_RANK="0",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
    )
    script = [sys.executable, str(TESTS / "ddp_resume_run.py"), str(tmp_path)]
    logs = [(tmp_path / f"rank{r}.log").open("w") for r in (0, 1)]
    ranks = [
        subprocess.Popen(
            script, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=log, stderr=log
        )
        for r, log in enumerate(logs)
    ]
    try:
        codes = [p.wait(timeout=420) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    assert codes == [0, 0], "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in (0, 1))

    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=1.ckpt", weights_only=False)
    states = checkpoint["lit_dash"]["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"]), (
        "each rank's own stream is saved (the swap below changes what each rank restores)"
    )
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, run in enumerate(runs):
        assert sorted(run["A"]) == ["1", "2"] and sorted(run["B"]) == sorted(run["C"]) == ["2"], rank
        assert len(run["A"]["2"]) == 8  # 2 prompts x 4 completions
        assert run["B"]["2"] == run["A"]["2"], f"rank {rank}: the resumed step 2 sampled other completions"
        assert run["C"]["2"] != run["A"]["2"], f"rank {rank}: the other rank's RNG state gave the same ones"
    assert runs[0]["A"]["2"] != runs[1]["A"]["2"]  # the ranks sample their own prompts and streams

    # fit D: only rank 1's step-1 loss is infinite (its gradient, all-reduced, is finite): every rank
    # skips that step together, so the ranks hold the same weights after every step
    zero, one = (run["D"] for run in runs)
    assert sorted(zero) == sorted(one) == ["0", "1", "2"]
    assert zero == one, "the ranks' weights or skip counters parted"
    assert zero["1"][:2] != zero["0"][:2], "control: the finite step 0 moved the weights"
    assert zero["2"] == [*zero["1"][:2], 1], "step 1 changed no weight and was counted on every rank"
