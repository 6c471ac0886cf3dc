"""The LightningCLI end to end (tiny model, real vLLM), and every shipped config parses."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from support import REPO, TINY, sequence_logprobs

from lit_dash.callbacks.timing import PHASES
from lit_dash.cli import build_cli, check_config
from lit_dash.data.datamodule import RolloutDataModule
from lit_dash.logs import read_scalars
from lit_dash.module import DashModule

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_against_the_code(config, monkeypatch):
    monkeypatch.chdir(REPO)  # configs name ../shared/data relative to the repo root
    init = check_config(str(config))
    assert isinstance(init.model, DashModule)
    assert isinstance(init.data, RolloutDataModule)
    assert init.data.group_size >= 2


def test_a_bad_knob_is_refused_with_its_name(tmp_path):
    with pytest.raises(ValueError, match="micro_batch_size .* is larger than the rollout"):
        build_cli(["--config", str(TINY), "--data.micro_batch_size", "999"], run=False)


def test_two_step_fit_through_the_cli(tiny_cli_fit):
    # float32 pinned (trainer and engine): the parity gap below is at rounding level only there, and `auto`
    # is bf16 on a bf16-native machine
    cli = tiny_cli_fit.cli
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 2
    log_dir = Path(trainer.log_dir)
    rows = list(csv.DictReader((log_dir / "timing.csv").open()))
    assert [int(float(r["step"])) for r in rows] == [1, 2]
    assert all(float(r["generation"]) > 0 and float(r["forward_backward"]) > 0 for r in rows)
    # resident memory of the one process (engine included): a model and an engine are far over 100 MiB
    assert all(float(r["peak_rss_mib"]) >= float(r["rss_mib"]) > 100 for r in rows)
    for r in rows:  # the phases and "other" partition each step's wall time; weight sync happens every step
        parts = sum(float(r[p]) for p in (*PHASES, "other"))
        assert parts == pytest.approx(float(r["total"]), rel=1e-6)
        assert float(r["weight_sync"]) > 0 and float(r["profiler_s"]) >= 0
    evals = sorted((log_dir / "eval").glob("arithmetic_fit_step*.jsonl"))
    assert len(evals) == 3  # step 0, 1, 2
    record = json.loads(evals[0].read_text().splitlines()[0])
    assert {"question", "reference", "completion", "reward", "completion_tokens"} <= set(record)
    assert "Answer in one line." in record["prompt"]  # eval prompts use the configured instruction
    assert trainer.callback_metrics["train/kept_fraction"] == 1.0  # filtering is off in tiny.yaml
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert module.skipped_steps == 0
    gaps = read_scalars(log_dir, "train/engine_logprob_gap")
    assert len(gaps["train/engine_logprob_gap"]) == 2  # one per step
    assert all(0 <= gap < 1e-3 for _, gap in gaps["train/engine_logprob_gap"]), gaps  # threshold: 0.02

    # the engine served the policy's weights at every rollout (the gap of stale weights is 10x and more:
    # test_parity.py); that it serves pushed weights exactly is test_engine_follows.py's, and that the
    # final push reaches the last evaluation is test_export.py's (plain vLLM on the export, same text)
    from transformers import AutoModelForCausalLM

    ids = cli.datamodule.engine.tokenizer("What is 3 + 4? The answer is 7.")["input_ids"]
    initial = AutoModelForCausalLM.from_pretrained(module.model_path(), dtype=torch.float32)
    moved = (sequence_logprobs(initial, ids) - sequence_logprobs(module.policy, ids)).abs().max()
    assert moved > 1e-2, "two steps at lr 1e-4 should move the policy"


@pytest.mark.parametrize("flag", ["--optimizer=Adam", "--lr_scheduler.class_path=StepLR", "--optimizer"])
def test_optimizer_and_scheduler_flags_are_refused_with_what_to_set(flag, capsys):
    from lit_dash.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(TINY), flag])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not supported" in err and "lr_schedule" in err, err
    # without the refusal LightningCLI would have offered them (auto_configure_optimizers=False removes them)
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"], run=False)
    assert "--optimizer" not in capsys.readouterr().out


def test_help_names_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        build_cli(["--help"], run=False)
    out = capsys.readouterr().out
    assert all(name in out for name in ("fit", "validate", "test", "predict", "lit-dash export"))
