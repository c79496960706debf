"""Find the final answer in a model response or a reference solution.

Order for a response (the first rule that applies wins):
1. if the response closes a ``</think>`` block, only the text after it is searched; inside it, the
   last ``<answer>...</answer>`` block if there is one;
2. the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; ``\\boxed 5`` too). When the last
   one is unbalanced the response is malformed and has no answer;
3. the text after the last GSM8K ``####`` marker, to the end of its line;
4. the text after the last "answer is" / "answer:" to the end of its sentence;
5. the last number (or ``\\frac{a}{b}``) in the text.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|answer)\s*(?:is\b|:|=)\s*:?", re.I)
_NUMBER_RE = re.compile(
    r"\\[dt]?frac\{[^{}]{1,40}\}\{[^{}]{1,40}\}"
    r"|(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?![\d.]))?"
)


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


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].strip().split("\n", 1)[0]
    # End of sentence: a period, or a comma followed by a space ("$18, which is ...").
    rest = re.split(r"\.(?=\s|$)|,\s", rest, maxsplit=1)[0]
    rest = rest.replace("**", "").strip()
    return rest or None


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
    for rule in (_after_marker, _after_answer_is):
        found = rule(text)
        if found:
            return found
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


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
