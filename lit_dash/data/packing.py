"""Shared-prefix packing (``model.shared_prefix``): a group's kept completions train as one packed row
``[prompt, c1, c2, ..., ck]``, so the prompt is encoded once per group instead of once per completion.

In a packed row each completion attends to the prompt and to its own causal past only, and its position
ids restart at the prompt's length, so every hidden state equals the one the per-row layout
``[prompt, ci]`` gives: the same per-token log-probs, and (the prompt's gradient being the sum of what each
completion sends it) the same gradients. Prefix Grouper (Liu et al., arXiv 2506.05433) shows the method.

:func:`pack_groups` chooses which completions share a micro-batch (whole groups, by completion count and
padded tokens); :func:`packed_layout` lays one micro-batch out; :class:`PackedLayout` carries it, with the
4-D attention mask the model's own attention takes (SDPA: boolean, eager: additive). The micro-batch
keeps its per-row tensors too (:class:`lit_dash.data.batches.MicroBatch`): the loss, the advantages and
the engine's log-probs stay in that layout, and only the decoder's forward reads the packed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["PACKED_ATTENTION", "PackedLayout", "pack_groups", "packed_layout", "shared_prefix_problem"]

# attention implementations that run packed rows: a custom 4-D mask through transformers' SDPA or eager,
# and lit_dash's split attention (lit_dash/training/prefix_attention.py, installed over SDPA)
PACKED_ATTENTION = ("sdpa", "eager", "lit_dash_shared_prefix")
PAD, PROMPT = -1, 0  # segment ids: padding, the prompt; completions are 1..k in their row


@dataclass
class PackedLayout:
    """One micro-batch as packed rows, one per group (or per part of a group larger than the micro-batch).

    ``input_ids``, ``position_ids`` and ``segments`` are ``[r, W]``; ``segments`` is -1 on padding, 0 on
    the prompt and i on the row's i-th completion. ``hidden_index [N]`` is, for each completion token in
    the per-row micro-batch's order (row-major over its ``completion_mask``), the flat index into
    ``[r * W]`` of the hidden state that predicts it: the prompt's last position for a completion's first
    token, the completion's previous token for the others.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    hidden_index: torch.Tensor
    # what the forward derives from the layout (its split-attention plan, per device), made once: the
    # policy, the reference and PPO's old log-probs all run the same micro-batch
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        """Tokens the packed forward encodes (padding excluded)."""
        return int((self.segments != PAD).sum())

    @property
    def padded_tokens(self) -> int:
        return self.segments.numel()

    def allowed(self) -> torch.Tensor:
        """``[r, 1, W, W]`` boolean: query i may attend key j. Causal in the packed order, never to
        padding, and a completion's token sees the prompt and its own completion only. A padding query
        sees itself alone, so no softmax row is empty (an empty one is NaN, and NaN reaches the gradients
        through the softmax's backward even where the output is never read)."""
        seg = self.segments
        width = seg.shape[1]
        pos = torch.arange(width, device=seg.device)
        causal = pos[:, None] >= pos[None, :]
        q, k = seg[:, :, None], seg[:, None, :]
        ok = causal & (q != PAD) & (k != PAD) & ((k == PROMPT) | (k == q))
        pad_self = (q == PAD) & (pos[:, None] == pos[None, :])
        return (ok | pad_self)[:, None]

    def attention_mask(self, implementation: str, device: torch.device) -> torch.Tensor:
        """The mask as ``implementation`` takes it: SDPA a boolean one (True attends), eager an additive
        float32 one (0 attends, the dtype's minimum does not)."""
        allowed = self.allowed().to(device)
        if implementation == "sdpa":
            return allowed
        if implementation == "eager":
            mask = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
            return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)
        raise ValueError(shared_prefix_problem_text(implementation))


def shared_prefix_problem_text(implementation: str) -> str:
    return (
        f"model.shared_prefix packs a group's completions behind one prompt with a custom 4-D attention mask, "
        f"which attention implementation {implementation!r} cannot take (it takes sdpa or eager): load "
        "the model with attn_implementation='sdpa', or set model.init_args.shared_prefix: false"
    )


def shared_prefix_problem(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run the packed forward, or None. It needs an attention that takes a 4-D mask
    (SDPA or eager) and no sliding window (the packed row is longer than any per-row one, so a window
    would cut what the per-row layout sees)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    name = type(model).__name__
    if implementation not in PACKED_ATTENTION:
        return f"{name}: " + shared_prefix_problem_text(str(implementation))
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return (
            f"{name} uses sliding-window attention ({config.sliding_window} tokens): a packed row is longer "
            "than a per-row one, so the window would cut what a completion sees; set "
            "model.init_args.shared_prefix: false"
        )
    return None


def pack_groups(
    rows: list[int],
    prompt_of: dict[int, int],
    length: dict[int, int],
    prompt_length: dict[int, int],
    micro_batch_size: int,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """``rows`` cut into micro-batches that keep each prompt's completions together.

    A group (the rows of one prompt, in the order given) larger than ``micro_batch_size`` is split into
    parts of at most that many. Parts are placed, longest packed row first, into the first micro-batch
    with room: at most ``micro_batch_size`` completions and, with ``max_tokens``, at most that many padded
    tokens (rows x the longest packed row; a part that alone exceeds it gets a micro-batch of its own).
    ``length[r]`` is completion r's token count, ``prompt_length[p]`` prompt p's.
    """
    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(prompt_of[r], []).append(r)
    parts = [
        members[i : i + micro_batch_size]
        for members in groups.values()
        for i in range(0, len(members), micro_batch_size)
    ]

    def width(part: list[int]) -> int:
        return prompt_length[prompt_of[part[0]]] + sum(length[r] for r in part)

    parts.sort(key=lambda part: (-width(part), part[0]))
    bins: list[list[list[int]]] = []
    for part in parts:
        for b in bins:
            count = sum(len(p) for p in b) + len(part)
            padded = max(width(p) for p in [*b, part]) * (len(b) + 1)
            if count <= micro_batch_size and (max_tokens is None or padded <= max_tokens):
                b.append(part)
                break
        else:
            bins.append([part])
    return [[r for part in b for r in part] for b in bins]


def packed_layout(
    rows: Sequence[int], prompt_of: dict[int, int], prompt_ids: Sequence[list[int]],
    completion_ids: dict[int, list[int]], pad_token_id: int,
) -> PackedLayout:  # fmt: skip
    """The packed rows of a micro-batch whose per-row layout holds ``rows`` in this order: one packed row
    per run of consecutive rows with the same prompt."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and prompt_of[runs[-1][0]] == prompt_of[r]:
            runs[-1].append(r)
        else:
            runs.append([r])
    widths = [len(prompt_ids[prompt_of[run[0]]]) + sum(len(completion_ids[r]) for r in run) for run in runs]
    width = max(widths)
    input_ids = torch.full((len(runs), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(runs), width), dtype=torch.long)
    segments = torch.full((len(runs), width), PAD, dtype=torch.long)
    index_of_row: dict[int, list[int]] = {}
    for i, run in enumerate(runs):
        prompt = prompt_ids[prompt_of[run[0]]]
        p = len(prompt)
        input_ids[i, :p] = torch.tensor(prompt, dtype=torch.long)
        position_ids[i, :p] = torch.arange(p)
        segments[i, :p] = PROMPT
        start = p
        for k, r in enumerate(run, start=1):
            c = completion_ids[r]
            input_ids[i, start : start + len(c)] = torch.tensor(c, dtype=torch.long)
            position_ids[i, start : start + len(c)] = torch.arange(p, p + len(c))
            segments[i, start : start + len(c)] = k
            # the state predicting token j: the prompt's last for j = 0, else this completion's token j - 1
            predicting = [p - 1] + list(range(start, start + len(c) - 1))
            index_of_row[r] = [i * width + pos for pos in predicting[: len(c)]]
            start += len(c)
    hidden_index = torch.tensor([x for r in rows for x in index_of_row[r]], dtype=torch.long)
    return PackedLayout(input_ids, position_ids, segments, hidden_index)
