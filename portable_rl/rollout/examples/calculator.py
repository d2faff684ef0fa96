"""A calculator tool: evaluates an arithmetic expression with a small parser over Python's ``ast``.

``calculate(text) -> str`` accepts numbers (integers, decimals), ``+ - * / // % **``, unary ``+ -`` and
parentheses; anything else (names, calls, attributes, strings, comparisons) raises ``CalculatorError``. It never
calls ``eval``, imports nothing at run time and touches no file or network. Bounds keep a hostile expression
cheap: at most ``MAX_CHARS`` characters, exponents of at most ``MAX_EXPONENT`` in size, and no intermediate value
above ``MAX_VALUE`` in size. Results print as integers when they are whole (``"12"``, not ``"12.0"``).
"""

from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 200
MAX_EXPONENT = 64
MAX_VALUE = 1e15


class CalculatorError(ValueError):
    """The expression is not arithmetic the calculator evaluates; the message says why."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _bounded(value: float) -> float:
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_VALUE:
        raise CalculatorError(f"result out of range (more than {MAX_VALUE:g} in size)")
    return value


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right:g} is larger than {MAX_EXPONENT}")
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError(f"result out of range (more than {MAX_VALUE:g} in size)") from None
    raise CalculatorError(f"unsupported syntax: {type(node).__name__}")


def calculate(text: str) -> str:
    """The value of the arithmetic expression ``text``, as text; ``CalculatorError`` if it is not one."""
    expr = text.strip().replace("×", "*").replace("÷", "/")
    if not expr:
        raise CalculatorError("empty expression")
    if len(expr) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise CalculatorError(f"not an arithmetic expression ({exc.msg})") from None
    value = _value(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"
