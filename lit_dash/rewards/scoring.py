"""Call a reward and refuse what training cannot use, naming the reward and the sample.

A reward is user code (``DashModule.reward`` in a subclass, or any ``(completions, problems) -> floats``
callable). When it raises, returns the wrong number of values, or returns something that is not a finite
number, the run stops with a :class:`RewardError` that says which reward, which completion (its index in
the rollout, its problem and the start of its text) and what was wrong: a NaN reward would otherwise turn
every advantage of its group into NaN, and a silently broken reward looks like a model that never learns.

A :class:`~lit_dash.rewards.math.RewardWorkerError` (the math reward's worker processes failed) passes
through unchanged: it is not a property of any completion, so bisecting for one would only start the
failing workers again, and "make it score such completions 0.0" would be the wrong advice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lit_dash.data.records import Problem
from lit_dash.errors import RunStopped
from lit_dash.rewards.math import RewardWorkerError

RewardFn = Callable[[list[str], list[Problem]], Sequence[float]]
_SHOWN_CHARS = 80  # how much of a completion an error message quotes


class RewardError(RunStopped):
    """A reward function raised, or returned something training cannot use."""


def reward_name(reward_fn: Callable) -> str:
    """``package.module.Class.method`` for a bound method, ``package.module.function`` otherwise."""
    owner = getattr(reward_fn, "__self__", None)
    if owner is not None and not isinstance(owner, type):
        cls = type(owner)
        return f"{cls.__module__}.{cls.__qualname__}.{reward_fn.__name__}"
    name = getattr(reward_fn, "__qualname__", None) or type(reward_fn).__qualname__
    module = getattr(reward_fn, "__module__", None) or type(reward_fn).__module__
    return f"{module}.{name}"


def _sample(i: int, texts: list[str], problems: list[Problem]) -> str:
    return f"completion {i} (problem {problems[i].source_id!r}, text starts {texts[i][:_SHOWN_CHARS]!r})"


def _raises(reward_fn: RewardFn, texts: list[str], problems: list[Problem]) -> bool:
    try:
        reward_fn(texts, problems)
    except RewardWorkerError:
        raise
    except Exception:  # noqa: BLE001 - any failure is what is being looked for
        return True
    return False


def _a_failing_completion(reward_fn: RewardFn, texts: list[str], problems: list[Problem]) -> int | None:
    """Bisect a batch the reward raised on down to one completion that makes it raise on its own
    (about 2 log2(n) calls); ``None`` when no half fails alone (the failure needs the whole batch)."""
    lo, hi = 0, len(texts)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _raises(reward_fn, texts[lo:mid], problems[lo:mid]):
            hi = mid
        elif _raises(reward_fn, texts[mid:hi], problems[mid:hi]):
            lo = mid
        else:
            return None
    return lo if hi - lo == 1 else None


def score_completions(reward_fn: RewardFn, texts: list[str], problems: list[Problem]) -> torch.Tensor:
    """``reward_fn(texts, problems)`` as a float32 tensor, one finite reward per completion, or a
    :class:`RewardError` naming the reward and the sample."""
    name = reward_name(reward_fn)
    try:
        values = reward_fn(texts, problems)
    except RewardWorkerError:
        raise
    except Exception as exc:
        what = f"{type(exc).__name__}: {exc}"
        i = _a_failing_completion(reward_fn, texts, problems)
        where = (
            f"on {_sample(i, texts, problems)}"
            if i is not None
            else f"on a batch of {len(texts)} completions (no single completion makes it raise alone)"
        )
        raise RewardError(
            f"reward {name} raised {what} {where}; fix the reward, or make it score such completions 0.0"
        ) from exc
    return check_rewards(values, texts, problems, name)


def check_rewards(
    rewards: Sequence[float], texts: list[str], problems: list[Problem], name: str = "reward"
) -> torch.Tensor:
    """Refuse a wrong count, a value that is not a number, or a non-finite number, naming the sample."""
    try:
        values = list(rewards)
    except TypeError:
        raise RewardError(
            f"reward {name} returned a {type(rewards).__name__}, expected a sequence of {len(texts)} floats "
            "(one per completion)"
        ) from None
    if len(values) != len(texts):
        raise RewardError(
            f"reward {name} returned {len(values)} values for {len(texts)} completions; it must return one "
            "float per completion (completions come prompt-major, group_size per prompt), "
            "not one per prompt"
        )
    floats = []
    for i, value in enumerate(values):
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            floats.append(float(value))
        except (TypeError, ValueError, RuntimeError):
            raise RewardError(
                f"reward {name} returned {value!r} (a {type(value).__name__}, not a number) for "
                f"{_sample(i, texts, problems)}"
            ) from None
    out = torch.tensor(floats, dtype=torch.float32)
    bad = (~torch.isfinite(out)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(
            f"reward {name} returned {floats[bad[0]]} for {_sample(bad[0], texts, problems)}; "
            f"rewards must be finite numbers ({len(bad)} of {len(floats)} were not)"
        )
    return out
