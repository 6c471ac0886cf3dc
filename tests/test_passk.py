"""pass@k and maj@k: the estimator against hand-computed values, the vote on crafted answers, and the
evaluator's sampled path on the real engine."""

from __future__ import annotations

import json
from math import comb

import pytest

from lit_dash.data.records import Problem
from lit_dash.errors import ConfigError
from lit_dash.evaluation import EvalSamples, Evaluator, majority_vote, pass_at_k, summarize


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (8, 0, 8, 0.0),  # nothing correct
        (6, 0, 1, 0.0),
        (5, 3, 3, 1.0),  # n - c = 2 < k: every 3-subset holds a correct sample
        (8, 8, 1, 1.0),
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
        (8, 1, 8, 1.0),  # n = k: any correct sample
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_where_the_binomials_overflow_a_float():
    # C(2000, 500) ~ 1e486 is not a float; the product form needs no binomial
    exact = 1 - comb(1500, 500) / comb(2000, 500)  # Python ints: exact, then one division
    assert pass_at_k(2000, 500, 500) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(1000, 1, 10) == pytest.approx(10 / 1000, rel=1e-12)  # one correct: k / n


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 2)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_majority_vote_on_crafted_answers():
    assert majority_vote(["7", "8", "7", None]) == 0  # 7 wins 2-1; its first sample
    assert majority_vote(["8", "7", "7", "8", "7"]) == 1  # 7 wins 3-2, first seen at index 1
    assert majority_vote([None, "3", "4"]) == 1  # a tie: the answer seen first wins
    assert majority_vote(["4", "3", "3", "4"]) == 0  # a tie again: 4 appears first
    assert majority_vote([None, None]) is None  # nobody answered
    assert majority_vote([None, None, "5"]) == 2  # unanswered samples do not vote
    assert majority_vote(["1 / 2", "0.5", "1/2"]) == 0  # whitespace does not split a vote...
    assert majority_vote(["0.5", "1/2", "1/2"]) == 1  # ...but equal values written apart are two answers


def test_eval_samples_knobs_are_checked():
    with pytest.raises(ConfigError, match="eval_samples.n"):
        EvalSamples(k=8, n=4)
    with pytest.raises(ConfigError, match="temperature"):
        EvalSamples(k=2, temperature=0.0)
    assert EvalSamples(k=4).num_samples == 4 and EvalSamples(k=2, n=6).num_samples == 6


def test_summary_averages_the_per_problem_figures():
    base = {"extracted": "1", "boxed": True, "completion_tokens": 1, "truncated": False, "seconds": 1.0, "k": 2}
    records = [
        {**base, "reward": 1.0, "pass_at_k": 0.5, "maj_at_k": 1.0},
        {**base, "reward": 0.0, "pass_at_k": 1.0, "maj_at_k": 0.0},
    ]
    r = summarize("toy", records)
    assert (r.k, r.pass_at_k, r.maj_at_k, r.accuracy) == (2, 0.75, 0.5, 0.5)
    assert r.metrics()["eval/toy/pass@2"] == 0.75 and r.metrics()["eval/toy/maj@2"] == 0.5
    assert "eval/toy/pass@2" not in summarize("toy", [{**base, "reward": 1.0}]).metrics()


def test_sampled_evaluation_on_the_real_engine(tiny_engine, tmp_path):
    problems = [Problem(f"What is {i} + 1?", str(i + 1), f"t:{i}") for i in range(3)]
    evaluator = Evaluator("toy", problems, max_new_tokens=8, samples=EvalSamples(k=2, n=4, temperature=1.0))

    def even_length(completions, probs):
        return [float(len(c) % 2 == 0) for c in completions]

    out = tmp_path / "toy.jsonl"
    result = evaluator.run(tiny_engine, even_length, output=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:  # every figure follows from the samples the record holds
        assert len(row["sample_completions"]) == 4
        assert row["sample_rewards"] == [float(len(t) % 2 == 0) for t in row["sample_completions"]]
        assert row["pass_at_k"] == pass_at_k(4, int(sum(row["sample_rewards"])), 2)
        winner = majority_vote(row["sample_answers"][:2])
        assert row["maj_at_k"] == float(winner is not None and row["sample_rewards"][winner] >= 1.0)
    assert result.pass_at_k == pytest.approx(sum(r["pass_at_k"] for r in rows) / 3)
    assert result.accuracy == sum(r["reward"] for r in rows) / 3  # greedy accuracy is still reported
    assert len({t for r in rows for t in r["sample_completions"]}) > 3  # sampled, not greedy copies
