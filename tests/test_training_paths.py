"""Every training path in a short real fit (tiny model, the session's real vLLM engine, tiny.yaml's
settings): KL with k2 / k3 / k3+, update multi and mini, a constant reward, DAPO's dynamic sampling.
That filtering leaves the gradient as it was is test_module.py's (three loss aggregations, the negative
control's exact factor); the fit's own denominators with skipped prompts are test_prompt_skipping.py's."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from fitting import fit
from support import tiny_data_knobs
from tiny_reward import ParityRewardModule

from lit_dash.callbacks import MathEvaluation, StepCheckpoint
from lit_dash.data.datamodule import ProblemSource, RolloutDataModule
from lit_dash.module import DashModule


class PerRollout(L.Callback):
    """After each training step (one rollout): the step count, the module's per-optimizer-step stats, the
    learning rate and the rollout's slices."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = pl_module.last_rollout
        self.rows.append(
            {
                "step": trainer.global_step,
                "updates": [dict(u) for u in pl_module.update_stats],
                "lr": pl_module.lr_schedulers().get_last_lr()[0],
                "slice_sizes": list(rollout.slice_sizes),
                "kept": rollout.num_kept,
            }
        )


def _fit(
    root,
    engine,
    module,
    *,
    max_steps=-1,
    callbacks=(),
    data_cls=RolloutDataModule,
    ckpt_path=None,
    **data_kwargs,
):
    data = data_cls(**tiny_data_knobs(**data_kwargs))  # tests/configs/tiny.yaml's data
    return fit(
        module, data, engine=engine, max_steps=max_steps, callbacks=callbacks, root=root, ckpt_path=ckpt_path
    )


# ---- KL -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k2", "k3", "k3+"])
def test_kl_is_zero_at_the_reference_and_grows_as_the_policy_departs(tmp_path, engine, estimator):
    module = ParityRewardModule(
        model="tiny-llama", lr=5e-3, kl_coef=0.1, kl_estimator=estimator, precision="float32", seed=0
    )
    record = PerRollout()
    trainer = _fit(tmp_path, engine, module, max_steps=3, callbacks=[record])
    kl = [row["updates"][0]["kl"] for row in record.rows]
    print(f"[kl {estimator}] per step: {kl}")
    assert len(kl) == 3 and trainer.callback_metrics["train/kl"] == pytest.approx(kl[-1])
    assert kl[0] == 0.0, "before its first update the policy is the reference"
    assert all(k >= 0 for k in kl) and kl[1] > 1e-6 and kl[2] > 1e-6


class FirstPromptUniform(ParityRewardModule):
    """The rollout's first prompt scores 0 everywhere (a uniform group, which filtering drops); the others
    get the text-parity reward (mixed groups, mostly)."""

    def reward(self, completions, problems):
        first = problems[0].source_id
        parity = super().reward(completions, problems)
        return [0.0 if p.source_id == first else r for r, p in zip(parity, problems, strict=True)]


@pytest.mark.parametrize("kl_over", ["kept", "sampled"])
def test_kl_over_names_the_completions_the_kl_term_covers(tmp_path, engine, kl_over):
    """kl_over kept: only the kept completions are micro-batched, and over the sampled denominators
    the KL weighs kl_coef x kept / sampled; sampled: the dropped ones are trained too, at advantage 0,
    and the KL weighs kl_coef."""
    module = FirstPromptUniform(
        model="tiny-llama", lr=5e-3, kl_coef=0.1, kl_over=kl_over, precision="float32", seed=0
    )
    trainer = _fit(tmp_path, engine, module, max_steps=1, filter_threshold=0.1)
    rollout = module.last_rollout
    kept, sampled = rollout.num_kept, rollout.sampled_completions
    assert 0 < kept < sampled == 16, "the test needs a rollout that drops some completions"
    trained = sorted(r for mb in rollout.micro_batches for r in mb.rows)
    coef = float(trainer.callback_metrics["train/kl_effective_coef"])
    kept_rows = rollout.kept.nonzero().flatten().tolist()
    if kl_over == "kept":
        assert trained == kept_rows
        assert coef == pytest.approx(0.1 * kept / sampled)
    else:
        assert trained == list(range(16))
        assert coef == pytest.approx(0.1)
        for mb in rollout.micro_batches:
            for i, row in enumerate(mb.rows):
                expected = float(rollout.advantages[row]) if row in kept_rows else 0.0
                assert float(mb.advantages[i]) == expected


def test_kl_over_sampled_needs_the_sampled_denominators():
    with pytest.raises(ValueError, match="use normalize_over: rollout with kl_over: sampled"):
        DashModule(model="tiny-llama", kl_coef=0.1, kl_over="sampled", normalize_over="kept")


# ---- update: multi ----------------------------------------------------------------------------------------


class RatioRecorder(ParityRewardModule):
    """Per optimizer step: the largest |log-prob - sampling-time log-prob| over the step's tokens."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_log_ratio: list[float] = []
        self._seen: list = []

    def forward(self, micro_batch):
        logprobs, entropy = super().forward(micro_batch)
        self._seen.append((micro_batch, logprobs.detach()))
        return logprobs, entropy

    def _accumulate(self, micro_batches, chunk, old, ref, sampled=None):
        self._seen = []
        totals = super()._accumulate(micro_batches, chunk, old, ref, sampled)
        index = {id(mb): i for i, mb in enumerate(micro_batches)}
        self.max_log_ratio.append(
            max(float(((lp - old[index[id(mb)]]).abs() * mb.completion_mask).max()) for mb, lp in self._seen)
        )
        return totals


def test_multi_takes_ppo_epochs_steps_and_only_later_passes_clip(tmp_path, engine):
    module = RatioRecorder(
        model="tiny-llama", lr=2e-2, update="multi", ppo_epochs=3, max_rollouts=2, precision="float32", seed=0
    )
    record = PerRollout()
    trainer = _fit(tmp_path, engine, module, callbacks=[record])  # the budget stops it: no max_steps
    assert trainer.global_step == 6 and [row["step"] for row in record.rows] == [3, 6]
    assert trainer.callback_metrics["train/optimizer_steps_per_rollout"] == 3.0
    print(f"[multi] max |log ratio| per step: {module.max_log_ratio}")
    for k, row in enumerate(record.rows):
        ratios = module.max_log_ratio[3 * k : 3 * k + 3]
        assert ratios[0] == 0.0 and row["updates"][0]["clip_fraction"] == 0.0  # pass 1: ratio exactly 1
        assert ratios[1] > 0 and ratios[2] > 0
    later = [u["clip_fraction"] for row in record.rows for u in row["updates"][1:]]
    print(f"[multi] clip fraction of the later passes: {later}")
    assert max(later) > 0


# ---- update: mini, and the budget in rollouts -----------------------------------------------------------


class OneInformativeGroup(DashModule):
    """Only the first group is mixed ([0, 0, 0, 1]): 4 completions survive filtering."""

    def reward(self, completions, problems):
        return [0.0, 0.0, 0.0, 1.0] + [0.0] * (len(completions) - 4)


def test_mini_takes_exactly_its_steps_and_cadences_count_rollouts(tmp_path, engine):
    module = OneInformativeGroup(
        model="tiny-llama",
        lr=1e-3,
        update="mini",
        ppo_mini_batches=6,
        max_rollouts=2,
        precision="float32",
        seed=0,
    )
    record = PerRollout()
    evaluation = MathEvaluation(every_n_rollouts=1)
    checkpoints = StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_rollouts=1, save_top_k=-1)
    eval_sets = {
        "arithmetic": ProblemSource(source="arithmetic", difficulty="add1", split="test", num_problems=4)
    }
    trainer = _fit(
        tmp_path,
        engine,
        module,
        callbacks=[record, evaluation, checkpoints],
        filter_threshold=0.1,
        eval_sets=eval_sets,
    )
    # 6 optimizer steps per rollout, more than the 4 kept completions: slices 0, 1, 1, 0, 1, 1
    assert trainer.global_step == 12 and [row["step"] for row in record.rows] == [6, 12]
    assert trainer.callback_metrics["train/optimizer_steps_per_rollout"] == 6.0
    for row in record.rows:
        assert row["kept"] == 4 and row["slice_sizes"] == [0, 1, 1, 0, 1, 1]
        assert [u.get("skipped", 0.0) for u in row["updates"]] == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
        for update in row["updates"]:
            if not update.get("skipped"):  # each slice stands for 1/6 of the 16 sampled completions
                assert update["loss_denominator_completions"] == pytest.approx(16 / 6)
    assert module.skipped_steps == 4
    assert [row["lr"] for row in record.rows] == pytest.approx([5e-4, 0.0])  # the schedule spans the budget
    assert [step for step, _ in evaluation.history] == [0, 6, 12]  # at start, then after every rollout
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("epoch=*.ckpt")) == [
        "epoch=0-step=12.ckpt",
        "epoch=0-step=6.ckpt",
    ]


# ---- a constant reward ------------------------------------------------------------------------------------


class ConstantReward(DashModule):
    def reward(self, completions, problems):
        return [1.0] * len(completions)


def test_a_constant_reward_changes_no_weight_yet_advances_the_schedule(tmp_path, engine):
    module = ConstantReward(model="tiny-llama", lr=1e-3, update="multi", ppo_epochs=2, max_rollouts=2, seed=0)
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = _fit(tmp_path, engine, module, filter_threshold=0.1)
    assert trainer.global_step == 4 and module.skipped_steps == 4  # 2 rollouts x 2 no-op steps
    assert trainer.callback_metrics["train/skipped_steps"] == 4.0
    assert trainer.callback_metrics["train/optimizer_steps_per_rollout"] == 2.0
    assert all(torch.equal(before[k], v) for k, v in module.policy.state_dict().items()), "bit for bit"
    scheduler = module.lr_schedulers()
    assert scheduler.last_epoch == 4 and scheduler.get_last_lr() == [0.0]
    assert not module.optimizers().optimizer.state, "AdamW never stepped a parameter"


# ---- DAPO dynamic sampling ------------------------------------------------------------------------------


class OddAnswersOnly(DashModule):
    """Problems with an even answer score 0 everywhere (a group that teaches nothing); odd ones get the
    text-parity reward (mixed groups, mostly)."""

    def reward(self, completions, problems):
        pairs = zip(completions, problems, strict=True)
        return [float(int(p.answer) % 2 == 1 and len(c) % 2 == 0) for c, p in pairs]


class RefillLog(L.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int]] = []  # (informative groups, refill calls, refill prompts)
        self.problems: list[list[str]] = []  # the source ids each rollout trained on, refills included

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        r = pl_module.last_rollout
        informative = int(r.kept.view(-1, r.group_size).any(dim=1).sum())
        self.rows.append((informative, r.refill_engine_calls, r.refill_prompts))
        self.problems.append([p.source_id for p in r.problems])


def test_dynamic_sampling_fills_each_rollout_or_stops_at_its_cap(tmp_path, engine):
    module = OddAnswersOnly(model="tiny-llama", precision="float32", seed=0)
    log = RefillLog()
    every_two = StepCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = _fit(
        tmp_path, engine, module, max_steps=3, callbacks=[log, every_two], filter_threshold=0.1,
        dynamic_sampling_calls=2,
    )  # fmt: skip
    print(f"[dynamic sampling] per rollout (informative groups of 4, extra calls, extra prompts): {log.rows}")
    assert len(log.rows) == 3
    for informative, calls, _ in log.rows:
        assert informative == 4 or calls == 2, "the target (P informative groups) or the cap"
        assert 0 <= calls <= 2
    assert sum(calls for _, calls, _ in log.rows) > 0, "even answers make about half the groups constant"
    data = trainer.datamodule
    assert data.refill_prompts_consumed == sum(p for *_, p in log.rows)
    assert data.state_dict()["refill_prompts_consumed"] == data.refill_prompts_consumed
    assert trainer.callback_metrics["train/refill_engine_calls"] == float(log.rows[-1][1])
    assert len(module.last_rollout.completions) == 16, "the rollout keeps its P x G size"
    # resumed from the step-2 checkpoint, the third rollout refills from where the run's refill stream
    # stood: the same problems, refills included, as the uninterrupted run's third rollout
    assert log.rows[2][1] > 0, "the third rollout refills, so its problems test the refill stream"
    resumed_log = RefillLog()
    resumed = OddAnswersOnly(model="tiny-llama", precision="float32", seed=0)
    _fit(
        tmp_path / "resumed", engine, resumed, max_steps=3, callbacks=[resumed_log], filter_threshold=0.1,
        dynamic_sampling_calls=2, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"),
    )  # fmt: skip
    assert resumed_log.problems == log.problems[2:] and resumed_log.rows == log.rows[2:]
