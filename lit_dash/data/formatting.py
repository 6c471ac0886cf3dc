"""Turn a :class:`~lit_dash.data.records.Problem` into the prompt string the policy sees.

Two styles, because the choice changes what an instruction-tuned model does:

* ``"chat"`` wraps ``"<question>\\n<INSTRUCTION>"`` as one user turn in the tokenizer's chat template and
  opens the assistant turn, so the model answers instead of continuing the user's text. The instruction
  asks for a ``\\boxed{}`` answer, which is what the reward extracts.
* ``"raw"`` is the plain problem text, as the DASH paper feeds it: no template, no instruction.

Prompts are strings (not token ids) so that the same prompt can go to vLLM, to the trainer's tokenizer
and into logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lit_dash.data.records import Problem

__all__ = ["INSTRUCTION", "PROMPT_STYLES", "format_prompt", "format_prompts"]

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_STYLES = ("chat", "raw")


def format_prompt(
    problem_or_question: Problem | str,
    tokenizer: Any = None,
    style: str = "chat",
    instruction: str = INSTRUCTION,
) -> str:
    """The prompt for one problem (or bare question text) in the given ``style``.

    ``tokenizer`` is any Hugging Face tokenizer with a chat template; it is only needed for ``"chat"``.
    """
    question = (
        problem_or_question.question if isinstance(problem_or_question, Problem) else problem_or_question
    )
    if not isinstance(question, str):
        raise TypeError(f"expected a Problem or a question string, got {type(problem_or_question).__name__}")
    if style == "raw":
        return question
    if style != "chat":
        raise ValueError(f"unknown prompt style {style!r}; valid styles: {', '.join(PROMPT_STYLES)}")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(
            f"prompt style 'chat' needs a tokenizer with a chat template, and {name!r} has none; "
            "use an instruction-tuned model's tokenizer or style='raw'"
        )
    messages = [{"role": "user", "content": f"{question}\n{instruction}"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):  # defensive: some tokenizer versions return a list for batched input
        raise TypeError(f"apply_chat_template returned {type(prompt).__name__}, expected str")
    return prompt


def format_prompts(
    problems: Iterable[Problem | str],
    tokenizer: Any = None,
    style: str = "chat",
    instruction: str = INSTRUCTION,
) -> list[str]:
    """:func:`format_prompt` over many problems."""
    return [format_prompt(p, tokenizer, style, instruction) for p in problems]
