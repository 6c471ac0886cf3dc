"""Greedy evaluation on held-out problems: accuracy, length, answered fraction, tokens/s, and how many
answers are unevaluated expressions that equal the reference (``\\boxed{23 + 73}`` for 96).

Accuracy comes from the reward (the module's, strict by default). The ``verdict`` of every record comes
from :func:`lit_dash.rewards.math_verdicts` whatever the reward is, so a lenient or custom reward that pays
unevaluated answers shows up as ``unevaluated`` beside its accuracy instead of hiding inside it.

One :class:`Evaluator` serves both ``lit-dash validate`` (through the module's validation step) and the
evaluation callback during training, so the numbers mean the same thing in both places.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lit_dash import console
from lit_dash.data.formatting import INSTRUCTION, format_prompts
from lit_dash.data.records import Problem
from lit_dash.engines.base import Engine, SamplingConfig
from lit_dash.rewards import extract_answer, math_rewards, math_verdicts
from lit_dash.rewards.math import CORRECT, UNEVALUATED
from lit_dash.rewards.scoring import score_completions

RewardFn = Callable[[list[str], list[Problem]], Sequence[float]]


def default_reward(completions: list[str], problems: list[Problem]) -> list[float]:
    return math_rewards(completions, [p.answer for p in problems])


@dataclass
class EvalResult:
    """Summary of one evaluation set. ``mean_completion_tokens`` is in tokens, the rest are fractions of the
    problems; ``unevaluated_fraction`` counts answers equal to the reference only once their arithmetic is
    done (``\\boxed{23 + 73}`` for 96), which the strict reward scores 0 and a lenient one pays;
    ``correct_fraction`` is the strict rule's accuracy (verdict ``correct``) whatever the reward is."""

    name: str
    num_problems: int
    accuracy: float
    mean_completion_tokens: float
    answered_fraction: float
    truncated_fraction: float
    generation_tokens_per_second: float
    unevaluated_fraction: float = 0.0
    correct_fraction: float = 0.0

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        base = f"{prefix}/{self.name}"
        return {
            f"{base}/accuracy": self.accuracy,
            f"{base}/length": self.mean_completion_tokens,
            f"{base}/answered": self.answered_fraction,
            f"{base}/truncated": self.truncated_fraction,
            f"{base}/tokens_per_s": self.generation_tokens_per_second,
            f"{base}/unevaluated": self.unevaluated_fraction,
            f"{base}/correct": self.correct_fraction,
        }


class Evaluator:
    """Scores an engine on a fixed list of problems, greedy by default."""

    def __init__(
        self,
        name: str,
        problems: list[Problem],
        prompt_style: str = "chat",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        batch_size: int = 256,
        instruction: str = INSTRUCTION,
        last_number_fallback: bool = False,
    ) -> None:
        self.name = name
        self.problems = problems
        self.prompt_style = prompt_style
        self.sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
        self.batch_size = batch_size
        self.instruction = instruction
        self.last_number_fallback = (
            last_number_fallback  # only for the "extracted" column; scores come from reward_fn
        )

    def score_batch(
        self, engine: Engine, problems: list[Problem], reward_fn: RewardFn = default_reward
    ) -> list[dict]:
        """Generate one completion per problem and return one record per problem (for JSONL)."""
        prompts = format_prompts(
            problems, engine.tokenizer, style=self.prompt_style, instruction=self.instruction
        )
        with console.phase(f"evaluating {self.name}"):  # what the progress bar says the engine is doing
            result = engine.generate(prompts, 1, self.sampling)
        texts = [c.text for c in result.completions]
        rewards = score_completions(reward_fn, texts, problems).tolist()
        verdicts = math_verdicts(
            texts, [p.answer for p in problems], last_number_fallback=self.last_number_fallback
        )
        seconds_each = result.seconds / max(len(problems), 1)
        return [
            {
                "source_id": p.source_id,
                "question": p.question,
                "prompt": prompt,
                "reference": p.answer,
                "completion": c.text,
                "extracted": extract_answer(c.text, self.last_number_fallback),
                "reward": float(r),
                "verdict": v,
                "completion_tokens": len(c.token_ids),
                "truncated": c.truncated,
                "seconds": seconds_each,
            }
            for p, prompt, c, r, v in zip(
                problems, prompts, result.completions, rewards, verdicts, strict=True
            )
        ]

    def records(self, engine: Engine, reward_fn: RewardFn = default_reward) -> list[dict]:
        """Score every problem, ``batch_size`` problems per engine call."""
        records: list[dict] = []
        for start in range(0, len(self.problems), self.batch_size):
            records += self.score_batch(engine, self.problems[start : start + self.batch_size], reward_fn)
        return records

    def run(
        self, engine: Engine, reward_fn: RewardFn = default_reward, output: str | Path | None = None
    ) -> EvalResult:
        records = self.records(engine, reward_fn)
        if output is not None:
            write_jsonl(records, output)
        return summarize(self.name, records)


def summarize(name: str, records: list[dict]) -> EvalResult:
    n = max(len(records), 1)
    tokens = sum(r["completion_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    return EvalResult(
        name=name,
        num_problems=len(records),
        accuracy=sum(r["reward"] >= 1.0 for r in records) / n,
        mean_completion_tokens=tokens / n,
        answered_fraction=sum(r["extracted"] is not None for r in records) / n,
        truncated_fraction=sum(bool(r["truncated"]) for r in records) / n,
        generation_tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        unevaluated_fraction=sum(r.get("verdict") == UNEVALUATED for r in records) / n,
        correct_fraction=sum(r.get("verdict") == CORRECT for r in records) / n,
    )


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def format_results(results: list[EvalResult]) -> str:
    """A small table for the terminal."""
    lines = [
        "| set | problems | accuracy | unevaluated = ref | answered | mean tokens | truncated | gen tok/s |",
        "|---" * 8 + "|",
    ]
    for r in results:
        d = asdict(r)
        lines.append(
            f"| {d['name']} | {d['num_problems']} | {r.accuracy:.1%} | {r.unevaluated_fraction:.1%} | "
            f"{r.answered_fraction:.1%} | "
            f"{r.mean_completion_tokens:.1f} | {r.truncated_fraction:.1%} | {r.generation_tokens_per_second:.0f} |"
        )
    return "\n".join(lines)
