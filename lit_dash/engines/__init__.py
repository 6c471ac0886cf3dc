"""Rollout engines: vLLM in-process (the real one) and the transformers fallback."""

from __future__ import annotations

from lit_dash.engines.base import Completion, Engine, GenerationResult, SamplingConfig

ENGINE_KINDS = ("vllm", "hf")


def build_engine(kind: str, model: str, seed: int = 0, **kwargs) -> Engine:
    """Start an engine by name: ``vllm`` (default) or ``hf`` (transformers generate)."""
    if kind == "vllm":
        from lit_dash.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model, seed=seed, **kwargs)
    if kind == "hf":
        from lit_dash.engines.hf_engine import HFEngine

        return HFEngine(model, seed=seed, **{k: v for k, v in kwargs.items() if k in ("dtype", "device")})
    raise ValueError(f"unknown engine {kind!r}: choose one of {', '.join(ENGINE_KINDS)}")


__all__ = ["Completion", "Engine", "GenerationResult", "SamplingConfig", "build_engine", "ENGINE_KINDS"]
