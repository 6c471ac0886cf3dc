"""Greedy evaluation on held-out problems: accuracy, length, answered fraction, tokens/s, how many answers
are boxed (and right), and how many are unevaluated expressions that equal the reference
(``\\boxed{23 + 73}`` for 96).

Accuracy comes from the reward (the module's, strict by default). The ``verdict`` of every record comes
from :func:`lit_dash.rewards.math_verdicts` whatever the reward is, so a lenient or custom reward that pays
unevaluated answers shows up as ``unevaluated`` beside its accuracy instead of hiding inside it.

With ``samples`` (:class:`EvalSamples`) each problem also gets ``n`` sampled completions at a temperature,
and the set reports pass@k (the unbiased estimator, :func:`pass_at_k`) and maj@k (majority vote over the
extracted answers of k samples, :func:`majority_vote`) beside greedy accuracy.

One :class:`Evaluator` serves both ``lit-dash validate`` (through the module's validation step) and the
evaluation callback during training, so the numbers mean the same thing in both places.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lit_dash import console
from lit_dash.data.formatting import INSTRUCTION, format_prompts
from lit_dash.data.records import Problem
from lit_dash.engines.base import Engine, GenerationResult, SamplingConfig
from lit_dash.rewards import extract_answer, has_answer, math_rewards, math_verdicts
from lit_dash.rewards.math import CORRECT, UNEVALUATED
from lit_dash.rewards.scoring import score_completions

RewardFn = Callable[[list[str], list[Problem]], Sequence[float]]


def default_reward(completions: list[str], problems: list[Problem]) -> list[float]:
    return math_rewards(completions, [p.answer for p in problems])


@dataclass(frozen=True)
class EvalSamples:
    """Sampled completions per problem at evaluation, for pass@k and maj@k.

    Args:
        k: completions pass@k and maj@k are about.
        n: completions sampled per problem (>= k; default k). pass@k is estimated from all n (more is a
            lower-variance estimate of the same number); maj@k votes over the first k.
        temperature: sampling temperature (> 0).
        top_p: nucleus sampling.
    """

    k: int = 8
    n: int | None = None
    temperature: float = 0.7
    top_p: float = 1.0

    def __post_init__(self) -> None:
        from lit_dash.errors import ConfigError

        if self.k < 1:
            raise ConfigError(f"eval_samples.k must be >= 1 (completions), got {self.k}")
        if self.n is not None and self.n < self.k:
            raise ConfigError(f"eval_samples.n ({self.n}) must be >= eval_samples.k ({self.k}) or null")
        if not self.temperature > 0:
            raise ConfigError(
                f"eval_samples.temperature must be > 0 (greedy accuracy is reported anyway), got {self.temperature}"
            )

    @property
    def num_samples(self) -> int:
        return self.n if self.n is not None else self.k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021),
    as the product 1 - prod_{i<k} (n-c-i)/(n-i), which never forms the large binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def answer_key(answer: str | None) -> str | None:
    """What majority vote compares: the extracted answer with all whitespace removed (so ``1 / 2`` and
    ``1/2`` vote together; ``0.5`` and ``1/2`` do not)."""
    return None if answer is None else "".join(answer.split()) or None


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    Unanswered samples (None) do not vote. A tie goes to the answer that appears first in sample order
    (samples are in the engine's order, fixed by its seed), and the index returned is that answer's first
    sample."""
    keys = [answer_key(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, key in enumerate(keys) if key is not None and counts[key] == best)


@dataclass
class EvalResult:
    """Summary of one evaluation set. ``mean_completion_tokens`` is in tokens, the rest are fractions of the
    problems; ``unevaluated_fraction`` counts answers equal to the reference only once their arithmetic is
    done (``\\boxed{23 + 73}`` for 96), which the strict reward scores 0 and a lenient one pays;
    ``correct_fraction`` is the strict rule's accuracy (verdict ``correct``) whatever the reward is;
    ``boxed_fraction`` counts answers inside a non-empty ``\\boxed{}`` (the format the prompt asks for) and
    ``boxed_correct_fraction`` those that are also correct: the accuracy without the last-number fallback."""

    name: str
    num_problems: int
    accuracy: float
    mean_completion_tokens: float
    answered_fraction: float
    truncated_fraction: float
    generation_tokens_per_second: float
    unevaluated_fraction: float = 0.0
    correct_fraction: float = 0.0
    boxed_fraction: float = 0.0
    boxed_correct_fraction: float = 0.0
    k: int | None = None  # with eval_samples: pass@k and maj@k (fractions of the problems)
    pass_at_k: float | None = None
    maj_at_k: float | None = None

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        base = f"{prefix}/{self.name}"
        sampled = {}
        if self.k is not None:
            sampled = {f"{base}/pass@{self.k}": self.pass_at_k, f"{base}/maj@{self.k}": self.maj_at_k}
        return sampled | {
            f"{base}/accuracy": self.accuracy,
            f"{base}/length": self.mean_completion_tokens,
            f"{base}/answered": self.answered_fraction,
            f"{base}/truncated": self.truncated_fraction,
            f"{base}/tokens_per_s": self.generation_tokens_per_second,
            f"{base}/unevaluated": self.unevaluated_fraction,
            f"{base}/correct": self.correct_fraction,
            f"{base}/boxed": self.boxed_fraction,
            f"{base}/boxed_correct": self.boxed_correct_fraction,
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
        samples: EvalSamples | None = None,
    ) -> None:
        self.name = name
        self.samples = samples
        self.problems = problems
        self.prompt_style = prompt_style
        self.sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
        self.batch_size = batch_size
        self.instruction = instruction
        self.last_number_fallback = (
            last_number_fallback  # only for the "extracted" column; scores come from reward_fn
        )

    def _generate(self, engine: Engine, problems: list[Problem]) -> tuple[list[str], GenerationResult]:
        """The problems' prompts and one completion each, at this evaluator's sampling."""
        prompts = format_prompts(
            problems, engine.tokenizer, style=self.prompt_style, instruction=self.instruction
        )
        return prompts, engine.generate(prompts, 1, self.sampling)

    def predict_batch(self, engine: Engine, problems: list[Problem], reward_fn: RewardFn) -> list[dict]:
        """``lit-dash predict``'s records: one completion per problem, generated as for evaluation;
        problems with an ``answer`` are scored by ``reward_fn`` too (``reference`` and ``reward``)."""
        prompts, result = self._generate(engine, problems)
        records = [
            {
                "source_id": p.source_id,
                "question": p.question,
                "prompt": prompt,
                "completion": c.text,
                "extracted": extract_answer(c.text, self.last_number_fallback),
                "boxed": has_answer(c.text),
                "completion_tokens": len(c.token_ids),
                "truncated": c.truncated,
            }
            for p, prompt, c in zip(problems, prompts, result.completions, strict=True)
        ]
        scored = [i for i, p in enumerate(problems) if p.answer]
        if scored:
            rewards = reward_fn([records[i]["completion"] for i in scored], [problems[i] for i in scored])
            for i, reward in zip(scored, rewards, strict=True):
                records[i].update(reference=problems[i].answer, reward=float(reward))
        return records

    def score_batch(
        self, engine: Engine, problems: list[Problem], reward_fn: RewardFn = default_reward
    ) -> list[dict]:
        """Generate one completion per problem and return one record per problem (for JSONL)."""
        with console.phase(f"evaluating {self.name}"):  # what the progress bar says the engine is doing
            prompts, result = self._generate(engine, problems)
        texts = [c.text for c in result.completions]
        rewards = score_completions(reward_fn, texts, problems).tolist()
        verdicts = math_verdicts(
            texts, [p.answer for p in problems], last_number_fallback=self.last_number_fallback
        )
        seconds_each = result.seconds / max(len(problems), 1)
        records = [
            {
                "source_id": p.source_id,
                "question": p.question,
                "prompt": prompt,
                "reference": p.answer,
                "completion": c.text,
                "extracted": extract_answer(c.text, self.last_number_fallback),
                "boxed": has_answer(c.text),
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
        if self.samples is not None:
            for record, sampled in zip(
                records, self.sample(engine, problems, prompts, reward_fn), strict=True
            ):
                record.update(sampled)
        return records

    def sample(
        self, engine: Engine, problems: list[Problem], prompts: list[str], reward_fn: RewardFn
    ) -> list[dict]:
        """n sampled completions per problem; per problem: its pass@k, maj@k and the samples."""
        cfg = self.samples
        n = cfg.num_samples
        sampling = SamplingConfig(
            temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=self.sampling.max_new_tokens
        )
        result = engine.generate(prompts, n, sampling)  # prompt-major: problem i's n samples are together
        texts = [c.text for c in result.completions]
        repeated = [p for p in problems for _ in range(n)]
        rewards = score_completions(reward_fn, texts, repeated).tolist()
        out = []
        for i in range(len(problems)):
            texts_i, rewards_i = texts[i * n : (i + 1) * n], rewards[i * n : (i + 1) * n]
            answers = [extract_answer(t, self.last_number_fallback) for t in texts_i]
            winner = majority_vote(answers[: cfg.k])
            out.append(
                {
                    "k": cfg.k,
                    "pass_at_k": pass_at_k(n, sum(r >= 1.0 for r in rewards_i), cfg.k),
                    "maj_at_k": float(winner is not None and rewards_i[winner] >= 1.0),
                    "maj_answer": answers[winner] if winner is not None else None,
                    "sample_temperature": cfg.temperature,
                    "sample_completions": texts_i,
                    "sample_answers": answers,
                    "sample_rewards": [float(r) for r in rewards_i],
                }
            )
        return out

    def records(
        self, engine: Engine, reward_fn: RewardFn = default_reward, problems: list[Problem] | None = None
    ) -> list[dict]:
        """Score every problem (or only ``problems``, e.g. this rank's :func:`shard`), ``batch_size``
        problems per engine call."""
        problems = self.problems if problems is None else problems
        records: list[dict] = []
        for start in range(0, len(problems), self.batch_size):
            records += self.score_batch(engine, problems[start : start + self.batch_size], reward_fn)
        return records

    def run(
        self, engine: Engine, reward_fn: RewardFn = default_reward, output: str | Path | None = None
    ) -> EvalResult:
        records = self.records(engine, reward_fn)
        if output is not None:
            write_jsonl(records, output)
        return summarize(self.name, records)


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank ``rank``'s share of ``items`` out of ``world`` ranks: every ``world``-th item from ``rank`` on.
    The shares cover ``items`` once each, no padding, no duplicates (sizes differ by at most one); the
    layout of Lightning's ``UnrepeatedDistributedSampler`` (shuffle off), which ``lit-dash validate`` uses."""
    return list(items[rank::world])


def unshard(shares: Sequence[Sequence]) -> list:
    """Undo :func:`shard`: the ranks' shares (in rank order) back into the original order."""
    merged = []
    for i in range(max((len(s) for s in shares), default=0)):
        merged += [s[i] for s in shares if i < len(s)]
    return merged


def summarize(name: str, records: list[dict]) -> EvalResult:
    n = max(len(records), 1)
    tokens = sum(r["completion_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    sampled = {}
    if records and "pass_at_k" in records[0]:
        sampled = {
            "k": records[0]["k"],
            "pass_at_k": sum(r["pass_at_k"] for r in records) / n,
            "maj_at_k": sum(r["maj_at_k"] for r in records) / n,
        }
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
        boxed_fraction=sum(r["boxed"] for r in records) / n,
        boxed_correct_fraction=sum(r["boxed"] and r.get("verdict") == CORRECT for r in records) / n,
        **sampled,
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
        "| set | problems | accuracy | boxed | boxed & right | unevaluated = ref | answered | mean tokens "
        "| truncated | gen tok/s |",
        "|---" * 10 + "|",
    ]
    for r in results:
        d = asdict(r)
        lines.append(
            f"| {d['name']} | {d['num_problems']} | {r.accuracy:.1%} | {r.boxed_fraction:.1%} | "
            f"{r.boxed_correct_fraction:.1%} | {r.unevaluated_fraction:.1%} | "
            f"{r.answered_fraction:.1%} | "
            f"{r.mean_completion_tokens:.1f} | {r.truncated_fraction:.1%} | {r.generation_tokens_per_second:.0f} |"
        )
    sampled = [
        f"{r.name}: pass@{r.k} {r.pass_at_k:.1%}, maj@{r.k} {r.maj_at_k:.1%} (sampled; greedy {r.accuracy:.1%})"
        for r in results
        if r.k is not None
    ]
    return "\n".join(lines + sampled)
