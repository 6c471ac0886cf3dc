"""Attention for packed rows that computes only what the mask lets through (``model.shared_prefix``).

A packed row ``[prompt, c1, ..., ck]`` through SDPA with a dense 4-D mask computes every query against
every key of the row and then masks most of it away: ``(p + k c)^2`` pairs where the per-row layout
computes ``k (p + c)^2 / 2``. With short completions that is cheap; with long ones it costs more than the
prompt encodings it saves. This attention splits the work as the mask does: the prompt attends to itself
(causal), and each completion's queries attend to its prompt's keys and its own (causal), all completions
in one batched SDPA call. The same values as the dense mask, with the per-row layout's attention cost.

It is registered in transformers' ``AttentionInterface`` and installed on a model whose attention is SDPA
(:func:`install`); a forward without a plan (the per-row layout, evaluation, a model shared with other
code) runs transformers' SDPA unchanged. The plan travels as the ``shared_prefix_plan`` keyword through the
model's forward into every attention layer, so gradient checkpointing recomputes with it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from lit_dash.data.packing import PROMPT, PackedLayout

NAME = "lit_dash_shared_prefix"
PLAN_KEYWORD = "shared_prefix_plan"

__all__ = ["NAME", "PLAN_KEYWORD", "SplitPlan", "install", "split_plan"]


@dataclass
class SplitPlan:
    """Where a packed micro-batch's prompts and completions lie in its flattened ``[r * W]`` positions.

    ``prompt_index [r, P]``: each row's prompt positions (P the longest prompt), ``prompt_mask
    [r, 1, P, P]``: causal within the prompt; ``query_index [n, C]``: each completion's positions (C the
    longest completion), ``key_index [n, P + C]``: its prompt's positions then its own, ``key_mask
    [n, 1, C, P + C]``: the whole prompt and its own causal past. Padding entries point at position 0 and
    attend to one valid key (never an empty softmax row); ``written`` and ``written_at`` say which outputs
    are real and where they go."""

    width: int
    prompt_index: torch.Tensor
    prompt_mask: torch.Tensor
    query_index: torch.Tensor
    key_index: torch.Tensor
    key_mask: torch.Tensor
    written: torch.Tensor  # the real outputs' places in the prompt outputs [r*P] then the completions' [n*C]
    written_at: torch.Tensor  # where each of them goes in the flattened [r*W] positions


def split_plan(layout: PackedLayout, device: torch.device) -> SplitPlan:
    """The plan of ``layout``'s rows (one prompt each, then its completions), on ``device``; made once
    per layout and device."""
    key = ("split_plan", str(device))
    if key not in layout.derived:
        layout.derived[key] = _split_plan(layout, device)
    return layout.derived[key]


def _split_plan(layout: PackedLayout, device: torch.device) -> SplitPlan:
    seg = layout.segments.cpu()
    rows, width = seg.shape
    prompt_lengths = (seg == PROMPT).sum(dim=1)
    longest_prompt = int(prompt_lengths.max())
    spans: list[tuple[int, int, int]] = []  # (row, start, length) of each completion, in layout order
    for i in range(rows):
        row, pos = seg[i].tolist(), 0
        while pos < width:
            end = pos + 1
            if row[pos] > 0:
                while end < width and row[end] == row[pos]:
                    end += 1
                spans.append((i, pos, end - pos))
            pos = end
    longest = max((length for _, _, length in spans), default=1)
    p_arange, c_arange = torch.arange(longest_prompt), torch.arange(longest)
    prompt_written = p_arange[None, :] < prompt_lengths[:, None]
    prompt_index = torch.where(prompt_written, torch.arange(rows)[:, None] * width + p_arange[None, :], 0)
    causal_p = p_arange[:, None] >= p_arange[None, :]
    prompt_mask = causal_p[None] & prompt_written[:, None, :]
    prompt_mask = prompt_mask | ~prompt_written[:, :, None] & (p_arange == 0)[None, None, :]
    n = len(spans)
    row_of = torch.tensor([r for r, _, _ in spans], dtype=torch.long)
    starts = torch.tensor([s for _, s, _ in spans], dtype=torch.long)
    lengths = torch.tensor([c for _, _, c in spans], dtype=torch.long)
    query_written = c_arange[None, :] < lengths[:, None]
    query_index = torch.where(query_written, row_of[:, None] * width + starts[:, None] + c_arange[None, :], 0)
    own_prompt = p_arange[None, :] < prompt_lengths[row_of][:, None]  # [n, P]
    key_index = torch.cat([prompt_index[row_of], query_index], dim=1)
    causal_c = c_arange[:, None] >= c_arange[None, :]  # [C, C]
    own = causal_c[None] & query_written[:, None, :]  # [n, C, C]
    seen_prompt = own_prompt[:, None, :].expand(n, longest, longest_prompt)
    key_mask = torch.cat([seen_prompt, own], dim=2)
    key_mask = key_mask | (
        ~query_written[:, :, None] & (torch.arange(longest_prompt + longest) == 0)[None, None]
    )
    written = torch.cat(
        [
            prompt_written.flatten().nonzero()[:, 0],
            rows * longest_prompt + query_written.flatten().nonzero()[:, 0],
        ]
    )
    written_at = torch.cat([prompt_index[prompt_written], query_index[query_written]])
    return SplitPlan(
        width=width,
        prompt_index=prompt_index.to(device),
        prompt_mask=prompt_mask[:, None].to(device),
        query_index=query_index.to(device),
        key_index=key_index.to(device),
        key_mask=key_mask[:, None].to(device),
        written=written.to(device),
        written_at=written_at.to(device),
    )


def _gather(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``flat [r*W, h, d]`` at ``index [a, b]`` as ``[a, h, b, d]`` (SDPA's layout). ``index_select``, not
    ``flat[index]``: its backward is ``index_add_``, where advanced indexing's is an accumulating
    ``index_put_`` that took a quarter of a packed micro-batch's forward+backward on the CPU."""
    a, b = index.shape
    return flat.index_select(0, index.reshape(-1)).view(a, b, *flat.shape[1:]).transpose(1, 2)


def split_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: ``query [r, h, W, d]``, ``key``/``value`` ``[r, h_kv, W, d]``;
    returns ``[r, W, h, d]``. Without a plan in ``kwargs``, transformers' SDPA."""
    plan: SplitPlan | None = kwargs.pop(PLAN_KEYWORD, None)
    if plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(rows * width, heads, dim)
    k, v = (t.transpose(1, 2).reshape(rows * width, kv_heads, dim) for t in (key, value))
    # grouped-query attention (kv_heads < heads): SDPA pairs each key/value head with its query heads
    gqa = {"enable_gqa": True} if kv_heads != heads else {}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    prompt_out = sdpa(
        _gather(q, plan.prompt_index), _gather(k, plan.prompt_index), _gather(v, plan.prompt_index),
        attn_mask=plan.prompt_mask, dropout_p=dropout, scale=scaling, **gqa,
    )  # fmt: skip
    completion_out = sdpa(
        _gather(q, plan.query_index), _gather(k, plan.key_index), _gather(v, plan.key_index),
        attn_mask=plan.key_mask, dropout_p=dropout, scale=scaling, **gqa,
    )  # fmt: skip
    # [a, h, b, d] -> [a*b, h, d], prompts then completions; the real outputs, to their places in the rows
    outputs = torch.cat([t.transpose(1, 2).reshape(-1, heads, dim) for t in (prompt_out, completion_out)])
    values = outputs.index_select(0, plan.written).to(q.dtype)
    out = q.new_zeros(rows * width, heads, dim).index_copy(0, plan.written_at, values)
    return out.view(rows, width, heads, dim), None


_registered = False


def install(model: torch.nn.Module) -> bool:
    """Run ``model``'s attention through :func:`split_attention` when it is SDPA (a forward without a plan
    stays SDPA); returns whether it is installed. Other implementations are left as they are (eager takes
    the dense 4-D mask instead)."""
    global _registered
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    if not _registered:  # the mask a forward without a plan needs (padding) is SDPA's
        AttentionInterface.register(NAME, split_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
        _registered = True
    config._attn_implementation = NAME
    return True
