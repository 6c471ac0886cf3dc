"""Gradient clipping goes through Lightning (the precision plugin) on one process / DDP, and clips by the
norm of the whole gradient; train/grad_norm is that norm before clipping."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from tiny_reward import ParityRewardModule
from transformers import AutoModelForCausalLM

from lit_dash.data.datamodule import EngineConfig, ProblemSource, RolloutDataModule
from lit_dash.engines import SamplingConfig
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


@pytest.fixture
def engine(tiny_engine, tiny_model_path):
    yield tiny_engine
    tiny_engine.load_weights(AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict().items())


def _fit(engine, max_grad_norm: float | None) -> ClipProbe:
    module = ParityRewardModule(model="tiny-llama", precision="float32", lr=1e-4, max_grad_norm=max_grad_norm)
    data = RolloutDataModule(
        train=ProblemSource(source="arithmetic", difficulty="add1", num_problems=16),
        prompts_per_rollout=4,
        group_size=4,
        micro_batch_size=8,
        filter_threshold=None,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=12),
        max_prompt_tokens=64,
        engine=EngineConfig(kind="vllm", dtype="float32"),
    )
    data.engine = engine
    probe = ClipProbe()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        callbacks=[probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
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
