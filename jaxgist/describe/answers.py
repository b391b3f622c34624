"""Validators for answers: the JSON an LLM was asked for, found in what it wrote; BadAnswer otherwise.

    validate = answers.string_list(n=10)          # a JSON list of 10 non-empty strings (code fences ok)
    answers.json_value('Sure: ```json\\n["a", "b"]\\n```')   # -> ["a", "b"]
    answers.one_line(max_words=20)("A bird with...")         # one stripped line, at most 20 words
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from jaxgist.describe.client import BadAnswer

FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def json_value(text: str) -> Any:
    """The JSON value in ``text``: the whole text, a fenced code block, or the outermost [...] / {...}."""
    candidates = [text.strip()] + [m.strip() for m in FENCE.findall(text)]
    for opener, closer in ("[]", "{}"):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    raise BadAnswer(f"no JSON in the answer: {text[:120]!r}")


def string_list(n: int | None = None, min_items: int = 1) -> Callable[[str], list[str]]:
    """A validator: a JSON list of non-empty strings (stripped, duplicates dropped), exactly ``n`` if given
    (more are cut to ``n``; fewer is a BadAnswer), at least ``min_items``."""

    def validate(text: str) -> list[str]:
        value = json_value(text)
        if isinstance(value, dict) and len(value) == 1:  # {"descriptions": [...]}
            value = next(iter(value.values()))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadAnswer(f"not a JSON list of strings: {text[:120]!r}")
        items = list(dict.fromkeys(v.strip() for v in value if v.strip()))
        need = max(min_items, n or 0)
        if len(items) < need:
            raise BadAnswer(f"{len(items)} distinct non-empty strings, wanted {need}: {text[:120]!r}")
        return items[:n] if n else items

    return validate


def one_line(max_words: int | None = None) -> Callable[[str], str]:
    """A validator: the answer as one line (quotes and a "Caption:" label dropped), at most ``max_words``."""

    def validate(text: str) -> str:
        line = " ".join(text.split())
        line = re.sub(r"^(?:caption|summary|description)\s*:\s*", "", line, flags=re.I).strip().strip('"\'')
        if not line:
            raise BadAnswer("empty answer")
        if max_words is not None and len(line.split()) > max_words:
            raise BadAnswer(f"{len(line.split())} words, at most {max_words} wanted: {line[:120]!r}")
        return line

    return validate
