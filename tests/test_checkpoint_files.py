"""Checkpoint files, without a training run: atomic writes (a real ``torch.save`` killed mid-write), which
files ``--ckpt_path last`` takes for complete, and the frozen reference model kept out of checkpoints.
The kill-and-resume runs through the CLI are in test_resume.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from support import TESTS, TINY, cli_env

from lit_dash.callbacks import StepCheckpoint
from lit_dash.callbacks.atomic_io import FAULT_ENV, AtomicCheckpointIO, is_complete, scan
from lit_dash.errors import ConfigError

_SAVE = """
import sys, torch
from lit_dash.callbacks.atomic_io import AtomicCheckpointIO
step, path = int(sys.argv[1]), sys.argv[2]
AtomicCheckpointIO().save_checkpoint({"global_step": step, "w": torch.full((256, 1024), float(step))}, path)
"""


def _save_in_subprocess(step: int, path: Path, fault: str = "") -> int:
    env = cli_env(**{FAULT_ENV: fault})
    return subprocess.run(
        [sys.executable, "-c", _SAVE, str(step), str(path)], env=env, timeout=120
    ).returncode


def test_a_write_killed_midway_leaves_the_previous_file_whole_and_a_temporary_no_resume_takes(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.zeros(4)}, target)
    assert _save_in_subprocess(4, target, fault="mid_write@4") == -9  # SIGKILL inside torch.save
    (temporary,) = [p for p in tmp_path.iterdir() if p != target]
    assert temporary.name.startswith(".last.ckpt.partial-") and temporary.stat().st_size >= 4096
    assert torch.load(target, weights_only=True)["global_step"] == 2, "the old file is untouched"
    found = scan(tmp_path)
    assert found.complete == [target] and found.incomplete == [temporary]
    # negative control: the same bytes under a checkpoint's name (what an in-place write killed at that
    # moment leaves) are recognised as incomplete, and torch cannot load them
    truncated = tmp_path / "epoch=0-step=4.ckpt"
    truncated.write_bytes(temporary.read_bytes())
    assert not is_complete(truncated)
    with pytest.raises(RuntimeError):
        torch.load(truncated, weights_only=True)


def test_a_completed_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "epoch=0-step=2.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, target)
    AtomicCheckpointIO().save_checkpoint({"global_step": 4}, target)
    assert os.listdir(tmp_path) == [target.name]
    assert torch.load(target, weights_only=True) == {"global_step": 4}


def _resolve_last(folder: Path) -> set[str]:
    callback = StepCheckpoint(dirpath=str(folder), every_n_train_steps=2)
    return callback._find_last_checkpoints(SimpleNamespace(default_root_dir=str(folder.parent)))


def _complete(path: Path, step: int, mtime: float) -> Path:
    torch.save({"global_step": step}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_last_is_the_newest_complete_checkpoint_whatever_its_name(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    older = _complete(folder / "epoch=0-step=2.ckpt", 2, 1000)
    (folder / "last.ckpt").symlink_to("epoch=0-step=0.ckpt")  # its target is gone
    (folder / "epoch=0-step=6.ckpt").write_bytes(b"PK\x03\x04 truncated")  # newer, incomplete
    assert _resolve_last(folder) == {str(older)}, "no last.ckpt needed; incomplete and dangling skipped"

    newest = _complete(folder / "epoch=0-step=4.ckpt", 4, 2000)
    assert _resolve_last(folder) == {str(newest)}
    (folder / "last.ckpt").unlink()
    (folder / "last.ckpt").symlink_to(newest.name)
    assert _resolve_last(folder) == {str(folder / "last.ckpt")}, "the link, when it points at the newest"


def test_last_over_only_incomplete_files_is_an_error_naming_them_and_a_missing_folder_starts_anew(tmp_path):
    folder = tmp_path / "checkpoints"
    assert _resolve_last(folder) == set()  # no folder: a new run (Lightning's behaviour)
    folder.mkdir()
    assert _resolve_last(folder) == set()  # empty folder: likewise
    (folder / ".epoch=0-step=2.ckpt.partial-123").write_bytes(b"PK")
    with pytest.raises(
        ConfigError, match=r"no complete checkpoint, only \.epoch=0-step=2\.ckpt\.partial-123"
    ):
        _resolve_last(folder)


def test_the_cli_refuses_to_start_over_a_run_with_only_a_partial_checkpoint(tmp_path, capsys, monkeypatch):
    from lit_dash.cli import main

    monkeypatch.syspath_prepend(str(TESTS))  # tiny_reward
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".epoch=0-step=2.ckpt.partial-9").write_bytes(b"PK")
    args = ["fit", "--config", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "holds no complete checkpoint, only .epoch=0-step=2.ckpt.partial-9" in err
    assert not (tmp_path / "lightning_logs").exists(), "stopped before any training"


def test_the_frozen_reference_model_is_left_out_of_a_checkpoint_and_restored_from_the_base_model():
    from lit_dash.module import DashModule

    saved = DashModule(model="tiny-llama", kl_coef=0.05)
    saved.configure_model()
    with torch.no_grad():
        next(saved.policy.parameters()).add_(1.0)  # the policy moved away from the base model
    state = {k: v.clone() for k, v in saved.state_dict().items()}
    reference_keys = {k for k in state if k.startswith("reference.")}
    assert reference_keys, "control: with kl_coef > 0 the module's state_dict holds the reference"
    checkpoint = {"state_dict": state}
    saved.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("reference.") for k in checkpoint["state_dict"])
    assert set(checkpoint["state_dict"]) == set(state) - reference_keys

    resumed = DashModule(model="tiny-llama", kl_coef=0.05)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"], strict=True)
    for (name, got), want in zip(resumed.state_dict().items(), saved.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


# ---- background writes (StepCheckpoint(background_writes: true)) ----------------------------------------


def _blocked_worker(io):
    """Hold the IO's worker thread until the returned event is set."""
    import threading

    release = threading.Event()
    io.after_queued_writes(release.wait)
    return release


@pytest.mark.parametrize("snapshot", [True, False])
def test_a_background_write_saves_the_step_it_was_asked_for_and_runs_off_the_callers_thread(
    tmp_path, snapshot, monkeypatch
):
    from lit_dash.callbacks import background_io
    from lit_dash.callbacks.background_io import BackgroundCheckpointIO

    if not snapshot:  # negative control: without the snapshot the file gets the weights as mutated later
        monkeypatch.setattr(background_io, "_snapshot", lambda t, buffer=None: t)
    io = BackgroundCheckpointIO()
    release = _blocked_worker(io)
    weights = torch.zeros(8)
    target = tmp_path / "epoch=0-step=2.ckpt"
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": weights}}, target)
    assert not target.exists(), "save_checkpoint returned before the write: it is the worker's"
    weights.add_(1.0)  # the next optimizer step changes the live tensor in place
    release.set()
    io.teardown()
    saved = torch.load(target, weights_only=True)["state_dict"]["w"]
    assert torch.equal(saved, torch.zeros(8)) is snapshot


class _Pair(NamedTuple):  # module level: the checkpoint pickles it
    weights: torch.Tensor
    count: int


def test_background_snapshots_reach_tensors_inside_namedtuples_and_keep_their_type(tmp_path):
    from lit_dash.callbacks.background_io import BackgroundCheckpointIO

    io = BackgroundCheckpointIO()
    release = _blocked_worker(io)
    weights = torch.zeros(4)
    io.save_checkpoint({"loops": {"pair": _Pair(weights, 3), "list": [weights]}}, tmp_path / "a.ckpt")
    weights.add_(1.0)  # changed in place before the worker writes
    release.set()
    io.teardown()
    saved = torch.load(tmp_path / "a.ckpt", weights_only=False)["loops"]
    assert type(saved["pair"]) is _Pair and saved["pair"].count == 3
    assert torch.equal(saved["pair"].weights, torch.zeros(4)), "the namedtuple's tensor was not snapshotted"
    assert torch.equal(saved["list"][0], torch.zeros(4))


def test_background_snapshots_reuse_their_buffers_and_still_save_each_steps_values(tmp_path):
    from lit_dash.callbacks.background_io import BackgroundCheckpointIO

    io = BackgroundCheckpointIO()
    weights = torch.zeros(8)
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": weights}}, tmp_path / "a.ckpt")
    buffer = io._buffers[("state_dict", "w")]
    weights.add_(1.0)
    io.save_checkpoint({"global_step": 4, "state_dict": {"w": weights}}, tmp_path / "b.ckpt")
    assert io._buffers[("state_dict", "w")].data_ptr() == buffer.data_ptr(), "the same buffer, copied into"
    io.teardown()
    assert torch.equal(torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]["w"], torch.zeros(8))
    assert torch.equal(torch.load(tmp_path / "b.ckpt", weights_only=True)["state_dict"]["w"], torch.ones(8))


def test_background_writes_delete_and_relink_only_after_the_new_file_is_whole(tmp_path):
    from lit_dash.callbacks.atomic_io import replace_link
    from lit_dash.callbacks.background_io import BackgroundCheckpointIO

    io = BackgroundCheckpointIO()
    old, new, last = (
        tmp_path / "epoch=0-step=2.ckpt",
        tmp_path / "epoch=0-step=4.ckpt",
        tmp_path / "last.ckpt",
    )
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, old)
    replace_link(str(old), str(last))
    release = _blocked_worker(io)
    io.save_checkpoint({"global_step": 4}, new)  # what StepCheckpoint asks for, in its order
    io.after_queued_writes(replace_link, str(new), str(last))
    io.remove_checkpoint(old)
    # a kill now (the write still queued) would leave the previous checkpoint and a link to it
    assert old.exists() and not new.exists() and os.path.realpath(last) == str(old)
    assert scan(tmp_path).complete == [old, last]
    release.set()
    io.wait()
    assert not old.exists() and is_complete(new) and os.path.realpath(last) == str(new)
    assert torch.load(last, weights_only=True)["global_step"] == 4
    io.teardown()


def test_a_background_write_error_reaches_the_training_loop(tmp_path):
    from lit_dash.callbacks.background_io import BackgroundCheckpointIO

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the checkpoint folder should be")
    io = BackgroundCheckpointIO()
    io.save_checkpoint({"global_step": 2}, blocker / "epoch=0-step=2.ckpt")
    with pytest.raises(OSError):
        io.wait()
    io.teardown()


def test_background_writes_refuse_a_foreign_checkpoint_io():
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    trainer = SimpleNamespace(
        strategy=SimpleNamespace(checkpoint_io=AsyncCheckpointIO()),
        default_root_dir="/tmp",
        is_global_zero=False,
    )
    with pytest.raises(ConfigError, match="background_writes"):
        StepCheckpoint(background_writes=True).setup(trainer, None, "fit")
