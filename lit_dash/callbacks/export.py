"""At the end of fit, the policy as a transformers folder (``<log_dir>/export``) that vLLM loads."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_dash.export import export_dtype, policy_state, save_policy


class ExportModel(L.Callback):
    """Writes the trained policy with :func:`lit_dash.export.save_policy` when fit ends: safetensors,
    ``config.json``, ``generation_config.json``, the tokenizer and its chat template, and prints the path.

    Args:
        dirpath: the folder to write (default ``<log_dir>/export``).
        dtype: auto (the training dtype: the fp32 master weights), float32, bfloat16 or float16.

    Every rank gathers the state dict (``strategy.lightning_module_state_dict``: full weights under DDP,
    FSDP with full state dicts, DeepSpeed); rank 0 writes it.
    """

    def __init__(self, dirpath: str | None = None, dtype: str = "auto") -> None:
        self.dirpath = dirpath
        self.dtype = dtype
        export_dtype(dtype)  # a bad dtype fails at config time
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "export")
        state = policy_state(trainer.strategy.lightning_module_state_dict())
        if trainer.is_global_zero:
            save_policy(pl_module.policy, out, pl_module.model_path(), export_dtype(self.dtype), state)
        self.path = out
        rank_zero_info(f"[lit_dash] exported the policy (step {trainer.global_step}) to {out}")
