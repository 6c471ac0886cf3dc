"""Bad input is refused before any model loads or engine starts, with a message that names what to fix."""

from __future__ import annotations

import json
import subprocess

import pytest
from support import REPO, TINY, cli_command, cli_env

from lit_dash.cli import build_cli
from lit_dash.data import datamodule as datamodule_module
from lit_dash.data.datamodule import EngineConfig, ProblemSource, RolloutDataModule
from lit_dash.data.sources import DataError, load_problems
from lit_dash.engines import SamplingConfig
from lit_dash.errors import ConfigError, InputError, find_input_error
from lit_dash.models import ModelNotFoundError, context_length
from lit_dash.module import DashModule


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if anything tries to start an engine or load the policy's weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("an engine or model was loaded before the bad input was reported")

    monkeypatch.setattr(datamodule_module, "build_engine", refuse)
    monkeypatch.setattr(DashModule, "configure_model", refuse)


def _fit(tmp_path, *flags: str):
    return build_cli(
        [
            "fit",
            "--config",
            str(TINY),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.callbacks",
            "[]",
        ]
        + list(flags)
    )


def _train(source: str, path) -> str:
    return json.dumps({"source": source, "path": str(path)})


# ---- knobs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 1}, r"group_size must be >= 2 completions per prompt .* got 1"),
        (
            {"micro_batch_size": 129},
            r"micro_batch_size \(129 completions\) is larger than the rollout .* 128",
        ),
        ({"filter_threshold": -0.1}, r"filter_threshold must be >= 0 or null \(no filtering\), got -0.1"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens and eval_max_new_tokens must be >= 1 tokens"),
        ({"truncated": "drop"}, r"truncated must be one of \('keep', 'mask', 'penalty'\), got 'drop'"),
        (
            {"overlong_buffer_tokens": 32},
            r"overlong_buffer_tokens \(32\) is the buffer of truncated: penalty",
        ),
        (
            {"truncated": "penalty", "overlong_buffer_tokens": 129},
            r"overlong_buffer_tokens must be 1..sampling.max_new_tokens \(128\) tokens, got 129",
        ),
        (
            {"engine": EngineConfig(max_model_len=100), "max_prompt_tokens": 64},
            r"engine.max_model_len \(100 tokens\) is smaller than max_prompt_tokens \+ "
            r"sampling.max_new_tokens \(64 \+ 128 = 192 tokens\)",
        ),
    ],
)
def test_data_knobs_that_cannot_work_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RolloutDataModule(**kwargs)


def test_several_bad_knobs_are_reported_together():
    with pytest.raises(ConfigError) as info:
        RolloutDataModule(group_size=1, filter_threshold=-1.0, rollout_mode="sync")
    message = str(info.value)
    assert "group_size" in message and "filter_threshold" in message and "rollout_mode" in message


def test_bad_sampling_is_a_config_error():
    with pytest.raises(ConfigError, match="sampling max_new_tokens must be >= 1, got 0"):
        SamplingConfig(max_new_tokens=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kl_coef": -0.01}, "kl_coef must be >= 0, got -0.01"),
        ({"max_nonfinite_steps": 0}, "max_nonfinite_steps must be >= 1"),
        ({"model": "./checkpoints/my-sft"}, "model path './checkpoints/my-sft' does not exist"),
    ],
)
def test_module_knobs_are_config_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        DashModule(**{"model": "tiny-llama", **kwargs})


# ---- the model's context, from config.json alone --------------------------------------------------


def test_context_length_is_read_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    assert context_length(str(tmp_path)) == (512, f"max_position_embeddings in {tmp_path / 'config.json'}")
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"n_positions": 1024}}))
    assert context_length(str(tmp_path))[0] == 1024
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="cannot read the model config"):
        context_length(str(tmp_path))


def test_alias_context_is_known_before_its_folder_is_built(tmp_path):
    assert context_length("tiny-llama", cache=tmp_path) == (2048, "the tiny-llama alias")
    assert context_length("org/never-downloaded-model") is None  # unknown: no check, no network


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"sampling": SamplingConfig(max_new_tokens=2000)},
            r"max_prompt_tokens \+ sampling.max_new_tokens \(256 \+ 2000 = 2256 tokens\) is more than the "
            r"context of model 'tiny-llama' \(2048 tokens, max_position_embeddings in .*config.json\); "
            r"lower data.sampling.max_new_tokens or data.max_prompt_tokens",
        ),
        (
            {"eval_sets": {"a": ProblemSource()}, "eval_max_new_tokens": 1900},
            r"max_prompt_tokens \+ eval_max_new_tokens \(256 \+ 1900 = 2156 tokens\)",
        ),
        ({"engine": EngineConfig(max_model_len=4096)}, r"engine.max_model_len \(4096 tokens\) is more than"),
    ],
)
def test_budget_beyond_the_model_context_is_refused(tiny_model_path, kwargs, match):
    del tiny_model_path  # the alias folder exists, so its config.json is what gets read
    with pytest.raises(ConfigError, match=match):
        RolloutDataModule(**kwargs).check_model_context("tiny-llama")
    RolloutDataModule().check_model_context("tiny-llama")  # the defaults fit


# ---- data -----------------------------------------------------------------------------------------


def test_a_missing_data_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match=r"data path not found: \.\./no/such/dir \(resolved to /"):
        load_problems("gsm8k", "../no/such/dir", "train")
    with pytest.raises(DataError, match="data file not found: .*gsm8k_train.jsonl"):
        load_problems("gsm8k", str(tmp_path), "train")  # a folder without the file


def test_zero_limit_is_refused(tmp_path):
    """Before any file is read: a folder without the data gives the limit's error, not the path's."""
    for source in ("gsm8k", "math", "math500", "math12k", "arithmetic"):
        with pytest.raises(DataError, match="limit must be a positive integer"):
            load_problems(source, str(tmp_path), "train", limit=0)


# ---- through `lit-dash fit`: refused before the engine or the model is loaded ----------------------


@pytest.mark.parametrize(
    "flags, error, match",
    [
        (
            ["--data.train", _train("gsm8k", "/nonexistent/gsm8k_trian.jsonl")],
            DataError,
            "data file not found",
        ),
        (["--data.train", _train("gsm8k", "../shared/dta")], DataError, "data path not found"),
        (["--data.sampling.max_new_tokens", "4000"], ConfigError, "is more than the context"),
        (
            ["--data.eval_sets", json.dumps({"b": {"source": "math500", "split": "train"}})],
            DataError,
            "MATH-500",
        ),
    ],
)
def test_fit_reports_bad_input_before_any_engine_or_model(
    tmp_path, monkeypatch, no_engine, flags, error, match
):
    monkeypatch.chdir(REPO)
    with pytest.raises(error, match=match):
        _fit(tmp_path, *flags)


def test_malformed_jsonl_names_file_and_line_through_fit(tmp_path, no_engine):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n\n{"question": "2+2?", "answer": "#### 4"\n')
    with pytest.raises(DataError, match=rf"{bad}:3: not valid JSON \(Expecting ',' delimiter at column 40\)"):
        _fit(tmp_path, "--data.train", _train("gsm8k", bad))


def test_knob_errors_are_found_behind_the_config_parser(tmp_path):
    with pytest.raises(ValueError) as info:
        _fit(tmp_path, "--model.init_args.model", "smollm3-135m")
    found = find_input_error(info.value)  # jsonargparse wraps it in "Does not validate against ..."
    assert isinstance(found, ModelNotFoundError) and "unknown model 'smollm3-135m'" in str(found)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    """The console entry point: the message alone on stderr, no traceback, exit status 2."""
    proc = subprocess.run(
        cli_command("fit", "--data.group_size", "1"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "lit-dash: error: data configuration: group_size must be >= 2 completions per prompt for "
        "group-normalised advantages, got 1"
    )
