"""The one record type every prompt source produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One math problem, normalised across datasets.

    ``question`` is the raw problem text (no chat template, no instruction); ``answer`` is the reference
    final answer that the reward compares against; ``solution`` is a worked solution when the dataset has
    one (used by the SFT baseline); ``source_id`` names where the row came from (``"gsm8k_test.jsonl:12"``).
    """

    question: str
    answer: str
    source_id: str
    solution: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
