"""Checkpoint and resume.

The prompt position a checkpoint holds is the number of batches training consumed (the DataLoader has
already fetched one more); RNG states survive a save and a ``weights_only`` load; and a real
``lit_dash.cli fit`` killed with SIGKILL in the middle of a step resumes with ``--ckpt_path last`` to the
end, training on exactly the prompts an uninterrupted run trains on, with the engine serving the resumed
weights from its first rollout.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_dash.checkpointing import restore_rng_states, rng_states_by_rank
from lit_dash.data.datamodule import PromptStream, RolloutDataModule
from lit_dash.data.records import Problem
from lit_dash.data.sources import DataError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def _problems(n: int) -> list[Problem]:
    return [Problem(question=f"What is {i} + 1?", answer=str(i + 1), source_id=f"p{i}") for i in range(n)]


def _ids(batch: list[Problem]) -> list[str]:
    return [p.source_id for p in batch]


def test_stream_batch_k_does_not_depend_on_where_the_stream_started():
    problems = _problems(10)  # 3 prompts per batch: 3 batches per epoch, one problem left out each epoch
    stream = iter(PromptStream(problems, 3, seed=7))
    uninterrupted = [_ids(next(stream)) for _ in range(8)]
    for k in range(8):
        assert _ids(next(iter(PromptStream(problems, 3, seed=7, start_batch=k)))) == uninterrupted[k]
    order = list(range(10))
    random.Random(7 * 100_003 + 0).shuffle(order)  # epoch 0's order, by hand
    assert uninterrupted[1] == [f"p{i}" for i in order[3:6]]
    epoch0 = sum(uninterrupted[:3], [])
    assert len(set(epoch0)) == 9, "an epoch draws each problem at most once"
    assert uninterrupted[3:6] != uninterrupted[:3], "each epoch is reshuffled"


def test_resumed_loader_starts_at_the_first_batch_training_did_not_consume():
    dm = RolloutDataModule(prompts_per_rollout=3, group_size=2, micro_batch_size=2)
    dm.train_problems = _problems(10)
    fetched = iter(dm.train_dataloader())
    first, second = next(fetched), next(fetched)  # Lightning fetches one batch ahead of the step
    dm.consumed_batches += 1  # what on_after_batch_transfer does for the one step that ran
    state = dm.state_dict()
    assert state == {"consumed_batches": 1, "prompts_per_rollout": 3}

    resumed = RolloutDataModule(prompts_per_rollout=3, group_size=2, micro_batch_size=2)
    resumed.train_problems = _problems(10)
    resumed.load_state_dict(state)
    assert _ids(next(iter(resumed.train_dataloader()))) == _ids(second)
    assert _ids(second) != _ids(first)


def test_a_checkpoint_without_the_consumed_count_is_refused():
    dm = RolloutDataModule(prompts_per_rollout=3, group_size=2, micro_batch_size=2)
    with pytest.raises(ValueError, match="no consumed_batches"):
        dm.load_state_dict({"stream": {"epoch": 0, "position": 6}})


def test_a_shard_smaller_than_one_batch_is_refused():
    with pytest.raises(DataError, match="cannot fill one batch of prompts_per_rollout=4"):
        PromptStream(_problems(3), 4, seed=0)


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    torch.save({"rng": rng_states_by_rank()}, tmp_path / "state.pt")
    expected = (torch.rand(4), random.random(), float(np.random.rand()))
    torch.rand(10), random.random(), np.random.rand()  # move every generator on
    assert restore_rng_states(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    torch.testing.assert_close(torch.rand(4), expected[0], rtol=0, atol=0)
    assert (random.random(), float(np.random.rand())) == expected[1:]


# ---- a real run, killed and resumed -------------------------------------------------------------------


def _fit(root: Path, steps: int, tag: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lit_dash.cli",
        "fit",
        "--config",
        str(TINY),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(steps),
        "--trainer.callbacks+=recorders.PromptLog",
        f"--trainer.callbacks.path={root}/{tag}_prompts",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def _records(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(f"{path}.rank0.jsonl").read_text().splitlines()]


def _run(cmd: list[str], log: Path, timeout_s: float = 300) -> None:
    with log.open("w") as out:
        proc = subprocess.run(
            cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s
        )
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.engine
def test_sigkill_mid_step_then_resume_trains_on_the_uninterrupted_prompts(tmp_path):
    steps = 5  # checkpoints every 2 steps (tiny.yaml); the kill comes during step 4, after step 3
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    _run(_fit(reference, steps, "run"), tmp_path / "reference.log")

    marks = broken / "started"
    broken.mkdir()
    cmd = _fit(
        broken,
        steps,
        "killed",
        "--trainer.callbacks+=recorders.StepStarted",
        f"--trainer.callbacks.path={marks}",
    )
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not Path(f"{marks}.step3").exists():  # step 4 has begun
            assert proc.poll() is None, f"the run ended before step 4 began:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "step 4 never began"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed = _records(f"{broken}/killed_prompts")
    assert [r["step"] for r in killed] == [1, 2, 3], "killed after step 3, before step 4 ended"
    last = broken / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2  # every 2 steps: step 3 was lost

    probe = f"{broken}/probe"
    resume = _fit(broken, steps, "resumed", "--trainer.callbacks+=recorders.EngineProbe")
    resume += [f"--trainer.callbacks.path={probe}", "--ckpt_path", "last"]
    _run(resume, tmp_path / "resumed.log")

    resumed = _records(f"{broken}/resumed_prompts")
    assert [r["step"] for r in resumed] == [3, 4, 5]
    expected = _records(f"{reference}/run_prompts")
    assert [r["ids"] for r in killed[:2] + resumed] == [r["ids"] for r in expected]
    assert resumed[0]["ids"] == killed[2]["ids"], "the step lost with the kill is redone on its own prompts"
    # RNG states restored: the engine even samples the same completions as the uninterrupted run
    assert [r["completions_sha"] for r in resumed] == [r["completions_sha"] for r in expected[2:]]
    final = torch.load(last, weights_only=False)
    assert final["global_step"] == steps
    assert final["RolloutDataModule"] == {"consumed_batches": steps, "prompts_per_rollout": 4}

    # the engine served the resumed weights from the first rollout: its log-probs are the policy's ...
    (record,) = _records(probe)
    assert record["step"] == 2
    engine_lp, policy_lp = torch.tensor(record["engine"]), torch.tensor(record["policy"])
    torch.testing.assert_close(engine_lp, policy_lp, atol=0.15, rtol=0)
    # ... and the policy's are not the initial model's (two steps at lr 1e-4 move a random model)
    from transformers import AutoModelForCausalLM

    from lit_dash.models import resolve_model

    initial = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32)
    ids = torch.tensor([record["ids"]])
    with torch.no_grad():
        logits = initial(ids).logits.float()[0, :-1]
    initial_lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    assert (initial_lp - policy_lp).abs().max() > 5 * (engine_lp - policy_lp).abs().max()
