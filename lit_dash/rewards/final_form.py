"""Is an answer in final form, or does it leave arithmetic for the verifier to do?

math_verify decides *equivalence*: ``\\boxed{23 + 73}`` equals the reference ``96``, because SymPy does the
addition. For a reward that is a hole: a policy that restates the question inside the box is "right" on
every problem without learning any arithmetic (measured: the fp32 demo collapsed into exactly that). So the
default reward also asks for *final form*: no arithmetic left between plain numbers.

What counts as arithmetic left, on math_verify's own (unevaluated) parse of the answer:

* a sum or product with two or more plain numbers among its terms (``23 + 73``, ``20 \\times 4 + 16``,
  ``1 + 2 + \\sqrt{3}``), except a negation (``-4``) and a fraction written as a division of two integers;
* a power of two plain numbers with an integer exponent (``2^{10}``), or a root that SymPy would simplify
  (``\\sqrt{8}`` is ``2\\sqrt{2}``; ``\\sqrt{3}`` is already final).

A plain number is an integer, a decimal or a rational. Symbols, constants (``\\pi``), roots that do not
simplify and units are not plain numbers, so ``x^2+1``, ``\\frac{\\sqrt{3}}{2}``, ``3\\pi``, ``10\\text{ cm}``,
``\\$18`` and ``50\\%`` are final. Integer fractions arrive already folded into one rational
(``\\frac{6}{4}``), so a simple fraction is final whether or not it is reduced.

An equation counts by its right-hand side (``23 + 73 = 96`` shows the work and commits to 96, as ``x = 5``
commits to 5). The answer is compared with its reference: it is final when it leaves no more arithmetic than the reference
itself does (a MATH reference such as ``2^{10}`` accepts ``2^{10}``). Nodes are counted, never evaluated,
except a root of a number below ``_MAX_ROOT_BASE``, so no answer can make this check slow.
"""

from __future__ import annotations

from typing import Any

_MAX_ROOT_BASE = 10**12  # a root of a larger number is never evaluated (and counted as final)


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


def is_final_form(answer_parse: list, reference_parse: list) -> bool:
    """Whether math_verify's parse of an answer leaves no more arithmetic than the reference's parse.

    Both arguments are what ``math_verify.parse`` returns (a list whose first item is the unevaluated
    SymPy expression, then the normalised string).
    """
    answer_expr = answer_parse[0] if answer_parse else None
    reference_expr = reference_parse[0] if reference_parse else None
    return arithmetic_left(answer_expr) <= arithmetic_left(reference_expr)
