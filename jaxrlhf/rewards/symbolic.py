"""Symbolic equivalence of two answers, under a deadline that is really enforced.

The check uses ``math_verify`` when it is installed, else a small sympy fallback. Either can run
for ever on a pathological answer (``9^{9^{9^{9}}}`` asks for an astronomically large integer),
and math_verify's own timeout relies on ``signal.alarm``, which works only in the main thread and
cannot interrupt a long C-level computation. So :func:`symbolic_equal` runs the check in a helper
process (see :mod:`jaxrlhf.rewards.worker`) and kills it at the deadline; the next call starts a
fresh helper. Calls from several threads share one helper and are serialised.

Inside a :class:`~jaxrlhf.rewards.parallel.RewardPool` worker the pool already kills items that
outlive their deadline, so there the check runs in-process (:func:`run_inline`).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import threading
from fractions import Fraction
from typing import TYPE_CHECKING

from jaxrlhf.rewards.worker import Worker, WorkerError, WorkerTimeout

if TYPE_CHECKING:
    import sympy

log = logging.getLogger(__name__)

MAX_CHARS = 1000  # longer answers are not parsed symbolically (they are never short math)
HELPER_MEMORY_MB = 4096
HELPER_STARTUP_S = 120.0

_inline = False
_lock = threading.Lock()
_helper: Worker | None = None
_helper_pid = -1


def run_inline() -> None:
    """Run symbolic checks in this process from now on (the caller enforces deadlines)."""
    global _inline
    _inline = True


def warmup() -> None:
    """Import the symbolic backend now so that the first check does not pay for it."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        import sympy  # noqa: F401


def symbolic_equal(gold: str, pred: str, timeout: float = 5.0) -> bool:
    """True if ``pred`` is mathematically equivalent to ``gold``; False on timeout or error."""
    if not gold or not pred or len(gold) > MAX_CHARS or len(pred) > MAX_CHARS:
        return False
    if _inline:
        return equal_now(gold, pred, soft_timeout=max(1, math.ceil(timeout)))
    global _helper, _helper_pid
    with _lock:
        if _helper is None or _helper_pid != os.getpid() or not _helper.alive:
            _helper = None  # a helper inherited through fork belongs to the parent
            _helper = Worker("jaxrlhf.rewards.symbolic:equal_now", memory_limit_mb=HELPER_MEMORY_MB)
            _helper_pid = os.getpid()
            _helper.wait_ready(HELPER_STARTUP_S)
        try:
            soft = max(1, math.ceil(timeout))
            return bool(_helper.call(gold, pred, soft_timeout=soft, timeout=timeout))
        except WorkerTimeout:
            log.debug("symbolic check timed out after %g s", timeout)
        except (WorkerError, OSError) as e:  # equal_now catches errors: the helper died
            log.debug("symbolic check failed: %s", e)
            _helper.kill()
        _helper = None
        return False


def _close_helper() -> None:
    if _helper is not None and _helper_pid == os.getpid():
        _helper.close()


atexit.register(_close_helper)


def equal_now(gold: str, pred: str, soft_timeout: int | None = None) -> bool:
    """The unguarded check; call only where something else enforces a deadline."""
    try:
        import math_verify
    except ImportError:
        return _sympy_equal(gold, pred)
    if threading.current_thread() is not threading.main_thread():
        soft_timeout = None  # math_verify's signal-based timeout raises off the main thread
    try:
        gold_parsed = math_verify.parse(f"${plain_to_latex(gold)}$", parsing_timeout=soft_timeout)
        pred_parsed = math_verify.parse(f"${plain_to_latex(pred)}$", parsing_timeout=soft_timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=soft_timeout))
    except Exception:
        return False


equal_now.needs_symbolic = True  # type: ignore[attr-defined]


def _closing_paren(s: str, i: int) -> int:
    """Index of the ``)`` that closes the ``(`` at ``s[i]``, or -1."""
    depth = 0
    for j in range(i, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return j
    return -1


def plain_to_latex(s: str) -> str:
    """Calculator syntax as LaTeX: ``sqrt(3)`` -> ``\\sqrt{3}``, ``2**(1/4)`` -> ``2^{(1/4)}``.

    math_verify reads ``sqrt(3)`` in LaTeX as the letters s, q, r, t; text with a backslash is
    LaTeX already and is returned as is.
    """
    if "\\" in s or ("sqrt(" not in s and "**" not in s):
        return s
    s = s.replace("**", "^")
    out, i = [], 0
    while i < len(s):
        if s.startswith("sqrt(", i) or s.startswith("^(", i):
            head = 4 if s[i] == "s" else 1
            end = _closing_paren(s, i + head)
            if end < 0:
                return s
            inner = plain_to_latex(s[i + head + 1 : end])
            out.append(f"\\sqrt{{{inner}}}" if head == 4 else f"^{{({inner})}}")
            i = end + 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


# ---- sympy fallback -------------------------------------------------------------------------

_FUNCS = {"sqrt", "pi", "log", "ln", "exp", "sin", "cos", "tan"}
_EXACT_REL_TOL = 1e-12  # two exact values equal to double precision are one value
_SAFE_CHARS = re.compile(r"^[0-9A-Za-z+\-*/^().,\s]*$")


def _brace_arg(s: str, i: int) -> tuple[str, int] | None:
    """The ``{...}`` group (or single character) starting at ``s[i]`` and the index after it."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j], j + 1
    return None


def latex_to_plain(s: str) -> str | None:
    """A small LaTeX subset to sympy syntax; None when something unsupported remains."""
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:)", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s).replace("\\cdot", "*").replace("\\times", "*")
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i) or s.startswith("\\sqrt", i):
            is_frac = s.startswith("\\frac", i)
            i += 5
            root = None
            if not is_frac and i < len(s) and s[i] == "[":
                end = s.find("]", i)
                if end < 0:
                    return None
                root, i = s[i + 1 : end], end + 1
            first = _brace_arg(s, i)
            if first is None:
                return None
            a, i = first
            a = latex_to_plain(a)
            if a is None:
                return None
            if is_frac:
                second = _brace_arg(s, i)
                b = latex_to_plain(second[0]) if second else None
                if second is None or b is None:
                    return None
                out.append(f"(({a})/({b}))")
                i = second[1]
            elif root is not None:
                out.append(f"(({a})**(1/({root})))")
            else:
                out.append(f"sqrt({a})")
        elif s[i] == "\\":
            m = re.match(r"\\([A-Za-z]+)", s[i:])
            if not m or m.group(1) not in _FUNCS:
                return None
            out.append(m.group(1))
            i += m.end()
        else:
            out.append({"{": "(", "}": ")"}.get(s[i], s[i]))
            i += 1
    return "".join(out)


def _numbers_close(a: sympy.Expr, b: sympy.Expr) -> bool:
    """Two numbers that ``simplify`` found different, under the rule of
    :func:`~jaxrlhf.rewards.answer_matching.values_match`: equal only where one is a decimal
    that approximates a value with no finite decimal form (1/3, sqrt(2)); integers and finite
    decimals compare exactly."""
    from jaxrlhf.rewards.answer_matching import REL_TOL, values_match  # it imports this module

    if (a.is_Float and b.is_Float) or (a.is_rational and b.is_rational):
        return False  # two different decimals, or two different fractions
    if not (a.is_Float or b.is_Float):  # exact, one irrational: simplify() may miss the identity
        x, y = complex(a.evalf(30)), complex(b.evalf(30))
        return abs(x - y) <= _EXACT_REL_TOL * max(abs(x), abs(y))
    decimal, other = (a, b) if a.is_Float else (b, a)
    if other.is_rational:
        return values_match(Fraction(str(decimal)), Fraction(int(other.p), int(other.q)))
    x, y = complex(decimal), complex(other.evalf())
    return abs(x - y) <= REL_TOL * max(abs(x), abs(y))


def _sympy_equal(gold: str, pred: str) -> bool:
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = (*standard_transformations, implicit_multiplication_application, convert_xor)

    def to_expr(text: str) -> sympy.Expr | None:
        plain = latex_to_plain(text.strip().strip("$"))
        if plain is None or not _SAFE_CHARS.match(plain) or "__" in plain:
            return None
        if re.search(r"\d\s+\d", plain):
            return None  # "12 1" is not 12*1
        names = set(re.findall(r"[A-Za-z]+", plain))
        if any(len(n) > 1 and n not in _FUNCS for n in names):
            return None  # only single-letter variables and known functions reach eval
        local = {n: sympy.Symbol(n) for n in names if len(n) == 1}
        local.update(pi=sympy.pi, ln=sympy.log, E=sympy.E)
        try:
            return parse_expr(plain, local_dict=local, transformations=transformations)
        except Exception:
            return None

    a, b = to_expr(gold), to_expr(pred)
    if a is None or b is None:
        return False
    try:
        if sympy.simplify(a - b) == 0:
            return True
        if a.is_number and b.is_number:
            return _numbers_close(a, b)
    except Exception:
        return False
    return False
