"""At the end of fit, the policy as a transformers folder (``<log_dir>/export``) that vLLM loads."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_dash.callbacks.weight_sync import _full_weights, _is_fsdp, _policy_weights
from lit_dash.errors import ConfigError
from lit_dash.export import export_dtype, policy_state, save_policy
from lit_dash.lora import save_adapter


class ExportModel(L.Callback):
    """Writes the trained policy with :func:`lit_dash.export.save_policy` when fit ends: safetensors,
    ``config.json``, ``generation_config.json``, the tokenizer and its chat template, and prints the path.

    Args:
        dirpath: the folder to write (default ``<log_dir>/export``).
        dtype: auto (the training dtype: the fp32 master weights), float32, bfloat16 or float16.
        adapter: LoRA runs: also write the adapter alone in PEFT's format, to ``<dirpath>_adapter``.

    Rank 0 writes. Under FSDP every rank takes part in summoning the full parameters (as WeightSync does
    each step), whatever ``state_dict_type``; elsewhere ``strategy.lightning_module_state_dict()`` gives
    the full weights (single device, DDP). Not tested under FSDP or DeepSpeed (no multi-GPU machine here);
    with DeepSpeed, export the converted checkpoint instead (``lit-dash export``).
    """

    def __init__(self, dirpath: str | None = None, dtype: str = "auto", adapter: bool = False) -> None:
        self.dirpath = dirpath
        self.dtype = dtype
        self.adapter = adapter
        export_dtype(dtype)  # a bad dtype fails at config time
        self.path: Path | None = None
        self.adapter_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the hyper-parameter, not the policy: configure_model (which wraps it in peft) runs after setup
        if self.adapter and not (getattr(pl_module, "hparams", {}) or {}).get("lora"):
            raise ConfigError(
                "ExportModel(adapter: true) writes a LoRA run's adapter: this run has model.lora null"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "export")
        model = trainer.strategy.model
        if getattr(pl_module, "lora", None):  # LoRA (no FSDP): a merged plain copy, adapters folded in
            if trainer.is_global_zero:
                merged = pl_module.policy_for_export()
                save_policy(merged, out, pl_module.model_path(), export_dtype(self.dtype))
                if self.adapter:
                    self.adapter_path = save_adapter(pl_module.policy, out.with_name(out.name + "_adapter"))
                    rank_zero_info(f"[lit_dash] wrote the adapter alone (PEFT format) to {self.adapter_path}")
            self.path = out
            rank_zero_info(
                f"[lit_dash] exported the merged LoRA policy (step {trainer.global_step}) to {out}"
            )
            return
        if _is_fsdp(model):
            with torch.no_grad(), _full_weights(model):
                pairs = _policy_weights(pl_module.policy, fsdp=True)
                state = {n: t.detach().cpu().clone() for n, t in pairs} if trainer.is_global_zero else {}
        else:
            state = policy_state(trainer.strategy.lightning_module_state_dict())
        if trainer.is_global_zero:
            save_policy(pl_module.policy, out, pl_module.model_path(), export_dtype(self.dtype), state)
        self.path = out
        rank_zero_info(f"[lit_dash] exported the policy (step {trainer.global_step}) to {out}")
