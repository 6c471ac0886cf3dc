"""Token-chunked log-probs and entropy (``model.logprob_chunk_tokens``): the LM head and the log-softmax run
on a few tokens at a time under a checkpoint, and give the unchunked values and gradients to fp32
precision; the global gradient clip goes through the strategy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from numerics import assert_tensors_near

from lit_dash import losses
from lit_dash.data.buffer import pad_micro_batch
from lit_dash.module import DashModule

TEMPERATURE = 1.3
VOCAB = 49152  # the tiny model has SmolLM2's tokenizer


def _micro_batch() -> object:
    """Three rows of unequal lengths (17 completion tokens in all), right-padded."""
    prompts = [[1, 5, 9], [1, 7], [1, 4, 4, 8]]
    completions = [[11, 12, 13, 40, 41], [14, 15, 16, 17, 90, 91, 92], [20, 21, 22, 23, 24]]
    return pad_micro_batch(
        list(zip(prompts, completions, strict=True)),
        0,
        torch.tensor([1.0, -0.5, 0.25]),
        [0, 1, 2],
        temperature=TEMPERATURE,
    )


@pytest.fixture(scope="module")
def module() -> DashModule:
    module = DashModule(model="tiny-llama", precision="float32", kl_coef=0.0, logprob_chunk_tokens=None)
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def exact(module) -> tuple:
    """The unchunked log-probs, entropies and gradients in float64: the exact values both fp32 paths
    approximate."""
    module64 = copy.deepcopy(module)
    module64.policy.double()
    return _values_and_grads(module64, None, _micro_batch())


def _values_and_grads(module: DashModule, chunk: int | None, mb) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """log-probs, entropies and the gradient of an advantage-weighted sum of log-probs + a KL-like
    square, w.r.t. every policy parameter (a loss that reaches every chunk with different weights)."""
    module.hparams.logprob_chunk_tokens = chunk
    module.policy.zero_grad(set_to_none=True)
    logprobs, entropy = module(mb)
    weights = torch.linspace(-1.0, 2.0, logprobs.numel()).view_as(logprobs) * mb.completion_mask
    loss = (weights * logprobs).sum() + 0.1 * (logprobs * mb.completion_mask).square().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters()}
    return logprobs.detach(), entropy, grads


def _assert_near_exact(result, exact) -> None:
    """An fp32 result within one fp32 rounding error of the float64 one (see tests/numerics.py): the
    longest sum on every compared path is over the vocabulary (the log-sum-exp in forward, the LM head's
    ``d hidden = d logits @ W`` in backward), 49,152 terms on this model's tokenizer. Chunking changes only
    the order of fp32 sums (the same chunking run twice is bit-identical), so it stays within the bound on
    any CPU's kernels; log-probs and entropies absolutely (entropy times its size, up to log V), gradients
    relative to each tensor's largest entry."""
    (lp, h, grads), (lp64, h64, grads64) = result, exact
    assert_tensors_near(lp, lp64, VOCAB, relative=False, sides=1)
    assert_tensors_near(h, h64, VOCAB, relative=False, sides=1, scale=math.log(VOCAB))
    assert_tensors_near(grads, grads64, VOCAB, sides=1)


@pytest.mark.parametrize("chunk", [None, 1, 4, 16, 1024])  # 17 tokens: ragged last chunk, one chunk, > N
def test_chunked_logprobs_entropy_and_gradients_equal_unchunked(module, exact, chunk):
    mb = _micro_batch()
    assert module.policy.config.vocab_size == VOCAB
    assert exact[1].abs().sum() > 0 and all(g.abs().sum() > 0 for g in exact[2].values())
    result = _values_and_grads(module, chunk, mb)
    _assert_near_exact(result, exact)
    # the no-grad paths (PPO's old log-probs, the KL's reference, the parity probe) agree as well
    module.hparams.logprob_chunk_tokens = chunk
    assert_tensors_near(module._logprobs_of(module.policy, mb), exact[0], VOCAB, relative=False, sides=1)


def test_a_wrong_chunk_fails_the_comparison(module, exact, monkeypatch):
    """Negative control: a chunked path that forgets the temperature in one chunk (or shifts that chunk's
    targets by one) is caught by the same comparison."""
    mb = _micro_batch()
    real = losses.chunked_logprobs_and_entropy

    def wrong_temperature(hidden, head, ids, chunk, temperature, with_entropy):
        lp, h = real(hidden, head, ids, chunk, temperature, with_entropy)
        lp2, h2 = real(hidden[4:8], head, ids[4:8], chunk, 1.0, with_entropy)  # second chunk at T = 1
        return torch.cat([lp[:4], lp2, lp[8:]]), torch.cat([h[:4], h2, h[8:]])

    def shifted_targets(hidden, head, ids, chunk, temperature, with_entropy):
        ids = ids.clone()
        ids[4:8] = ids[5:9].clone()  # one chunk predicts the token after its own
        return real(hidden, head, ids, chunk, temperature, with_entropy)

    for wrong in (wrong_temperature, shifted_targets):
        monkeypatch.setattr(losses, "chunked_logprobs_and_entropy", wrong)
        with pytest.raises(AssertionError):
            _assert_near_exact(_values_and_grads(module, 4, mb), exact)
    monkeypatch.setattr(losses, "chunked_logprobs_and_entropy", real)
    _assert_near_exact(_values_and_grads(module, 4, mb), exact)
    # and the bound is not vacuous: the same gradients moved by about 20x the bound (1e-3 of each tensor's
    # largest entry, the size of a real bf16-vs-fp32 difference) fail it
    lp, h, grads = _values_and_grads(module, None, mb)
    moved = {n: g + 1e-3 * g.abs().max() for n, g in grads.items()}
    with pytest.raises(AssertionError):
        _assert_near_exact((lp, h, moved), exact)


def test_chunks_do_not_keep_their_logits_for_backward():
    """Under the checkpoint autograd keeps only the chunk inputs and outputs: the saved tensors of the
    chunked graph hold no ``[chunk, V]`` logits, the unchunked one holds ``[N, V]`` ones."""
    torch.manual_seed(0)
    n, hidden_size, vocab = 64, 8, 1000
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    ids = torch.randint(0, vocab, (n,))

    def saved_elements(chunk):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, _ = losses.chunked_logprobs_and_entropy(hidden, head, ids, chunk, temperature=0.7)
        return lp, max(sizes)

    lp_full, biggest_full = saved_elements(None)
    lp_chunked, biggest_chunked = saved_elements(16)
    assert biggest_full >= n * vocab  # the unchunked graph keeps [N, V]
    assert biggest_chunked < 16 * vocab  # the chunked one not even one chunk's logits
    assert_tensors_near(lp_chunked, lp_full, vocab, relative=False)  # two fp32 log-sum-exps over V terms
    # hand values: uniform logits (zero head) give log(1/V) and entropy log(V) at any temperature
    zero = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    zero.weight.zero_()
    lp, h = losses.chunked_logprobs_and_entropy(hidden, zero, ids, 7, temperature=1.3)
    torch.testing.assert_close(lp, torch.full((n,), -math.log(vocab)))
    torch.testing.assert_close(h, torch.full((n,), math.log(vocab)))


def test_bad_chunk_settings():
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        losses.chunked_logprobs_and_entropy(torch.zeros(2, 3), lambda h: h, torch.zeros(2), -1)
    with pytest.raises(ValueError, match="token_ids shape"):
        losses.chunked_logprobs_and_entropy(torch.zeros(2, 3), lambda h: h, torch.zeros(3), 1)
    from lit_dash.errors import ConfigError

    with pytest.raises(ConfigError, match="logprob_chunk_tokens must be >= 1"):
        DashModule(model="tiny-llama", logprob_chunk_tokens=-5)


def test_one_chunk_is_not_recomputed_in_backward():
    """The LM head runs once per chunk in forward; backward recomputes each chunk only when there are
    several (N > chunk): N tokens that fit one chunk run once, as unchunked, and give the same gradient."""
    torch.manual_seed(0)
    n, hidden_size, vocab = 24, 8, 50
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    ids = torch.randint(0, vocab, (n,))
    base = torch.randn(n, hidden_size)

    def head_calls_and_grad(chunk):
        calls = []

        def counted(h):
            calls.append(h.shape[0])
            return head(h)

        hidden = base.clone().requires_grad_(True)
        lp, _ = losses.chunked_logprobs_and_entropy(hidden, counted, ids, chunk, temperature=0.9)
        lp.sum().backward()
        return calls, hidden.grad

    calls_full, grad_full = head_calls_and_grad(None)
    calls_one, grad_one = head_calls_and_grad(n)  # exactly one chunk
    calls_wide, _ = head_calls_and_grad(1024)  # a chunk wider than N
    calls_many, grad_many = head_calls_and_grad(10)  # 10 + 10 + 4: forward, then each recomputed
    assert calls_full == calls_one == calls_wide == [n]
    assert calls_many == [10, 10, 4, 4, 10, 10]  # negative control: several chunks are recomputed
    torch.testing.assert_close(grad_one, grad_full, rtol=0, atol=0)
    assert_tensors_near(grad_many, grad_full, vocab)  # the same sums over V, split into chunks
