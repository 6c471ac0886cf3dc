"""What a checkpoint needs beyond Lightning's own: every rank's random-number generator states, and the
edits of the state dict that keep it small (no copy of the frozen reference; under LoRA, the adapters
alone), undone on load so Lightning's strict load still sees every key; :class:`CheckpointHooks` is the
module's side (the format: ``policy.`` keys, ``checkpoint["lit_dash"]``).

Lightning saves weights, optimizer, scheduler, loops and the datamodule's ``state_dict``, but no RNG
state. vLLM's CPU sampler draws from torch's global generator, so with these restored (at the start of
the resumed fit) the resumed run samples what the uninterrupted run sampled. Each rank has its own
stream; only rank 0 writes the file, so the states are gathered first.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from lit_dash.lora import adapter_state

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


class CheckpointHooks(L.LightningModule):
    """The module's checkpoint hooks, as a mixin of :class:`lit_dash.module.DashModule`: the counters and
    every rank's RNG states in ``checkpoint["lit_dash"]``, the state-dict edits above on save and their
    undoing on load. Needs ``policy``, ``reference``, ``lora``, ``configure_model`` and the
    ``skipped_steps`` / ``nonfinite_steps`` counters and the parity guard (``_parity``)."""

    _rng_to_restore: list | None = None

    REFERENCE_PREFIX = REFERENCE_PREFIX

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves weights, optimizer, scheduler, step and the datamodule's prompt position;
        # the counters and the RNG states of every rank are ours to add, the reference ours to drop
        drop_reference(checkpoint.get("state_dict", {}))
        checkpoint["lit_dash"] = {
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "rng": rng_states_by_rank(),
            "parity_gaps": self._parity.trend.state_dict(),  # a resumed run judges the same rising gap
        }
        if self.lora and "state_dict" in checkpoint:  # the adapters alone: the base reloads from disk
            trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = adapter_state(checkpoint["state_dict"], trainable)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lit_dash", {})
        self.skipped_steps = state.get("skipped_steps", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self._rng_to_restore = state.get("rng")
        self._parity.trend.load_state_dict(state.get("parity_gaps", {}))
        self.configure_model()
        if self.reference is not None and "state_dict" in checkpoint:  # the base model's, just loaded
            restore_reference(checkpoint["state_dict"], self.reference.state_dict())
        if self.lora and "state_dict" in checkpoint:  # strict load still checks every adapter key
            checkpoint["state_dict"] = with_frozen_base(checkpoint["state_dict"], self.state_dict())

    def on_train_start(self) -> None:
        # Restored here, not on load: between the two, Lightning creates the DataLoader iterator, which
        # draws from torch's generator; the interrupted run had drawn that before its checkpoint.
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
