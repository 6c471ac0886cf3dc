"""Gradient clipping by the norm of the whole gradient: through Lightning (the precision plugin) on one
process / DDP, through the root FSDP module under FSDP; train/grad_norm is that norm before clipping."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from support import parity_fit
from tiny_reward import ParityRewardModule

from lit_dash.errors import ConfigError
from lit_dash.module import DashModule


class ClipProbe(L.Callback):
    """Counts the precision plugin's clip calls, and the gradient norm the optimizer steps with."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, GradClipAlgorithmType]] = []
        self.stepped_norms: list[float] = []
        self.logged_norms: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        plugin = trainer.precision_plugin
        real = plugin.clip_gradients

        def recording(optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM):
            self.calls.append((clip_val, gradient_clip_algorithm))
            return real(optimizer, clip_val, gradient_clip_algorithm)

        plugin.clip_gradients = recording

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
        if grads:
            self.stepped_norms.append(float(torch.nn.utils.get_total_norm(grads)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged_norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def _fit(engine, max_grad_norm: float | None) -> ClipProbe:
    module = ParityRewardModule(model="tiny-llama", precision="float32", lr=1e-4, max_grad_norm=max_grad_norm)
    probe = ClipProbe()
    parity_fit(engine, module, [probe], temperature=1.0)
    return probe


def test_clipping_goes_through_lightning_and_logs_the_norm_before_it(engine):
    max_norm = 1e-3  # far below the tiny model's gradient norms, so the clip binds every step
    clipped = _fit(engine, max_norm)
    assert clipped.calls == [(max_norm, GradClipAlgorithmType.NORM)] * 2
    assert len(clipped.logged_norms) == len(clipped.stepped_norms) == 2
    for logged, stepped in zip(clipped.logged_norms, clipped.stepped_norms, strict=True):
        assert logged > 10 * max_norm  # train/grad_norm: the norm before clipping
        assert stepped == pytest.approx(max_norm, rel=1e-4)  # the step: clipped to max_grad_norm
    # negative control: without clipping, no clip call, and the step sees the logged norm itself
    unclipped = _fit(engine, None)
    assert unclipped.calls == []
    for logged, stepped in zip(unclipped.logged_norms, unclipped.stepped_norms, strict=True):
        assert stepped == pytest.approx(logged, rel=1e-5) and stepped > 10 * max_norm


def test_bad_max_grad_norm():
    with pytest.raises(ConfigError, match="max_grad_norm must be > 0"):
        DashModule(model="tiny-llama", max_grad_norm=0.0)


def _fsdp_rank(rank: int, port: int, out: str, max_norm: float) -> None:
    """One of two gloo ranks: a real FSDP (FULL_SHARD) root on the CPU, each rank on its own data, clipped by
    DashModule._clip_gradients. Lightning's Trainer refuses FSDP without a GPU, so its plumbing (the
    strategy's model, the hyper-parameters) is a namespace here; FSDP and the collectives are real."""
    import copy
    import json
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    reference = copy.deepcopy(model)
    inputs = [torch.randn(4, 8) + r for r in range(2)]  # each rank its own micro-batch
    root = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    root(inputs[rank]).square().sum().backward()
    optimizer = torch.optim.SGD(root.parameters(), lr=0.1)

    def shard_norm() -> float:
        return float(torch.nn.utils.get_total_norm([p.grad for p in root.parameters() if p.grad is not None]))

    local = shard_norm()  # what torch's clip_grad_norm_ would clip this rank by
    host = SimpleNamespace(
        hparams=SimpleNamespace(max_grad_norm=max_norm),
        trainer=SimpleNamespace(strategy=SimpleNamespace(model=root)),
    )
    logged = DashModule._clip_gradients(host, optimizer)
    after = torch.tensor(shard_norm() ** 2)
    dist.all_reduce(after)  # the clipped gradient's norm, all shards together
    for x in inputs:  # the unsharded gradient: FSDP averages the ranks' gradients
        (reference(x).square().sum() / 2).backward()
    whole = float(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]))
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"local": local, "logged": logged, "after": float(after.sqrt()), "whole": whole})
    )
    # both ranks past their last collective before either tears gloo down: without it, 1 run in about 12
    # aborted at exit ("terminate called without an active exception", SIGABRT) after the rank files were written
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp_clips_by_the_norm_of_all_shards(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    max_norm = 0.5
    mp.spawn(_fsdp_rank, args=(port, str(tmp_path), max_norm), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    whole = ranks[0]["whole"]
    assert whole > 4 * max_norm  # the clip binds
    for r in ranks:
        assert r["logged"] == pytest.approx(whole, rel=1e-5)  # train/grad_norm: all shards, before clipping
        assert r["after"] == pytest.approx(max_norm, rel=1e-4)  # clipped by one global factor
    # negative control: each rank's shard-local norm (what torch's clip_grad_norm_ uses) is not the norm
    assert all(abs(r["local"] - whole) > 1e-2 * whole for r in ranks)
    assert abs(ranks[0]["local"] - ranks[1]["local"]) > 1e-3 * whole
