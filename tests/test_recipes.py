"""Every paper recipe trains what it says: its budget in rollouts, the paper's batch shape and sampling,
its KL and update mode, and evaluation / checkpoints at the cadence it names, counted in rollouts
whatever optimizer steps a rollout takes. Parsed through the LightningCLI; no model is loaded."""

from __future__ import annotations

import pytest
from support import REPO, SHARED_DATA

from lit_dash.callbacks import CompletionSamples, MathEvaluation, StepCheckpoint
from lit_dash.cli import build_cli, check_config

MATH_TRAIN_PROBLEMS = 11_998  # the 12k MATH train split less its 2 unanswerable rows (sources.math_12k_train)
BUDGET = 3 * MATH_TRAIN_PROBLEMS // 64  # 3 epochs of 64 prompts per rollout: 562 rollouts

# recipe: (kl_coef, update, optimizer steps per rollout, filter_threshold, rollout_mode)
RECIPES = {
    "qwen05b_math_dash.yaml": (0.04, "dash", 1, 0.1, "preemptive"),
    "qwen05b_math_dash_no_kl.yaml": (0.0, "dash", 1, 0.1, "preemptive"),
    "qwen05b_math_grpo.yaml": (0.04, "dash", 1, None, "per_micro_batch"),
    "qwen05b_math_preemptive_only.yaml": (0.04, "dash", 1, None, "preemptive"),
    "qwen05b_math_ppo_multi.yaml": (0.04, "multi", 3, 0.1, "preemptive"),  # paper: K = 3 passes
    "qwen05b_math_ppo_mini.yaml": (0.04, "mini", 32, 0.1, "preemptive"),  # paper: 32 mini-batch steps
}


def test_every_paper_recipe_is_listed():
    assert sorted(p.name for p in (REPO / "configs" / "paper").glob("*.yaml")) == sorted(RECIPES)


def _fires(cadence, steps_per_rollout: int) -> list[int]:
    """The rollouts after which a callback fires over the whole budget."""
    return [r for r in range(1, BUDGET + 1) if cadence.due(r * steps_per_rollout, steps_per_rollout)]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_recipe_trains_what_it_says(name, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes name ../shared/data relative to the repo root
    kl, update, steps_per_rollout, threshold, rollout_mode = RECIPES[name]
    path = str(REPO / "configs" / "paper" / name)
    config = build_cli(["--config", path], run=False, instantiate=False).config
    assert config["trainer"]["max_steps"] in (None, -1), "the budget is model.max_rollouts, not max_steps"
    init = check_config(path)
    model, data = init.model, init.data
    hp = model.hparams

    assert BUDGET == 562 and hp.max_rollouts == BUDGET
    assert model.steps_per_rollout == steps_per_rollout and model.update_mode == update
    assert (hp.ppo_epochs, hp.ppo_mini_batches) == {"dash": (1, 1), "multi": (3, 1), "mini": (1, 32)}[update]
    assert hp.kl_coef == kl and hp.kl_estimator == "k3"
    # the paper's code filters before the reference's forward pass: the KL covers the kept completions
    assert hp.kl_over == "kept" and data.truncated == "keep"  # and cut-off answers are trained on as 0
    assert (hp.log_ratio_clamp, hp.clip_ratio_c, hp.kl_clamp) == (
        20.0,
        3.0,
        None,
    )  # verl's bounds, no KL clamp
    assert (hp.lr, hp.lr_schedule, hp.warmup_steps, hp.max_grad_norm) == (3e-6, "linear", 0, 1.0)
    assert (hp.loss_agg, hp.normalize_over, hp.scale_rewards) == ("constant", "rollout", True)
    assert hp.model == "Qwen/Qwen2.5-0.5B"

    assert (data.prompts_per_rollout, data.group_size, data.micro_batch_size) == (64, 4, 8)
    assert data.filter_threshold == threshold and data.rollout_mode == rollout_mode
    s = data.sampling
    assert (s.temperature, s.top_k, s.top_p, s.max_new_tokens) == (0.9, 50, 1.0, 2048)
    assert (data.max_prompt_tokens, data.eval_max_new_tokens, data.prompt_style) == (256, 2048, "raw")
    assert data.train_source.source == "math12k" and sorted(data.eval_sources) == ["gsm8k", "math500"]

    callbacks = {type(c): c for c in init.trainer.callbacks}
    every_50 = list(range(50, BUDGET + 1, 50))  # rollouts 50, 100, ..., 550: 11 evaluations + start + end
    evaluation = callbacks[MathEvaluation]
    assert evaluation.at_start and evaluation.at_end
    assert _fires(evaluation.cadence, steps_per_rollout) == every_50
    assert _fires(callbacks[StepCheckpoint].cadence, steps_per_rollout) == every_50
    assert callbacks[StepCheckpoint].save_last
    assert _fires(callbacks[CompletionSamples].cadence, steps_per_rollout) == list(range(25, BUDGET + 1, 25))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")
def test_the_budget_is_three_epochs_of_the_math_train_split():
    from lit_dash.data.sources import load_problems

    assert len(load_problems("math12k", str(SHARED_DATA), "train")) == MATH_TRAIN_PROBLEMS


@pytest.mark.parametrize(
    "kwargs, steps_per_rollout, fires",
    [
        ({"every_n_steps": 50}, 3, [17, 34, 50]),  # steps 51, 102, 150: each rollout that crosses a multiple
        ({"every_n_steps": 50}, 32, [2, 4, 5, 7, 8, 10]),  # steps 64, 128, 160, 224, 256, 320
        ({"every_n_rollouts": 5}, 3, [5, 10]),
        ({}, 1, [10]),  # the default: every 10 optimizer steps
    ],
)
def test_every_n_fires_on_a_jump_that_crosses_it(kwargs, steps_per_rollout, fires):
    cadence = MathEvaluation(**kwargs).cadence
    rollouts = range(1, 11) if steps_per_rollout == 32 else range(1, 51)
    assert [r for r in rollouts if cadence.due(r * steps_per_rollout, steps_per_rollout)][
        : len(fires)
    ] == fires


def test_every_n_steps_and_rollouts_are_exclusive():
    with pytest.raises(ValueError, match="every_n_steps or every_n_rollouts, not both"):
        MathEvaluation(every_n_steps=2, every_n_rollouts=2)
    with pytest.raises(ValueError, match="every_n_rollouts must be >= 1"):
        StepCheckpoint(every_n_rollouts=0)
    with pytest.raises(ValueError, match="mutually exclusive"):
        StepCheckpoint(every_n_rollouts=5, every_n_epochs=1)
