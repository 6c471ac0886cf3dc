"""Model aliases and name checks: errors come before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_dash.models import ALIASES, ModelNotFoundError, check_model_name, resolve_model


def test_unknown_alias_names_the_choices():
    with pytest.raises(ModelNotFoundError, match="unknown model 'smollm3'.*smollm2-135m-instruct"):
        check_model_name("smollm3")


def test_missing_local_path_is_reported(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        check_model_name(str(tmp_path / "nope"))


def test_folder_without_config_is_reported(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        check_model_name(str(tmp_path))


def test_hub_id_passes_through():
    assert resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_aliases_resolve_to_cached_transformers_folders(tiny_model_path, smollm2_path):
    assert set(ALIASES) == {"smollm2-135m-instruct", "tiny-llama"}
    real = json.loads((Path(smollm2_path) / "config.json").read_text())
    tiny = json.loads((Path(tiny_model_path) / "config.json").read_text())
    assert real["model_type"] == "llama" and real["num_hidden_layers"] == 30 and real["tie_word_embeddings"]
    assert "quantization_config" not in real  # de-quantised, loadable by vLLM and transformers
    assert tiny["num_hidden_layers"] == 2 and tiny["vocab_size"] == real["vocab_size"]
    assert resolve_model("tiny-llama") == tiny_model_path  # cached: the second call reuses the folder
