"""Test-only callbacks a CLI run loads by class path (``--trainer.callbacks+=recorders.PromptLog``): they
write what each rank saw to JSONL files, so a test can compare runs across processes and restarts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from support import sequence_logprobs

PROBE_TEXT = "What is 3 + 4? The answer is 7."


def _append(path: str, rank: int, record: dict) -> None:
    with Path(f"{path}.rank{rank}.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


class PromptLog(L.Callback):
    """After each training step: the step count, the problems (source ids) that step trained on, and a
    hash of the completions the engine sampled for them."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        texts = "\x00".join(c.text for c in pl_module.last_rollout.completions)
        record = {
            "step": trainer.global_step,
            "ids": [p.source_id for p in batch],
            "completions_sha": hashlib.sha256(texts.encode()).hexdigest()[:16],
        }
        _append(self.path, trainer.global_rank, record)


class StepStarted(L.Callback):
    """Touches ``<path>.step<k>`` when the training step that will make global step k+1 starts."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        Path(f"{self.path}.step{trainer.global_step}").touch()


class EngineProbe(L.Callback):
    """Before the first rollout of a fit: the engine's and the policy's log-probs of a fixed sequence."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done:
            return
        self.done = True
        engine = trainer.datamodule.engine
        ids = engine.tokenizer(PROBE_TEXT)["input_ids"]
        policy = sequence_logprobs(pl_module.policy, ids)
        record = {
            "step": trainer.global_step,
            "ids": ids,
            "policy": policy.tolist(),
            "engine": engine.sequence_logprobs([ids])[0],
        }
        _append(self.path, trainer.global_rank, record)


class WeightChecksum(L.Callback):
    """After each training step: a float64 checksum of every policy parameter, and the rollout's kept count."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            total = sum(float(p.double().sum()) for p in pl_module.policy.parameters())
            weighted = sum(
                float((p.double().flatten() * torch.arange(p.numel(), dtype=torch.float64).cos()).sum())
                for p in pl_module.policy.parameters()
            )
        rollout = pl_module.last_rollout
        _append(
            self.path,
            trainer.global_rank,
            {
                "step": trainer.global_step,
                "sum": total,
                "weighted": weighted,
                "kept": rollout.num_kept,
                "micro_batches": len(rollout.micro_batches),
                "skipped_steps": pl_module.skipped_steps,
            },
        )


class RolloutDump(L.Callback):
    """Rank r's rollout of step k (``<path>.rank<r>.step<k>.rollout.pt``, the whole :class:`Rollout`), and on
    rank 0 the gradient each optimizer step applied (after DDP's all-reduce and clipping,
    ``<path>.step<k>.grads.pt``) and the policy's weights after each step (``<path>.step<k>.weights.pt``):
    what a one-process replay of the union of the ranks' rollouts must reproduce."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_rank == 0:
            grads = {
                n: p.grad.detach().clone()
                for n, p in pl_module.policy.named_parameters()
                if p.grad is not None
            }
            torch.save(grads, f"{self.path}.step{trainer.global_step + 1}.grads.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        torch.save(pl_module.last_rollout, f"{self.path}.rank{trainer.global_rank}.step{step}.rollout.pt")
        if trainer.global_rank == 0:
            weights = {n: p.detach().clone() for n, p in pl_module.policy.named_parameters()}
            torch.save(weights, f"{self.path}.step{step}.weights.pt")
