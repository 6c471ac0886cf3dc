"""The on-policy rollout buffer: sample, score, normalise, filter, then emit micro-batches.

One call to :meth:`RolloutBuffer.collect` builds everything one optimizer step trains on. In
``preemptive`` mode (DASH) all P x G completions come from ONE engine call; in ``per_micro_batch`` mode
(standard GRPO) they come from one engine call per micro-batch of completions, which is what makes
standard GRPO slow on a GPU. Both give the same kind of rollout, so the two can be compared on equal work.
Completions whose |advantage| is at or below ``filter_threshold`` group standard deviations are dropped
here, before any further forward pass, and never reach a micro-batch. In ``update: mini`` the kept
completions are cut into as many slices as the rollout takes optimizer steps (``slices``), each slice into
micro-batches.

With ``dynamic_sampling_calls > 0`` (DAPO's dynamic sampling) groups that teach nothing (every
completion dropped by the filter) are replaced before training: up to that many extra engine calls sample
fresh prompts until the rollout holds P informative groups. The rollout keeps its size, P groups of G, so
the loss's denominators do not move; when the cap stops the refill, the first call's uninformative groups
fill the remaining places, as plain DASH would have trained on them.

With ``skip`` (``data.prompt_skipping``, see :mod:`lit_dash.data.skipping`) the prompts it marks are not
sent to the engine at all: the rollout holds the other prompts' groups, and ``Rollout.skipped_problems``
the skipped ones, which the loss's denominators still count as G zero-advantage completions each.

Each ``collect`` counts the math reward's timeouts and worker restarts of its own reward calls
(:func:`lit_dash.rewards.reward_events`), logged as ``train/reward_timeouts`` and
``train/reward_worker_restarts``; when timeouts pass ``reward_timeout_warn_fraction`` of the completions the
reward judged in one step, it warns (once per buffer): each is a 0.0 the answer may not have earned.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lit_dash.advantages import group_advantages, keep_mask, overlong_penalty, zero_variance_groups
from lit_dash.data.batches import MicroBatch, completion_length, pack_rows, pad_completions, pad_micro_batch
from lit_dash.data.packing import pack_groups
from lit_dash.data.records import Problem
from lit_dash.data.rollout import Rollout, in_loss
from lit_dash.engines.base import Completion, Engine, SamplingConfig
from lit_dash.rewards.math import RewardEvents, reward_events
from lit_dash.rewards.scoring import RewardError, check_rewards, score_completions

__all__ = [
    "MicroBatch",
    "Rollout",
    "RolloutBuffer",
    "RewardError",
    "check_rewards",
    "pad_micro_batch",
    "slice_rows",
    "ROLLOUT_MODES",
    "TRUNCATED_MODES",
]

ROLLOUT_MODES = ("preemptive", "per_micro_batch")
TRUNCATED_MODES = ("keep", "mask", "penalty")
RewardFn = Callable[[list[str], list[Problem]], Sequence[float]]
# DAPO refill: given a number of prompts, the next problems of the refill stream and their prompt texts
RefillFn = Callable[[int], tuple[list[Problem], list[str]]]


def slice_rows(rows: list[int], slices: int) -> list[list[int]]:
    """``slices`` contiguous runs of ``rows`` in the order given (the rollout's: prompts as the shuffled
    stream drew them, each prompt's G completions together), sizes differing by at most one; a run is
    empty when there are fewer rows than slices. update=mini trains one run per optimizer step.

    Never by length: length goes with reward (long and truncated completions are mostly wrong), so
    length-sorted slices would give the late steps mostly negative advantages (verl splits in rollout
    order too). The order is deterministic, so a resumed run cuts the same slices.
    """
    n = len(rows)
    return [rows[k * n // slices : (k + 1) * n // slices] for k in range(slices)]


@dataclass
class RolloutBuffer:
    """Turns P prompts into a filtered, micro-batched rollout.

    Args:
        engine: the rollout engine (vLLM in-process by default).
        group_size: completions per prompt (G).
        micro_batch_size: completions per micro-batch for backprop.
        max_tokens_per_micro_batch: if set, micro-batches are packed up to this many padded tokens instead
            of a fixed completion count (micro_batch_size still caps the count).
        filter_threshold: drop completions with |r - group mean| <= this x (group std + 1e-4), i.e.
            |A| <= this for std-scaled advantages, and the same completions when ``scale_rewards`` is off
            (see ``lit_dash.advantages.keep_mask``); ``None`` keeps all (standard GRPO).
        rollout_mode: ``preemptive`` (one engine call) or ``per_micro_batch`` (one call per micro-batch).
        scale_rewards: divide advantages by the group's std (GRPO) or not (Dr. GRPO).
        slices: cut the kept completions into this many slices of (nearly) equal size, one per optimizer
            step (``update: mini``); each slice is cut into micro-batches. 1 for one step per pass.
        dynamic_sampling_calls: DAPO's dynamic sampling: at most this many extra engine calls per rollout,
            each on at most P fresh prompts, to replace groups that keep nothing; 0 turns it off.
        reward_timeout_warn_fraction: warn (once) when more than this fraction of the completions the math
            reward judged in one step timed out: 5% of rewards that may be wrong is past noise.
        truncated: what becomes of a completion the engine cut off at ``max_new_tokens``: ``keep``
            (trained on with its reward, usually 0: pushed down as if wrong), ``mask`` (out of the loss and
            its denominators, as TRL's mask_truncated_completions; its reward still counts in its group's
            mean and std) or ``penalty`` (DAPO's soft overlong penalty on every completion's reward, see
            :func:`lit_dash.advantages.overlong_penalty`).
        train_dropped: also cut the completions filtering dropped into micro-batches, with advantage 0,
            so the loss's KL term covers every sampled completion (``model.kl_over: sampled``); ``kept``
            and the statistics stay the filter's.
        overlong_buffer_tokens: ``penalty``'s buffer (tokens before ``max_new_tokens`` where the penalty
            starts); None: a fifth of ``max_new_tokens`` (DAPO's 4,096 of 20,480).
        shared_prefix: micro-batches keep each prompt's completions together and carry them as packed
            rows, one prompt per group (``model.shared_prefix``, :mod:`lit_dash.data.packing`); off, rows
            are sorted by length and padded one completion per row.

    ``collect``'s ``skip`` (prompt skipping) and dynamic sampling do not combine (the datamodule refuses
    both together): refilling tops a rollout up to P sampled groups, skipping leaves it smaller on purpose.
    """

    engine: Engine
    sampling: SamplingConfig
    group_size: int = 8
    micro_batch_size: int = 8
    max_tokens_per_micro_batch: int | None = None
    filter_threshold: float | None = 0.1
    rollout_mode: str = "preemptive"
    scale_rewards: bool = True
    pad_token_id: int = 0
    slices: int = 1
    dynamic_sampling_calls: int = 0
    reward_timeout_warn_fraction: float = 0.05
    truncated: str = "keep"
    overlong_buffer_tokens: int | None = None
    train_dropped: bool = False
    shared_prefix: bool = False
    warned_reward_timeouts: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.rollout_mode not in ROLLOUT_MODES:
            raise ValueError(f"rollout_mode must be one of {ROLLOUT_MODES}, got {self.rollout_mode!r}")
        if self.slices < 1:
            raise ValueError(f"slices must be >= 1, got {self.slices}")
        if self.dynamic_sampling_calls < 0:
            raise ValueError(f"dynamic_sampling_calls must be >= 0, got {self.dynamic_sampling_calls}")
        if self.truncated not in TRUNCATED_MODES:
            raise ValueError(f"truncated must be one of {TRUNCATED_MODES}, got {self.truncated!r}")
        if self.truncated == "penalty":
            self.overlong_buffer()  # a bad buffer fails here

    def overlong_buffer(self) -> int:
        """The penalty's buffer in tokens (``overlong_buffer_tokens``, or a fifth of max_new_tokens)."""
        max_new = self.sampling.max_new_tokens
        buffer = self.overlong_buffer_tokens or max(1, max_new // 5)
        if not 1 <= buffer <= max_new:
            raise ValueError(f"overlong_buffer_tokens must be 1..{max_new} (max_new_tokens), got {buffer}")
        return buffer

    def _shaped(
        self, rewards: torch.Tensor, completions: list[Completion]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``data.truncated`` applied to the rewards and to the filter: (the rewards the advantages are
        computed from, the kept mask, the completions a loss can hold (:func:`in_loss`), the overlong
        penalties or None)."""
        penalties = None
        if self.truncated == "penalty":
            lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=rewards.dtype)
            penalties = overlong_penalty(lengths, self.sampling.max_new_tokens, self.overlong_buffer())
            rewards = rewards + penalties
        if self.filter_threshold is None:
            kept = torch.ones_like(rewards, dtype=torch.bool)
        else:
            kept = keep_mask(rewards, self.group_size, self.filter_threshold)
        mask = self.truncated == "mask"
        trainable = torch.tensor([in_loss(c, mask) for c in completions], dtype=torch.bool)
        return rewards, kept & trainable, trainable, penalties

    def _generate(self, prompts: list[str]) -> tuple[list[list[int]], list[Completion], int]:
        if self.rollout_mode == "preemptive":
            result = self.engine.generate(prompts, self.group_size, self.sampling, want_logprobs=True)
            return result.prompt_token_ids, result.completions, 1
        # Standard GRPO: each engine call samples one micro-batch worth of completions (whole groups).
        prompts_per_call = max(1, self.micro_batch_size // self.group_size)
        prompt_ids: list[list[int]] = []
        completions: list[Completion] = []
        calls = 0
        for start in range(0, len(prompts), prompts_per_call):
            result = self.engine.generate(
                prompts[start : start + prompts_per_call], self.group_size, self.sampling, want_logprobs=True
            )
            for c in result.completions:
                c.prompt_index += start
            prompt_ids += result.prompt_token_ids
            completions += result.completions
            calls += 1
        return prompt_ids, completions, calls

    def collect(
        self,
        problems: list[Problem],
        prompts: list[str],
        reward_fn: RewardFn,
        refill: RefillFn | None = None,
        skip: Sequence[bool] | None = None,
    ) -> Rollout:
        """Sample G completions for each prompt, score them, and keep the informative ones; with
        ``dynamic_sampling_calls`` and a ``refill`` source, first replace groups that keep nothing. Prompts
        ``skip`` marks (one flag per prompt) are not sampled; at least one prompt must remain."""
        skipped: list[Problem] = []
        if skip is not None:
            if len(skip) != len(problems):
                raise ValueError(f"skip has {len(skip)} flags for {len(problems)} prompts")
            if all(skip):
                raise ValueError("skip marks every prompt of the rollout: at least one must be sampled")
            if any(skip) and refill is not None and self.dynamic_sampling_calls:
                raise ValueError(
                    "prompt skipping and dynamic sampling (dynamic_sampling_calls) do not combine"
                )
            skipped = [p for p, s in zip(problems, skip, strict=True) if s]
            prompts = [t for t, s in zip(prompts, skip, strict=True) if not s]
            problems = [p for p, s in zip(problems, skip, strict=True) if not s]
        with reward_events() as events:  # this step's reward calls only, whatever other threads score
            rollout = self._collect(problems, prompts, reward_fn, refill)
        rollout.skipped_problems = skipped
        rollout.reward_timeouts, rollout.reward_worker_restarts = events.timeouts, events.worker_restarts
        self._check_reward_timeouts(events)
        return rollout

    def _check_reward_timeouts(self, events: RewardEvents) -> None:
        fraction = events.timeouts / events.completions if events.completions else 0.0
        if fraction <= self.reward_timeout_warn_fraction or self.warned_reward_timeouts:
            return
        self.warned_reward_timeouts = True
        warnings.warn(
            f"{events.timeouts} of the {events.completions} completions the math reward judged in this step "
            f"({fraction:.0%}, above {self.reward_timeout_warn_fraction:.0%}) scored 0.0 because their "
            "comparison ran past its timeout (or out of SymPy's recursion depth or memory): some may be right "
            "answers. Usual causes: an overloaded machine (fewer processes per core, or "
            "LIT_DASH_REWARD_WORKERS), or a policy writing huge expressions; a longer timeout is "
            "math_rewards(timeout_s=...) in an overriding DashModule.reward. Watch train/reward_timeouts "
            "(this warning is shown once per run)",
            stacklevel=2,
        )

    def _collect(
        self, problems: list[Problem], prompts: list[str], reward_fn: RewardFn, refill: RefillFn | None
    ) -> Rollout:
        t0 = time.perf_counter()
        prompt_ids, completions, calls = self._generate(prompts)
        timings = {"generation": time.perf_counter() - t0}
        if refill is None or self.dynamic_sampling_calls == 0:
            return self.assemble(problems, prompt_ids, completions, reward_fn, timings, calls)
        return self._refilled(problems, prompt_ids, completions, reward_fn, timings, calls, refill)

    def _informative_groups(self, rewards: torch.Tensor, completions: list[Completion]) -> torch.Tensor:
        """[groups] bool: the group has at least one completion the filter keeps (a non-constant group
        when filtering is off), after ``data.truncated``."""
        shaped, kept, _, _ = self._shaped(rewards, completions)
        if self.filter_threshold is None:
            kept = kept & ~zero_variance_groups(shaped, self.group_size).repeat_interleave(self.group_size)
        return kept.view(-1, self.group_size).any(dim=1)

    def _score(
        self, reward_fn: RewardFn, problems: list[Problem], completions: list[Completion]
    ) -> torch.Tensor:
        return score_completions(
            reward_fn, [c.text for c in completions], [problems[c.prompt_index] for c in completions]
        )

    def _refilled(
        self,
        problems: list[Problem],
        prompt_ids: list[list[int]],
        completions: list[Completion],
        reward_fn: RewardFn,
        timings: dict[str, float],
        calls: int,
        refill: RefillFn,
    ) -> Rollout:
        """DAPO dynamic sampling: top the rollout up to P informative groups with extra engine calls."""
        g, p = self.group_size, len(problems)
        t = time.perf_counter()
        rewards = self._score(reward_fn, problems, completions)
        timings["reward"] = time.perf_counter() - t
        first_call_reward = float(rewards.mean())
        # every group sampled so far, in sampling order: (problem, prompt ids, its G completions, rewards)
        pool = [
            (problems[i], prompt_ids[i], completions[i * g : (i + 1) * g], rewards[i * g : (i + 1) * g])
            for i in range(p)
        ]
        informative = self._informative_groups(rewards, completions).tolist()
        extra_calls = extra_prompts = 0
        while sum(informative) < p and extra_calls < self.dynamic_sampling_calls:
            rate = max(sum(informative) / len(informative), 1.0 / p)  # informative groups per prompt so far
            wanted = min(p, math.ceil((p - sum(informative)) / rate))  # no call larger than the first
            new_problems, new_prompts = refill(wanted)
            t = time.perf_counter()
            new_ids, new_completions, new_calls = self._generate(new_prompts)
            timings["generation"] += time.perf_counter() - t
            t = time.perf_counter()
            new_rewards = self._score(reward_fn, new_problems, new_completions)
            timings["reward"] += time.perf_counter() - t
            pool += [
                (
                    new_problems[i],
                    new_ids[i],
                    new_completions[i * g : (i + 1) * g],
                    new_rewards[i * g : (i + 1) * g],
                )
                for i in range(len(new_problems))
            ]
            informative += self._informative_groups(new_rewards, new_completions).tolist()
            extra_calls += new_calls
            extra_prompts += len(new_problems)
        chosen = [i for i, ok in enumerate(informative) if ok][:p]
        chosen += [i for i in range(p) if not informative[i]][: p - len(chosen)]  # the cap stopped it
        chosen.sort()
        out_problems, out_ids, out_completions, out_rewards = [], [], [], []
        for k, i in enumerate(chosen):
            problem, ids, group, group_rewards = pool[i]
            out_problems.append(problem)
            out_ids.append(ids)
            for c in group:
                c.prompt_index = k
            out_completions += group
            out_rewards.append(group_rewards)
        rollout = self.assemble(
            out_problems,
            out_ids,
            out_completions,
            reward_fn,
            timings,
            calls + extra_calls,
            rewards=torch.cat(out_rewards),
        )
        rollout.refill_engine_calls = extra_calls
        rollout.refill_prompts = extra_prompts
        rollout.first_call_reward_mean = first_call_reward
        return rollout

    def assemble(
        self,
        problems: list[Problem],
        prompt_ids: list[list[int]],
        completions: list[Completion],
        reward_fn: RewardFn,
        timings: dict[str, float] | None = None,
        engine_calls: int = 1,
        rewards: torch.Tensor | None = None,
    ) -> Rollout:
        """Score sampled completions (unless their ``rewards`` are given), normalise, filter and cut the
        kept ones into micro-batches."""
        timings = dict(timings or {})
        if rewards is None:
            t1 = time.perf_counter()
            rewards = self._score(reward_fn, problems, completions)
            timings["reward"] = time.perf_counter() - t1
        t2 = time.perf_counter()

        shaped, kept, trainable, penalties = self._shaped(rewards, completions)
        advantages = group_advantages(shaped, self.group_size, scale_by_std=self.scale_rewards)
        rows = [i for i in range(len(completions)) if kept[i]]
        trained, loss_advantages = rows, advantages
        if self.train_dropped:  # kl_over: sampled: the dropped rows' KL, at advantage 0
            trained = [i for i, ok in enumerate(trainable.tolist()) if ok]
            loss_advantages = torch.where(kept, advantages, torch.zeros_like(advantages))
        micro_batches, slice_sizes = self._sliced_micro_batches(
            trained, prompt_ids, completions, loss_advantages
        )
        probe = None
        if not trained and completions:  # nothing to train on; the trainer still checks the engine on these
            probe_rows = list(range(min(self.micro_batch_size, len(completions))))
            probe = self._micro_batches(probe_rows, prompt_ids, completions, advantages)[0]
        timings["filtering"] = time.perf_counter() - t2
        return Rollout(
            problems=problems,
            prompt_token_ids=prompt_ids,
            completions=completions,
            rewards=rewards,
            advantages=advantages,
            kept=kept,
            micro_batches=micro_batches,
            group_size=self.group_size,
            max_new_tokens=self.sampling.max_new_tokens,
            timings=timings,
            engine_calls=engine_calls,
            slice_sizes=slice_sizes,
            temperature=self.sampling.temperature,
            top_k=self.sampling.top_k,
            top_p=self.sampling.top_p,
            parity_probe=probe,
            masked_truncated=self.truncated == "mask",
            overlong_penalties=penalties,
        )

    def _sliced_micro_batches(
        self,
        rows: list[int],
        prompt_ids: list[list[int]],
        completions: list[Completion],
        advantages: torch.Tensor,
    ) -> tuple[list[MicroBatch], list[int]]:
        """The kept rows cut into ``slices`` parts (:func:`slice_rows`, rollout order), each cut into
        micro-batches; returns all micro-batches in slice order and how many each slice has."""
        micro_batches: list[MicroBatch] = []
        sizes = []
        for part in slice_rows(rows, self.slices):
            cut = self._micro_batches(part, prompt_ids, completions, advantages)
            micro_batches += cut
            sizes.append(len(cut))
        return micro_batches, sizes

    def _micro_batches(
        self,
        rows: list[int],
        prompt_ids: list[list[int]],
        completions: list[Completion],
        advantages: torch.Tensor,
    ) -> list[MicroBatch]:
        """Cut kept rows into micro-batches, so little is padded: sorted by total length, or with
        ``shared_prefix`` whole groups packed behind their prompt (:func:`pack_groups`)."""
        if self.shared_prefix:
            groups = pack_groups(
                rows,
                {r: completions[r].prompt_index for r in rows},
                {r: len(completions[r].token_ids) for r in rows},
                dict(enumerate(len(p) for p in prompt_ids)),
                self.micro_batch_size,
                self.max_tokens_per_micro_batch,
            )
        else:
            length = {r: completion_length(r, prompt_ids, completions) for r in rows}
            groups = pack_rows(rows, length, self.micro_batch_size, self.max_tokens_per_micro_batch)
        return [
            pad_completions(
                g,
                prompt_ids,
                completions,
                advantages,
                self.pad_token_id,
                self.sampling.temperature,
                shared_prefix=self.shared_prefix,
            )  # fmt: skip
            for g in groups
        ]
