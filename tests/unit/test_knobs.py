"""Testing knobs (closewait_trace/knobs.py): what they accept, and that the
symbolizer's budgets follow the time scale."""

import time

import pytest

from closewait_trace import knobs
from closewait_trace.evidence import symbolize


@pytest.mark.parametrize("value,expected", [
    (None, 1.0), ("60", 60.0), ("0.5", 0.5), ("1000", 1000.0),
    ("0", 1.0), ("-3", 1.0), ("1001", 1.0), ("nan", 1.0), ("inf", 1.0), ("x", 1.0), ("", 1.0)])
def test_time_scale_accepts_a_factor_in_range_else_1(value, expected):
    env = {} if value is None else {knobs.TIME_SCALE_ENV: value}
    assert knobs.time_scale(env) == expected


def test_the_symbolizer_batch_budget_follows_the_scale(monkeypatch):
    before = time.monotonic()
    plain = symbolize.Budget(2.0).deadline - before
    monkeypatch.setenv(knobs.TIME_SCALE_ENV, "50")
    scaled = symbolize.Budget(2.0).deadline - before
    assert 1.9 < plain < 2.5 and 99.9 < scaled < 100.5
