"""What the TensorBoard page shows after a short fit: scalars grouped by prefix, completions as text, and
the run's hyper-parameters (module and data knobs), read back from the event files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lit_dash.logs import find_log_dir, read_hparams, read_scalars, read_texts, read_timing


def test_event_files_hold_grouped_scalars_samples_and_hparams(tiny_cli_fit):
    """tiny.yaml's fit with CompletionSamples every step (2 samples), shared with the CLI tests."""
    tmp_path = tiny_cli_fit.root
    cli = tiny_cli_fit.cli
    log_dir = find_log_dir(tmp_path)
    assert log_dir == Path(cli.trainer.log_dir)

    scalars = read_scalars(log_dir)
    groups = {tag.split("/")[0] for tag in scalars}
    assert {"train", "eval", "time"} <= groups
    # train/ at the policy version that sampled the rollout, time/ at the optimizer step it produced
    assert [step for step, _ in scalars["train/reward_mean"]] == [0, 1]
    assert [step for step, _ in scalars["eval/arithmetic/accuracy"]] == [0, 1, 2]
    assert [step for step, _ in scalars["time/generation"]] == [1, 2]
    assert all(v > 0 for _, v in scalars["time/total"])
    # the CSV and the event files carry the same per-step timings
    csv_total = [row["total"] for row in read_timing(log_dir)]
    assert csv_total == pytest.approx([v for _, v in scalars["time/total"]], rel=1e-5)

    texts = read_texts(log_dir)
    assert [step for step, _ in texts] == [1, 2]
    assert texts[0][1].count("**prompt**") == 2 and "**reward**" in texts[0][1]

    # RewardAudit (in tiny.yaml): beside train/, at the same steps; the parity reward pays random text,
    # which has no answer at all, so nothing it paid is a hack
    assert {"audit"} <= groups
    assert [step for step, _ in scalars["audit/rewarded_fraction"]] == [0, 1]
    paid = [v for _, v in scalars["audit/rewarded_fraction"]]
    assert paid == pytest.approx([float(v) for _, v in scalars["train/reward_mean"]])
    # the shares of the paid completions: logged at exactly the steps that paid some, and zero there
    paid_steps = [step for step, v in scalars["audit/rewarded_fraction"] if v > 0]
    assert paid_steps, "the parity reward pays about half of random text: some step must have paid"
    for tag in ("audit/unevaluated_fraction", "audit/restated_fraction"):
        assert scalars.get(tag, []) == [(step, 0.0) for step in paid_steps], tag
    audit_texts = read_texts(log_dir, tag="audit/rewarded")
    assert len(audit_texts) == sum(v > 0 for v in paid)
    assert all("**verdict** no_answer" in t and "**reference**" in t for _, t in audit_texts)

    hparams = read_hparams(log_dir)
    assert hparams["model"] == "tiny-llama" and hparams["lr"] == pytest.approx(1e-4)
    assert hparams["group_size"] == 4 and hparams["prompts_per_rollout"] == 4
    assert hparams["rollout_mode"] == "preemptive" and hparams["sampling/max_new_tokens"] == 16
    assert hparams["train/difficulty"] == "add1" and hparams["eval_sets/arithmetic/num_problems"] == 8


def test_find_log_dir_takes_the_newest_run_and_names_a_folder_without_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        find_log_dir(tmp_path)
    old, new = tmp_path / "lightning_logs" / "version_0", tmp_path / "lightning_logs" / "version_1"
    for folder, mtime in ((new, 2_000_000_000), (old, 1_000_000_000)):
        folder.mkdir(parents=True)
        (folder / "timing.csv").write_text("step,total,generation\n1.0,2.5,1.5\n2.0,3.0,2.0\n")
        os.utime(folder, (mtime, mtime))
    assert find_log_dir(tmp_path) == new
    assert find_log_dir(old) == old
    assert read_timing(tmp_path) == [
        {"step": 1.0, "total": 2.5, "generation": 1.5},
        {"step": 2.0, "total": 3.0, "generation": 2.0},
    ]
