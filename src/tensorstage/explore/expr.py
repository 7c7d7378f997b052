"""Safe arithmetic expressions for derived parameters, constraints and objectives of a space file.

Why: a space file is data a user may have downloaded; ``eval`` of its text would run arbitrary
Python. Expressions are parsed with :mod:`ast` and only a small whitelist of node types is
compiled (numbers, strings, names, ``model.attr`` style dotted names, arithmetic, comparisons, ``and``/``or``
/``not``, ``a if c else b`` and calls of the functions in :data:`FUNCTIONS`). Anything else is a
one-line :class:`SpecError` naming the expression's field.

The compiled closure works on Python scalars and on numpy arrays alike (``and``/``or``/``not`` and
``if``/``else`` map to their element-wise numpy forms), so the pre-screen evaluates constraints over
thousands of candidates in one call.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorstage.errors import SpecError

Env = Mapping[str, Any]
Fn = Callable[[Env], Any]


def _log2(x: Any) -> Any:
    return np.log2(x)


def _is_pow2(x: Any) -> Any:
    a = np.asarray(x)
    ai = a.astype(np.int64)
    return np.logical_and(ai > 0, (ai & (ai - 1)) == 0) & (ai == a)


def _divides(a: Any, b: Any) -> Any:
    """``a`` divides ``b`` exactly (both integers)."""
    a, b = np.asarray(a), np.asarray(b)
    return np.logical_and(a != 0, np.mod(b, np.where(a == 0, 1, a)) == 0)


#: Functions an expression may call; each works on scalars and on numpy arrays.
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": np.minimum,
    "max": np.maximum,
    "abs": np.abs,
    "ceil": np.ceil,
    "floor": np.floor,
    "log2": _log2,
    "sqrt": np.sqrt,
    "is_pow2": _is_pow2,
    "divides": _divides,
}

def _by_zero_nan(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``op`` with a zero divisor giving NaN (so ``x % 0 == 0`` is false and ``gpus // 0`` fails
    every constraint) instead of raising midway through a vectorised pass."""
    def safe(a: Any, b: Any) -> Any:
        bz = np.asarray(b) == 0
        if not bz.any():
            return op(a, b)
        with np.errstate(all="ignore"):
            out = op(np.asarray(a, dtype=float), np.where(bz, 1, b))
        return np.where(bz, np.nan, out)
    return safe


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: _by_zero_nan(operator.truediv),
    ast.FloorDiv: _by_zero_nan(operator.floordiv), ast.Mod: _by_zero_nan(operator.mod), ast.Pow: operator.pow,
}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}


@dataclass(frozen=True)
class Expr:
    """A compiled expression: its source text, the names it reads, and the closure."""

    text: str
    names: frozenset[str]
    fn: Fn

    def __call__(self, env: Env) -> Any:
        return self.fn(env)


def compile_expr(text: str | int | float, field: str) -> Expr:
    """Parse and compile ``text``; a syntax error or a disallowed construct is a :class:`SpecError`
    on ``field``. Numbers are accepted as constant expressions."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise SpecError(field, f"expected an expression string or a number, got {text!r}")
    src = str(text)
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as exc:
        raise SpecError(field, f"cannot parse expression {src!r}: {exc.msg}") from None
    names: set[str] = set()
    fn = _compile(tree.body, field, src, names)
    return Expr(src, frozenset(names), fn)


def _dotted(node: ast.AST) -> str | None:
    """``model.num_heads`` -> ``"model.num_heads"``; ``None`` for anything but names and attributes."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _compile(node: ast.AST, field: str, src: str, names: set[str]) -> Fn:  # noqa: C901 - one case per node type
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        value = node.value
        return lambda env: value
    if isinstance(node, ast.Constant) and isinstance(node.value, bool | str):
        value = node.value
        return lambda env: value
    if isinstance(node, ast.Name | ast.Attribute):
        name = _dotted(node)
        if name is None or "__" in name:
            raise SpecError(field, f"only names like x or model.attr may be read in {src!r}")
        names.add(name)

        def read(env: Env, name: str = name) -> Any:
            try:
                return env[name]
            except KeyError:
                raise SpecError(field, f"unknown name {name!r} in {src!r}", sorted(env)) from None
        return read
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        op, a, b = _BINOPS[type(node.op)], _compile(node.left, field, src, names), _compile(node.right, field, src, names)
        return lambda env: op(a(env), b(env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd | ast.Not):
        inner = _compile(node.operand, field, src, names)
        if isinstance(node.op, ast.USub):
            return lambda env: -inner(env)
        if isinstance(node.op, ast.Not):
            return lambda env: np.logical_not(inner(env))
        return inner
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v, field, src, names) for v in node.values]
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or

        def boolop(env: Env) -> Any:
            out = parts[0](env)
            for p in parts[1:]:
                out = combine(out, p(env))
            return out
        return boolop
    if isinstance(node, ast.Compare) and all(type(o) in _CMPOPS for o in node.ops):
        terms = [_compile(node.left, field, src, names)] + [_compile(c, field, src, names) for c in node.comparators]
        ops = [_CMPOPS[type(o)] for o in node.ops]

        def compare(env: Env) -> Any:
            vals = [t(env) for t in terms]
            out = ops[0](vals[0], vals[1])
            for i in range(1, len(ops)):
                out = np.logical_and(out, ops[i](vals[i], vals[i + 1]))
            return out
        return compare
    if isinstance(node, ast.IfExp):
        c, a, b = (_compile(x, field, src, names) for x in (node.test, node.body, node.orelse))
        return lambda env: np.where(c(env), a(env), b(env))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        fname = node.func.id
        if fname not in FUNCTIONS:
            raise SpecError(field, f"function {fname!r} is not allowed in {src!r}", sorted(FUNCTIONS))
        func = FUNCTIONS[fname]
        args = [_compile(a, field, src, names) for a in node.args]
        if fname in ("min", "max") and len(args) > 2:
            def fold(env: Env) -> Any:
                out = args[0](env)
                for a in args[1:]:
                    out = func(out, a(env))
                return out
            return fold
        return lambda env: func(*(a(env) for a in args))
    what = type(node).__name__
    raise SpecError(field, f"{what} is not allowed in expressions ({src!r}); use numbers, names, "
                    "arithmetic, comparisons, and/or/not, x if c else y and the listed functions",
                    sorted(FUNCTIONS))


def scalar(value: Any) -> float | int | bool:
    """A 0-d numpy result as a plain Python number (ints stay ints when whole)."""
    v = value.item() if isinstance(value, np.ndarray | np.generic) else value
    if isinstance(v, float) and v.is_integer() and math.isfinite(v):
        return int(v)
    return v
