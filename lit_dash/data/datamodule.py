"""The LightningDataModule: prompt stream in, rollouts out, plus the held-out evaluation sets.

It owns the rollout engine (started in ``setup`` once the module knows its model) and the
:class:`RolloutBuffer`. The train dataloader yields *prompt batches* (P problems), not tensors: the
rollout itself is sampled inside the training step, after the previous step's weights reached the engine.
Sampling in the dataloader would let Lightning's one-batch prefetch sample with stale weights.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from lit_dash import console
from lit_dash.advantages import zero_variance_groups
from lit_dash.contract import RewardFn, RolloutPolicy
from lit_dash.data.buffer import Rollout, RolloutBuffer
from lit_dash.data.formatting import INSTRUCTION, format_prompts
from lit_dash.data.knobs import DataKnobs, EngineConfig, ProblemSource
from lit_dash.data.prompt_stream import PromptStream
from lit_dash.data.records import Problem
from lit_dash.data.skipping import PromptSkipping, SkipHistory
from lit_dash.data.sources import DataError, read_jsonl
from lit_dash.engines import Engine, SamplingConfig, build_engine
from lit_dash.errors import ConfigError
from lit_dash.evaluation import EvalSamples, Evaluator

__all__ = ["EngineConfig", "ProblemSource", "PromptStream", "RolloutDataModule"]  # the old import paths


_REFILL_SEED_OFFSET = 7_919  # the refill stream's shuffle seed, relative to the run's


def _problems_collate(batch):
    return batch


class RolloutDataModule(DataKnobs, L.LightningDataModule):
    """Prompts, the vLLM-backed rollout buffer, and evaluation sets.

    Args:
        train: the training problems.
        eval_sets: held-out sets by name, evaluated greedily (eval/<name>/accuracy).
        prompt_style: chat (the model's chat template + boxed instruction) or raw (the problem text, as in
            the paper).
        instruction: the line after the question in chat style (a small model is sensitive to it: "Please
            reason step by step" makes SmolLM2-135M ramble past a short token budget).
        prompts_per_rollout: prompts (P) sampled per optimizer step, or ``auto``: at the start of fit, time
            one engine call per candidate size and take the smallest P whose P x group_size completions
            reach 90% of the best throughput measured (the engine's knee on this machine).
        auto_max_completions: ``auto`` only: the largest rollout tried, in completions (P x group_size).
        group_size: completions per prompt (G); a rollout holds P x G completions.
        micro_batch_size: completions per backward pass.
        max_tokens_per_micro_batch: pack micro-batches up to this many padded tokens instead (optional).
        filter_threshold: drop completions with |advantage| <= this before any further forward pass,
            in units of the group's std: |r - mean| <= threshold x (std + 1e-4), which is the paper's
            |A| <= threshold with std-scaled advantages and keeps the same completions when
            model.scale_rewards is false; null keeps all (standard GRPO).
        dynamic_sampling_calls: DAPO's dynamic sampling: up to this many extra engine calls per rollout
            (each on at most prompts_per_rollout fresh prompts, from a refill stream of its own) replace
            groups that keep nothing, so the step trains on P informative groups; 0 (default) is off.
        prompt_skipping: skip, before sampling, prompts whose last ``history`` groups were uniform (every
            completion the same reward: nothing to learn), except with probability ``explore``
            (``{history: 2, explore: 0.2}``; see data.skipping); the loss counts each skipped prompt as G
            zero-advantage completions. null (default): off. Not with dynamic_sampling_calls.
        rollout_mode: preemptive (DASH: one engine call per step) or per_micro_batch (standard GRPO).
        truncated: completions cut off at sampling.max_new_tokens: keep (trained on with their reward,
            as in the paper), mask (left out of the loss and its denominators; TRL's
            mask_truncated_completions) or penalty (DAPO's soft overlong penalty on the reward: 0 up to
            max_new_tokens - overlong_buffer_tokens, then down to -1 at max_new_tokens). Logged:
            train/truncated_fraction, and train/overlong_penalty_mean with penalty.
        overlong_buffer_tokens: penalty only: the buffer in tokens; null: max_new_tokens / 5.
        sampling: temperature, top_p, top_k, max_new_tokens (tokens per completion).
        max_prompt_tokens: prompts longer than this (in tokens) are skipped with a warning.
        engine: the rollout engine's settings.
        eval_max_new_tokens: tokens per completion at evaluation.
        eval_batch_size: problems per engine call at evaluation.
        eval_samples: also sample n completions per eval problem at a temperature and report pass@k and
            maj@k beside greedy accuracy (``{k: 8, temperature: 0.7}``; see evaluation.EvalSamples); null:
            greedy only.
        predict_file: JSONL of prompts for ``lit-dash predict`` (one object per line with a ``question``;
            an ``answer`` is scored when present); greedy completions go to ``<log_dir>/predictions.jsonl``.
    """

    def __init__(
        self,
        train: ProblemSource | None = None,
        eval_sets: dict[str, ProblemSource] | None = None,
        prompt_style: str = "chat",
        instruction: str = INSTRUCTION,
        prompts_per_rollout: int | str = 16,
        auto_max_completions: int = 256,
        group_size: int = 8,
        micro_batch_size: int = 8,
        max_tokens_per_micro_batch: int | None = None,
        filter_threshold: float | None = 0.1,
        dynamic_sampling_calls: int = 0,
        prompt_skipping: PromptSkipping | None = None,
        rollout_mode: str = "preemptive",
        truncated: str = "keep",
        overlong_buffer_tokens: int | None = None,
        sampling: SamplingConfig | None = None,
        max_prompt_tokens: int = 256,
        engine: EngineConfig | None = None,
        eval_max_new_tokens: int = 256,
        eval_batch_size: int = 256,
        eval_samples: EvalSamples | None = None,
        predict_file: str | None = None,
    ) -> None:
        super().__init__()
        self.train_source = train or ProblemSource()
        self.eval_sources = dict(eval_sets or {})
        self.prompt_style = prompt_style
        self.instruction = instruction
        self.prompts_per_rollout = prompts_per_rollout
        self.auto_max_completions = auto_max_completions
        self.auto_throughput: dict = {}  # prompts -> ThroughputPoint, when prompts_per_rollout is auto
        self.group_size = group_size
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.filter_threshold = filter_threshold
        self.dynamic_sampling_calls = dynamic_sampling_calls
        self.prompt_skipping = prompt_skipping
        self.rollout_mode = rollout_mode
        self.truncated = truncated
        self.overlong_buffer_tokens = overlong_buffer_tokens
        self.sampling = sampling or SamplingConfig(temperature=1.0, max_new_tokens=128)
        self.max_prompt_tokens = max_prompt_tokens
        self.engine_config = engine or EngineConfig()
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_batch_size = eval_batch_size
        self.eval_samples = eval_samples
        self.predict_file = predict_file
        self._check_knobs()
        self._save_knobs_as_hparams()
        self.engine: Engine | None = None
        self.buffer: RolloutBuffer | None = None
        self.train_problems: list[Problem] = []
        self.evaluators: dict[str, Evaluator] = {}
        self.stream: PromptStream | None = None
        self.skipped_long_prompts = 0
        self.consumed_batches = 0  # prompt batches training steps have taken: the resumable position
        self.refill_stream: PromptStream | None = None
        self.refill_prompts_consumed = 0  # dynamic sampling's own stream position (prompts), resumable too
        # prompt skipping: every rank holds the world's outcomes (gathered each step), so rank 0's state,
        # the one Lightning checkpoints, resumes every rank
        self.skip_history = SkipHistory(prompt_skipping) if prompt_skipping is not None else None

    # ---- set-up -------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        console.quiet()  # library use (a plain Trainer) gets the CLI's console too
        policy = self._policy()
        if self.engine is None and policy is not None:  # before any model or data is loaded
            self.check_model_context(policy.model_name, policy.model_cache)
        if stage == "fit" and policy is not None:
            policy.apply_rollout_budget()  # a budget conflict fails here, before the engine starts
            if self.prompt_skipping is not None and policy.skipping_problems():
                raise ConfigError("data.prompt_skipping: " + "; ".join(policy.skipping_problems()))
        if stage == "predict":
            self._predict_problems()  # a missing or malformed prompt file fails before the engine starts
        if stage == "fit" and not self.train_problems:
            self.train_problems = self.train_source.load()
        if not self.evaluators:
            for name, source in self.eval_sources.items():
                self.evaluators[name] = Evaluator(
                    name,
                    source.load(),
                    self.prompt_style,
                    self.eval_max_new_tokens,
                    batch_size=self.eval_batch_size,
                    instruction=self.instruction,
                    last_number_fallback=policy.answer_fallback if policy is not None else False,
                    samples=self.eval_samples,
                )
        if self.engine is None:
            self.engine = self._start_engine()
        if stage == "fit":
            self.train_problems = self._drop_long_prompts(self.train_problems)
            if self.prompts_per_rollout == "auto":
                self.prompts_per_rollout = self._calibrate_prompts_per_rollout()
            self.buffer = RolloutBuffer(
                engine=self.engine,
                sampling=self.sampling,
                group_size=self.group_size,
                micro_batch_size=self.micro_batch_size,
                max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
                filter_threshold=self.filter_threshold,
                rollout_mode=self.rollout_mode,
                scale_rewards=policy.scale_rewards if policy is not None else True,
                pad_token_id=self.engine.tokenizer.pad_token_id or 0,
                slices=policy.rollout_slices if policy is not None else 1,
                train_dropped=policy.trains_dropped_rows if policy is not None else False,
                shared_prefix=policy.shared_prefix if policy is not None else False,
                dynamic_sampling_calls=self.dynamic_sampling_calls,
                truncated=self.truncated,
                overlong_buffer_tokens=self.overlong_buffer_tokens,
            )

    def _calibrate_prompts_per_rollout(self) -> int:
        from lightning.pytorch.utilities import rank_zero_info

        from lit_dash.data import calibration

        min_prompts = -(-self.micro_batch_size // self.group_size)  # a rollout fills >= one micro-batch
        counts = calibration.candidate_prompt_counts(self.group_size, self.auto_max_completions, min_prompts)
        sample = self.train_problems[: max(counts)]
        prompts = format_prompts(sample, self.engine.tokenizer, self.prompt_style, self.instruction)
        self.auto_throughput = calibration.measure(
            self.engine, prompts, self.group_size, counts, self.sampling
        )
        chosen = calibration.pick_prompt_count(self.auto_throughput)
        if self.trainer is not None:  # every rank samples rollouts of the size rank 0 measured
            chosen = int(self.trainer.strategy.broadcast(chosen, src=0))
        rank_zero_info(calibration.format_points(self.auto_throughput, chosen, self.group_size))
        return chosen

    def _policy(self) -> RolloutPolicy | None:
        """The Trainer's module as :class:`lit_dash.contract.RolloutPolicy`, or None for another module
        (which gets the defaults, and cannot start the engine)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return module if isinstance(module, RolloutPolicy) else None

    def _start_engine(self) -> Engine:
        policy = self._policy()
        if policy is None:
            raise RuntimeError("RolloutDataModule needs a lit_dash module (DashModule) in the same Trainer")
        seed = self._run_seed()
        cfg = self.engine_config
        max_len = cfg.max_model_len or self._sequence_tokens()
        kwargs = {"dtype": cfg.dtype}
        if cfg.kind == "vllm":
            kwargs.update(
                kv_cache_gib=cfg.kv_cache_gib,
                memory_fraction=cfg.memory_fraction,
                max_model_len=max_len,
                tensor_parallel_size=cfg.tensor_parallel_size,
                prefix_caching=cfg.prefix_caching,
                block_size=cfg.block_size,
            )
        return build_engine(cfg.kind, policy.model_path(), seed=seed + self._rank(), **kwargs)

    def _run_seed(self) -> int:
        """The module's seed, else seed_everything's: one seed drives prompt order and engine sampling."""
        policy = self._policy()
        seed = policy.seed if policy is not None else None
        return int(seed) if seed is not None else torch.initial_seed() % (2**31)

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _drop_long_prompts(self, problems: list[Problem]) -> list[Problem]:
        prompts = format_prompts(problems, self.engine.tokenizer, self.prompt_style, self.instruction)
        kept = [
            p
            for p, text in zip(problems, prompts, strict=True)
            if len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            <= self.max_prompt_tokens
        ]
        self.skipped_long_prompts = len(problems) - len(kept)
        if self.skipped_long_prompts:
            import warnings

            warnings.warn(
                f"skipped {self.skipped_long_prompts} of {len(problems)} training prompts longer than "
                f"max_prompt_tokens={self.max_prompt_tokens}",
                stacklevel=2,
            )
        if not kept:
            raise DataError(
                f"every training prompt is longer than max_prompt_tokens={self.max_prompt_tokens}"
            )
        return kept

    # ---- data ---------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        shard = self.train_problems[self._rank() :: world]  # each rank samples its own share of prompts
        self.stream = PromptStream(
            shard, self.prompts_per_rollout, self._run_seed(), start_batch=self.consumed_batches
        )
        # dynamic sampling draws single prompts from a second stream over the same share, shuffled with
        # another seed, so the main stream's batches (and their resume) are the same with or without it
        self.refill_stream = PromptStream(shard, 1, self._run_seed() + _REFILL_SEED_OFFSET)
        return DataLoader(self.stream, batch_size=None, collate_fn=_problems_collate, num_workers=0)

    def val_dataloader(self) -> list[DataLoader]:
        if not self.evaluators:
            fitting = self.trainer is not None and self.trainer.state.fn == "fit"
            if fitting:  # no held-out sets: fit skips validation instead of failing its sanity check
                return []
            raise DataError("validation needs at least one entry in data.eval_sets")
        return [self._eval_dataloader(name, ev.problems) for name, ev in self.evaluators.items()]

    def _eval_dataloader(self, name: str, problems: list[Problem]) -> DataLoader:
        """One eval set's loader. Under DDP each rank gets its share of the problems without the padding
        with duplicates of Lightning's default DistributedSampler (``lit_dash.evaluation.shard``'s layout);
        the module gathers the shares and logs the whole set once."""
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = None
        if world > 1:
            if len(problems) < world:
                raise DataError(
                    f"eval set {name!r} has {len(problems)} problems, fewer than the {world} ranks: every "
                    "rank needs one; add problems or validate on fewer devices"
                )
            sampler = UnrepeatedDistributedSampler(
                problems, num_replicas=world, rank=self._rank(), shuffle=False
            )
        return DataLoader(
            problems,
            batch_size=self.eval_batch_size,
            collate_fn=_problems_collate,
            shuffle=False,
            sampler=sampler,
        )

    def test_dataloader(self) -> list[DataLoader]:
        """``lit-dash test``: the eval sets through Lightning's test loop (the validation path)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """``lit-dash predict``: the prompts of ``predict_file``, ``eval_batch_size`` per engine call."""
        return DataLoader(
            self._predict_problems(), batch_size=self.eval_batch_size, collate_fn=_problems_collate
        )

    def _predict_problems(self) -> list[Problem]:
        if not self.predict_file:
            raise DataError("predict needs data.predict_file: a JSONL file with a question per line")
        problems = []
        for i, row in enumerate(read_jsonl(self.predict_file)):
            if not isinstance(row.get("question"), str):
                raise DataError(f'{self.predict_file}: line {i + 1} has no "question" string')
            problems.append(
                Problem(
                    row["question"], str(row.get("answer", "")), f"{self.predict_file}:{i + 1}", extra=row
                )
            )
        return problems

    def rollout(self, problems: list[Problem], reward_fn: RewardFn) -> Rollout:
        """Sample, score, normalise and filter one optimizer step's data (called by the training step)."""
        prompts = format_prompts(problems, self.engine.tokenizer, self.prompt_style, self.instruction)
        refill = self._refill if self.dynamic_sampling_calls else None
        if self.skip_history is None:
            return self.buffer.collect(problems, prompts, reward_fn, refill=refill)
        # decided now, not in the stream: the DataLoader fetched this batch before the last step's outcomes
        skip = self.skip_history.choose(
            [p.source_id for p in problems], self._run_seed(), self.consumed_batches
        )
        rollout = self.buffer.collect(problems, prompts, reward_fn, skip=skip)
        self._record_outcomes(rollout)
        return rollout

    def _record_outcomes(self, rollout: Rollout) -> None:
        """Each sampled group's outcome (uniform or not) and the skipped count, every rank's, into the
        history every rank holds."""
        uniform = zero_variance_groups(rollout.rewards, rollout.group_size).tolist()
        mine = (
            [(p.source_id, u) for p, u in zip(rollout.problems, uniform, strict=True)],
            rollout.skipped_prompts,
        )
        world = self.trainer.world_size if self.trainer is not None else 1
        shares = [mine]
        if world > 1:
            shares = [None] * world
            torch.distributed.all_gather_object(shares, mine)  # problem ids: an object gather
        for outcomes, skipped in shares:  # rank order: every rank records the same sequence
            self.skip_history.record(outcomes)
            self.skip_history.skipped_prompts_total += skipped

    def _refill(self, num_prompts: int) -> tuple[list[Problem], list[str]]:
        """The next ``num_prompts`` problems of the refill stream, and their prompts."""
        start = self.refill_prompts_consumed
        problems = [self.refill_stream.batch(k)[0] for k in range(start, start + num_prompts)]
        self.refill_prompts_consumed += num_prompts
        return problems, format_prompts(problems, self.engine.tokenizer, self.prompt_style, self.instruction)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # a batch is a list of (frozen) Problems, text that Lightning's default cannot copy; rollouts move
        # their tensors themselves. Here rather than on the module: the datamodule makes these batches
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Lightning calls this for the batch a training step is about to take, after its one-batch
        # prefetch: so this counts batches consumed, for RL and SFT modules alike
        if self.trainer is not None and self.trainer.training:
            self.consumed_batches += 1
        return batch

    def state_dict(self) -> dict:
        # consumed, not the stream's read position: the DataLoader has already fetched the next batch
        state = {
            "consumed_batches": self.consumed_batches,
            "prompts_per_rollout": self.prompts_per_rollout,
            "refill_prompts_consumed": self.refill_prompts_consumed,
        }
        if self.skip_history is not None:
            state["skip_history"] = self.skip_history.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "consumed_batches" not in state:
            raise ValueError(
                "this checkpoint's data state has no consumed_batches (written by an older lit_dash): "
                "the prompt order cannot be resumed from it"
            )
        self.consumed_batches = int(state["consumed_batches"])
        self.refill_prompts_consumed = int(state.get("refill_prompts_consumed", 0))
        if self.skip_history is not None:
            if "skip_history" in state:
                self.skip_history.load_state_dict(state["skip_history"])
            else:
                import warnings

                warnings.warn(
                    "data.prompt_skipping is on but the checkpoint's run did not skip prompts: the skip "
                    "history starts empty",
                    stacklevel=2,
                )
        saved = state.get("prompts_per_rollout")
        if saved is not None and saved != self.prompts_per_rollout:
            if self.auto_throughput:  # auto measured again and chose differently: keep the run's size
                self.prompts_per_rollout = int(saved)
            else:
                import warnings

                warnings.warn(
                    f"prompts_per_rollout is {self.prompts_per_rollout}, the checkpoint's run used {saved}: "
                    "the resumed prompt order does not continue the interrupted run's",
                    stacklevel=2,
                )
