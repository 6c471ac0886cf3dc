"""What the reward actually paid for: a per-step audit of the rewarded completions of each rollout.

A reward can be gamed. The demo's first headline (13% -> 100% held-out on two-digit addition) was a hack:
the policy boxed the question (``\\boxed{23 + 73}``) and math_verify evaluated it to the reference. The
training reward and the lenient held-out accuracy both rose; only reading the completions showed it. This
callback reads them every step, for the completions the reward paid (reward > 0), and logs:

* ``audit/unevaluated_fraction``: the share whose answer equals the reference only once its arithmetic is
  done (verdict ``unevaluated`` of :func:`lit_dash.rewards.math_verdicts`, with the module's
  ``answer_fallback``), e.g. ``\\boxed{23 + 73}`` for 96;
* ``audit/restated_fraction``: the share whose answer restates numbers copied from the question
  (:func:`restates_question`), e.g. ``\\boxed{23 + 73}``, or ``\\boxed{73}`` paid for 23 + 73;
* ``audit/rewarded_fraction``: the share of all completions the reward paid;
* every ``text_every_n_steps`` steps, a few rewarded completions as TensorBoard text (``audit/rewarded``),
  the suspicious ones first, with the question, reference, extracted answer and verdict.

It warns once (each) when

* the hack fractions are high: ``unevaluated`` or ``restated`` above ``max_hack_fraction`` (0.2) of the
  rewarded completions of a step that rewarded at least ``min_rewarded`` (4) completions;
* the reward rises while the strict held-out accuracy does not: the mean training reward of the last
  ``reward_window`` (3) steps is at least ``reward_rise`` (0.2, absolute) above that of the first
  ``reward_window`` steps, while, after at least two evaluations by :class:`MathEvaluation` at different
  steps, no eval set's strict accuracy (``EvalResult.correct_fraction``: verdict ``correct``, whatever the
  reward is) rose by ``eval_rise`` (0.05) from its first evaluation to its latest. The training prompts
  are not the held-out ones, so this is a heuristic: learning that does not transfer trips it too, which
  is worth a look as well.

Measured on ``configs/demo.yaml`` with the lenient reward (``--model.init_args.require_final_form false``,
12 steps): audit/unevaluated_fraction 0.08 at step 0, 0.36 at step 6, 0.98 at step 11; the hack warning
fired at step 7 and the divergence warning at step 8 (reward 0.24 -> 0.52, strict held-out 13% -> 12%),
while the lenient held-out accuracy printed 13% -> 100%.

Cheap: one :func:`math_verdicts` call on the rewarded completions of the step (each distinct answer is
verified once, a few ms each) and a regex per completion. Under DDP each rank audits its own rollout and
rank 0's numbers are logged.
"""

from __future__ import annotations

import re
from fractions import Fraction

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_dash.callbacks.cadence import Cadence, steps_per_rollout
from lit_dash.callbacks.evaluation import MathEvaluation
from lit_dash.rewards import extract_answer, math_verdicts
from lit_dash.rewards.math import UNEVALUATED

__all__ = ["RewardAudit", "audit_rollout", "format_rows", "numbers_in", "pick_samples", "restates_question"]

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")  # 1,000 -> 1000
# arithmetic between numbers: + - * / ^, the unicode signs, and LaTeX's operators
_OPERATOR = re.compile(r"[+\-*/^×÷·−]|\\(?:times|cdot|div|frac|dfrac|tfrac|sqrt)(?![a-zA-Z])")
# what a purely arithmetic answer may hold besides numbers and operators (no variables, no words)
_ARITHMETIC_ONLY = re.compile(r"^(?:\d|\.|\s|[(){}\[\]]|\\left|\\right|" + _OPERATOR.pattern + r")*$")
# one integer fraction and nothing else: never a restatement (in lowest terms it is a final form; one that
# is not, \frac{144}{2}, is an `unevaluated` verdict instead: see rewards/final_form.py)
_FRACTION = re.compile(r"^-?\s*(?:\\[dt]?frac\s*\{\s*\d+\s*\}\s*\{\s*\d+\s*\}|\d+\s*/\s*\d+)$")
_SINGLE_NUMBER = re.compile(r"^[-−]?\s*\d+(?:\.\d+)?$")


def numbers_in(text: str) -> list[Fraction]:
    """The unsigned numbers written in ``text`` (integers and decimals; ``1,000`` is one thousand)."""
    return [Fraction(m) for m in _NUMBER.findall(_DIGIT_COMMA.sub("", text))]


def _clean(answer: str) -> str:
    a = answer.strip().strip("$").strip()
    a = re.sub(r"\\[,;!: ]", "", a)  # LaTeX spacing
    return a.rstrip(".").strip()


def _as_number(text: str) -> Fraction | None:
    t = _DIGIT_COMMA.sub("", _clean(text)).replace("−", "-").replace(" ", "")
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def restates_question(answer: str | None, question: str, reference: str) -> bool:
    """Whether ``answer`` just restates numbers copied from ``question`` instead of answering it.

    True in two cases, on the extracted answer (e.g. the last ``\\boxed{}`` content):

    1. *an expression of the question's numbers*: the answer is pure arithmetic (numbers, brackets and
       operators: ``+ - * / ^``, ``\\times``, ``\\cdot``, ``\\div``, ``\\frac``, ``\\sqrt``; no variable,
       constant, word or ``=``), holds at least two numbers and an operator, and every number in it
       appears in the question (``23 + 73`` or ``73 + 23`` for "What is 23 + 73?"). A lone integer
       fraction (``\\frac{3}{4}``, ``3/4``) is a final answer, not a restatement, and so is an equation
       (``23 + 73 = 96`` commits to 96). On MATH-like answers this can still flag a final form built
       from the question's numbers (``\\frac{\\sqrt{3}}{2}``); it is a signal to read, not a reward;
    2. *a copied number that is not the answer*: the answer is a single number, it appears in the
       question, and it differs from the reference (``73`` for "What is 23 + 73?"; ``96`` would not count,
       nor ``5`` for "What is 0 + 5?").

    Numbers are compared by value, unsigned (``-23`` restates 23, ``23.0`` is 23). ``None`` (no answer) is
    never a restatement.
    """
    if not answer:
        return False
    asked = set(numbers_in(question))
    cleaned = _DIGIT_COMMA.sub("", _clean(answer))
    if _SINGLE_NUMBER.match(cleaned):
        value = _as_number(cleaned)
        ref = _as_number(reference)
        copied = value is not None and abs(value) in asked
        not_the_answer = (value != ref) if ref is not None else (cleaned != reference.strip())
        return copied and not_the_answer
    found = numbers_in(cleaned)
    if len(found) < 2 or not _OPERATOR.search(cleaned) or _FRACTION.match(cleaned):
        return False
    if not _ARITHMETIC_ONLY.match(cleaned):
        return False  # a variable, a constant, a word or an "=" in it: not a restated sum
    return all(n in asked for n in found)


def audit_rollout(rollout, answer_fallback: bool = False) -> dict:
    """The audit of one rollout: for its rewarded completions (reward > 0), the verdict, whether the answer
    restates the question, and the fractions. Returns a dict with ``rewarded`` (row dicts),
    ``num_completions``, ``num_rewarded`` and ``metrics`` (``audit/...`` floats; the two hack fractions
    only when something was rewarded)."""
    rewards = torch.as_tensor(rollout.rewards, dtype=torch.float32).flatten()
    rows = []
    for i, completion in enumerate(rollout.completions):
        if float(rewards[i]) <= 0:
            continue
        problem = rollout.problems[completion.prompt_index]
        answer = extract_answer(completion.text, answer_fallback)
        rows.append(
            {
                "index": i,
                "question": problem.question,
                "reference": problem.answer,
                "completion": completion.text,
                "reward": float(rewards[i]),
                "extracted": answer,
                "restated": restates_question(answer, problem.question, problem.answer),
            }
        )
    if rows:
        verdicts = math_verdicts(
            [r["completion"] for r in rows],
            [r["reference"] for r in rows],
            last_number_fallback=answer_fallback,
        )
        for row, verdict in zip(rows, verdicts, strict=True):
            row["verdict"] = verdict
    n = len(rollout.completions)
    metrics = {"audit/rewarded_fraction": len(rows) / n if n else 0.0}
    if rows:
        metrics["audit/unevaluated_fraction"] = sum(r["verdict"] == UNEVALUATED for r in rows) / len(rows)
        metrics["audit/restated_fraction"] = sum(r["restated"] for r in rows) / len(rows)
    return {"rewarded": rows, "num_completions": n, "num_rewarded": len(rows), "metrics": metrics}


def _suspicious(row: dict) -> bool:
    return row["verdict"] == UNEVALUATED or row["restated"]


def pick_samples(rows: list[dict], k: int) -> list[dict]:
    """Up to ``k`` rows to show: the suspicious ones first, one per question before any repeat."""
    ranked = sorted(rows, key=lambda r: not _suspicious(r))
    picked, seen = [], set()
    for repeat in (False, True):
        for r in ranked:
            if len(picked) == k:
                return picked
            if r not in picked and (repeat or r["question"] not in seen):
                picked.append(r)
                seen.add(r["question"])
    return picked


def format_rows(rows: list[dict], max_chars: int = 600) -> str:
    """Markdown for TensorBoard's text tab, one block per rewarded completion."""
    blocks = []
    for r in rows:
        text = (
            r["completion"] if len(r["completion"]) <= max_chars else r["completion"][:max_chars] + " [...]"
        )
        blocks.append(
            f"**question** {r['question']}  \n**reference** {r['reference']}  \n"
            f"**extracted** {r['extracted']!s}  \n**verdict** {r['verdict']}"
            f"{' | **restates the question**' if r['restated'] else ''} | **reward** {r['reward']:g}"
            f"  \n```\n{text}\n```"
        )
    return "\n\n---\n\n".join(blocks)


class RewardAudit(L.Callback):
    """Logs, each training step, what the reward paid for (see the module docstring), and warns once when
    the reward looks gamed.

    Args:
        num_samples: rewarded completions shown as TensorBoard text (the suspicious ones first).
        text_every_n_steps: how often the text is written (the scalars are logged every step).
        max_hack_fraction: warn once when ``unevaluated`` or ``restated`` exceeds this share of a step's
            rewarded completions.
        min_rewarded: ... in a step that rewarded at least this many completions (fewer is noise).
        reward_window: steps averaged at the start and at the end for the reward-rise rule.
        reward_rise: warn when the training reward rose by at least this (absolute) ...
        eval_rise: ... while no eval set's strict held-out accuracy rose by this much.
    """

    def __init__(
        self,
        num_samples: int = 3,
        text_every_n_steps: int = 1,
        max_hack_fraction: float = 0.2,
        min_rewarded: int = 4,
        reward_window: int = 3,
        reward_rise: float = 0.2,
        eval_rise: float = 0.05,
    ) -> None:
        if text_every_n_steps < 1 or reward_window < 1 or num_samples < 0:
            raise ValueError(
                "RewardAudit: text_every_n_steps and reward_window must be >= 1 and num_samples >= 0, got "
                f"{text_every_n_steps}, {reward_window}, {num_samples}"
            )
        self.num_samples = num_samples
        self.text_every_n_steps = text_every_n_steps
        self._text_cadence = Cadence(text_every_n_steps, None, default_steps=1, owner="RewardAudit")
        self.max_hack_fraction = max_hack_fraction
        self.min_rewarded = min_rewarded
        self.reward_window = reward_window
        self.reward_rise = reward_rise
        self.eval_rise = eval_rise
        self.reward_means: list[float] = []  # one per audited step
        self.history: list[tuple[int, dict[str, float]]] = []  # (global_step, metrics)
        self.warned_hack = False
        self.warned_divergence = False

    # ---- the rules ----------------------------------------------------------------------------------

    def check_hack_fractions(self, step: int, audit: dict) -> str | None:
        """The warning text when this step's hack fractions are too high (once per run), else None."""
        m = audit["metrics"]
        if self.warned_hack or audit["num_rewarded"] < self.min_rewarded:
            return None
        unevaluated, restated = m["audit/unevaluated_fraction"], m["audit/restated_fraction"]
        if max(unevaluated, restated) <= self.max_hack_fraction:
            return None
        self.warned_hack = True
        example = next((r for r in audit["rewarded"] if _suspicious(r)), None)
        shown = (
            f' (e.g. "{example["question"]}" -> {example["extracted"]!s}, reference {example["reference"]})'
            if example
            else ""
        )
        return (
            f"[lit_dash] reward audit, step {step}: of the {audit['num_rewarded']} completions the reward "
            f"paid, {unevaluated:.0%} are unevaluated expressions equal to the reference and {restated:.0%} "
            f"restate numbers copied from the question{shown}. The reward is likely being gamed: check the "
            "reward function, keep model.require_final_form=true (the default math reward's strict rule), "
            "and read the audit/rewarded text in TensorBoard."
        )

    def check_divergence(self, eval_history: list) -> str | None:
        """The warning text when the training reward rose and the strict held-out accuracy did not (once
        per run), else None. ``eval_history`` is :attr:`MathEvaluation.history` ((step, EvalResult))."""
        k = self.reward_window
        if self.warned_divergence or len(self.reward_means) < 2 * k:
            return None
        first = sum(self.reward_means[:k]) / k
        last = sum(self.reward_means[-k:]) / k
        if last - first < self.reward_rise:
            return None
        by_set: dict[str, list[tuple[int, object]]] = {}
        for step, result in eval_history:
            by_set.setdefault(result.name, []).append((step, result))
        rises = {}
        for name, rows in by_set.items():
            (s0, r0), (s1, r1) = rows[0], rows[-1]
            if s1 > s0:
                rises[name] = (r0.correct_fraction, r1.correct_fraction, s0, s1)
        if not rises or max(b - a for a, b, _, _ in rises.values()) >= self.eval_rise:
            return None
        self.warned_divergence = True
        sets = "; ".join(
            f"{name} {a:.1%} (step {s0}) -> {b:.1%} (step {s1})" for name, (a, b, s0, s1) in rises.items()
        )
        return (
            f"[lit_dash] reward audit: the training reward rose from {first:.2f} (mean of the first {k} "
            f"steps) to {last:.2f} (last {k} steps), but the strict held-out accuracy (answers correct and "
            f"in final form) did not rise by {self.eval_rise:.0%}: {sets}. The policy may be gaming the "
            "reward rather than learning the task: read the audit/rewarded text and the eval JSONL "
            "(verdict column), check the reward function, and keep model.require_final_form=true."
        )

    # ---- state (kept in checkpoints, so a resumed run compares against its real first steps) ----------

    def state_dict(self) -> dict:
        return {
            "reward_means": list(self.reward_means),
            "warned_hack": self.warned_hack,
            "warned_divergence": self.warned_divergence,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.reward_means = list(state_dict.get("reward_means", []))
        self.warned_hack = bool(state_dict.get("warned_hack", False))
        self.warned_divergence = bool(state_dict.get("warned_divergence", False))

    # ---- hooks ----------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = getattr(pl_module, "last_rollout", None)
        if rollout is None or not rollout.completions:
            return
        hparams = getattr(pl_module, "hparams", {}) or {}
        audit = audit_rollout(rollout, answer_fallback=bool(hparams.get("answer_fallback", False)))
        step = trainer.global_step
        self.reward_means.append(float(torch.as_tensor(rollout.rewards, dtype=torch.float32).mean()))
        self.history.append((step, dict(audit["metrics"])))
        pl_module.log_dict(audit["metrics"], on_step=True, on_epoch=False, batch_size=1)

        experiment = getattr(trainer.logger, "experiment", None)
        due = self._text_cadence.due(step, steps_per_rollout(pl_module))  # fires across multi/mini jumps too
        if audit["rewarded"] and due and hasattr(experiment, "add_text"):
            rows = pick_samples(audit["rewarded"], self.num_samples)
            if rows and trainer.is_global_zero:
                experiment.add_text("audit/rewarded", format_rows(rows), global_step=step)

        message = self.check_hack_fractions(step, audit) if audit["num_rewarded"] else None
        if message:
            rank_zero_warn(message)
        evaluation = next((c for c in trainer.callbacks if isinstance(c, MathEvaluation)), None)
        message = self.check_divergence(evaluation.history if evaluation is not None else [])
        if message:
            rank_zero_warn(message)
