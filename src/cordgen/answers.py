"""Reading the final answer out of a teacher's answer text."""

from __future__ import annotations

import re

FINAL_ANSWER_IS = re.compile(r"final answer is[:\s]*(.+?)\s*\.?\s*$", re.IGNORECASE | re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced (LaTeX answers nest them)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i].strip()
            depth -= 1
    return None


def extract_answer(text: str) -> str | None:
    """`\\boxed{}` if present, else what follows 'final answer is' on the last line, else the last
    non-empty line; None for an empty answer."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    stated = FINAL_ANSWER_IS.search(lines[-1])
    return stated.group(1).strip() if stated else lines[-1]
