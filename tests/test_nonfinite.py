"""A NaN loss skips its step and is counted; several in a row stop the run, and the last checkpoint holds
the last good weights. One real fit: tiny model, the transformers engine (no vLLM start-up), GSM8K prompts."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from support import SHARED_DATA

from lit_dash.data.datamodule import EngineConfig, ProblemSource, RolloutDataModule
from lit_dash.data.sources import load_problems
from lit_dash.engines import SamplingConfig
from lit_dash.module import DashModule, NonFiniteLossError

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")

NAN_STEPS = (1, 3, 4, 5)  # one bad step, a good one, then three bad in a row: the run stops at step 5
MAX_PROMPT_TOKENS = 60  # some GSM8K test questions are longer than this and must be skipped


class NaNLossAt(DashModule):
    """The loss of every micro-batch is NaN at the listed optimizer steps (and so is every gradient)."""

    def __init__(self, nan_steps: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)

    def reward(self, completions, problems):
        return [float(len(c) % 2 == 0) for c in completions]  # mixed groups: a real gradient

    def micro_batch_loss(self, *args, **kwargs):
        loss, stats = super().micro_batch_loss(*args, **kwargs)
        if self.global_step in self.nan_steps:
            loss = loss * math.nan
        return loss, stats


class WeightsAfterEachStep(L.Callback):
    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step] = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nan_losses_are_skipped_counted_and_stop_the_run(tmp_path, tiny_model_path, recwarn):
    module = NaNLossAt(nan_steps=NAN_STEPS, model="tiny-llama", lr=1e-3, max_nonfinite_steps=3, seed=0)
    data = RolloutDataModule(
        train=ProblemSource(source="gsm8k", path=str(SHARED_DATA), split="test", limit=40),
        prompt_style="raw",
        prompts_per_rollout=4,
        group_size=4,
        micro_batch_size=16,
        filter_threshold=None,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=12),
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        engine=EngineConfig(kind="hf"),
    )
    weights = WeightsAfterEachStep()
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=20,
        limit_val_batches=0,
        callbacks=[weights, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row had a NaN or infinite loss"):
        trainer.fit(module, datamodule=data)
    skipped = [str(w.message) for w in recwarn if "is not finite; skipped this update" in str(w.message)]
    assert [m.split(":")[0] for m in skipped] == ["step 1", "step 3", "step 4"]

    # steps 0 and 2 trained; 1, 3 and 4 were skipped; step 5 raised before any update or checkpoint
    assert trainer.global_step == 5 and sorted(weights.after) == [1, 2, 3, 4, 5]
    first = torch.load(checkpoints.dirpath + "/epoch=0-step=1.ckpt", weights_only=False)  # after step 0
    assert not _same(weights.after[1], weights.after[3]), "the good step 2 should have moved the weights"
    assert _same(weights.after[1], weights.after[2])  # step 1 (NaN) left every weight as it was
    assert _same(weights.after[3], weights.after[5])  # so did steps 3 and 4
    assert module.nonfinite_steps == 4 and module.nonfinite_in_a_row == 3
    assert trainer.callback_metrics["train/nonfinite_steps"] == 3.0  # logged at step 4, the last completed

    last = torch.load(checkpoints.last_model_path, weights_only=False)
    assert last["global_step"] == 5  # saved after the skipped step 4; nothing was saved after the stop
    policy = {k.removeprefix("policy."): v for k, v in last["state_dict"].items()}
    assert all(torch.isfinite(v).all() for v in policy.values())
    assert _same(weights.after[3], policy)  # the last good weights (after step 2)
    assert first["lit_dash"]["nonfinite_steps"] == 0 and last["lit_dash"]["nonfinite_steps"] == 3

    # prompts longer than max_prompt_tokens were skipped, counted and logged
    tokenizer = data.engine.tokenizer
    questions = load_problems("gsm8k", str(SHARED_DATA), "test", limit=40)
    too_long = sum(
        len(tokenizer(p.question, add_special_tokens=False)["input_ids"]) > MAX_PROMPT_TOKENS
        for p in questions
    )
    assert 0 < too_long < 40
    assert data.skipped_long_prompts == too_long and len(data.train_problems) == 40 - too_long
    assert trainer.callback_metrics["train/skipped_long_prompts"] == float(too_long)
