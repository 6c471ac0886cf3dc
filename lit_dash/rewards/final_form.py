"""Is an answer in final form, or does it leave arithmetic for the verifier to do?

math_verify decides *equivalence*: ``\\boxed{23 + 73}`` equals the reference ``96``, because SymPy does the
addition. For a reward that is a hole: a policy that restates the question inside the box is "right" on
every problem without learning any arithmetic (measured: the fp32 demo collapsed into exactly that). So the
default reward also asks for *final form*: no arithmetic left between plain numbers.

What counts as arithmetic left, on math_verify's own (unevaluated) parse of the answer:

* a sum or product with two or more plain numbers among its terms (``23 + 73``, ``20 \\times 4 + 16``,
  ``1 + 2 + \\sqrt{3}``), except a negation (``-4``) and a division of two integers (judged from the text,
  below);
* a power of two plain numbers with an integer exponent (``2^{10}``), or a root that SymPy would simplify
  (``\\sqrt{8}`` is ``2\\sqrt{2}``; ``\\sqrt{3}`` is already final).

A plain number is an integer, a decimal or a rational. Symbols, constants (``\\pi``), roots that do not
simplify and units are not plain numbers, so ``x^2+1``, ``\\frac{\\sqrt{3}}{2}``, ``3\\pi``, ``10\\text{ cm}``,
``\\$18`` and ``50\\%`` are final.

A division of two integers never reaches SymPy as a division: latex2sympy folds ``\\frac{144}{2}``,
``144 \\div 2``, ``144/2`` and ``144:2`` into the number 72 while it parses, so the tree above cannot tell
them from ``72``. They are therefore read from the answer's *text*: the LaTeX that math_verify normalised
and then parsed (the second item of what ``math_verify.parse`` returns: ``\\dfrac``, ``\\frac12`` and a bare
``6/4`` already rewritten as ``\\frac{..}{..}``, units dropped). :func:`divisions_left` counts, between two
integer literals:

* a fraction (``\\frac{p}{q}``, ``p/q``, ``{p \\over q}``) or a ratio (``p:q``) that is not in lowest terms
  or whose value is an integer: ``\\frac{6}{4}`` (say ``\\frac{3}{2}``), ``\\frac{144}{2}`` (say ``72``),
  ``\\frac{5}{1}``. A fraction in lowest terms (``\\frac{3}{4}``, ``3/4``, ``-\\frac{1}{2}``) is a final
  form, and so is a mixed number (``2\\frac{1}{2}``);
* every ``\\div`` or ``÷``, reduced or not: it is an instruction to divide, not a way to write a number.

``\\text{...}`` is skipped (words are not arithmetic). A division with a decimal (``1.5/3``) needs no text:
SymPy keeps it as a product, counted above.

An equation counts by its right-hand side (``23 + 73 = 96`` shows the work and commits to 96, as ``x = 5``
commits to 5); in the text that is what follows the last ``=`` of each comma-separated part. The answer is
compared with its reference: it is final when it leaves no more arithmetic than the reference itself does
(a MATH reference such as ``2^{10}`` accepts ``2^{10}``, and ``\\frac{6}{4}`` accepts ``\\frac{6}{4}``).
Nodes are counted, never evaluated, except a root of a number below ``_MAX_ROOT_BASE``, and the text is
read by linear-time regular expressions, so no answer can make this check slow.
"""

from __future__ import annotations

import math
import re
from typing import Any

_MAX_ROOT_BASE = 10**12  # a root of a larger number is never evaluated (and counted as final)

# Words and unit names inside \text{...} (math_verify keeps those it does not drop as units) are not math.
_TEXT_GROUP = re.compile(r"\\(?:text[a-z]*|mbox|mathrm)\s*\{[^{}]*\}")
# Where the next part of a list, tuple or system starts (each part's equation counts by its right side).
_PART = re.compile(r"[,;]")
# \frac{p}{q} of two integer literals (math_verify has already rewritten \dfrac, \tfrac and \frac12).
_FRAC = re.compile(r"\\frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}")
# p / q, p : q, {p \over q}, p \div q, p ÷ q between integer literals: not part of a decimal, a power's
# exponent or a factorial (``1.5/3``, ``2^6/4``, ``6/4!`` are other nodes, or other arithmetic).
_OPERATOR = re.compile(
    r"(?<![\d.^_])(\d+)\s*(/|:|\\over(?![a-zA-Z])|\\div(?![a-zA-Z])|÷)\s*(-?\d+)(?![\d.^!])"
)
_ALWAYS_ARITHMETIC = ("\\div", "÷")


def _sympy():
    import sympy

    return sympy


def _is_plain(e: Any) -> bool:
    """An integer, decimal or rational literal, its negation, or the reciprocal of one."""
    sp = _sympy()
    if isinstance(e, (sp.Rational, sp.Float)):
        return True
    if isinstance(e, sp.Mul) and len(e.args) == 2 and sp.S.NegativeOne in e.args:
        return all(_is_plain(a) for a in e.args)
    if isinstance(e, sp.Pow) and e.exp == -1:
        return isinstance(e.base, (sp.Rational, sp.Float))
    return False


def _is_negation_or_division(e: Any) -> bool:
    sp = _sympy()
    if len(e.args) != 2:
        return False
    if sp.S.NegativeOne in e.args:
        return True
    a, b = e.args
    integer = lambda x: isinstance(x, sp.Integer)  # noqa: E731
    reciprocal = lambda x: isinstance(x, sp.Pow) and x.exp == -1 and integer(x.base)  # noqa: E731
    return (integer(a) and reciprocal(b)) or (integer(b) and reciprocal(a))


def _node_is_arithmetic(e: Any) -> bool:
    sp = _sympy()
    if isinstance(e, sp.Add):
        return sum(_is_plain(a) for a in e.args) >= 2
    if isinstance(e, sp.Mul):
        return sum(_is_plain(a) for a in e.args) >= 2 and not _is_negation_or_division(e)
    if isinstance(e, sp.Pow):
        base, exp = e.args
        if not (_is_plain(base) and _is_plain(exp)):
            return False
        if isinstance(exp, sp.Integer):
            return exp != -1  # a reciprocal is a fraction, 2^{10} is arithmetic
        if isinstance(exp, sp.Rational) and isinstance(base, sp.Integer) and abs(base) < _MAX_ROOT_BASE:
            return sp.srepr(sp.Pow(base, exp)) != sp.srepr(e)  # does SymPy simplify the root?
        return False
    return False


def arithmetic_left(expr: Any) -> int:
    """How many nodes of an unevaluated SymPy expression are arithmetic between plain numbers."""
    sp = _sympy()
    if not isinstance(expr, sp.Basic):
        return 0
    count = 0
    stack = [expr]
    while stack:
        node = stack.pop()
        if not isinstance(node, sp.Basic):
            continue
        if isinstance(node, sp.Equality):  # ``23 + 73 = 96`` commits to its right-hand side, like x = 5
            stack.append(node.rhs)
            continue
        count += _node_is_arithmetic(node)
        stack.extend(node.args)
    return count


def _unreduced(numerator: str, denominator: str) -> bool:
    """Whether the integer fraction ``numerator/denominator`` still has a division to do: it is not in
    lowest terms (``6/4``), or its value is an integer (``144/2``, ``5/1``, ``0/3``)."""
    p, q = int(numerator), int(denominator)
    return math.gcd(p, q) != 1 or abs(q) == 1


def divisions_left(latex: str) -> int:
    """How many divisions between two integer literals the (math_verify-normalised) LaTeX leaves undone.

    latex2sympy folds these into one number while it parses, so they are counted here, on the text: a
    fraction or ratio that is not in lowest terms or is an integer (``\\frac{144}{2}``, ``6/4``, ``2:4``), and
    every ``\\div`` or ``÷``. ``\\text{...}`` is skipped, and in an equation only the right-hand side of each
    comma-separated part counts (``\\frac{144}{2} = 72`` commits to 72).
    """
    if not isinstance(latex, str):
        return 0
    count = 0
    for part in _PART.split(_TEXT_GROUP.sub(" ", latex)):
        rhs = part.rsplit("=", 1)[-1]
        count += sum(_unreduced(p, q) for p, q in _FRAC.findall(rhs))
        count += sum(op in _ALWAYS_ARITHMETIC or _unreduced(p, q) for p, op, q in _OPERATOR.findall(rhs))
    return count


def _total_left(parse: list) -> int:
    """Arithmetic left in one ``math_verify.parse`` result: the SymPy tree's nodes plus the text's divisions."""
    if not parse:
        return 0
    text = parse[1] if len(parse) > 1 else None
    return arithmetic_left(parse[0]) + divisions_left(text)


def is_final_form(answer_parse: list, reference_parse: list) -> bool:
    """Whether math_verify's parse of an answer leaves no more arithmetic than the reference's parse.

    Both arguments are what ``math_verify.parse`` returns: a list whose first item is the unevaluated
    SymPy expression, then the normalised LaTeX it was parsed from (read for the integer divisions that
    the parse has already folded).
    """
    return _total_left(answer_parse) <= _total_left(reference_parse)
