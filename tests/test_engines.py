"""The rollout engines: vLLM (real, in-process) and the transformers fallback, same interface."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_dash.engines import SamplingConfig, build_engine
from lit_dash.hardware import resolve_dtype

PROMPTS = ["What is 2 + 3?", "Name a prime number."]


def _policy_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def test_vllm_generate_shapes_and_logprobs(tiny_engine):
    result = tiny_engine.generate(PROMPTS, n=3, sampling=SamplingConfig(max_new_tokens=8), want_logprobs=True)
    assert len(result.completions) == 6
    assert [c.prompt_index for c in result.completions] == [0, 0, 0, 1, 1, 1]
    for c in result.completions:
        assert 1 <= len(c.token_ids) <= 8
        assert len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.truncated == (
            len(c.token_ids) == 8 and c.token_ids[-1] != tiny_engine.tokenizer.eos_token_id
        )
    assert result.tokens_per_second > 0
    assert len(result.prompt_token_ids) == 2


def test_vllm_greedy_is_deterministic(tiny_engine):
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    a = tiny_engine.generate(PROMPTS, n=1, sampling=greedy)
    b = tiny_engine.generate(PROMPTS, n=1, sampling=greedy)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]


def test_weight_push_takes_effect(tiny_engine, tiny_model_path):
    """After load_weights, the engine scores a fixed sequence as the (changed) policy does; before, not."""
    dtype = resolve_dtype("auto")
    tol = 2e-3 if dtype == torch.float32 else 0.15
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ids = tiny_engine.tokenizer("The quick brown fox jumps over the lazy dog 12345")["input_ids"]
    original = {k: v.clone() for k, v in policy.state_dict().items()}

    start = torch.tensor(tiny_engine.sequence_logprobs([ids])[0])
    torch.testing.assert_close(start, _policy_logprobs(policy, ids), atol=tol, rtol=0)

    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():  # includes the tied embedding / lm_head
            p.add_(torch.randn_like(p) * 0.05)
    changed = _policy_logprobs(policy, ids)
    assert (changed - start).abs().max() > 20 * tol, "perturbation too small to tell pushes apart"
    before = torch.tensor(tiny_engine.sequence_logprobs([ids])[0])
    torch.testing.assert_close(before, start)  # nothing pushed yet: the engine still has the old weights

    tiny_engine.load_weights(policy.state_dict().items())
    after = torch.tensor(tiny_engine.sequence_logprobs([ids])[0])
    torch.testing.assert_close(after, changed, atol=tol, rtol=0)

    tiny_engine.load_weights(original.items())  # leave the session engine as it was
    torch.testing.assert_close(torch.tensor(tiny_engine.sequence_logprobs([ids])[0]), start, atol=tol, rtol=0)


def test_hf_fallback_engine_same_interface(tiny_model_path):
    engine = build_engine("hf", tiny_model_path, seed=0)
    result = engine.generate(PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=6), want_logprobs=True)
    assert [c.prompt_index for c in result.completions] == [0, 0, 1, 1]
    for c in result.completions:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    a = engine.generate(PROMPTS[:1], 1, greedy).completions[0].token_ids
    with torch.no_grad():
        for p in engine.model.parameters():
            p.zero_()
    engine.load_weights(AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict().items())
    assert engine.generate(PROMPTS[:1], 1, greedy).completions[0].token_ids == a


def test_unknown_engine_kind_is_rejected(tiny_model_path):
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        build_engine("sglang", tiny_model_path)
