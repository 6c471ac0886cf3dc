"""The policy's per-token log-probs of a micro-batch's completions, at the sampling temperature, under
the trainer's autocast.

Only completion positions go through the LM head: prompt positions never need logits, and the vocabulary
projection with its log-softmax dominates a small model's step (49k vocabulary).
"""

from __future__ import annotations

import contextlib

import torch

from lit_dash import losses
from lit_dash.data.batches import MicroBatch


def autocast(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """The compute dtype's autocast on ``device``; float32 runs without one (weights stay float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def completion_hidden(
    model: torch.nn.Module, mb: MicroBatch, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at completion positions only, ``[N, H]`` for the N completion tokens (the
    state that predicts each), and their targets ``[N]``."""
    ids = mb.input_ids.to(device)
    with autocast(dtype, device):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mb.attention_mask.to(device))
    positions = mb.completion_mask.to(device) > 0
    return hidden.last_hidden_state[:, :-1][positions], ids[:, 1:][positions]


def completion_logits(
    model: torch.nn.Module, mb: MicroBatch, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at completion positions only, ``[N, V]`` for the N completion tokens, and their targets."""
    hidden, targets = completion_hidden(model, mb, dtype, device)
    with autocast(dtype, device):
        return model.get_output_embeddings()(hidden), targets


def completion_logprobs(
    model: torch.nn.Module,
    mb: MicroBatch,
    dtype: torch.dtype,
    device: torch.device,
    chunk_tokens: int | None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model``'s log-probs of the N completion tokens at the sampling temperature, ``[N]``, and with
    ``with_entropy`` their entropies (detached). With ``chunk_tokens`` the LM head and the log-softmax
    run on that many tokens at a time (recomputed in backward), so no ``[N, V]`` logits are kept; null /
    0 computes (and autograd keeps) the full ``[N, V]`` logits."""
    temperature = mb.temperature
    if not chunk_tokens:
        logits, targets = completion_logits(model, mb, dtype, device)
        logprobs = losses.token_logprobs(logits[None], targets[None], temperature=temperature)[0]
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = losses.entropy_from_logits(logits.detach()[None], temperature=temperature)[0]
        return logprobs, entropy
    hidden, targets = completion_hidden(model, mb, dtype, device)
    lm_head = model.get_output_embeddings()

    def head(h: torch.Tensor) -> torch.Tensor:
        with autocast(dtype, device):  # re-entered when the checkpoint recomputes the chunk in backward
            return lm_head(h)

    return losses.chunked_logprobs_and_entropy(hidden, head, targets, chunk_tokens, temperature, with_entropy)


def scatter(values: torch.Tensor, mb: MicroBatch, device: torch.device) -> torch.Tensor:
    """Per-completion-token ``values`` ``[N]`` back into the micro-batch's ``[b, L-1]`` layout, zero
    outside the completion positions."""
    out = values.new_zeros(mb.completion_mask.shape, device=device)
    out[mb.completion_mask.to(device) > 0] = values
    return out
