"""Shared fixtures: one vLLM engine per model per test session, the local data, the models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ENGINES: dict[str, object] = {}


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from lit_dash.models import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from lit_dash.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


def _engine(path: str):
    if path not in _ENGINES:
        from lit_dash.engines.vllm_engine import VLLMEngine

        _ENGINES[path] = VLLMEngine(path, seed=0, kv_cache_gib=0.5, max_model_len=512)
    return _ENGINES[path]


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_path):
    """The session's vLLM engine on the tiny random Llama (started once, about 10 s)."""
    return _engine(tiny_model_path)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path):
    """The session's vLLM engine on the real SmolLM2-135M-Instruct."""
    return _engine(smollm2_path)
