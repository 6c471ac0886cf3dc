"""Prompt sources: GSM8K, MATH, MATH-500, the 12k MATH train split and synthetic arithmetic.

Every loader returns a list of :class:`~lit_dash.data.records.Problem` with a reference ``answer`` that the
reward can compare against, so the trainer never needs to know which dataset it is looking at. Loaders accept
either a local path (a ``.jsonl`` file, or a directory holding ``<name>_<split>.jsonl``) or a Hugging Face
hub id; local files are what tests, CI and machines without network use, the hub is what users get by default.

Bad input fails early with :class:`DataError`, whose message names the file, the line and what to fix: a
silently dropped row or an empty reference answer would otherwise show up much later as a reward that is
always zero.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lit_dash.data.records import Problem
from lit_dash.errors import InputError
from lit_dash.rewards.boxed import last_boxed  # MATH's reference answers are its solutions' boxed ones

__all__ = [
    "DataError",
    "read_jsonl",
    "last_boxed",
    "load_gsm8k",
    "load_math",
    "load_math500",
    "math_12k_train",
    "arithmetic_problems",
    "load_problems",
    "ARITHMETIC_DIFFICULTIES",
    "SOURCES",
]

logger = logging.getLogger(__name__)

GSM8K_HUB_ID = "openai/gsm8k"
MATH_HUB_ID = "EleutherAI/hendrycks_math"
MATH500_HUB_ID = "HuggingFaceH4/MATH-500"
# EleutherAI/hendrycks_math keeps one config per subject; loading "the MATH split" means all of them.
_MATH_SUBJECT_CONFIGS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


class DataError(InputError):
    """Bad or missing input data; the message says which file/line and what to change."""


# ----------------------------------------------------------------------------------------------- JSONL


def _iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(1-based line number, object)`` so that later checks can point at the offending line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}; pass a local JSONL path or a hub id")
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # a truncated last object: the column is on this line
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of objects, skipping blank lines; raise :class:`DataError` on anything else."""
    return [obj for _, obj in _iter_jsonl(path)]


# ----------------------------------------------------------------------------------------------- boxed

# ------------------------------------------------------------------------------------- path resolution


def _resolve_local(path_or_hub_id: str | Path, filename: str) -> Path | None:
    """Local file to read, or ``None`` when the argument should be treated as a hub id."""
    p = Path(path_or_hub_id)
    if p.is_dir():
        f = p / filename
        if not f.is_file():
            raise DataError(f"data file not found: {f}; pass a local JSONL path or a hub id")
        return f
    if p.is_file() or str(path_or_hub_id).endswith(".jsonl"):
        return p  # a missing .jsonl is reported by _iter_jsonl with the standard message
    if _looks_like_a_path(str(path_or_hub_id)):
        raise DataError(
            f"data path not found: {path_or_hub_id} (resolved to {p.expanduser().resolve()}); "
            "pass an existing JSONL file or a folder holding " + filename
        )
    return None


def _looks_like_a_path(name: str) -> bool:
    """A hub id is ``owner/name``; anything relative, absolute or deeper is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _hub_rows(hub_id: str, split: str, config: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a hub dataset labelled ``hub_id[split]:row``; network/availability errors become DataError."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a hard dependency
        raise DataError(f"loading hub dataset {hub_id!r} needs the `datasets` package") from exc
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise DataError(
            f"could not load hub dataset {hub_id!r} (config={config!r}, split={split!r}): {exc}; "
            "if you meant a local file, it does not exist - pass an existing JSONL path"
        ) from exc
    label = f"{hub_id}" + (f"/{config}" if config else "") + f"[{split}]"
    for idx, row in enumerate(ds):
        yield f"{label}:{idx}", dict(row)


def _local_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for lineno, obj in _iter_jsonl(path):
        yield f"{path.name}:{lineno}", obj


def _where(location: str, path: Path | None) -> str:
    """Error prefix: the full path and line for local files, the hub label otherwise."""
    if path is None:
        return location
    return f"{path}:{location.rsplit(':', 1)[1]}"


def _collect(
    rows: Iterable[tuple[str, dict[str, Any]]],
    convert: Callable[[str, dict[str, Any]], Problem | None],
    limit: int | None,
    what: str,
) -> list[Problem]:
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive integer or None, got {limit}")
    out: list[Problem] = []
    for location, row in rows:
        problem = convert(location, row)
        if problem is None:  # a row the caller chose to skip
            continue
        out.append(problem)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{what}: no problems found (the source is empty)")
    return out


def _require_str(row: dict[str, Any], key: str, where: str, hint: str = "") -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: missing or empty field {key!r}{hint}")
    return value


# ----------------------------------------------------------------------------------------------- GSM8K

_CALC_RE = re.compile(r"<<[^<>]*>>")


def _gsm8k_problem(location: str, row: dict[str, Any], path: Path | None) -> Problem:
    where = _where(location, path)
    question = _require_str(row, "question", where)
    raw = _require_str(row, "answer", where, " (GSM8K rows need a worked answer ending in '#### <number>')")
    if "####" not in raw:
        raise DataError(f"{where}: field 'answer' has no '#### <number>' final answer")
    worked, final = raw.rsplit("####", 1)
    answer = final.strip().replace(",", "")
    if not answer:
        raise DataError(f"{where}: field 'answer' has nothing after '####'")
    solution = _CALC_RE.sub("", worked).strip()
    return Problem(question=question, answer=answer, source_id=location, solution=solution)


def load_gsm8k(
    path_or_hub_id: str | Path = GSM8K_HUB_ID, split: str = "test", limit: int | None = None
) -> list[Problem]:
    """GSM8K problems; ``answer`` is the number after ``####`` with thousands separators removed.

    The solution keeps the worked steps but drops the ``<<48/2=24>>`` calculator annotations, which are an
    artefact of how the dataset was made and would otherwise be imitated by an SFT baseline.
    """
    local = _resolve_local(path_or_hub_id, f"gsm8k_{split}.jsonl")
    rows = _local_rows(local) if local else _hub_rows(str(path_or_hub_id), split, "main")
    return _collect(
        rows, lambda loc, row: _gsm8k_problem(loc, row, local), limit, str(local or path_or_hub_id)
    )


# ------------------------------------------------------------------------------------------------ MATH


def _math_problem(
    location: str, row: dict[str, Any], path: Path | None, skip_unanswerable: bool
) -> Problem | None:
    where = _where(location, path)
    question = _require_str(row, "problem", where)
    solution = _require_str(row, "solution", where)
    answer = last_boxed(solution)
    if not answer:
        if skip_unanswerable:
            logger.warning("skipping %s: solution has no non-empty \\boxed{...} answer", where)
            return None
        raise DataError(
            f"{where}: field 'solution' has no non-empty \\boxed{{...}} final answer"
            " (pass skip_unanswerable=True to drop such rows)"
        )
    extra = {k: row.get(k) for k in ("level", "type", "unique_id")}
    return Problem(question=question, answer=answer, source_id=location, solution=solution, extra=extra)


def load_math(
    path_or_hub_id: str | Path = MATH_HUB_ID,
    split: str = "train",
    limit: int | None = None,
    skip_unanswerable: bool = False,
) -> list[Problem]:
    """Hendrycks MATH problems; ``answer`` is the last ``\\boxed{}`` of the reference solution.

    Two rows of MATH train (``train/number_theory/7115.json`` and ``7117.json``) have an empty ``\\boxed{}``;
    by default such a row is an error, ``skip_unanswerable=True`` drops it with a warning instead (a
    problem with no reference answer can only ever earn reward 0). From the hub, ``EleutherAI/hendrycks_math`` is stored one config per subject, so all subjects are loaded
    and concatenated (hub rows have no ``unique_id``; ``extra['unique_id']`` is then ``None``).
    """
    local = _resolve_local(path_or_hub_id, f"math_{split}.jsonl")
    if local:
        rows: Iterable[tuple[str, dict[str, Any]]] = _local_rows(local)
    elif str(path_or_hub_id) == MATH_HUB_ID:
        rows = (r for cfg in _MATH_SUBJECT_CONFIGS for r in _hub_rows(MATH_HUB_ID, split, cfg))
    else:
        rows = _hub_rows(str(path_or_hub_id), split)
    return _collect(
        rows,
        lambda loc, row: _math_problem(loc, row, local, skip_unanswerable),
        limit,
        str(local or path_or_hub_id),
    )


def _math500_problem(location: str, row: dict[str, Any], path: Path | None) -> Problem:
    where = _where(location, path)
    question = _require_str(row, "problem", where)
    answer = _require_str(row, "answer", where, " (MATH-500 rows carry the reference answer there)")
    extra = {"level": row.get("level"), "type": row.get("subject"), "unique_id": row.get("unique_id")}
    return Problem(
        question=question,
        answer=answer.strip(),
        source_id=location,
        solution=row.get("solution"),
        extra=extra,
    )


def load_math500(
    path_or_hub_id: str | Path = MATH500_HUB_ID, split: str = "test", limit: int | None = None
) -> list[Problem]:
    """MATH-500, the held-out evaluation set; it only has a ``test`` split (training on it is a leak)."""
    if split != "test":
        raise DataError(f"MATH-500 has only a 'test' split (got split={split!r}); train on 'math12k' instead")
    local = _resolve_local(path_or_hub_id, "math500_test.jsonl")
    rows = _local_rows(local) if local else _hub_rows(str(path_or_hub_id), split)
    return _collect(
        rows, lambda loc, row: _math500_problem(loc, row, local), limit, str(local or path_or_hub_id)
    )


def math_12k_train(shared_dir: str | Path | None = None, limit: int | None = None) -> list[Problem]:
    """The 12,000-problem MATH train split of PRM800K / the DASH paper, minus its 2 unanswerable rows.

    It is MATH train (7,500) plus the 4,500 MATH test problems that are not in MATH-500, so that evaluation
    on MATH-500 stays held out. Two MATH train rows have an empty ``\\boxed{}`` (no reference answer, so
    they could only ever earn reward 0); they are dropped, leaving 11,998 problems. ``shared_dir`` holds
    ``math_train.jsonl``, ``math_test.jsonl`` and ``math500_test.jsonl``; with ``None`` the hub copies are
    used and overlap is decided by problem text, because the hub MATH rows carry no ``unique_id``.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive integer or None, got {limit}")
    if shared_dir is None:
        held_out = {p.question.strip() for p in load_math500()}
        train = load_math(split="train", skip_unanswerable=True)
        test = load_math(split="test", skip_unanswerable=True)
        problems = train + [p for p in test if p.question.strip() not in held_out]
    else:
        d = Path(shared_dir)
        held_ids = {p.extra["unique_id"] for p in load_math500(d)}
        train = load_math(d, "train", skip_unanswerable=True)
        test = load_math(d, "test", skip_unanswerable=True)
        problems = train + [p for p in test if p.extra.get("unique_id") not in held_ids]
    return problems[:limit] if limit is not None else problems


# ------------------------------------------------------------------------------------------ arithmetic


# difficulty -> (capacity, index -> (a, op, b)); indices enumerate the whole question space once.
def _pairs(
    lo_a: int, hi_a: int, lo_b: int, hi_b: int, ops: str
) -> tuple[int, Callable[[int], tuple[int, str, int]]]:
    na, nb = hi_a - lo_a + 1, hi_b - lo_b + 1

    def decode(k: int) -> tuple[int, str, int]:
        op = ops[k % len(ops)]
        k //= len(ops)
        a, b = lo_a + k // nb, lo_b + k % nb
        if op == "-" and a < b:
            a, b = b, a  # keep subtraction answers non-negative
        return a, op, b

    return na * nb * len(ops), decode


ARITHMETIC_DIFFICULTIES: dict[str, tuple[int, Callable[[int], tuple[int, str, int]]]] = {
    "add1": _pairs(1, 9, 1, 9, "+"),
    "add2": _pairs(10, 99, 10, 99, "+"),
    "mul1x2": _pairs(2, 9, 10, 99, "*"),
    "add3": _pairs(100, 999, 100, 999, "+"),
    "mix2": _pairs(10, 99, 10, 99, "+-"),
}
_ARITH_TEST_FRACTION = 5  # 1 in 5 questions belongs to the held-out "test" partition


def _arith_split(question: str) -> str:
    """Fixed hash partition of the question space, so train and test never overlap whatever the seeds."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big")
    return "test" if h % _ARITH_TEST_FRACTION == 0 else "train"


def arithmetic_problems(
    n: int,
    seed: int,
    difficulty: str = "add2",
    exclude: Iterable[str] | None = None,
    split: str | None = None,
) -> list[Problem]:
    """``n`` distinct synthetic problems such as ``"What is 37 + 48?"`` with exact integer answers.

    Deterministic in ``(seed, difficulty)`` so that runs are reproducible, and cheap to verify, which makes
    them the smoke-test task for the RL loop. Two ways to keep evaluation held out:
    ``exclude`` (questions never to emit, e.g. the training set) and ``split`` (``"train"``/``"test"``),
    a fixed hash partition of the question space (about 1 in 5 questions are "test"), which keeps the
    splits disjoint for any seeds and sizes.
    """
    if difficulty not in ARITHMETIC_DIFFICULTIES:
        raise DataError(
            f"unknown arithmetic difficulty {difficulty!r}; valid: {sorted(ARITHMETIC_DIFFICULTIES)}"
        )
    if split not in (None, "train", "test"):
        raise DataError(f"arithmetic split must be None, 'train' or 'test', got {split!r}")
    if n < 1:
        raise DataError(f"number of arithmetic problems must be >= 1, got {n}")
    capacity, decode = ARITHMETIC_DIFFICULTIES[difficulty]
    if n > capacity:
        raise DataError(f"{difficulty!r} has only {capacity} distinct problems, asked for {n}")
    banned = set(exclude or ())
    rng = random.Random(f"arithmetic:{difficulty}:{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    tag = f"arithmetic-{difficulty}" + (f"-{split}" if split else "") + f"-seed{seed}"
    max_draws = min(50 * capacity + 10_000, 100 * n + 100_000)
    for _ in range(max_draws):
        a, op, b = decode(rng.randrange(capacity))
        question = f"What is {a} {op} {b}?"
        if question in seen or question in banned or (split and _arith_split(question) != split):
            seen.add(question)
            continue
        seen.add(question)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(
            Problem(
                question=question,
                answer=str(value),
                source_id=f"{tag}:{len(out)}",
                solution=f"{a} {op} {b} = {value}. The answer is \\boxed{{{value}}}.",
                extra={"difficulty": difficulty, "a": a, "b": b, "op": op},
            )
        )
        if len(out) == n:
            return out
    raise DataError(
        f"could only generate {len(out)} of {n} distinct {difficulty!r} problems"
        f" (split={split!r}, {len(banned)} excluded); ask for fewer or use a harder difficulty"
    )


# ------------------------------------------------------------------------------------------ dispatcher

SOURCES = ("gsm8k", "math", "math500", "math12k", "arithmetic")


def load_problems(
    source: str,
    path: str | None = None,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    difficulty: str = "add2",
    num_problems: int = 1000,
) -> list[Problem]:
    """Load problems by source name; the single entry point that configs use.

    ``path`` is a local JSONL file, a directory with the shared data files, or a hub id (``None`` means the
    default hub id). For ``arithmetic``, ``num_problems`` problems are generated from ``seed`` in the given
    ``split``'s partition (so ``split="test"`` never overlaps ``split="train"``), then cut to ``limit``.
    A bad ``limit`` is refused before any file or hub is read.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive integer or None, got {limit}")
    if source == "gsm8k":
        return load_gsm8k(path or GSM8K_HUB_ID, split, limit)
    if source == "math":
        return load_math(path or MATH_HUB_ID, split, limit)
    if source == "math500":
        return load_math500(path or MATH500_HUB_ID, split, limit)
    if source == "math12k":
        if split != "train":
            raise DataError(f"math12k is a training split (got split={split!r}); evaluate on 'math500'")
        return math_12k_train(path, limit)
    if source == "arithmetic":
        if split not in ("train", "test"):
            raise DataError(f"arithmetic split must be 'train' or 'test', got {split!r}")
        n = num_problems if limit is None else min(limit, num_problems)
        return arithmetic_problems(n, seed, difficulty, split=split)
    raise DataError(f"unknown problem source {source!r}; valid names: {', '.join(SOURCES)}")
