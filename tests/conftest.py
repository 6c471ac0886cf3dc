"""Shared fixtures: one vLLM engine per model (and dtype) per test session, the local data, the models.

The shared engines compute in float32 on every machine (``dtype: auto`` would be bf16 on a bf16-native
CPU or a GPU, and the exact invariants tested against them would fail there). Tests of bf16 numerics ask
for ``tiny_engine_bf16``, started only when one of them runs.
"""

from __future__ import annotations

import os
import types

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ENGINES: dict[tuple, object] = {}
GPU_GIB_PER_ENGINE = 8.0  # on CUDA: weights, vLLM's profiling peak and a KV cache, for the tiny or 135M model


def gpu_share() -> float:
    """On CUDA, the share of the GPU (vLLM's ``gpu_memory_utilization``) each session engine takes:
    ``GPU_GIB_PER_ENGINE`` of it, so the session's engines (up to four: tiny fp32, bf16 and prefix-cached,
    and the 135M model) and the CLI runs beside them fit on one card together. VLLMEngine's default, 0.3,
    is a training run's; four of those do not fit. Off CUDA the KV cache is ``kv_cache_gib`` instead."""
    import torch

    if not torch.cuda.is_available():
        return 0.3  # unused: the CPU backend sizes its KV cache by kv_cache_gib
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return min(0.3, GPU_GIB_PER_ENGINE / total_gib)


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
            path, seed=0, kv_cache_gib=kv_cache_gib, memory_fraction=gpu_share(), max_model_len=512,
            dtype=dtype, prefix_caching=prefix_caching,
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


@pytest.fixture(scope="module", name="engine")
def tiny_engine_for_fits(tiny_engine, tiny_model_path):
    """The session's fp32 tiny engine, for a module whose fits push their weights into it (each fit's
    WeightSync pushes the policy's at its start): the engine gets the initial weights back after the
    module, for the tests that read it untrained."""
    from support import restore_engine_weights

    yield tiny_engine
    restore_engine_weights(tiny_engine, tiny_model_path)


@pytest.fixture(scope="session")
def tiny_cli_fit(tmp_path_factory, tiny_engine, tiny_model_path):
    """One 2-step fit of tests/configs/tiny.yaml through the CLI (``build_cli(["fit", ...])``, in this
    process, on the session's fp32 engine), shared by the tests of what a fit leaves behind (the CLI's
    logs, the TensorBoard page, checkpoints and exports) instead of one fit each.

    The config adds to tiny.yaml: fp32 (trainer and engine), a StepCheckpoint every step keeping the best
    of ``MONITOR``, ExportModel, and CompletionSamples every step (2 samples); it is written to
    ``config`` for later ``lit-dash`` runs. The fit trains into the shared engine, which then gets its
    initial weights back. A test that runs another loop on ``cli.trainer`` (test_export's
    ``trainer.test``) gives back what that changes: the model's weights, the engine's, callback_metrics.
    """
    import yaml
    from support import MONITOR, TINY, restore_engine_weights, session_engine_for_the_cli

    from lit_dash.cli import build_cli

    root = tmp_path_factory.mktemp("tiny_cli_fit")
    config = yaml.safe_load(TINY.read_text())
    callbacks = config["trainer"]["callbacks"]
    callbacks[0]["init_args"].update(every_n_train_steps=1, monitor=MONITOR, mode="max", save_top_k=1)
    callbacks.append({"class_path": "lit_dash.callbacks.ExportModel"})
    samples = {"every_n_steps": 1, "num_samples": 2}
    callbacks.append({"class_path": "lit_dash.callbacks.CompletionSamples", "init_args": samples})
    config["model"]["init_args"]["precision"] = "float32"
    config["data"]["engine"]["dtype"] = "float32"
    path = root / "tiny_cli_fit.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        with session_engine_for_the_cli(tiny_engine):
            cli = build_cli(["fit", "--config", str(path), "--trainer.default_root_dir", str(root)])
        assert cli.datamodule.engine is tiny_engine
    finally:
        restore_engine_weights(tiny_engine, tiny_model_path)
    return types.SimpleNamespace(cli=cli, config=path, root=root)
