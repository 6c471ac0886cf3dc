"""What a checkpoint needs beyond Lightning's own: every rank's random-number generator states, and the
edits of the state dict that keep it small (no copy of the frozen reference; under LoRA, the adapters
alone), undone on load so Lightning's strict load still sees every key.

Lightning saves weights, optimizer, scheduler, loops and the datamodule's ``state_dict``, but no RNG
state. vLLM's CPU sampler draws from torch's global generator, so with these restored (at the start of
the resumed fit) the resumed run samples what the uninterrupted run sampled. Each rank has its own
stream; only rank 0 writes the file, so the states are gathered first.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

REFERENCE_PREFIX = "reference."  # the frozen KL reference's keys in the module's state dict


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collect() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, gauss),  # plain types: loads with weights_only
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


def rng_states_by_rank() -> list[dict[str, Any]]:
    """torch / CUDA / numpy / python RNG states of every rank, indexed by rank (call on every rank)."""
    states = _collect()
    if not _distributed():
        return [states]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    return gathered


def restore_rng_states(states_by_rank: list[dict[str, Any]] | None) -> bool:
    """Set this rank's generators from a checkpoint; False (with a warning) when it has none for this rank."""
    rank = dist.get_rank() if _distributed() else 0
    world = dist.get_world_size() if _distributed() else 1
    if not states_by_rank:
        return False
    if len(states_by_rank) != world:
        warnings.warn(
            f"the checkpoint holds RNG states for {len(states_by_rank)} rank(s) but this run has {world}: "
            "random streams are not restored (the prompt order is, it does not depend on them)",
            stacklevel=2,
        )
        return False
    _restore(states_by_rank[rank])
    return True


def drop_reference(state_dict: dict[str, Any]) -> None:
    """Remove the frozen reference's weights: it is the base model, loaded again on resume, and a copy
    of it in every checkpoint would add a model's size."""
    for key in [k for k in state_dict if k.startswith(REFERENCE_PREFIX)]:
        del state_dict[key]


def restore_reference(state_dict: dict[str, Any], reference: dict[str, Any]) -> None:
    """Put the reference's weights (the base model's, just loaded) back where :func:`drop_reference`
    took them from; keys the checkpoint holds win."""
    for key, value in reference.items():
        state_dict.setdefault(REFERENCE_PREFIX + key, value)


def with_frozen_base(state_dict: dict[str, Any], module_state: dict[str, Any]) -> dict[str, Any]:
    """An adapter-only checkpoint's weights with the frozen base's (``module_state``, as loaded from
    disk) filled back in."""
    frozen = {k: v for k, v in module_state.items() if k not in state_dict}
    return {**frozen, **state_dict}
