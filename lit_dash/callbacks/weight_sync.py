"""Push the policy's weights into the rollout engine: at the start of fit (so a resumed run samples from
the resumed weights, not the initial ones) and after every optimizer step.

Under LoRA (a peft policy) only the adapted modules change, so only they are pushed, merged
(``W + scale * B @ A``) under the base model's names: see :func:`lit_dash.lora.merged_adapted_weights`.
The engine must have started from the same base model the trainer loaded."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import lightning as L
import torch

from lit_dash.errors import ConfigError
from lit_dash.lora import is_lora, merged_adapted_weights

# wrappers FSDP and activation checkpointing put into parameter names; the engine wants transformers names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _is_fsdp(model: torch.nn.Module | None) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _full_weights(model: torch.nn.Module | None):
    """Under FSDP, every rank's full (unsharded) parameters for the duration (a collective: all ranks
    sync together, which they do, each into its own engine). Elsewhere, nothing to do.
    The FSDP path is written for configs/gpu/fsdp.yaml and not run in this project's tests."""
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


def _policy_weights(policy: torch.nn.Module, fsdp: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, tensor) pairs; under FSDP the parameters (state_dict is off limits while the
    full parameters are summoned), with the wrappers' prefixes removed."""
    pairs = policy.named_parameters() if fsdp else policy.state_dict().items()
    for name, tensor in pairs:
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        yield name, tensor


def engine_weights(policy: torch.nn.Module, fsdp: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """What a sync pushes: every weight, or under LoRA the merged weights of the adapted modules."""
    if is_lora(policy):
        if fsdp:
            raise ConfigError(
                "model.lora with FSDP is not supported: use ddp (the base is frozen, small "
                "adapters need no sharding)"
            )
        return merged_adapted_weights(policy)
    return _policy_weights(policy, fsdp)


class WeightSync(L.Callback):
    """One batched ``load_weights`` call per sync; its wall time is logged as ``time/weight_sync``."""

    def __init__(self) -> None:
        self.last_seconds = 0.0
        self.syncs = 0
        self.synced_step = -1

    def sync(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        engine = trainer.datamodule.engine
        start = time.perf_counter()
        model = trainer.strategy.model
        with torch.no_grad(), _full_weights(model):
            engine.load_weights(engine_weights(pl_module.policy, _is_fsdp(model)))
        self.last_seconds = time.perf_counter() - start
        self.syncs += 1
        self.synced_step = trainer.global_step
        if hasattr(pl_module, "_add_time"):
            pl_module._add_time("weight_sync", self.last_seconds)
        return self.last_seconds

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sync(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ``lit-dash validate --ckpt_path ...`` must score the checkpoint's weights, not the initial ones.
        if not trainer.training and self.synced_step != trainer.global_step:
            self.sync(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sync(trainer, pl_module)  # lit-dash test / predict: the loaded weights, whatever the step

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sync(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.synced_step != trainer.global_step:
            self.sync(trainer, pl_module)
