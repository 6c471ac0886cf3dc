"""Micro-batches: kept completions right-padded for one forward/backward pass, and how rows are packed
into them (sorted by length, cut by a completion count or a padded-token budget, so little is padded).

Its own module because the SFT path and the benchmarks build micro-batches without the rollout buffer's
engine and reward imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lit_dash.data.packing import PackedLayout, packed_layout

if TYPE_CHECKING:
    from lit_dash.engines.base import Completion

__all__ = ["MicroBatch", "completion_length", "pack_rows", "pad_completions", "pad_micro_batch"]


@dataclass
class MicroBatch:
    """Kept completions, right-padded, ready for one forward/backward pass.

    ``input_ids [b, L]`` is prompt + completion; ``completion_mask [b, L-1]`` marks the positions whose
    *next-token* prediction is a completion token (aligned with ``logits[:, :-1]``).

    ``temperature`` is the sampling temperature of the completions: the trainer's log-probs, entropy, KL
    and PPO ratio use ``logits / temperature`` (0, greedy, counts as 1). ``engine_logprobs [b, L-1]``
    (aligned with ``completion_mask``, zero elsewhere) holds the log-prob the engine's sampler gave each
    sampled token, after temperature and top-k / top-p; ``None`` when the engine reported none.

    ``packed`` (``model.shared_prefix``) lays the same completions out as packed rows, one prompt per
    group (:class:`lit_dash.data.packing.PackedLayout`): the decoder's forward reads it instead of
    ``input_ids``; everything after the forward keeps this per-row layout.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    rows: list[int]
    temperature: float = 1.0
    engine_logprobs: torch.Tensor | None = None
    packed: PackedLayout | None = None

    @property
    def num_completions(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        """Tokens the forward encodes: prompt + completion per row, or each prompt once when packed."""
        return self.packed.num_tokens if self.packed is not None else int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        """Tokens the forward runs on, padding included."""
        return self.packed.padded_tokens if self.packed is not None else self.input_ids.numel()


def completion_length(row: int, prompt_ids: list[list[int]], completions: Sequence[Completion]) -> int:
    """Prompt + completion tokens of completion ``row``: its padded width in a micro-batch."""
    return len(prompt_ids[completions[row].prompt_index]) + len(completions[row].token_ids)


def pack_rows(
    rows: list[int], length: dict[int, int], micro_batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """``rows`` sorted by ``length`` and cut into groups of at most ``micro_batch_size`` completions and,
    with ``max_tokens``, at most that many padded tokens (width x completions; a longer row alone)."""
    ordered = sorted(rows, key=lambda r: length[r])
    groups: list[list[int]] = []
    for r in ordered:
        if groups:
            current = groups[-1]
            width = max(length[r], max(length[x] for x in current))
            fits_tokens = max_tokens is None or width * (len(current) + 1) <= max_tokens
            if len(current) < micro_batch_size and fits_tokens:
                current.append(r)
                continue
        groups.append([r])
    return groups


def pad_completions(
    rows: list[int],
    prompt_ids: list[list[int]],
    completions: Sequence[Completion],
    advantages: torch.Tensor,
    pad_token_id: int,
    temperature: float,
    shared_prefix: bool = False,
) -> MicroBatch:
    """Completions ``rows`` (with their prompts, advantages and engine log-probs) as one micro-batch;
    with ``shared_prefix`` also as packed rows (:func:`lit_dash.data.packing.packed_layout`)."""
    seqs = [(prompt_ids[completions[r].prompt_index], completions[r].token_ids) for r in rows]
    engine_logprobs = [completions[r].logprobs for r in rows]
    if not all(len(lp) == len(completions[r].token_ids) for lp, r in zip(engine_logprobs, rows, strict=True)):
        engine_logprobs = None  # an engine that reports no (or partial) log-probs: no parity check
    mb = pad_micro_batch(
        seqs,
        pad_token_id,
        advantages[rows].clone(),
        rows,
        temperature=temperature,
        engine_logprobs=engine_logprobs,
    )
    if shared_prefix:
        prompt_of = {r: completions[r].prompt_index for r in rows}
        mb.packed = packed_layout(
            rows, prompt_of, prompt_ids, {r: completions[r].token_ids for r in rows}, pad_token_id
        )
    return mb


def pad_micro_batch(
    seqs: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    advantages: torch.Tensor,
    rows: list[int],
    temperature: float = 1.0,
    engine_logprobs: list[list[float]] | None = None,
) -> MicroBatch:
    """Right-pad ``(prompt ids, completion ids)`` pairs into one :class:`MicroBatch`; the completion mask
    marks the positions whose next token is a completion token (aligned with ``logits[:, :-1]``), and
    ``engine_logprobs[i]`` (one per completion token of pair i) is laid out on the same positions."""
    width = max(len(p) + len(c) for p, c in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    engine = None if engine_logprobs is None else torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(seqs):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0
        if engine is not None:
            if len(engine_logprobs[i]) != len(c):
                raise ValueError(
                    f"completion {i} has {len(c)} tokens but {len(engine_logprobs[i])} engine log-probs"
                )
            engine[i, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(
                engine_logprobs[i], dtype=torch.float32
            )
    return MicroBatch(input_ids, attention, completion_mask, advantages, rows, temperature, engine)
