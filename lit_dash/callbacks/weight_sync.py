"""Push the policy's weights into the rollout engine: at the start of fit (so a resumed run samples from
the resumed weights, not the initial ones) and after every optimizer step."""

from __future__ import annotations

import time

import lightning as L
import torch


class WeightSync(L.Callback):
    """One batched ``load_weights`` call per sync; its wall time is logged as ``time/weight_sync``."""

    def __init__(self) -> None:
        self.last_seconds = 0.0
        self.syncs = 0
        self.synced_step = -1

    def sync(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        engine = trainer.datamodule.engine
        start = time.perf_counter()
        with torch.no_grad():
            engine.load_weights(pl_module.policy.state_dict().items())
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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.synced_step != trainer.global_step:
            self.sync(trainer, pl_module)
