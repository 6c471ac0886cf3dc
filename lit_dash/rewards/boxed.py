"""The answer a completion (or a MATH solution) commits to: the content of its last ``\\boxed{}``.

An answer parser, so it lives with the rewards; the MATH loader (:mod:`lit_dash.data.sources`) uses it
too, to take a reference answer out of a solution.
"""

from __future__ import annotations

import re

__all__ = ["last_boxed"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])(\s*)")
# ``\boxed 2`` (no braces, allowed by TeX for a single token) occurs in a few MATH solutions.
_BARE_RE = re.compile(r"[^\s$]+")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last balanced ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, or ``None``.

    Braces are matched with one left-to-right stack pass (linear time, so ``"\\boxed{" * 5000`` from a
    degenerate completion is cheap), and escaped braces ``\\{`` ``\\}`` are ignored so that set answers such
    as ``\\boxed{\\{1,2\\}}`` survive. An unclosed trailing box (a truncated completion) is skipped in favour
    of the last box that does close, which is the answer the model actually committed to. The brace-less
    TeX form ``\\boxed 2`` (a few MATH solutions use it) yields the single token after the space.
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    match_of: dict[int, int] = {}
    stack: list[int] = []
    n = len(text)
    for tok in _BRACE_TOKEN_RE.finditer(text):  # escapes (\{ \} \\) are consumed whole and ignored
        ch = tok.group(0)
        if ch == "{":
            stack.append(tok.start())
        elif ch == "}" and stack:
            match_of[stack.pop()] = tok.start()
    for m in reversed(list(_BOX_RE.finditer(text))):
        open_pos = m.end()
        if open_pos < n and text[open_pos] == "{":
            close_pos = match_of.get(open_pos)
            if close_pos is not None:
                return text[open_pos + 1 : close_pos].strip()
        elif m.group(1) and (bare := _BARE_RE.match(text, open_pos)):
            return bare.group(0).rstrip(".,;")  # ``\boxed 2``: whitespace, then one bare token
    return None
