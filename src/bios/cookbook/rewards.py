"""Verifiable rewards: code that checks a reply, on a 0-1 scale."""

from __future__ import annotations

import re

_INT = re.compile(r"-?\d+")
_BARE_INT = re.compile(r"-?\d+\.?")


def is_bare_integer(reply: str) -> bool:
    """True when the reply is one integer and nothing else (a trailing period allowed)."""
    return _BARE_INT.fullmatch(reply.strip()) is not None


def last_integer(reply: str) -> int | None:
    """The last integer written in the reply, or None."""
    found = _INT.findall(reply)
    return int(found[-1]) if found else None


def arithmetic_reward(reply: str, answer: int) -> float:
    """0.5 for the strict format (only the number) + 0.5 for the right number.

    The right number is the reply's last integer, so "3 + 4 = 7" earns the correctness half and
    "7" earns both; the format half is what a small model learns first.
    """
    return 0.5 * is_bare_integer(reply) + 0.5 * (last_integer(reply) == answer)


def exact_match(reply: str, answer: int) -> float:
    """1.0 when the reply is exactly the number, else 0.0."""
    return float(is_bare_integer(reply) and last_integer(reply) == answer)
