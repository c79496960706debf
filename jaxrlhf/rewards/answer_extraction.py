"""Find the final answer in a model response or a reference solution.

Order for a response (the first rule that applies wins):
1. if the response closes a ``</think>`` block, only the text after it is searched; inside it, the
   last ``<answer>...</answer>`` block if there is one;
2. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; ``\\boxed 5`` too). When the last
   one is unbalanced the response is malformed and has no answer;
3. the text after the last GSM8K ``####`` marker, to the end of its line;
4. after the last "answer is" / "answer:": a math span that starts there (``$...$``, ``\\(...\\)``,
   ``\\[...\\]``) whole, else the text to the end of its sentence; a sentence of words
   ("Janet makes $18 every day.") gives its last number instead;
5. a short response that is itself an answer ("-1 + sqrt(3)", "2 000"), as is;
6. the last math span when no number follows it, else the last number (``\\frac{a}{b}``,
   ``2/3``, ``1\\,234``, ``40%`` included).
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|answer)\s*(?:is\b|:|=)\s*:?", re.I)
_FRAC_ARG = r"(?:\{[^{}]{1,40}\}|\d)"
# Thousands separators written in LaTeX: 1\,234  1{,}234  1,\!234  1\ 234  1~234.
LATEX_THOUSANDS_SEP = r"(?:,\\!|\\,|\\!|\{,\}|\\ |~)"
_GROUP_SEP = rf"(?:{LATEX_THOUSANDS_SEP}|,| )"
_NUMBER_RE = re.compile(
    r"(?=[-\\\d.])(?:"  # the lookahead lets the scan skip the letters fast
    rf"-?\\[dtc]?frac{_FRAC_ARG}{_FRAC_ARG}"
    rf"|(?<![\w.])-?(?:(?:\d{{1,3}}(?:{_GROUP_SEP}\d{{3}}(?!\d))+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*\d+(?!\d|\.\d))?(?:\s*\\?%)?)"
)
# A math span: $$...$$, \[...\], \(...\) or $...$ on one line (a lone "$18" is currency). The
# length bound keeps a response of 20,000 unclosed "\[" linear: no answer is that long.
_SPAN = r"(.{1,300}?)"
_MATH_SPAN_RE = re.compile(
    rf"\$\${_SPAN}\$\$|\\\[{_SPAN}\\\]|\\\({_SPAN}\\\)|\$([^$\n]{{1,300}}?)\$(?!\d)", re.S
)
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|$)|,\s")  # "42!" is excited, rarely 42 factorial
_WORDS_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}")  # a sentence
_LEADING_WORD_RE = re.compile(r"[A-Za-z]{2,}\s")  # "an $1,234$ dollars", not "x = 4"
_PLAIN_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_MATH_WORDS = {"sqrt", "frac", "pi", "log", "ln", "exp", "sin", "cos", "tan", "infty", "cup"}
_MATH_WORDS |= {"pmatrix", "bmatrix", "vmatrix", "matrix", "array", "cases"}  # \begin{...}
_BARE_MAX_CHARS = 60
_BARE_RE = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_BARE_HINT_RE = re.compile(r"\\|\*\*|\^|\b(?:sqrt|log|ln|exp|sin|cos|tan|pi)\(")


def _box_content(text: str, m: re.Match[str]) -> str | None:
    """Content of the box whose ``\\boxed`` keyword is ``m``; None if it is unbalanced."""
    i = m.end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        return None
    token = re.match(r"[^\s$]+", text[i:])  # "\boxed 5": the token up to a space or '$'
    return token.group(0) if token and i > m.end() else None


def box_matches(text: str) -> list[re.Match[str]]:
    """Every ``\\boxed`` / ``\\fbox`` keyword in ``text``."""
    return list(_BOX_RE.finditer(text))


def last_boxed(text: str) -> str | None:
    """The last boxed answer, or None if there is none or the last one is unbalanced.

    Only the last box is scanned, so a degenerate response with thousands of unclosed boxes
    still costs linear time.
    """
    last = None
    for last in _BOX_RE.finditer(text):  # noqa: B007 - we want the final match
        pass
    return _box_content(text, last) if last is not None else None


def _after_marker(text: str) -> str | None:
    if "####" not in text:
        return None
    line = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
    return line.strip() or None


def _span_text(m: re.Match[str]) -> str:
    return next(g for g in m.groups() if g is not None).strip()


def _is_math_like(text: str) -> bool:
    """No plain words beyond maths names ("sqrt", "pi"): an answer, not a sentence."""
    return all(w.casefold() in _MATH_WORDS for w in _PLAIN_WORD_RE.findall(text))


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip(" *")
    span = _MATH_SPAN_RE.match(rest)
    if span:  # "The final answer is \((-6, 10)\)": the whole span, commas included
        return _span_text(span) or None
    rest = rest.split("\n", 1)[0]
    # End of sentence: . ! or ?, or a comma followed by a space ("$18, which is ...").
    rest = _SENTENCE_END_RE.split(rest, maxsplit=1)[0]
    rest = rest.replace("**", "").strip()
    if _WORDS_RE.search(rest) or _LEADING_WORD_RE.match(rest):
        # "Janet makes $18 every day": its last number; "no real solution": the words.
        return _last_span_or_number(rest) or rest
    return rest or None


def _bare_answer(text: str) -> str | None:
    """A short response that is only an expression (``-1 + sqrt(3)``, ``2**(1/4)``) or a number
    grouped by spaces (``2 000``). Anything else, ``3+4=7`` included, is left to the last-number
    rule, so the common short numeric response never reaches the symbolic check."""
    s = text.strip().rstrip(".")
    if not s or len(s) > _BARE_MAX_CHARS or "\n" in s or "=" in s or not _is_math_like(s):
        return None
    return s if _BARE_RE.fullmatch(s) or _BARE_HINT_RE.search(s) else None


def _last_span_or_number(text: str) -> str | None:
    """The last math span unless a number follows it; else the last number."""
    numbers = list(_NUMBER_RE.finditer(text))
    spans = []
    if "$" in text or "\\(" in text or "\\[" in text:  # most plain prose has none: skip the scan
        spans = [m for m in _MATH_SPAN_RE.finditer(text) if _is_math_like(_span_text(m))]
    if spans and (not numbers or numbers[-1].end() <= spans[-1].end()):
        return _span_text(spans[-1]) or None
    return numbers[-1].group(0).strip() if numbers else None


def extract_answer(response: str, *, boxed_only: bool = False) -> str | None:
    """The final answer string of a model response, or None if it has none.

    ``boxed_only`` applies rules 1 and 2 only.
    """
    text = response
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        text = tags[-1]
    if _BOX_RE.search(text):
        boxed = last_boxed(text)
        return (boxed.strip() or None) if boxed is not None else None
    if boxed_only:
        return None
    for rule in (_after_marker, _after_answer_is, _bare_answer, _last_span_or_number):
        found = rule(text)
        if found:
            return found
    return None


def extract_reference(answer: str) -> str:
    """The final answer of a reference: GSM8K ``#### 42`` text, a boxed solution, or as is."""
    marked = _after_marker(answer)
    if marked is not None:
        return marked
    if _BOX_RE.search(answer):
        boxed = last_boxed(answer)
        if boxed:
            return boxed.strip()
    return answer.strip()
