"""Prefix caching in the vLLM engine: the same completions and log-probs with and without it, and no
stale prefill after a weight push (the cache is reset on every push; the negative control skips that)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_dash.engines import SamplingConfig

# longer than one KV block (vLLM caches whole blocks: 128 tokens on CPU by default), sharing the preamble
PREAMBLE = "Here is a long shared preamble of text that every prompt starts with. " * 12
PROMPTS = [PREAMBLE + "The capital of France is", PREAMBLE + "One plus one equals", PREAMBLE + "Two and two"]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def engines(tiny_engine, tiny_engine_prefix_cached, tiny_model_path):
    """The session's engine (prefix caching off) and the session's prefix-cached one; both get the initial
    weights back after. Neither is closed here (see conftest: closing one breaks the others)."""
    assert not tiny_engine.prefix_caching and tiny_engine_prefix_cached.prefix_caching
    yield tiny_engine_prefix_cached, tiny_engine
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    for engine in (tiny_engine, tiny_engine_prefix_cached):
        engine.load_weights(initial.items())


def _greedy(engine):
    result = engine.generate(PROMPTS, 1, GREEDY, want_logprobs=True)
    return [c.token_ids for c in result.completions], [c.logprobs for c in result.completions]


def _perturbed(path, scale):
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def test_cached_prefill_gives_the_same_completions_and_logprobs(engines):
    cached, plain = engines
    _greedy(cached)  # fills the cache with the prompts' prefixes
    tokens_c, lps_c = _greedy(cached)
    tokens_p, lps_p = _greedy(plain)
    assert tokens_c == tokens_p
    for a, b in zip(lps_c, lps_p, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_a_weight_push_never_leaves_a_stale_prefill(engines, tiny_model_path, monkeypatch):
    cached, plain = engines
    weights = _perturbed(tiny_model_path, 0.05)
    _greedy(cached)  # the cache now holds prefills under the current weights
    for engine in (cached, plain):
        engine.load_weights(weights.items())
    _, lps_c = _greedy(cached)
    _, lps_p = _greedy(plain)
    for a, b in zip(lps_c, lps_p, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # negative control: a push that skips the reset serves the old weights' prefill from the cache
    weights = _perturbed(tiny_model_path, 0.2)
    _greedy(cached)
    monkeypatch.setattr(cached._llm, "reset_prefix_cache", lambda *a, **k: True)
    for engine in (cached, plain):
        engine.load_weights(weights.items())
    _, lps_c = _greedy(cached)
    _, lps_p = _greedy(plain)
    worst = max(abs(x - y) for a, b in zip(lps_c, lps_p, strict=True) for x, y in zip(a, b, strict=True))
    assert worst > 1e-3, "without the reset the cached engine should read a stale prefill"
