"""One way for tests to run ``Trainer.fit`` on the CPU: quiet (no logger, bar or summary), one device,
the session's engine handed to the data module so no test starts its own."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Checkpoint


def fit(
    module,
    data,
    *,
    engine=None,
    max_steps: int = -1,
    callbacks=(),
    root=None,
    ckpt_path=None,
    enable_checkpointing: bool | None = None,
) -> L.Trainer:
    """Fit ``module`` on ``data`` for ``max_steps`` optimizer steps and return the trainer.

    ``engine``: an engine to use instead of starting one from ``data``'s config. Checkpointing is on
    exactly when a checkpoint callback is among ``callbacks`` unless ``enable_checkpointing`` says
    otherwise (True: Lightning adds its own ModelCheckpoint under ``root`` when none is given).
    """
    if engine is not None:
        data.engine = engine
    if enable_checkpointing is None:
        enable_checkpointing = any(isinstance(c, Checkpoint) for c in callbacks)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer
