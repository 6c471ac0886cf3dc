"""The evaluator: summary numbers against hand-computed values, JSONL output, the real engine path."""

from __future__ import annotations

import json

import pytest
from support import SHARED_DATA

from lit_dash.data.records import Problem
from lit_dash.evaluation import Evaluator, format_results, summarize


def _record(reward, extracted, tokens, truncated, seconds, verdict="wrong", boxed=True):
    return {
        "reward": reward,
        "verdict": verdict,
        "extracted": extracted,
        "boxed": boxed,
        "completion_tokens": tokens,
        "truncated": truncated,
        "seconds": seconds,
    }


def test_summary_matches_hand_computed_values():
    records = [
        _record(1.0, "5", 10, False, 0.5, verdict="correct"),
        _record(0.0, "3 + 4", 30, False, 0.5, verdict="unevaluated"),
        _record(0.0, None, 40, True, 1.0, verdict="no_answer", boxed=False),
        _record(1.0, "2", 20, False, 0.5, boxed=False),  # a custom reward paid a wrong bare number
    ]
    r = summarize("toy", records)
    assert r.num_problems == 4
    assert r.accuracy == 0.5  # 2 of 4 correct
    assert r.mean_completion_tokens == 25.0  # (10 + 30 + 40 + 20) / 4
    assert r.answered_fraction == 0.75  # 3 of 4 have a boxed answer
    assert r.truncated_fraction == 0.25
    assert r.unevaluated_fraction == 0.25  # 1 of 4 boxes an expression equal to the reference
    assert r.correct_fraction == 0.25  # the strict rule's accuracy, whatever the reward paid
    assert r.generation_tokens_per_second == pytest.approx(100 / 2.5)
    assert r.metrics()["eval/toy/accuracy"] == 0.5
    assert r.metrics()["eval/toy/unevaluated"] == 0.25
    assert r.metrics()["eval/toy/correct"] == 0.25
    assert r.boxed_fraction == 0.5  # "5" and "3 + 4" are boxed
    assert r.boxed_correct_fraction == 0.25  # of those only "5" is correct
    assert "| toy | 4 | 50.0% | 50.0% | 25.0% | 25.0% | 75.0% | 25.0 |" in format_results([r])


def test_boxed_columns_separate_the_fallbacks_answers():
    """With the last-number fallback a bare "27" can be correct; "boxed & right" is the accuracy without it."""
    records = [
        _record(1.0, "27", 8, False, 0.1, verdict="correct", boxed=True),  # \\boxed{27}
        _record(1.0, "27", 8, False, 0.1, verdict="correct", boxed=False),  # "16 + 11 = 27"
        _record(0.0, "26", 8, False, 0.1, verdict="wrong", boxed=True),
        _record(0.0, None, 8, False, 0.1, verdict="no_answer", boxed=False),
    ]
    r = summarize("toy", records)
    assert (r.accuracy, r.correct_fraction) == (0.5, 0.5)
    assert (r.boxed_fraction, r.boxed_correct_fraction) == (0.5, 0.25)
    assert r.metrics()["eval/toy/boxed"] == 0.5
    assert r.metrics()["eval/toy/boxed_correct"] == 0.25


def test_evaluator_on_the_real_engine_writes_scored_jsonl(tiny_engine, tmp_path):
    problems = [
        Problem(question=f"What is {i} + {i}?", answer=str(2 * i), source_id=f"t:{i}") for i in range(5)
    ]
    evaluator = Evaluator("toy", problems, max_new_tokens=8, batch_size=2)  # 3 engine calls: 2 + 2 + 1

    def first_token_even(completions, probs):
        return [float(len(c) % 2 == 0) for c in completions]

    out = tmp_path / "toy.jsonl"
    result = evaluator.run(tiny_engine, first_token_even, output=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source_id"] for r in rows] == [p.source_id for p in problems]
    assert all(r["reward"] == float(len(r["completion"]) % 2 == 0) for r in rows)
    assert result.accuracy == sum(r["reward"] for r in rows) / 5
    assert all(1 <= r["completion_tokens"] <= 8 for r in rows)
    assert all(r["verdict"] in ("correct", "unevaluated", "wrong", "no_answer") for r in rows)
    again = evaluator.run(tiny_engine, first_token_even)  # greedy: the same completions again
    assert again.accuracy == result.accuracy and again.mean_completion_tokens == result.mean_completion_tokens


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")
def test_real_smollm2_on_gsm8k_slice_through_vllm(smollm2_engine, tmp_path):
    """The real 135M model, real GSM8K rows, real vLLM, greedy: the evaluation path a user runs."""
    from lit_dash.data.sources import load_gsm8k

    problems = load_gsm8k(SHARED_DATA / "gsm8k_test.jsonl", limit=8)
    result = Evaluator("gsm8k", problems, max_new_tokens=96).run(smollm2_engine, output=tmp_path / "g.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert result.num_problems == 8 and len(rows) == 8
    assert rows[0]["reference"] == "18"  # the first GSM8K test answer
    # an instruction-tuned model writes real text, mostly English words, not token soup
    assert all(len(r["completion"].split()) >= 5 for r in rows)
    assert result.accuracy == sum(r["reward"] for r in rows) / 8  # the mean of the scored rows written
    assert result.generation_tokens_per_second > 0


def test_unevaluated_answers_are_reported_whatever_the_reward():
    """A lenient reward pays ``\\boxed{2 + 3}`` for 5; the evaluator still reports it as unevaluated."""
    from lit_dash.rewards import math_rewards

    problems = [Problem(question="What is 2 + 3?", answer="5", source_id="t:0")] * 3
    texts = ["\\boxed{2 + 3}", "\\boxed{5}", "\\boxed{6}"]

    def lenient(completions, probs):
        return math_rewards(completions, [p.answer for p in probs], require_final_form=False)

    class Canned:  # the three completions above, as an engine would return them
        tokenizer = None

        def generate(self, prompts, n, sampling):
            from lit_dash.engines.base import Completion, GenerationResult

            comps = [Completion(i, t, [1] * 4, [], False) for i, t in enumerate(texts)]
            return GenerationResult([[1]] * 3, comps, 1.0)

    evaluator = Evaluator("toy", problems, prompt_style="raw")
    records = evaluator.score_batch(Canned(), problems, lenient)
    assert [r["verdict"] for r in records] == ["unevaluated", "correct", "wrong"]
    result = summarize("toy", records)
    assert result.accuracy == pytest.approx(2 / 3)  # what the lenient reward paid
    assert result.unevaluated_fraction == pytest.approx(1 / 3)  # and how much of it was the hack
    assert result.correct_fraction == pytest.approx(1 / 3)  # what the strict rule would have paid
