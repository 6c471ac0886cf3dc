"""One 2-step fit of the tiny model on the session engine (fp32), shared by three claims:

* ``prompts_per_rollout: auto`` inside a fit: the data module measures the engine, picks the size
  ``pick_prompt_count`` gives for its measurements, and every rollout of the fit has that many prompts;
* a gradient that is not finite while the loss is (step 1 here) skips its update like a NaN loss: the
  weights stay, the step is counted and the warning gives the finite loss and the NaN norm; the finite
  step 0 moved the weights (the control);
* on resume, auto keeps the checkpoint's size even where it would measure another one (the checkpoint's
  size is set to 3, a size auto never picks), and a fixed size that differs warns instead; a checkpoint
  holding two ranks' RNG states resumed on one process warns that its random streams are not restored.
"""

from __future__ import annotations

import math
import re
import warnings

import lightning as L
import pytest
import torch
from fitting import fit
from lightning.pytorch.callbacks import ModelCheckpoint
from support import restore_engine_weights
from tiny_reward import ParityRewardModule

from lit_dash.data import calibration
from lit_dash.data.datamodule import ProblemSource, RolloutDataModule
from lit_dash.engines import SamplingConfig

NAN_GRADIENT_STEP = 1


class _NaNGradient(torch.autograd.Function):
    """The identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.nan)


class NaNGradientAt(ParityRewardModule):
    def __init__(self, nan_gradient_steps: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_gradient_steps = set(nan_gradient_steps)

    def micro_batch_loss(self, *args, **kwargs):
        loss, stats = super().micro_batch_loss(*args, **kwargs)
        if self.global_step in self.nan_gradient_steps:
            loss = _NaNGradient.apply(loss)
        return loss, stats


class Steps(L.Callback):
    """The weights before the fit and after each step, and each rollout's prompt count."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.prompts: list[int] = []

    def _keep(self, step: int, module) -> None:
        self.weights[step] = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}

    def on_train_start(self, trainer, pl_module) -> None:
        self._keep(trainer.global_step, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._keep(trainer.global_step, pl_module)
        self.prompts.append(len(pl_module.last_rollout.problems))


def _data(prompts_per_rollout) -> RolloutDataModule:
    return RolloutDataModule(
        train=ProblemSource(source="arithmetic", difficulty="add1", num_problems=40),
        eval_sets={},
        prompts_per_rollout=prompts_per_rollout,
        auto_max_completions=16,  # candidate sizes 1, 2, 4 prompts of 4 completions
        group_size=4,
        micro_batch_size=4,
        filter_threshold=None,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=8),
    )


def _module(**kwargs) -> NaNGradientAt:
    return NaNGradientAt(model="tiny-llama", lr=1e-3, precision="float32", seed=0, **kwargs)


@pytest.fixture(scope="module")
def auto_fit(tiny_engine, tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("auto_fit")
    module, data, steps = _module(nan_gradient_steps=(NAN_GRADIENT_STEP,)), _data("auto"), Steps()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit(module, data, engine=tiny_engine, max_steps=2, callbacks=[steps, checkpoints], root=root)
        finally:
            restore_engine_weights(tiny_engine, tiny_model_path)
    yield module, data, steps, root, [str(w.message) for w in caught]


def test_auto_picks_the_size_its_measurements_give_and_the_fit_samples_it(auto_fit):
    module, data, steps, _, _ = auto_fit
    assert sorted(data.auto_throughput) == [1, 2, 4]
    assert all(p.completions == 4 * n and p.seconds > 0 for n, p in data.auto_throughput.items())
    chosen = calibration.pick_prompt_count(data.auto_throughput)
    assert data.prompts_per_rollout == chosen and isinstance(chosen, int)
    assert steps.prompts == [chosen, chosen]
    assert data.state_dict()["prompts_per_rollout"] == chosen  # what a checkpoint keeps


def test_a_nan_gradient_with_a_finite_loss_skips_its_update(auto_fit):
    module, _, steps, _, messages = auto_fit
    (skipped,) = [m for m in messages if "is not finite; skipped this update" in m]
    found = re.fullmatch(
        rf"step {NAN_GRADIENT_STEP}: loss (\S+), grad norm nan is not finite; skipped this update "
        r"\(1 in a row, the run stops at 3\)",
        skipped,
    )
    assert found, skipped
    assert math.isfinite(float(found.group(1))), "the loss was finite: only the gradient was not"
    assert module.nonfinite_steps == 1 and module.nonfinite_in_a_row == 1

    def same(a, b) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(steps.weights[0], steps.weights[1]), "control: the finite step 0 moved the weights"
    assert same(steps.weights[1], steps.weights[2]), "the NaN-gradient step left every weight as it was"
    assert all(torch.isfinite(v).all() for v in steps.weights[2].values())


def _datamodule_state(checkpoint: dict) -> dict:
    (state,) = [v for v in checkpoint.values() if isinstance(v, dict) and "consumed_batches" in v]
    return state


def test_resume_keeps_the_runs_size_under_auto_and_warns_of_another_world(
    auto_fit, tiny_engine, tiny_model_path, tmp_path
):
    _, _, _, root, _ = auto_fit
    checkpoint = torch.load(root / "ckpt" / "epoch=0-step=1.ckpt", weights_only=False)
    assert len(checkpoint["lit_dash"]["rng"]) == 1
    _datamodule_state(checkpoint)["prompts_per_rollout"] = 3  # a size auto never picks (not a power of 2)
    checkpoint["lit_dash"]["rng"] = checkpoint["lit_dash"]["rng"] * 2  # as a two-rank run writes it
    edited = tmp_path / "two_ranks.ckpt"
    torch.save(checkpoint, edited)

    module, data, steps = _module(), _data("auto"), Steps()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit(module, data, engine=tiny_engine, max_steps=2, callbacks=[steps], ckpt_path=str(edited))
        finally:  # the session engine serves the initial weights again (a LoRA fit pushes only its layers)
            restore_engine_weights(tiny_engine, tiny_model_path)
    messages = [str(w.message) for w in caught]
    assert data.auto_throughput, "auto measured again on resume"
    assert data.prompts_per_rollout == 3 and steps.prompts == [3]  # the checkpoint's size, one more step
    assert not [m for m in messages if "the resumed prompt order does not continue" in m]
    assert (
        "the checkpoint holds RNG states for 2 rank(s) but this run has 1: random streams are not restored "
        "(the prompt order is, it does not depend on them)"
    ) in messages

    fixed = _data(2)  # control: a fixed size that differs from the checkpoint's is kept, with a warning
    with pytest.warns(
        UserWarning,
        match=r"prompts_per_rollout is 2, the checkpoint's run used 3: the resumed prompt order does not "
        r"continue the interrupted run's",
    ):
        fixed.load_state_dict(_datamodule_state(checkpoint))
    assert fixed.prompts_per_rollout == 2
