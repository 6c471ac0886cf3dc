"""Prompt skipping (data.prompt_skipping): the decisions, the buffer that does not sample skipped prompts,
the update that stays exactly the no-skip update when the skipped groups were uniform, the knobs refused
before any engine starts, and a resumed run that takes the uninterrupted run's decisions."""

from __future__ import annotations

import math
from dataclasses import replace

import lightning as L
import pytest
import torch
from fitting import fit
from support import GradCapture, tiny_data_knobs, worst

from lit_dash.callbacks import StepCheckpoint
from lit_dash.cli import build_cli
from lit_dash.data import datamodule as datamodule_module
from lit_dash.data.buffer import RolloutBuffer
from lit_dash.data.datamodule import ProblemSource, PromptStream, RolloutDataModule
from lit_dash.data.records import Problem
from lit_dash.data.skipping import PromptSkipping, SkipHistory, draw
from lit_dash.engines import SamplingConfig
from lit_dash.errors import ConfigError, find_input_error
from lit_dash.module import DashModule
from lit_dash.world_metrics import TRAIN_REDUCTIONS

G = 4

# ---- the decisions ----------------------------------------------------------------------------------


def test_a_prompt_is_skipped_after_history_uniform_groups_except_when_explored():
    history = SkipHistory(PromptSkipping(history=2, explore=0.2))
    history.record([("a", True), ("b", True), ("c", False)])
    assert history.choose(["a", "b", "c", "d"], seed=0, rollout_index=1) == [False] * 4, "one is not two"
    history.record([("a", True), ("b", False), ("c", True)])
    assert [history.predicted_uniform(p) for p in "abcd"] == [True, False, False, False]
    assert history.outcomes == {"a": [True, True], "b": [True, False], "c": [False, True]}  # the last 2
    # 2000 predicted-uniform ids: skipped with probability 1 - explore, each by its own hash draw
    ids = [f"p{i}" for i in range(2000)]
    history.record([(p, True) for p in ids] * 2)
    skip = history.choose(["c", *ids], seed=3, rollout_index=7)
    assert skip[1:] == [draw(3, 7, p) >= 0.2 for p in ids] and skip[0] is False
    assert 0.77 < sum(skip) / 2000 < 0.83
    # the same (seed, rollout, ids) give the same decisions in a fresh history; another rollout others
    again = SkipHistory(PromptSkipping(history=2, explore=0.2))
    again.load_state_dict(history.state_dict())
    assert again.choose(["c", *ids], seed=3, rollout_index=7) == skip
    assert again.choose(["c", *ids], seed=3, rollout_index=8) != skip
    assert again.choose(["c", *ids], seed=4, rollout_index=7) != skip


def test_a_rollout_whose_every_prompt_would_be_skipped_explores_the_smallest_draw():
    history = SkipHistory(PromptSkipping(history=1, explore=0.0))
    ids = ["a", "b", "c"]
    history.record([(p, True) for p in ids])
    skip = history.choose(ids, seed=0, rollout_index=5)
    smallest = min(ids, key=lambda p: draw(0, 5, p))
    assert skip == [p != smallest for p in ids]


def test_sampled_predicted_uniform_prompts_measure_how_often_the_prediction_holds():
    history = SkipHistory(PromptSkipping(history=2, explore=0.2))
    history.record([("a", True), ("b", True), ("c", False)] * 2)  # a, b predicted uniform; c not
    assert history.predicted_uniform_sampled == 0 and math.isnan(history.confirmed_fraction)
    history.record([("a", True), ("b", False), ("c", True)])  # a confirmed, b not; c was not predicted
    assert (history.predicted_uniform_sampled, history.predicted_uniform_confirmed) == (2, 1)
    history.record([("a", True), ("b", True), ("c", True)])  # a again; b's history is now [False, True]
    assert (history.predicted_uniform_sampled, history.predicted_uniform_confirmed) == (3, 2)
    assert history.confirmed_fraction == pytest.approx(2 / 3)
    again = SkipHistory(PromptSkipping(history=2, explore=0.2))
    again.load_state_dict(history.state_dict())  # in the checkpoint: a resume keeps counting
    assert (again.predicted_uniform_sampled, again.predicted_uniform_confirmed) == (3, 2)


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"prompt_skipping": PromptSkipping(history=0)}, r"prompt_skipping.history must be a whole number"),
        (
            {"prompt_skipping": PromptSkipping(explore=1.5)},
            r"explore must be a probability in \[0, 1\], got 1.5",
        ),
        (
            {"prompt_skipping": PromptSkipping(), "dynamic_sampling_calls": 2},
            "prompt_skipping and dynamic_sampling_calls do not combine",
        ),
    ],
)
def test_bad_skipping_knobs_are_refused(knobs, match):
    with pytest.raises(ConfigError, match=match):
        RolloutDataModule(**knobs)


def test_fit_refuses_a_bad_skipping_knob_before_any_engine_or_model(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an engine or model was loaded before the bad input was reported")

    monkeypatch.setattr(datamodule_module, "build_engine", refuse)
    monkeypatch.setattr(DashModule, "configure_model", refuse)
    tiny = "tests/configs/tiny.yaml"
    flags = [
        "fit",
        "--config",
        tiny,
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.callbacks",
        "[]",
    ]
    with pytest.raises(ValueError) as info:
        build_cli([*flags, "--data.prompt_skipping", '{"history": 2, "explore": -0.1}'])
    found = find_input_error(info.value)  # jsonargparse wraps it in "Does not validate against ..."
    assert isinstance(found, ConfigError)
    assert "prompt_skipping.explore must be a probability in [0, 1], got -0.1" in str(found)


def test_token_mean_over_the_rollout_is_refused_with_skipping(tmp_path, monkeypatch):
    """A skipped prompt's tokens are unknown: loss_agg token_mean over the rollout's tokens is refused
    before any engine or model loads; the control (constant, the default) passes that check."""

    def refuse(*args, **kwargs):
        raise AssertionError("an engine or model was loaded before the bad input was reported")

    monkeypatch.setattr(datamodule_module, "build_engine", refuse)
    monkeypatch.setattr(DashModule, "configure_model", refuse)
    skip = ["--data.prompt_skipping", '{"history": 2, "explore": 0.2}']
    flags = ["fit", "--config", "tests/configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path)]
    flags += ["--trainer.callbacks", "[]", *skip]
    with pytest.raises(ConfigError, match="token_mean with normalize_over: rollout divides by every"):
        build_cli([*flags, "--model.init_args.loss_agg", "token_mean"])
    with pytest.raises(AssertionError, match="an engine or model was loaded"):  # past the check
        build_cli(flags)
    with pytest.raises(AssertionError, match="an engine or model was loaded"):  # kept: nothing estimated
        build_cli(
            [*flags, "--model.init_args.loss_agg", "token_mean", "--model.init_args.normalize_over", "kept"]
        )


def test_the_skip_tags_have_world_reductions():
    for tag in ("skipped_prompts", "skipped_completions", "sampled_completions"):
        assert TRAIN_REDUCTIONS[f"train/{tag}"] == "sum"
    for tag in (
        "skipped_completions_total",
        "predicted_uniform_sampled_total",
        "predicted_uniform_confirmed_fraction",
    ):
        assert TRAIN_REDUCTIONS[f"train/{tag}"] == "same"


# ---- the buffer -------------------------------------------------------------------------------------

PROBLEMS = [Problem(question=f"What is {i} + 1?", answer=str(i + 1), source_id=f"t:{i}") for i in range(4)]


def test_skipped_prompts_are_not_sampled_and_count_in_the_denominators(tiny_engine):
    buffer = RolloutBuffer(
        engine=tiny_engine, sampling=SamplingConfig(temperature=1.0, max_new_tokens=8), group_size=G
    )
    calls = []
    generate = buffer._generate
    buffer._generate = lambda prompts: calls.append(list(prompts)) or generate(prompts)
    prompts = [p.question for p in PROBLEMS]
    rollout = buffer.collect(PROBLEMS, prompts, lambda c, p: [0.0] * len(c), skip=[True, False, True, False])
    assert calls == [[prompts[1], prompts[3]]], "the engine saw only the prompts not skipped"
    assert [p.source_id for p in rollout.problems] == ["t:1", "t:3"] and len(rollout.completions) == 8
    assert [p.source_id for p in rollout.skipped_problems] == ["t:0", "t:2"]
    assert rollout.skipped_completions == 8 and rollout.counted_completions == 16.0
    mean = rollout.sampled_tokens / 8
    assert rollout.counted_tokens == pytest.approx(rollout.sampled_tokens + 8 * mean)
    stats = rollout.stats()
    assert (stats["skipped_prompts"], stats["skipped_completions"], stats["sampled_completions"]) == (2, 8, 8)
    with pytest.raises(ValueError, match="at least one must be sampled"):
        buffer.collect(PROBLEMS, prompts, lambda c, p: [0.0] * len(c), skip=[True] * 4)


# ---- in a fit: the update, and resume -----------------------------------------------------------------


TRAIN = ProblemSource(source="arithmetic", difficulty="add1", num_problems=40)


class ByAnswer(DashModule):
    """A hand-crafted reward, whatever the text: problems with an even answer score 1 on every completion
    (a uniform group: all correct), odd ones [0, 1, 1, 0] (advantages -+0.866 in each group)."""

    def reward(self, completions, problems):
        return [1.0 if int(p.answer) % 2 == 0 else float(k % G in (1, 2)) for k, p in enumerate(problems)]


class SamePerPrompt(RolloutDataModule):
    """Each prompt's G completions are sampled the first time it is seen and reused: fits that sample
    different subsets of a batch train on the same groups. ``count_skipped`` False forgets the skipped
    prompts after the rollout (the negative control: the denominators then miss them)."""

    cache: dict = {}
    count_skipped = True

    def setup(self, stage):
        super().setup(stage)
        generate = self.buffer._generate

        def cached(prompts):
            missing = [t for t in prompts if t not in SamePerPrompt.cache]
            if missing:
                ids, completions, _ = generate(missing)
                for i, text in enumerate(missing):
                    SamePerPrompt.cache[text] = (ids[i], [c for c in completions if c.prompt_index == i])
            out_ids, out = [], []
            for k, text in enumerate(prompts):
                ids, group = SamePerPrompt.cache[text]
                out_ids.append(ids)
                out += [replace(c, prompt_index=k) for c in group]
            return out_ids, out, 1

        self.buffer._generate = cached

    def rollout(self, problems, reward_fn):
        rollout = super().rollout(problems, reward_fn)
        if not self.count_skipped:
            rollout.skipped_problems = []
        return rollout


class SkipLog(L.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, list[str], list[str]]] = []  # (step, sampled ids, skipped ids)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        r = pl_module.last_rollout
        self.rows.append(
            (
                trainer.global_step,
                [p.source_id for p in r.problems],
                [p.source_id for p in r.skipped_problems],
            )
        )


def _data(cls=RolloutDataModule, train=TRAIN, **kw):
    return cls(**tiny_data_knobs(train=train, group_size=G, **kw))


def test_skipping_uniform_groups_leaves_the_gradient_exactly_as_it_was(tmp_path, engine):
    """Batch 0 holds even-answer (uniform) and odd-answer (mixed) problems; a history that predicts the
    uniform ones skips them (explore 0). Counted as G zero-advantage completions each, the gradient is the
    no-skip gradient; not counted, it grows by sampled + skipped over sampled completions."""
    batch = PromptStream(TRAIN.load(), 4, seed=0).batch(0)
    uniform = [p.source_id for p in batch if int(p.answer) % 2 == 0]
    assert 0 < len(uniform) < 4, "the test needs both kinds in batch 0"
    SamePerPrompt.cache = {}
    grads, denominators, skipped = {}, {}, {}
    for label, skipping, count in (
        ("off", None, True),
        ("on", PromptSkipping(1, 0.0), True),
        ("uncounted", PromptSkipping(1, 0.0), False),
    ):
        data = _data(SamePerPrompt, prompt_skipping=skipping)
        data.count_skipped = count
        if skipping is not None:
            data.skip_history.record([(pid, True) for pid in uniform])
        module = ByAnswer(model="tiny-llama", precision="float32", max_grad_norm=None, seed=0)
        capture = GradCapture()
        trainer = fit(module, data, engine=engine, max_steps=1, callbacks=[capture], root=tmp_path / label)
        grads[label] = capture.grads[0]
        denominators[label] = float(trainer.callback_metrics["train/loss_denominator_completions"])
        skipped[label] = float(trainer.callback_metrics["train/skipped_completions"])
    n_uniform = len(uniform)
    assert skipped == {"off": 0.0, "on": G * n_uniform, "uncounted": 0.0}
    assert denominators == {"off": 16.0, "on": 16.0, "uncounted": 16.0 - G * n_uniform}
    factor = 4 / (4 - n_uniform)  # hand-computed: 16 completions over the 4 x (4 - uniform) sampled

    scaled = {n: factor * g for n, g in grads["off"].items()}
    print(
        f"[prompt skipping] {n_uniform} of 4 prompts skipped; max relative gradient difference on vs off: "
        f"{worst(grads['on'], grads['off']):.2e}; uncounted vs {factor:.3f} x off: {worst(grads['uncounted'], scaled):.2e}"
    )
    assert sum(float(g.abs().sum()) for g in grads["off"].values()) > 0
    assert worst(grads["on"], grads["off"]) < 1e-5
    assert worst(grads["uncounted"], grads["off"]) > 0.2  # the negative control differs ...
    assert worst(grads["uncounted"], scaled) < 1e-5  # ... by exactly the factor the denominators say


def test_a_resumed_run_takes_the_uninterrupted_runs_skip_decisions(tmp_path, engine):
    """8 problems, 2 batches an epoch, 4 rollouts, history 1, explore 0.5: resumed from the run's step-2
    checkpoint (the state a run killed after step 2 resumes from), the run samples and skips what the
    uninterrupted run did, and ends with its data state; resumed without the history (the negative
    control), it does not."""
    train = ProblemSource(source="arithmetic", difficulty="add1", num_problems=8)
    folder = tmp_path / "ckpt"

    def run(label, ckpt_path=None, callbacks=()):
        log = SkipLog()
        data = _data(train=train, prompt_skipping=PromptSkipping(history=1, explore=0.5))
        module = ByAnswer(model="tiny-llama", precision="float32", seed=0, lr=1e-4)
        callbacks = [log, *callbacks]
        fit(
            module,
            data,
            engine=engine,
            max_steps=4,
            callbacks=callbacks,
            root=tmp_path / label,
            ckpt_path=ckpt_path,
        )
        return log.rows, data

    every_two = StepCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)
    reference, reference_data = run("reference", callbacks=[every_two])
    resumed, resumed_data = run("resumed", ckpt_path=str(folder / "epoch=0-step=2.ckpt"))
    print(f"[prompt skipping] uninterrupted (step, sampled, skipped): {reference}")
    assert resumed == reference[2:]
    assert resumed_data.state_dict() == reference_data.state_dict()
    assert sum(len(skipped) for _, _, skipped in reference[2:]) > 0, "the resumed part skips prompts"
    # negative control: the same checkpoint without the history takes other decisions
    state = torch.load(folder / "epoch=0-step=2.ckpt", weights_only=False)
    del state["RolloutDataModule"]["skip_history"]
    torch.save(state, tmp_path / "no_history.ckpt")
    with pytest.warns(UserWarning, match="the skip history starts empty"):
        forgot, _ = run("forgot", ckpt_path=str(tmp_path / "no_history.ckpt"))
    assert [ids for _, ids, _ in forgot] != [ids for _, ids, _ in reference[2:]]
