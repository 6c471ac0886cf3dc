"""Prompt sources: real GSM8K / MATH / MATH-500 files, error messages, synthetic arithmetic."""

from __future__ import annotations

import json
import operator
from pathlib import Path

import pytest
from support import SHARED_DATA

from lit_dash.data import sources
from lit_dash.data.records import Problem
from lit_dash.data.sources import (
    ARITHMETIC_DIFFICULTIES,
    DataError,
    arithmetic_problems,
    last_boxed,
    load_gsm8k,
    load_math,
    load_math500,
    load_problems,
    math_12k_train,
    read_jsonl,
)

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------ GSM8K


def test_gsm8k_test_first_rows_hand_checked():
    probs = load_gsm8k(SHARED_DATA / "gsm8k_test.jsonl", limit=2)
    assert [p.answer for p in probs] == ["18", "3"]
    first = probs[0]
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.source_id == "gsm8k_test.jsonl:1"
    # calculator annotations are gone, the worked steps stay, the "#### 18" line is not in the solution
    assert first.solution == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer\u2019s market."
    )


def test_gsm8k_thousands_separators_removed():
    probs = {p.source_id: p for p in load_gsm8k(SHARED_DATA, split="test", limit=202)}
    assert probs["gsm8k_test.jsonl:147"].answer == "2125"  # raw: "#### 2,125"
    assert probs["gsm8k_test.jsonl:202"].answer == "114200"  # raw: "#### 114,200"
    assert all("<<" not in p.solution for p in probs.values())


def test_gsm8k_train_loads_in_full_with_plain_number_answers():
    probs = load_gsm8k(SHARED_DATA / "gsm8k_train.jsonl")
    assert len(probs) == 7473
    for p in probs:
        float(p.answer)  # every GSM8K answer is a plain number once commas are gone


# ------------------------------------------------------------------------------------------------- MATH


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $x=\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\left(\\frac{20}{3},0\\right)}", "\\left(\\frac{20}{3},0\\right)"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not structure
        ("\\fbox{7}", "7"),
        ("is $\\boxed 2$.", "2"),  # brace-less TeX form used by a few MATH rows
        ("\\boxed {17}.", "17"),
        ("\\boxed{3} and then \\boxed{4", "3"),  # truncated trailing box: the last one that closes
        ("no box here", None),
        ("\\boxed{" * 5000, None),
        ("\\boxedfoo{1}", None),  # a different macro
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_math_rows_hand_checked():
    probs = load_math(SHARED_DATA / "math_train.jsonl", limit=1045)
    assert probs[0].answer == "0"  # train/algebra/0.json ends "a+b=-3+3=\boxed{0}"
    assert probs[15].answer == "\\frac{1}{3}"  # train/algebra/27.json, nested braces
    assert probs[15].extra == {
        "level": probs[15].extra["level"],
        "type": "Algebra",
        "unique_id": "train/algebra/27.json",
    }
    assert probs[1044].answer == "\\left(\\frac{20}{3},0\\right)"  # train/algebra/1751.json
    assert probs[0].source_id == "math_train.jsonl:1"
    assert probs[0].solution.endswith("\\boxed{0}$.")


def test_math_empty_boxed_rows_error_or_skip():
    with pytest.raises(DataError, match=r"math_train\.jsonl:5530: field 'solution' has no non-empty"):
        load_math(SHARED_DATA, split="train")
    probs = load_math(SHARED_DATA, split="train", skip_unanswerable=True)
    assert len(probs) == 7498
    ids = {p.extra["unique_id"] for p in probs}
    assert "train/number_theory/7115.json" not in ids and "train/number_theory/7117.json" not in ids


def test_math500_answers_match_last_boxed_of_solution():
    probs = load_math500(SHARED_DATA)
    assert len(probs) == 500
    assert all(last_boxed(p.solution) == p.answer for p in probs)
    assert probs[0].extra["unique_id"].startswith("test/")


def test_math12k_is_train_plus_test_minus_math500():
    probs = math_12k_train(SHARED_DATA)
    ids = [p.extra["unique_id"] for p in probs]
    # 7,500 train + 4,500 test rows not in MATH-500 = 12,000, minus the 2 rows with an empty \boxed{}
    assert len(probs) == 11998 and len(set(ids)) == 11998
    held_out = {row["unique_id"] for row in read_jsonl(SHARED_DATA / "math500_test.jsonl")}
    assert not held_out & set(ids)
    assert sum(i.startswith("test/") for i in ids) == 4500
    assert len(math_12k_train(SHARED_DATA, limit=10)) == 10


# ----------------------------------------------------------------------------------------------- errors


def test_malformed_json_names_file_and_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", ['{"question": "q", "answer": "#### 1"}', "", '{"question": oops}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_gsm8k(p)


def test_non_object_line(tmp_path):
    p = write(tmp_path, "list.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object"):
        read_jsonl(p)


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    p = write(
        tmp_path,
        "g.jsonl",
        [
            "",
            '{"question": "q1", "answer": "x\\n#### 1,000"}',
            "  ",
            '{"question": "q2", "answer": "#### -3"}',
        ],
    )
    probs = load_gsm8k(p)
    assert [(q.source_id, q.answer) for q in probs] == [("g.jsonl:2", "1000"), ("g.jsonl:4", "-3")]


def test_missing_file(tmp_path):
    with pytest.raises(
        DataError, match="data file not found: .*nope.jsonl; pass a local JSONL path or a hub id"
    ):
        load_gsm8k(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="data file not found: .*gsm8k_validation.jsonl"):
        load_gsm8k(SHARED_DATA, split="validation")


@pytest.mark.parametrize(
    ("loader", "rows", "message"),
    [
        (
            load_gsm8k,
            ['{"question": "q", "answer": "#### 1"}', '{"question": "q", "answer": "no marker"}'],
            r":2: field 'answer' has no '#### <number>'",
        ),
        (load_gsm8k, ['{"question": "q"}'], r":1: missing or empty field 'answer'"),
        (
            load_math,
            ['{"problem": "p", "solution": "no box"}'],
            r":1: field 'solution' has no non-empty \\boxed",
        ),
        (load_math500, ['{"problem": "p", "solution": "s"}'], r":1: missing or empty field 'answer'"),
    ],
)
def test_row_without_answer_names_the_line(tmp_path, loader, rows, message):
    p = write(tmp_path, "rows.jsonl", rows)
    with pytest.raises(DataError, match=r"rows\.jsonl" + message):
        loader(p)


def test_empty_file_is_an_error(tmp_path):
    p = write(tmp_path, "empty.jsonl", [""])
    with pytest.raises(DataError, match="no problems found"):
        load_gsm8k(p)


def test_hub_rows_are_normalised_the_same_way(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return [{"question": "What is 1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (p,) = load_gsm8k("openai/gsm8k", split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert (p.answer, p.solution, p.source_id) == ("2", "1+1=2", "openai/gsm8k/main[test]:0")

    def failing(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="could not load hub dataset 'HuggingFaceH4/MATH-500'.*no network"):
        load_math500()


# ------------------------------------------------------------------------------------------- arithmetic

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.mark.parametrize("difficulty", sorted(ARITHMETIC_DIFFICULTIES))
def test_arithmetic_answers_are_correct(difficulty):
    probs = arithmetic_problems(60, seed=3, difficulty=difficulty)
    assert len({p.question for p in probs}) == 60
    for i, p in enumerate(probs):
        _, _, a, op, b = p.question.rstrip("?").split(" ")
        assert int(p.answer) == OPS[op](int(a), int(b)) >= 0
        assert p.solution == f"{a} {op} {b} = {p.answer}. The answer is \\boxed{{{p.answer}}}."
        assert p.source_id == f"arithmetic-{difficulty}-seed3:{i}"


def test_arithmetic_digit_ranges():
    (p,) = arithmetic_problems(1, seed=0, difficulty="add2")
    a, b = p.extra["a"], p.extra["b"]
    assert 10 <= a <= 99 and 10 <= b <= 99
    assert all(100 <= q.extra["a"] <= 999 for q in arithmetic_problems(20, 0, "add3"))
    assert all(
        2 <= q.extra["a"] <= 9 and 10 <= q.extra["b"] <= 99 for q in arithmetic_problems(20, 0, "mul1x2")
    )


def test_arithmetic_is_deterministic_and_seed_dependent():
    a = arithmetic_problems(50, seed=1)
    assert a == arithmetic_problems(50, seed=1)
    b = arithmetic_problems(50, seed=2)
    assert [p.question for p in a] != [p.question for p in b]


def test_arithmetic_exclude_and_split_give_disjoint_sets():
    train = arithmetic_problems(500, seed=0)
    held = arithmetic_problems(200, seed=1, exclude={p.question for p in train})
    assert not {p.question for p in train} & {p.question for p in held}
    tr = load_problems("arithmetic", split="train", seed=0, num_problems=1000)
    te = load_problems("arithmetic", split="test", seed=0, num_problems=300)
    assert not {p.question for p in tr} & {p.question for p in te}


def test_arithmetic_exhaustion_is_reported():
    assert len(arithmetic_problems(81, 0, "add1")) == 81  # the whole 1..9 + 1..9 space
    with pytest.raises(DataError, match="only 81 distinct"):
        arithmetic_problems(82, 0, "add1")
    with pytest.raises(DataError, match="could only generate"):
        arithmetic_problems(10, 0, "add1", exclude={p.question for p in arithmetic_problems(75, 1, "add1")})
    with pytest.raises(DataError, match="unknown arithmetic difficulty 'add9'"):
        arithmetic_problems(1, 0, "add9")


# ------------------------------------------------------------------------------------------- dispatcher


def test_dispatcher_by_name():
    d = str(SHARED_DATA)
    assert load_problems("gsm8k", d, split="test", limit=3)[0].answer == "18"
    assert len(load_problems("math", d, split="test", limit=4)) == 4
    assert len(load_problems("math500", d, split="test", limit=5)) == 5
    assert len(load_problems("math12k", d, limit=6)) == 6
    probs = load_problems("arithmetic", num_problems=20, limit=7, difficulty="mix2", seed=4)
    assert len(probs) == 7 and all(isinstance(p, Problem) for p in probs)


def test_dispatcher_rejects_unknown_names_and_leaky_splits():
    with pytest.raises(DataError, match="unknown problem source 'gsm9k'; valid names: gsm8k, math, math500"):
        load_problems("gsm9k")
    with pytest.raises(DataError, match="MATH-500 has only a 'test' split"):
        load_problems("math500", str(SHARED_DATA), split="train")
    with pytest.raises(DataError, match="math12k is a training split"):
        load_problems("math12k", str(SHARED_DATA), split="test")


def test_sources_has_no_copied_data():
    # The data must stay in ../shared/data; this catches an accidental copy into the package.
    pkg = Path(sources.__file__).resolve().parents[1]
    assert not list(pkg.rglob("*.jsonl"))
    assert json.loads((SHARED_DATA / "gsm8k_test.jsonl").open().readline())["question"]
