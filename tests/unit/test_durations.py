"""Parsing and formatting durations."""

import pytest

from closewait_trace.durations import format_age, parse_duration_ns


@pytest.mark.parametrize("text,ns", [("500ms", 500_000_000), ("2s", 2_000_000_000),
                                     ("1m", 60_000_000_000), ("1.5", 1_500_000_000),
                                     ("250us", 250_000), (" 3 s ", 3_000_000_000)])
def test_parse_duration(text, ns):
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("bad", ["", "abc", "-1s", "0", "1d", "1.2.3s", "0ms"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration_ns(bad)


@pytest.mark.parametrize("ns,text", [(850_000_000, "850ms"), (1_240_000_000, "1.2s"),
                                     (59_940_000_000, "59.9s"), (723_000_000_000, "12m03s"),
                                     (3 * 3600 * 10**9 + 240 * 10**9, "3h04m"),
                                     (2 * 86400 * 10**9 + 3 * 3600 * 10**9, "2d03h")])
def test_format_age(ns, text):
    assert format_age(ns) == text
    assert len(text) <= 7
