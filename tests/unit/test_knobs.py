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


@pytest.mark.parametrize("value,expected", [
    (None, None), ("2", 2.0), ("1", 1.0), ("86400", 86400.0), ("0.5", None), ("0", None),
    ("-3", None), ("86401", None), ("nan", None), ("inf", None), ("x", None), ("", None)])
def test_the_rescan_period_accepts_seconds_in_range_else_the_loops_own(value, expected):
    env = {} if value is None else {knobs.RECONCILE_ENV: value}
    assert knobs.reconcile_override(env) == expected


def test_the_loop_takes_the_rescan_period_from_the_knob(monkeypatch, tmp_path):
    from closewait_trace.live import tracer as tracer_module
    from tests.unit.test_loop import World
    assert World(tmp_path).tracer._reconcile_every == tracer_module.RECONCILE_EVERY_S == 60.0
    monkeypatch.setenv(knobs.RECONCILE_ENV, "2")
    assert World(tmp_path).tracer._reconcile_every == 2.0
