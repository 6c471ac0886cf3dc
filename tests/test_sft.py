"""The SFT baseline: targets per source, the loss mask on a real tokenizer, configs, a 2-step CLI fit."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import REPO, SHARED_DATA, TINY_SFT, sequence_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_dash.cli import build_cli, check_config
from lit_dash.data.formatting import format_prompts
from lit_dash.data.records import Problem
from lit_dash.data.sources import DataError, arithmetic_problems, last_boxed, load_gsm8k, load_math
from lit_dash.sft import SftDataModule, SftModule, sft_micro_batch, sft_target, sft_token_rows

INSTRUCTION = "Put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)  # the real SmolLM2 tokenizer


def test_targets_end_in_a_boxed_answer_for_every_source():
    arith = arithmetic_problems(1, seed=0)[0]  # "What is 12 + 55?"
    assert sft_target(arith) == "12 + 55 = 67. The answer is \\boxed{67}."
    if SHARED_DATA.is_dir():
        gsm = load_gsm8k(SHARED_DATA, "train", limit=1)[0]  # Natalia's clips, "#### 72"
        assert sft_target(gsm) == (
            "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
            "\nThe answer is \\boxed{72}."
        )
        math_problem = load_math(SHARED_DATA, "train", limit=1)[0]
        assert sft_target(math_problem) == math_problem.solution  # already boxed: unchanged
        assert last_boxed(sft_target(math_problem)) == math_problem.answer
    with pytest.raises(DataError, match="'q:1' has no reference solution"):
        sft_target(Problem(question="1 + 1?", answer="2", source_id="q:1"))


def test_loss_mask_covers_exactly_the_target_tokens(tokenizer):
    problems = arithmetic_problems(2, seed=0)
    prompts = format_prompts(problems, tokenizer, "chat", INSTRUCTION)
    targets = [sft_target(p) for p in problems]
    rows, truncated = sft_token_rows(prompts, targets, tokenizer, max_target_tokens=64)
    assert truncated == 0
    # "12 + 55 = 67. The answer is \boxed{67}." is 21 SmolLM2 tokens (digits are single tokens), + <|im_end|>
    assert [tokenizer.decode([t]) for t in rows[0][1]] == (
        ["1", "2", " +", " ", "5", "5", " =", " ", "6", "7", ".", " The", " answer", " is", " \\", "box"]
        + ["ed", "{", "6", "7", "}.", "<|im_end|>"]
    )
    rows[1] = (rows[1][0], rows[1][1][:-3])  # make the two rows differ in length, so one is padded
    mb = sft_micro_batch(rows, pad_token_id=tokenizer.pad_token_id)
    assert mb.completion_mask.shape == (2, mb.input_ids.shape[1] - 1)
    for i, (prompt_ids, target_ids) in enumerate(rows):
        mask = mb.completion_mask[i]
        assert int(mask.sum()) == len(target_ids)
        positions = mask.nonzero().flatten()
        # position j predicts token j + 1: the first masked position is the prompt's last token
        assert int(positions[0]) == len(prompt_ids) - 1
        assert positions.tolist() == list(range(len(prompt_ids) - 1, len(prompt_ids) + len(target_ids) - 1))
        predicted = mb.input_ids[i, 1:][mask > 0].tolist()
        assert predicted == target_ids
        assert tokenizer.decode(mb.input_ids[i, : len(prompt_ids)]) == prompts[i]
        assert int(mb.attention_mask[i].sum()) == len(prompt_ids) + len(target_ids)
    assert tokenizer.decode(mb.input_ids[0, 1:][mb.completion_mask[0] > 0]) == targets[0] + "<|im_end|>"


def test_a_long_target_is_cut_to_the_token_budget(tokenizer):
    rows, truncated = sft_token_rows(["Q"], ["one two three four five"], tokenizer, max_target_tokens=3)
    assert truncated == 1 and len(rows[0][1]) == 3


def test_sft_micro_batch_size_is_checked_against_problems_per_step():
    with pytest.raises(
        ValueError, match=r"micro_batch_size \(8 targets\) must be <= prompts_per_rollout \(4\)"
    ):
        SftDataModule(prompts_per_rollout=4, micro_batch_size=8)
    with pytest.raises(ValueError, match="SFT samples nothing, so prompts_per_rollout must be a number"):
        SftDataModule(prompts_per_rollout="auto", micro_batch_size=8)


def test_sft_demo_is_the_demo_with_other_classes(monkeypatch):
    monkeypatch.chdir(REPO)
    rl, sft = check_config("configs/demo.yaml"), check_config("configs/sft_demo.yaml")
    assert isinstance(sft.model, SftModule) and isinstance(sft.data, SftDataModule)
    for knob in ("train_source", "eval_sources", "prompt_style", "instruction", "prompts_per_rollout"):
        assert getattr(sft.data, knob) == getattr(rl.data, knob), knob
    for knob in ("max_prompt_tokens", "eval_max_new_tokens"):
        assert getattr(sft.data, knob) == getattr(rl.data, knob), knob
    assert sft.data.sampling.max_new_tokens == rl.data.sampling.max_new_tokens
    for knob in ("model", "lr", "lr_schedule", "warmup_steps", "max_grad_norm", "answer_fallback"):
        assert sft.model.hparams[knob] == rl.model.hparams[knob], knob
    assert sft.trainer.max_steps == rl.trainer.max_steps
    assert sft.seed_everything == rl.seed_everything


def test_two_step_sft_fit_through_the_cli(tmp_path):
    fp32 = ["--model.init_args.precision", "float32", "--data.engine.dtype", "float32"]  # exact sync check
    cli = build_cli(["fit", "--config", str(TINY_SFT), "--trainer.default_root_dir", str(tmp_path), *fp32])
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    log_dir = Path(trainer.log_dir)
    assert [int(float(r["step"])) for r in csv.DictReader((log_dir / "timing.csv").open())] == [1, 2]
    evals = sorted(p.name for p in (log_dir / "eval").glob("arithmetic_fit_step*.jsonl"))
    assert evals == [f"arithmetic_fit_step{s}.jsonl" for s in (0, 1, 2)]
    evaluation = next(c for c in trainer.callbacks if type(c).__name__ == "MathEvaluation")
    assert [step for step, _ in evaluation.history] == [0, 1, 2]

    # the step's loss, recomputed on the 4 training targets: ln(vocab) for the random initial model
    # (near-uniform logits), lower after two AdamW steps at lr 1e-3 on the same 4 targets
    micro_batches, _ = dm.sft_micro_batches(dm.train_problems)
    assert [mb.num_completions for mb in micro_batches] == [3, 1]
    n_tokens = sum(float(mb.completion_mask.sum()) for mb in micro_batches)

    def loss_of(model) -> float:
        with torch.no_grad():
            return (
                sum(
                    float(F.cross_entropy(*module.completion_logits(model, mb), reduction="sum"))
                    for mb in micro_batches
                )
                / n_tokens
            )

    initial = AutoModelForCausalLM.from_pretrained(module.model_path(), dtype=torch.float32)
    vocab = initial.config.vocab_size
    assert loss_of(initial) == pytest.approx(math.log(vocab), abs=0.1)  # 10.85 vs ln(49152) = 10.80
    assert loss_of(module.policy) < loss_of(initial) - 0.5
    changed = [
        name
        for (name, p), q in zip(module.policy.named_parameters(), initial.parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert len(changed) == len(list(initial.parameters())), "every weight should move"

    # weight sync: the engine (which evaluation uses) scores a sequence as the trained policy does, in
    # fp32 on both sides (1e-4: the tolerance the export test uses); the untrained model's log-probs, the
    # negative control, are rejected by the same tolerance
    ids = dm.engine.tokenizer("What is 3 + 4? The answer is 7.")["input_ids"]

    engine_lp = torch.tensor(dm.engine.sequence_logprobs([ids])[0])
    torch.testing.assert_close(engine_lp, sequence_logprobs(module.policy, ids), atol=1e-4, rtol=0)
    untrained_gap = float((engine_lp - sequence_logprobs(initial, ids)).abs().max())
    assert untrained_gap > 1e-2, f"the untrained weights would pass too (gap {untrained_gap:.1e})"
