"""Parsing and formatting of durations (pure)."""

import re

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h)?\s*$")


def parse_duration_ns(text: str) -> int:
    """'500ms' -> 500_000_000. A bare number means seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a duration (examples: 500ms, 2s, 1.5s, 1m)")
    value, unit = match.groups()
    ns = int(round(float(value) * _UNITS_NS[unit or "s"]))
    if ns <= 0:
        raise ValueError(f"{text!r}: the duration must be greater than zero")
    return ns


def format_age(ns: int) -> str:
    """Compact, at most 7 characters: 35us, 850ms, 1.2s, 59.9s, 12m03s, 3h04m, 2d03h."""
    if ns < 0:
        ns = 0
    if ns < 1_000_000:
        return f"{ns // 1000}us"
    seconds = ns / 1e9
    if seconds < 1:
        return f"{int(ns // 1_000_000)}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
