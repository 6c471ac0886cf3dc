"""The small interface every rollout engine implements.

Training only needs two things from an inference engine: sample completions for a batch of prompts
(with the per-token log-probs of what it sampled) and take new policy weights. Keeping the interface
this small is what lets a vLLM server, a tensor-parallel engine or the transformers fallback slot in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lit_dash.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled. ``temperature == 0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled completion of one prompt.

    ``token_ids`` are the completion tokens only (prompt excluded); ``logprobs[i]`` is the engine's
    log-probability of ``token_ids[i]`` under the distribution it was sampled from: after temperature and
    top-k / top-p, renormalised over the kept tokens (empty when the engine was not asked for them);
    ``truncated`` is True when generation stopped at ``max_new_tokens`` rather than at an end-of-sequence
    token.
    """

    prompt_index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    truncated: bool


@dataclass
class GenerationResult:
    """All completions of one engine call, laid out prompt-major: prompt 0's n completions first."""

    prompt_token_ids: list[list[int]]
    completions: list[Completion]
    seconds: float

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class Engine(ABC):
    """A rollout engine: ``generate`` and ``load_weights``.

    ``dtype`` is the dtype the engine's model computes in (None when unknown); the trainer's parity
    check picks its default threshold by it.
    """

    dtype: torch.dtype | None = None

    @abstractmethod
    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, want_logprobs: bool = False
    ) -> GenerationResult:
        """Sample ``n`` completions for each prompt in one call; completions come prompt-major. With
        ``want_logprobs`` each completion carries the sampler's log-probs of its tokens (see Completion)."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights (transformers checkpoint names and layout; any float dtype, the
        engine casts them to its own)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's resources."""
