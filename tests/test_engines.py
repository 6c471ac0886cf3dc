"""The rollout engines: vLLM (real, in-process) and the transformers fallback, same interface."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from support import restore_engine_weights, sequence_logprobs
from transformers import AutoModelForCausalLM

from lit_dash.engines import SamplingConfig, build_engine

PROMPTS = ["What is 2 + 3?", "Name a prime number."]


def test_vllm_logprobs_are_the_samplers_after_temperature(tiny_engine, tiny_model_path):
    """processed_logprobs: each sampled token's log-prob under softmax(logits / T), as the trainer computes
    it; vLLM's default (raw) would be the T = 1 value."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    result = tiny_engine.generate(
        PROMPTS, n=2, sampling=SamplingConfig(temperature=1.3, max_new_tokens=8), want_logprobs=True
    )
    for c in result.completions:
        ids = result.prompt_token_ids[c.prompt_index] + c.token_ids
        with torch.no_grad():
            logits = policy(torch.tensor([ids])).logits[0, len(ids) - len(c.token_ids) - 1 : -1].float()
        picked = torch.tensor(c.token_ids).unsqueeze(-1)
        tempered = torch.log_softmax(logits / 1.3, -1).gather(-1, picked).squeeze(-1)
        raw = torch.log_softmax(logits, -1).gather(-1, picked).squeeze(-1)
        engine = torch.tensor(c.logprobs)
        torch.testing.assert_close(engine, tempered, atol=1e-4, rtol=0)
        assert (engine - raw).abs().max() > 1e-2  # the temperature is visible in these numbers


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


# per engine dtype: how close the engine's log-probs of the fixed sequence must be to the fp32 policy's.
# Measured (tiny model): fp32 1e-6; bf16 2e-3 on the initial weights and 0.011 after pushing weights
# perturbed by N(0, 0.05) noise, which moves the log-probs by 1.05 (> 20 x either tolerance).
PUSH_TOLERANCES = {"float32": 2e-3, "bfloat16": 0.03}


@pytest.mark.parametrize("dtype", list(PUSH_TOLERANCES))
def test_weight_push_takes_effect(request, tiny_model_path, dtype):
    """After load_weights, the engine scores a fixed sequence as the (changed) policy does; before, not.
    The shared engines are pinned: fp32 (exact), and bf16 with a bf16-sized tolerance."""
    tiny_engine = request.getfixturevalue("tiny_engine" if dtype == "float32" else "tiny_engine_bf16")
    tol = PUSH_TOLERANCES[dtype]
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ids = tiny_engine.tokenizer("The quick brown fox jumps over the lazy dog 12345")["input_ids"]
    original = {k: v.clone() for k, v in policy.state_dict().items()}

    start = torch.tensor(tiny_engine.sequence_logprobs([ids])[0])
    torch.testing.assert_close(start, sequence_logprobs(policy, ids), atol=tol, rtol=0)

    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():  # includes the tied embedding / lm_head
            p.add_(torch.randn_like(p) * 0.05)
    changed = sequence_logprobs(policy, ids)
    assert (changed - start).abs().max() > 20 * tol, "perturbation too small to tell pushes apart"
    before = torch.tensor(tiny_engine.sequence_logprobs([ids])[0])
    torch.testing.assert_close(before, start)  # nothing pushed yet: the engine still has the old weights

    tiny_engine.load_weights(policy.state_dict().items())
    after = torch.tensor(tiny_engine.sequence_logprobs([ids])[0])
    torch.testing.assert_close(after, changed, atol=tol, rtol=0)

    tiny_engine.load_weights(original.items())  # leave the session engine as it was
    torch.testing.assert_close(torch.tensor(tiny_engine.sequence_logprobs([ids])[0]), start, atol=tol, rtol=0)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_weight_push_into_bf16_engine_is_quiet(tiny_engine_bf16, tiny_model_path):
    """fp32 master weights are cast to the engine's bf16 before the push (no dtype warning per tensor),
    and vLLM's rotary-embedding reload warning is filtered; negative controls show both would appear."""
    from lit_dash.engines import vllm_engine

    state = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).state_dict()
    records = _Records()
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(records)
    level = vllm_logger.level
    vllm_logger.setLevel(logging.WARNING)  # lit_dash.console raises vLLM's to ERROR; these read warnings
    try:
        tiny_engine_bf16.load_weights(state.items())
        assert not [m for m in records.messages if "Attempted to load weight" in m or "Failed to load" in m]
        # negative control 1: the same fp32 tensors pushed without the cast warn
        uncast = [(k, v) for k, v in state.items() if k != "lm_head.weight"]
        uncast.append(("lm_head.weight", state["model.embed_tokens.weight"]))
        tiny_engine_bf16._model_runner().reload_weights(weights_iterator=iter(uncast))
        assert any(
            "with dtype torch.float32 into parameter with dtype torch.bfloat16" in m for m in records.messages
        )
        # negative control 2: without the filter, vLLM warns about the rotary embedding on every reload
        reload_logger = logging.getLogger(vllm_engine._RELOAD_LOGGER)
        filters = list(reload_logger.filters)
        for f in filters:
            reload_logger.removeFilter(f)
        try:  # straight into the runner: load_weights would put the filter back
            cast = [(k, v.to(torch.bfloat16)) for k, v in uncast]
            tiny_engine_bf16._model_runner().reload_weights(weights_iterator=iter(cast))
        finally:
            for f in filters:
                reload_logger.addFilter(f)
        assert any("RotaryEmbedding: Failed to load weights" in m for m in records.messages)
    finally:
        vllm_logger.removeHandler(records)
        vllm_logger.setLevel(level)
        tiny_engine_bf16.load_weights(state.items())
    assert tiny_engine_bf16.dtype == torch.bfloat16


def test_hf_fallback_engine_same_interface(tiny_model_path):
    engine = build_engine("hf", tiny_model_path, seed=0, dtype="float32")
    result = engine.generate(PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=6), want_logprobs=True)
    assert [c.prompt_index for c in result.completions] == [0, 0, 1, 1]
    for c in result.completions:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
    # the sampler's log-probs: softmax(logits / T) truncated to the top k and renormalised (what vLLM's
    # processed_logprobs gives); in fp32 a full forward gives the same numbers to rounding (1e-4 is ~100x
    # the float32 error of a 5-way log-softmax over these logits), and the same formula at the wrong
    # temperature (T = 1) is the negative control
    tempered = engine.generate(
        PROMPTS[:1], 2, SamplingConfig(temperature=2.0, top_k=5, max_new_tokens=4), True
    )
    prompt = tempered.prompt_token_ids[0]

    def sampler_logprobs(logits: torch.Tensor, ids: list[int], temperature: float) -> torch.Tensor:
        logits = logits / temperature
        kept = logits.topk(5, dim=-1).indices
        truncated = torch.full_like(logits, -math.inf).scatter(-1, kept, logits.gather(-1, kept))
        return torch.log_softmax(truncated, -1).gather(-1, torch.tensor(ids, device=logits.device)[:, None])[
            :, 0
        ]

    for c in tempered.completions:
        with torch.no_grad():
            sequence = torch.tensor([prompt + c.token_ids], device=engine.device)
            logits = engine.model(sequence).logits[0, len(prompt) - 1 : -1].float()
        reported = torch.tensor(c.logprobs, device=logits.device)
        torch.testing.assert_close(reported, sampler_logprobs(logits, c.token_ids, 2.0), atol=1e-4, rtol=0)
        wrong = (reported - sampler_logprobs(logits, c.token_ids, 1.0)).abs().max()
        assert wrong > 1e-3, f"T = 1 would pass too ({wrong:.1e}): the check could not tell temperatures"
        assert all(lp > math.log(1 / 5) - 0.5 for lp in c.logprobs)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    a = engine.generate(PROMPTS[:1], 1, greedy).completions[0].token_ids
    with torch.no_grad():
        for p in engine.model.parameters():
            p.zero_()
    restore_engine_weights(engine, tiny_model_path)
    assert engine.generate(PROMPTS[:1], 1, greedy).completions[0].token_ids == a


def test_unknown_engine_kind_is_rejected(tiny_model_path):
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        build_engine("sglang", tiny_model_path)
