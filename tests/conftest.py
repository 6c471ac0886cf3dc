"""Shared fixtures: one vLLM engine per model (and dtype) per test session, the local data, the models.

The shared engines compute in float32 on every machine (``dtype: auto`` would be bf16 on a bf16-native
CPU or a GPU, and the exact invariants tested against them would fail there). Tests of bf16 numerics ask
for ``tiny_engine_bf16``, started only when one of them runs.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ENGINES: dict[tuple, object] = {}


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from lit_dash.models import resolve_model

    return resolve_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from lit_dash.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


def _engine(path: str, dtype: str = "float32", kv_cache_gib: float = 0.5, prefix_caching: bool = False):
    # Engines live for the whole session: closing one in the middle tears down vLLM's process-wide
    # parallel groups, and every engine still running then fails ("pipeline model parallel group is
    # not initialized") or spins in its scheduler
    key = (path, dtype, prefix_caching)
    if key not in _ENGINES:
        from lit_dash.engines.vllm_engine import VLLMEngine

        _ENGINES[key] = VLLMEngine(
            path, seed=0, kv_cache_gib=kv_cache_gib, max_model_len=512, dtype=dtype,
            prefix_caching=prefix_caching,
        )  # fmt: skip
    return _ENGINES[key]


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_path):
    """The session's float32 vLLM engine on the tiny random Llama (started once, about 10 s)."""
    return _engine(tiny_model_path)


@pytest.fixture(scope="session")
def tiny_engine_bf16(tiny_model_path):
    """A bfloat16 vLLM engine on the tiny random Llama, for the bf16 numerics (started on first use)."""
    return _engine(tiny_model_path, "bfloat16", kv_cache_gib=0.25)


@pytest.fixture(scope="session")
def tiny_engine_prefix_cached(tiny_model_path):
    """A float32 engine on the tiny model with prefix caching on (started on first use)."""
    return _engine(tiny_model_path, kv_cache_gib=0.25, prefix_caching=True)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_path):
    """The session's float32 vLLM engine on the real SmolLM2-135M-Instruct."""
    return _engine(smollm2_path)


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tiers (tests/tiers.py): ``engine`` and ``slow``, from what it uses."""
    from tiers import tiers_of

    for item in items:
        for tier in tiers_of(item):
            item.add_marker(getattr(pytest.mark, tier))
