"""Supervised fine-tuning on reference solutions: the baseline the paper's RL beats (finding 1).

SFT goes through the same LightningCLI, problem sources, prompt formatting, engine, weight sync and
evaluation callback as the RL runs, so an SFT row and a DASH row of a comparison differ only in the
training step:

    lit-dash fit --config configs/sft_demo.yaml

:class:`SftDataModule` yields the same prompt batches as :class:`RolloutDataModule` and turns them into
``prompt + target`` token rows whose loss mask covers the target tokens only (the prompt is formatted
exactly like an RL prompt). :class:`SftModule` minimises the token-mean cross-entropy of those target
tokens, one optimizer step per batch of problems, and pushes the weights to the engine so that held-out
evaluation scores the trained policy.

Targets (:func:`sft_target`): the dataset's worked solution, ending in ``\\boxed{answer}`` so that the
evaluation's boxed rule can score an imitated solution. MATH solutions already box their answer;
GSM8K's ``"... #### 42"`` becomes ``"...\\nThe answer is \\boxed{42}."`` (the loader strips the
``####`` line and the ``<<...>>`` calculator notes); arithmetic problems carry
``"23 + 45 = 68. The answer is \\boxed{68}."``.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from lit_dash.data.batches import MicroBatch, pad_micro_batch
from lit_dash.data.datamodule import RolloutDataModule
from lit_dash.data.formatting import format_prompts
from lit_dash.data.records import Problem
from lit_dash.data.sources import DataError
from lit_dash.module import DashModule
from lit_dash.rewards.boxed import last_boxed

__all__ = ["SftDataModule", "SftModule", "sft_micro_batch", "sft_target", "sft_token_rows"]


def sft_target(problem: Problem) -> str:
    """The text the policy learns to produce for ``problem``: its worked solution, ending in a boxed answer."""
    solution = (problem.solution or "").strip()
    if not solution:
        raise DataError(
            f"problem {problem.source_id!r} has no reference solution, so SFT cannot train on it; "
            "use a source with worked solutions (gsm8k, math, math12k, arithmetic)"
        )
    if last_boxed(solution) is None:  # GSM8K: the loader moved "#### 42" into problem.answer
        solution = f"{solution}\nThe answer is \\boxed{{{problem.answer}}}."
    return solution


def sft_token_rows(
    prompts: list[str], targets: list[str], tokenizer, max_target_tokens: int
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """``(prompt ids, target ids)`` per example, and how many targets were cut to ``max_target_tokens``.

    Prompt and target are tokenized separately (as the RL buffer joins engine prompt ids and completion
    ids), and the target ends with the tokenizer's end-of-sequence token, so the policy learns to stop.
    A target longer than ``max_target_tokens`` (the RL completion budget) is cut there, end token included.
    """
    rows, truncated = [], 0
    eos = tokenizer.eos_token_id
    for prompt, target in zip(prompts, targets, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if eos is not None:
            target_ids = target_ids + [eos]
        if len(target_ids) > max_target_tokens:
            target_ids = target_ids[:max_target_tokens]
            truncated += 1
        rows.append((list(prompt_ids), list(target_ids)))
    return rows, truncated


def sft_micro_batch(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> MicroBatch:
    """Right-padded ``prompt + target`` rows; ``completion_mask [b, L-1]`` marks the positions whose
    next token is a target token (aligned with ``logits[:, :-1]``), the same layout as an RL micro-batch."""
    return pad_micro_batch(rows, pad_token_id, torch.ones(len(rows)), list(range(len(rows))))


class SftDataModule(RolloutDataModule):
    """:class:`RolloutDataModule` for SFT: the same prompt stream, prompts, engine and eval sets.

    Knobs keep their RL meaning where one exists: ``prompts_per_rollout`` is problems per optimizer step
    (one reference target each), ``micro_batch_size`` is targets per backward pass, and
    ``sampling.max_new_tokens`` caps a target's length in tokens. ``group_size``, ``filter_threshold``,
    ``rollout_mode`` and the sampling temperature are unused (there is nothing to sample).
    """

    def _check_knobs(self) -> None:
        super()._check_knobs()
        if not isinstance(self.prompts_per_rollout, int):  # "auto" sizes rollouts by sampling throughput
            raise ValueError(
                "data configuration: SFT samples nothing, so prompts_per_rollout must be a number of "
                f"problems per optimizer step, got {self.prompts_per_rollout!r}"
            )
        if self.micro_batch_size > self.prompts_per_rollout:
            raise ValueError(
                f"data configuration: SFT trains on one target per problem, so micro_batch_size "
                f"({self.micro_batch_size} targets) must be <= prompts_per_rollout ({self.prompts_per_rollout})"
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            for problem in self.train_problems:  # a missing solution fails now, not at step 900
                sft_target(problem)

    def sft_micro_batches(self, problems: list[Problem]) -> tuple[list[MicroBatch], int]:
        """One step's ``prompt + target`` micro-batches (sorted by length) and the number of cut targets."""
        tokenizer = self.engine.tokenizer
        prompts = format_prompts(problems, tokenizer, self.prompt_style, self.instruction)
        rows, truncated = sft_token_rows(
            prompts, [sft_target(p) for p in problems], tokenizer, self.sampling.max_new_tokens
        )
        rows.sort(key=lambda r: len(r[0]) + len(r[1]))
        pad = tokenizer.pad_token_id or 0
        step = self.micro_batch_size
        return [sft_micro_batch(rows[i : i + step], pad) for i in range(0, len(rows), step)], truncated


class SftModule(DashModule):
    """Supervised cross-entropy on reference solutions (target tokens only), one optimizer step per batch
    of problems. Model loading, optimizer, LR schedule, weight sync, reward (for evaluation) and
    evaluation are :class:`DashModule`'s. Needs :class:`SftDataModule`; RL-only knobs must stay at their
    defaults (``kl_coef: 0``, ``update: dash``)."""

    def configure_model(self) -> None:
        if self.kl_coef > 0 or self.update_mode != "dash":
            raise ValueError(
                "SftModule trains on reference solutions with one optimizer step per batch: set "
                f"kl_coef: 0 (got {self.kl_coef}) and update: dash (got {self.update_mode!r})"
            )
        super().configure_model()

    def training_step(self, problems: list[Problem], batch_idx: int) -> None:
        dm = self.trainer.datamodule
        if not isinstance(dm, SftDataModule):
            raise TypeError(
                f"SftModule needs data: class_path: lit_dash.sft.SftDataModule, got {type(dm).__name__}"
            )
        self.phase_seconds = {}
        start = time.perf_counter()
        micro_batches, truncated = dm.sft_micro_batches(problems)
        total_tokens = float(sum(float(mb.completion_mask.sum()) for mb in micro_batches))
        loss_sum = 0.0
        for mb in micro_batches:
            logits, targets = self.completion_logits(self.policy, mb)
            loss = F.cross_entropy(logits.float(), targets, reduction="sum") / total_tokens
            self.manual_backward(loss)
            loss_sum += float(loss.detach())
        self._add_time("forward_backward", time.perf_counter() - start)
        grad_norm = self._optimizer_step()
        if truncated and batch_idx == 0:
            warnings.warn(
                f"{truncated} of {len(problems)} SFT targets were cut to sampling.max_new_tokens="
                f"{dm.sampling.max_new_tokens} tokens (train/truncated_fraction logs it every step)",
                stacklevel=2,
            )
        metrics = {
            "train/loss": loss_sum,
            "train/target_tokens": total_tokens,
            "train/truncated_fraction": truncated / len(problems),
            "train/grad_norm": grad_norm,
            "train/lr": self.lr_schedulers().get_last_lr()[0],
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self.log("loss", loss_sum, prog_bar=True, logger=False, batch_size=1)
