"""Checkpoint and resume.

The prompt position a checkpoint holds is the number of batches training consumed (the DataLoader has
already fetched one more); RNG states survive a save and a ``weights_only`` load; and a real
``lit_dash.cli fit`` (kl_coef > 0, fp32) stopped three ways in a row (SIGKILL between the step-2 file and
``last``, SIGTERM in step 3, SIGKILL in the middle of step 4's checkpoint write), each time resumed with
``--ckpt_path last``, ends with the uninterrupted run's weights, AdamW moments and LR-scheduler state,
bit for bit, training on the same prompts, with the engine serving the resumed weights from its first
rollout.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support import REPO, TINY, cli_command, cli_env, run_logged, sequence_logprobs

from lit_dash.callbacks.atomic_io import FAULT_ENV, is_temporary
from lit_dash.checkpointing import restore_rng_states, rng_states_by_rank
from lit_dash.data.datamodule import PromptStream, RolloutDataModule
from lit_dash.data.records import Problem
from lit_dash.data.sources import DataError


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
    assert state == {"consumed_batches": 1, "prompts_per_rollout": 3, "refill_prompts_consumed": 0}

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


# ---- a real run, stopped three ways and resumed -------------------------------------------------------

STEPS = 4  # tiny.yaml checkpoints every 2 steps, at the end and on SIGTERM
PINNED = [  # a reference model in the run, and fp32 everywhere: the end state must match bit for bit
    "--model.init_args.kl_coef",
    "0.05",
    "--model.init_args.precision",
    "float32",
    "--data.init_args.engine.dtype",
    "float32",
]


def _fit(root: Path, tag: str, *extra: str) -> list[str]:
    return cli_command(
        "fit",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        str(STEPS),
        *PINNED,
        "--trainer.callbacks+=recorders.PromptLog",
        f"--trainer.callbacks.path={root}/{tag}_prompts",
        *extra,
    )


def _records(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(f"{path}.rank0.jsonl").read_text().splitlines()]


def _run(cmd: list[str], log: Path, fault: str = "", expect: int = 0) -> str:
    return run_logged(cmd, log, env=cli_env(**{FAULT_ENV: fault}), expect=expect, timeout=300)


def _listing(folder: Path) -> dict[str, str]:
    """Each entry of a checkpoint folder: ``-> target`` for a link, ``partial`` for a temporary file."""
    return {
        ("<partial>." + p.name.split(".partial-")[0][1:] if is_temporary(p.name) else p.name): (
            f"-> {os.readlink(p)}" if p.is_symlink() else "file"
        )
        for p in sorted(folder.iterdir())
    }


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """An uninterrupted run, and one stopped three times, resumed with ``--ckpt_path last`` each time."""
    tmp = tmp_path_factory.mktemp("resume")
    reference, run = tmp / "reference", tmp / "run"
    folder = run / "checkpoints"
    out: dict = {"reference": reference, "run": run}
    _run(_fit(reference, "run"), tmp / "reference.log")
    out["reference_listing"] = _listing(reference / "checkpoints")
    out["reference_final"] = _load(reference / "checkpoints" / "last.ckpt")

    # 1. SIGKILL right after step 2's file got its name, before last.ckpt pointed at it
    _run(_fit(run, "a"), tmp / "a.log", fault="after_write@2", expect=-signal.SIGKILL)
    out["after_sigkill_after_write"] = _listing(folder)

    # 2. resumed; SIGTERM while step 3 runs
    marks = run / "started"
    cmd = _fit(run, "b", "--trainer.callbacks+=recorders.StepStarted", f"--trainer.callbacks.path={marks}")
    log = tmp / "b.log"
    with log.open("w") as f:
        proc = subprocess.Popen([*cmd, "--ckpt_path", "last"], cwd=REPO, env=cli_env(), stdout=f, stderr=f)
        deadline = time.monotonic() + 300
        while not Path(f"{marks}.step2").exists():  # step 3 has begun
            assert proc.poll() is None, f"the run ended before step 3 began:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "step 3 never began"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    out["sigterm_rc"], out["sigterm_log"] = proc.returncode, log.read_text()
    out["after_sigterm"] = _listing(folder)
    out["sigterm_checkpoint"] = _load(folder / "last.ckpt")

    # 3. resumed; SIGKILL in the middle of writing step 4's checkpoint
    resume = [*_fit(run, "c"), "--ckpt_path", "last"]
    _run(resume, tmp / "c.log", fault="mid_write@4", expect=-signal.SIGKILL)
    out["after_sigkill_mid_write"] = _listing(folder)

    # 4. resumed to the end, probing the engine before its first rollout
    probe = f"{run}/probe"
    resume = [
        *_fit(run, "d", "--trainer.callbacks+=recorders.EngineProbe", f"--trainer.callbacks.path={probe}")
    ]
    out["final_log"] = _run([*resume, "--ckpt_path", "last"], tmp / "d.log")
    out["final_listing"] = _listing(folder)
    out["final"] = _load(folder / "last.ckpt")
    out["probe"] = _records(probe)
    out["prompts"] = {tag: _records(f"{run}/{tag}_prompts") for tag in "abcd"}
    out["reference_prompts"] = _records(f"{reference}/run_prompts")
    return out


def state_differences(a: dict, b: dict) -> list[str]:
    """What differs, exactly (no tolerance), between two checkpoints' training states: weights, AdamW's
    exp_avg / exp_avg_sq / step and param groups, the LR scheduler, the step, the prompt position, the
    counters and the torch RNG state."""
    diffs = [f"global_step {a['global_step']} != {b['global_step']}"] * (a["global_step"] != b["global_step"])
    if a["state_dict"].keys() != b["state_dict"].keys():
        diffs.append("state_dict keys")
    diffs += [
        f"weights {k}" for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])
    ]
    (opt_a,), (opt_b,) = a["optimizer_states"], b["optimizer_states"]
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            if not torch.equal(value, opt_b["state"][index][name]):
                diffs.append(f"adamw state[{index}].{name}")
    if opt_a["param_groups"] != opt_b["param_groups"]:
        diffs.append("adamw param_groups")
    if a["lr_schedulers"] != b["lr_schedulers"]:
        diffs.append("lr_scheduler")
    for key in ("RolloutDataModule",):
        if a[key] != b[key]:
            diffs.append(key)
    counters = ("skipped_steps", "nonfinite_steps")
    if any(a["lit_dash"][c] != b["lit_dash"][c] for c in counters):
        diffs.append("lit_dash counters")
    if not torch.equal(a["lit_dash"]["rng"][0]["torch"], b["lit_dash"]["rng"][0]["torch"]):
        diffs.append("torch rng")
    return diffs


def test_last_is_a_link_to_the_one_file_kept_and_the_reference_model_is_not_in_it(runs):
    assert runs["reference_listing"] == {"epoch=0-step=4.ckpt": "file", "last.ckpt": "-> epoch=0-step=4.ckpt"}
    final = runs["reference_final"]
    assert final["hyper_parameters"]["kl_coef"] == 0.05  # the run had a reference model ...
    keys = final["state_dict"].keys()
    assert keys and all(k.startswith("policy.") for k in keys)  # ... and the checkpoint holds only the policy
    weights = {v.untyped_storage().data_ptr(): v.nbytes for v in final["state_dict"].values()}  # tied: once
    moments = sum(
        t.nbytes for state in final["optimizer_states"][0]["state"].values() for t in state.values()
    )
    size = (runs["reference"] / "checkpoints" / "epoch=0-step=4.ckpt").stat().st_size
    stored = sum(weights.values()) + moments
    assert stored < size < stored + sum(weights.values()) / 10, (
        "a reference model would add the weights again"
    )


def test_sigkill_between_the_step_file_and_last_resumes_from_the_step_file(runs):
    assert runs["after_sigkill_after_write"] == {"epoch=0-step=2.ckpt": "file"}, "no last.ckpt yet"
    assert "--ckpt_path last: resuming from" in runs["sigterm_log"]
    assert "epoch=0-step=2.ckpt" in runs["sigterm_log"].split("resuming from", 1)[1].splitlines()[0]
    assert [r["step"] for r in runs["prompts"]["b"]] == [3], "continued from step 2, not from step 0"


def test_sigterm_exits_143_with_last_at_the_finished_step(runs):
    assert runs["sigterm_rc"] == 128 + signal.SIGTERM, runs["sigterm_log"][-3000:]
    assert "stopped by SIGTERM at a step boundary" in runs["sigterm_log"]
    assert runs["sigterm_checkpoint"]["global_step"] == 3
    # the file resumed from is kept (Lightning never deletes it), the step-3 file, and the link to it
    assert runs["after_sigterm"] == {
        "epoch=0-step=2.ckpt": "file",
        "epoch=0-step=3.ckpt": "file",
        "last.ckpt": "-> epoch=0-step=3.ckpt",
    }


def test_sigkill_mid_write_leaves_the_previous_checkpoint_and_resume_goes_on_from_it(runs):
    assert runs["after_sigkill_mid_write"] == {
        "<partial>.epoch=0-step=4.ckpt": "file",  # the interrupted write, under its temporary name
        "epoch=0-step=2.ckpt": "file",
        "epoch=0-step=3.ckpt": "file",
        "last.ckpt": "-> epoch=0-step=3.ckpt",
    }
    log = runs["final_log"]
    assert "a checkpoint write that was interrupted" in log and "resuming from" in log
    assert runs["final_listing"] == {
        "epoch=0-step=2.ckpt": "file",
        "epoch=0-step=4.ckpt": "file",
        "last.ckpt": "-> epoch=0-step=4.ckpt",
    }
    assert runs["final"]["global_step"] == STEPS
    assert runs["final"]["RolloutDataModule"] == {
        "consumed_batches": STEPS,
        "prompts_per_rollout": 4,
        "refill_prompts_consumed": 0,
    }


def test_the_stopped_and_resumed_run_trains_on_the_uninterrupted_prompts_and_samples(runs):
    steps = {tag: [r["step"] for r in records] for tag, records in runs["prompts"].items()}
    assert steps == {"a": [1, 2], "b": [3], "c": [4], "d": [4]}  # c's step 4 died in its checkpoint write
    resumed = runs["prompts"]["a"] + runs["prompts"]["b"] + runs["prompts"]["d"]
    expected = runs["reference_prompts"]
    assert [r["ids"] for r in resumed] == [r["ids"] for r in expected]
    assert runs["prompts"]["c"][0]["ids"] == runs["prompts"]["d"][0]["ids"], "the lost step, redone"
    # RNG states restored: the engine even samples the same completions as the uninterrupted run
    assert [r["completions_sha"] for r in resumed] == [r["completions_sha"] for r in expected]


def test_the_resumed_run_ends_with_the_uninterrupted_state_bit_for_bit(runs):
    reference, final = runs["reference_final"], runs["final"]
    assert state_differences(reference, final) == []
    # negative controls: one step fewer (the SIGTERM checkpoint) differs everywhere it should ...
    fewer = " ".join(state_differences(reference, runs["sigterm_checkpoint"]))
    for part in ("global_step", "weights policy.", "exp_avg", "exp_avg_sq", ".step", "lr_scheduler"):
        assert part in fewer, part
    # ... and one AdamW second moment one float32 ulp off is caught
    nudged = {**final, "optimizer_states": [copy.deepcopy(final["optimizer_states"][0])]}
    value = nudged["optimizer_states"][0]["state"][3]["exp_avg_sq"].view(-1)
    value[7] = torch.nextafter(value[7], torch.tensor(float("inf")))
    assert state_differences(reference, nudged) == ["adamw state[3].exp_avg_sq"]


def test_the_engine_serves_the_resumed_weights_from_its_first_rollout(runs):
    (record,) = runs["probe"]
    assert record["step"] == 3
    engine_lp, policy_lp = torch.tensor(record["engine"]), torch.tensor(record["policy"])
    torch.testing.assert_close(engine_lp, policy_lp, atol=0.15, rtol=0)
    # ... and the policy's are not the initial model's (three steps at lr 1e-4 move a random model)
    from transformers import AutoModelForCausalLM

    from lit_dash.models import resolve_model

    initial = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32)
    initial_lp = sequence_logprobs(initial, record["ids"])
    assert (initial_lp - policy_lp).abs().max() > 5 * (engine_lp - policy_lp).abs().max()


@pytest.fixture(scope="module")
def background_run(runs, tmp_path_factory) -> dict:
    """The same run with ``StepCheckpoint(background_writes: true)``: SIGKILLed right after its step-2 file
    got its name (the worker thread's write; training had gone on to step 3), then resumed to the end."""
    import yaml

    tmp = tmp_path_factory.mktemp("background")
    config = yaml.safe_load(TINY.read_text())
    (checkpoint,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("StepCheckpoint")]
    checkpoint["init_args"]["background_writes"] = True
    override = tmp / "background.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": config["trainer"]["callbacks"]}}))
    run = tmp / "run"
    cmd = _fit(run, "a")
    cmd[cmd.index(str(TINY)) + 1 : cmd.index(str(TINY)) + 1] = ["--config", str(override)]
    _run(cmd, tmp / "a.log", fault="after_write@2", expect=-signal.SIGKILL)
    out = {"after_kill": _listing(run / "checkpoints")}
    out["log"] = _run([*cmd, "--ckpt_path", "last"], tmp / "b.log")
    out["listing"] = _listing(run / "checkpoints")
    out["final"] = _load(run / "checkpoints" / "last.ckpt")
    return out


def test_background_checkpoint_writes_resume_exactly(runs, background_run):
    assert background_run["after_kill"] == {"epoch=0-step=2.ckpt": "file"}, "no last.ckpt yet"
    assert "resuming from" in background_run["log"]
    assert background_run["listing"] == {  # the step-4 file and its link, written before the process exited
        "epoch=0-step=2.ckpt": "file",
        "epoch=0-step=4.ckpt": "file",
        "last.ckpt": "-> epoch=0-step=4.ckpt",
    }
    assert state_differences(runs["reference_final"], background_run["final"]) == []
