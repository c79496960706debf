"""Decide whether an extracted answer equals the reference answer.

Three tests, cheapest first:
1. normalised strings are equal (LaTeX spacing, ``\\dfrac``, ``\\text{}``, ``$``, case);
2. when **both** sides read as plain numbers (integers, decimals, ``1,000``, ``3/4``,
   ``\\frac{3}{4}``, mixed numbers ``2\\frac{1}{2}``, percentages, currency and trailing unit
   words), the numeric comparison decides alone. Exact values compare exactly: integers and
   decimals (``1000001`` is not ``1000000``, ``2.0000001`` is not ``2``) and fractions. A
   tolerance, ``REL_TOL = 1e-6`` relative, applies only where a decimal approximates a fraction
   that has no finite decimal form: ``0.3333333`` is ``1/3`` while ``0.33``, ``0.333`` and
   ``0.3333`` are not. ``50%`` equals both ``50`` and ``0.5``;
3. otherwise symbolic equivalence (math_verify or sympy) under a hard deadline.
"""

from __future__ import annotations

import re
from fractions import Fraction

from jaxrlhf.rewards.answer_extraction import LATEX_THOUSANDS_SEP
from jaxrlhf.rewards.symbolic import symbolic_equal

REL_TOL = 1e-6
_MAX_NUMBER_CHARS = 64  # longer digit strings are not numbers we compare (or want to parse)

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;: ]|~")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])")
_DEC = r"(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+|\d+)(?:\.\d+)?|\.\d+"
_NUMBER_FORMS = [
    (re.compile(rf"({_DEC})"), lambda m: _dec(m[1])),
    (re.compile(rf"({_DEC})\s*/\s*({_DEC})"), lambda m: _div(_dec(m[1]), _dec(m[2]))),
    (
        re.compile(rf"\\frac\s*\{{\s*(-?)\s*({_DEC})\s*\}}\s*\{{\s*(-?)\s*({_DEC})\s*\}}"),
        lambda m: _div(_dec(m[2]), _dec(m[4])) * (-1 if (m[1] == "-") != (m[3] == "-") else 1),
    ),
    (re.compile(r"\\frac\s*(\d)\s*(\d)"), lambda m: _div(_dec(m[1]), _dec(m[2]))),
    (
        re.compile(r"(\d+)\s*\\frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}"),
        lambda m: _mixed(int(m[1]), int(m[2]), int(m[3])),
    ),
]
_UNITS_ATTACHED = r"cm|mm|km|m|kg|mg|g|ml|l|s|sec|min|hrs?|ft|mph|lbs?|oz"
_UNIT_WORDS_RE = re.compile(r"(.*?[\d}])\s+[A-Za-z][A-Za-z .'/-]*(?:\^\s*\{?\d\}?)?")
_UNIT_ATTACHED_RE = re.compile(rf"(.*?\d)(?:{_UNITS_ATTACHED})(?:\^\s*\{{?\d\}}?)?")
_VARIABLE = r"(?:[A-Za-z](?:_\{?\w+\}?)?|\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])*\s*\))"
_ASSIGNMENT_RES = (  # "x = 5", "(p,q) = (3,2)", and "5 = x"
    re.compile(rf"{_VARIABLE}\s*=\s*(.+)", re.S),
    re.compile(rf"(.+?)\s*=\s*{_VARIABLE}", re.S),
)
_LATEX_GROUP_RE = re.compile(rf"(?<=\d){LATEX_THOUSANDS_SEP}(?=\d{{3}}(?!\d))")  # read as ","


def _dec(text: str) -> Fraction:
    return Fraction(text.replace(",", "").replace(" ", ""))


def _div(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise ZeroDivisionError
    return a / b


def _mixed(whole: int, num: int, den: int) -> Fraction:
    if not 0 < num < den:
        raise ValueError("not a mixed number")
    return whole + Fraction(num, den)


def clean(answer: str) -> str:
    """Remove presentation: math delimiters, spacing commands, text wrappers, degrees."""
    s = answer.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[()\[\]]", "", s)
    s = _LATEX_GROUP_RE.sub(",", s)
    for _ in range(3):  # nested wrappers, innermost first
        s = _WRAPPER_RE.sub(r" \1", s)
    s = _SPACING_RE.sub(" ", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = _DEGREE_RE.sub("", s).replace("{,}", ",").replace("\\%", "%").replace("\u2212", "-")
    s = " ".join(s.split())
    return s.rstrip(".").strip()


def normalize(answer: str) -> str:
    """Canonical string form of a cleaned answer for exact matching."""
    s = answer.casefold()
    return re.sub(r"\s*([^\w\s])\s*", r"\1", s)


def strip_units(answer: str) -> tuple[str, bool]:
    """Drop currency, percent signs and trailing unit words; return (text, was_percent)."""
    s = answer.strip()
    percent = False
    m = re.fullmatch(r"(.*?)\s*(?:%|percent)", s, flags=re.I)
    if m:
        s, percent = m[1], True
    s = re.sub(r"^(?:usd|us\$|rs\.?|€|£|¥)\s*", "", s, flags=re.I)
    m = _UNIT_WORDS_RE.fullmatch(s) or _UNIT_ATTACHED_RE.fullmatch(s)
    if m:
        s = m[1]
    return s.strip(), percent


def parse_number(answer: str) -> tuple[Fraction, bool] | None:
    """``(value, was_percent)`` if a cleaned answer is a plain number, else None."""
    if len(answer) > 4 * _MAX_NUMBER_CHARS:  # keeps the unit regexes linear in practice
        return None
    s, percent = strip_units(answer)
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    sign = 1
    if s and s[0] in "+-":
        sign, s = (-1 if s[0] == "-" else 1), s[1:].lstrip()
    for pattern, convert in _NUMBER_FORMS:
        m = pattern.fullmatch(s)
        if m:
            try:
                return sign * convert(m), percent
            except (ValueError, ZeroDivisionError):
                return None
    return None


def _finite_decimal(x: Fraction) -> bool:
    """True if ``x`` has a finite decimal form (its denominator has no prime but 2 and 5)."""
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _approximates(x: Fraction, y: Fraction) -> bool:
    """``x``, a non-integer decimal, is ``y`` (with no finite decimal form) to ``REL_TOL``."""
    return (
        x.denominator != 1
        and _finite_decimal(x)
        and not _finite_decimal(y)
        and abs(x - y) <= REL_TOL * max(abs(x), abs(y))
    )


def values_match(x: Fraction, y: Fraction) -> bool:
    """Equal exactly, or one a decimal approximation of the other (see the module docstring)."""
    return x == y or _approximates(x, y) or _approximates(y, x)


def numbers_match(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    """:func:`values_match`, where a percentage may also be read as a fraction of 100."""
    xs = [a[0], a[0] / 100] if a[1] else [a[0]]
    ys = [b[0], b[0] / 100] if b[1] else [b[0]]
    return any(values_match(x, y) for x in xs for y in ys)


def _value_of(answer: str) -> str:
    """The value side of a one-variable assignment (``x = 5``, ``5 = x``), else ``answer``."""
    for pattern in _ASSIGNMENT_RES:
        m = pattern.fullmatch(answer.strip())
        if m:
            return m[1].strip()
    return answer


def _is_text(answer: str) -> bool:
    """Words, not maths: "Monday", "no solution" (so "evil" never equals "live" symbolically)."""
    return re.fullmatch(r"[A-Za-z]{3,}(?: [A-Za-z]+)*", answer) is not None


def answers_match(pred: str, gold: str, *, timeout: float = 5.0) -> bool:
    """True if the extracted answer ``pred`` equals the reference answer ``gold``."""
    p, g = clean(pred), clean(gold)
    if not p or not g:
        return False
    p_sym = pred.replace("\\$", "").replace("$", "").strip().rstrip(".")
    g_sym = gold.replace("\\$", "").replace("$", "").strip().rstrip(".")
    if "=" in p and "=" not in g:  # "x = 5" against "5"
        p, p_sym = _value_of(p), _value_of(p_sym)
    elif "=" in g and "=" not in p:  # "5" against "2 = y"... or "y = 5"
        g, g_sym = _value_of(g), _value_of(g_sym)
    if normalize(p) == normalize(g):
        return True
    p_num, g_num = parse_number(p), parse_number(g)
    if p_num is not None and g_num is not None:
        return numbers_match(p_num, g_num)
    if _is_text(p) or _is_text(g):
        return False
    # Symbolic: the unit-free text of a side that is a plain number, else the original LaTeX.
    if p_num is not None:
        p_sym = strip_units(p)[0]
    if g_num is not None:
        g_sym = strip_units(g)[0]
    return symbolic_equal(g_sym, p_sym, timeout=timeout)
