"""The contract between the module and the datamodule, which meet only through the Trainer
(``trainer.datamodule``, ``trainer.lightning_module``) and so show it in no import.

:class:`RolloutPolicy` is what :class:`~lit_dash.data.datamodule.RolloutDataModule` asks of the module
(:class:`~lit_dash.module.DashModule` provides it); :class:`RolloutData` is what the module asks of the
datamodule. Written as protocols, a misspelled attribute fails a type check, not a run; the datamodule
also checks a module against :class:`RolloutPolicy` at run time, so another LightningModule in the same
Trainer gets the defaults (or a clear error when it must start the engine) instead of a reach-back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lit_dash.data.buffer import Rollout
    from lit_dash.data.records import Problem
    from lit_dash.data.skipping import SkipHistory
    from lit_dash.engines.base import Engine
    from lit_dash.evaluation import Evaluator

RewardFn = Callable[[list[str], list["Problem"]], Sequence[float]]


@runtime_checkable
class RolloutPolicy(Protocol):
    """What the datamodule needs from the policy's module, before and while it samples."""

    model_name: str  # checked against the rollout's token budget before anything loads
    seed: int | None  # the engine's and the prompt order's seed (None: seed_everything's)
    scale_rewards: bool  # advantages divided by the group's std, or not

    @property
    def model_cache(self) -> str | None: ...  # where converted models are cached

    @property
    def answer_fallback(self) -> bool: ...  # eval's "extracted" column accepts a last number

    @property
    def rollout_slices(self) -> int: ...  # slices the buffer cuts kept completions into

    @property
    def trains_dropped_rows(self) -> bool: ...  # micro-batch dropped completions too (kl_over: sampled)

    @property
    def shared_prefix(self) -> bool: ...  # micro-batches hold whole groups, packed behind one prompt

    def model_path(self) -> str: ...  # the local folder the engine loads

    def skipping_problems(self) -> list[str]: ...  # the module's knobs that data.prompt_skipping refuses

    def apply_rollout_budget(self) -> None: ...  # model.max_rollouts as trainer.max_steps


class RolloutData(Protocol):
    """What the module needs from the datamodule: a rollout per step, the engine and the eval sets."""

    engine: Engine | None
    evaluators: dict[str, Evaluator]
    prompt_style: str
    instruction: str
    eval_max_new_tokens: int
    # optional: logged each step when present (0 / None otherwise), as a minimal datamodule may lack them
    skipped_long_prompts: int
    skip_history: SkipHistory | None  # data.prompt_skipping's world-wide history

    def rollout(self, problems: list[Problem], reward_fn: RewardFn) -> Rollout: ...
