"""One rank of the DDP resume check (tests/test_ddp_resume.py launches two, as torchrun would: RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_* in the environment, so Lightning starts no processes of its own).

Each rank runs three short fits on one vLLM engine (started by the first fit's data module):
A: two steps, a checkpoint after each; B: resumed from A's step-1 checkpoint to step 2; C: the same,
from a copy of that checkpoint with the two ranks' RNG states swapped (the negative control); D: two steps
where only rank 1's loss is not finite at step 1. It writes each fit's completions (token ids) by step,
and D's weight checksums and skip counter by step, to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_reward import ParityRewardModule

from lit_dash.data.datamodule import EngineConfig, ProblemSource, RolloutDataModule
from lit_dash.engines import SamplingConfig


class Completions(L.Callback):
    """Each step's sampled completions (token ids), by the step they trained."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[list[int]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.by_step[trainer.global_step] = [list(c.token_ids) for c in pl_module.last_rollout.completions]


class RankOneInfiniteLossAtStep1(ParityRewardModule):
    """Rank 1's loss value is infinite at step 1 while its gradient stays finite: only rank 1 sees a
    non-finite step (a gradient would be averaged into rank 0's too)."""

    def micro_batch_loss(self, *args, **kwargs):
        loss, stats = super().micro_batch_loss(*args, **kwargs)
        if self.global_rank == 1 and self.global_step == 1:
            stats["loss"] = math.inf
        return loss, stats


class Checksums(L.Callback):
    """Each step's weight checksum (sum and position-weighted sum, float64) and the skip counter."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[float]] = {}

    def _keep(self, step: int, module) -> None:
        flat = torch.cat([p.detach().double().flatten() for p in module.policy.parameters()])
        weighted = float((flat * torch.arange(1, len(flat) + 1, dtype=torch.float64)).sum())
        self.by_step[step] = [float(flat.sum()), weighted, module.nonfinite_steps]

    def on_train_start(self, trainer, pl_module) -> None:
        self._keep(trainer.global_step, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._keep(trainer.global_step, pl_module)


def run(
    out: Path,
    engine=None,
    ckpt_path: str | None = None,
    checkpoint_dir: Path | None = None,
    module_class=ParityRewardModule,
):
    module = module_class(model="tiny-llama", lr=1e-3, precision="float32", seed=0)
    data = RolloutDataModule(
        train=ProblemSource(source="arithmetic", difficulty="add1", num_problems=40),
        eval_sets={},
        prompts_per_rollout=2,
        group_size=4,
        micro_batch_size=4,
        filter_threshold=None,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=8),
        engine=EngineConfig(kind="vllm", kv_cache_gib=0.25, dtype="float32"),
    )
    data.engine = engine
    completions, checksums = Completions(), Checksums()
    callbacks = [completions, checksums]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=1, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return data.engine, completions.by_step, checksums.by_step


def main(out: Path) -> None:
    rank = int(os.environ["RANK"])
    engine, a, _ = run(out, checkpoint_dir=out / "ckpt")
    step1 = out / "ckpt" / "epoch=0-step=1.ckpt"
    _, b, _ = run(out, engine, ckpt_path=str(step1))
    swapped = torch.load(step1, weights_only=False)
    swapped["lit_dash"]["rng"] = swapped["lit_dash"]["rng"][::-1]
    own_copy = out / f"swapped.rank{rank}.ckpt"  # each rank its own file: no barrier needed
    torch.save(swapped, own_copy)
    _, c, _ = run(out, engine, ckpt_path=str(own_copy))
    _, _, d = run(out, engine, module_class=RankOneInfiniteLossAtStep1)
    record = {"A": a, "B": b, "C": c, "D": d}
    (out / f"rank{rank}.json").write_text(
        json.dumps({k: {str(s): v for s, v in r.items()} for k, r in record.items()})
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
