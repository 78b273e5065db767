"""Module-name patterns shared by quantisation and LoRA: globs that match on dot boundaries.

``feed_forward.w_1`` matches ``encoder.encoders.0.feed_forward.w_1`` but not ``...feed_forward.w_10``;
``*.self_attn.linear_*`` matches any attention projection. A pattern may match a full name or any
dot-separated suffix of it, like peft's ``target_modules``.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Sequence


def name_matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def any_match(name: str, patterns: Iterable[str]) -> bool:
    return any(name_matches(name, p) for p in patterns)


def patterns_to_regex(patterns: Sequence[str]) -> str:
    """One full-match regex equivalent to ``any_match`` (peft takes a string as a full-match regex)."""
    alternatives = []
    for p in patterns:
        body = fnmatch.translate(p)[len("(?s:"):-len(")\\Z")]
        alternatives.append(f"(?:.*\\.)?(?:{body})")
    return "^(?:" + "|".join(alternatives) + ")$"


def check_regex(patterns: Sequence[str], names: Iterable[str]) -> None:
    """Guard: the regex handed to peft selects exactly what ``any_match`` selects."""
    rx = re.compile(patterns_to_regex(patterns))
    for n in names:
        assert bool(rx.match(n)) == any_match(n, patterns), n
