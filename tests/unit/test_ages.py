"""Ages of sockets already in CLOSE_WAIT at start, from tcp_info (pure):
the estimate, its bounds, when they are due, and their CLOSED durations."""

import json
import socket

import pytest

from closewait_trace.sockets import ages
from closewait_trace.output import records
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import KIND_UNTRACKED_EXIT, Endpoints, KernelEvent
from closewait_trace.sockets.tcprow import TcpRow
from closewait_trace.sockets.tracker import Lingerer, Tracker

S = 1_000_000_000
MS = 1_000_000
START = 1000 * S          # kernel clock at start: 1000 s after boot


def ep(rport):
    return Endpoints(socket.AF_INET, "127.0.0.1", 80, "127.0.0.1", rport)


def row(rport, ack_ms=None, data_ms=None):
    return TcpRow(ep(rport), tcpstates.CLOSE_WAIT, 0, 1, 0, 5000 + rport,
                  last_ack_recv_ms=ack_ms, last_data_recv_ms=data_ms)


def untracked_exit(rport, ts):
    return KernelEvent(kind=KIND_UNTRACKED_EXIT, ts_ns=ts, skaddr=77, duration_ns=0, pid=7,
                       tid=7, comm="srv", endpoints=ep(rport), oldstate=tcpstates.CLOSE_WAIT,
                       newstate=tcpstates.LAST_ACK)


def test_estimate_between_last_ack_and_last_data():
    est = ages.estimate_entry(8000, 9500, START)
    assert est == ages.AgeEstimate(START - 8 * S, START - 9500 * MS, ages.ESTIMATED)


def test_no_tcp_info_says_only_that_it_was_there():
    assert ages.estimate_entry(None, None, START) == ages.AgeEstimate(START, None, ages.LOWER_BOUND)
    assert ages.estimate_entry(None, 700, START).source == ages.LOWER_BOUND


def test_data_after_the_fin_is_impossible_so_no_upper_bound():
    est = ages.estimate_entry(8000, 3000, START)
    assert est == ages.AgeEstimate(START - 8 * S, None, ages.LOWER_BOUND)
    assert ages.estimate_entry(8000, None, START).source == ages.LOWER_BOUND


def test_a_reading_older_than_the_boot_is_not_believed():
    est = ages.estimate_entry(2000 * 1000, 2100 * 1000, START)    # 2000 s, up 1000 s
    assert est == ages.AgeEstimate(START, None, ages.LOWER_BOUND)


def test_after_49_7_days_of_uptime_a_wrap_is_possible_so_lower_bound():
    up = ages.U32_WRAP_NS + 5 * S
    est = ages.estimate_entry(8000, 9000, up)
    # a wrapped u32 reads smaller than the truth: the reading is a lower bound
    assert est == ages.AgeEstimate(up - 8 * S, None, ages.LOWER_BOUND)
    assert ages.estimate_entry(8000, 9000, ages.U32_WRAP_NS - 1).source == ages.ESTIMATED


def seeded(threshold=2 * S):
    t = Tracker(threshold_ns=threshold, start_ns=START)
    t.seed([row(1, 8000, 9000),      # 8 s old: due at the first tick
            row(2, 500, 4000),       # 0.5 s old: due 1.5 s after start
            row(3)], [])             # no tcp_info: due a threshold after start
    return t


def test_sockets_past_the_threshold_are_due_at_the_first_tick():
    t = seeded()
    first = t.due(START + 10 * MS)
    assert [l.endpoints.rport for l in first] == [1]
    l = first[0]
    assert l.age_source == ages.ESTIMATED and l.pre_existing
    assert l.age_ns(START) == 8 * S and l.age_max_ns(START) == 9 * S
    t.mark_reported(l)
    assert t.due(START + 1400 * MS) == []
    assert [l.endpoints.rport for l in t.due(START + 1500 * MS)] == [2]
    assert {l.endpoints.rport for l in t.due(START + 2 * S)} == {2, 3}


def test_lower_bound_without_tcp_info_counts_from_start():
    t = seeded()
    l = t.pre_existing[ep(3)]
    assert (l.age_source, l.enter_ns, l.enter_max_ns) == (ages.LOWER_BOUND, START, None)
    assert l.age_max_ns(START + S) is None


def test_closed_gives_estimate_at_start_plus_traced_time():
    t = seeded()
    for l in t.due(START):
        t.mark_reported(l)
    c = t.on_event(untracked_exit(1, START + 3 * S))
    assert c.duration_ns == 11 * S and c.duration_max_ns == 12 * S
    assert c.duration_source == ages.ESTIMATED and not c.duration_is_lower_bound
    assert c.pre_existing and c.reported
    rec = records.closed(c, 1.0)
    assert (rec["duration_s"], rec["duration_max_s"], rec["duration_source"]) == (11.0, 12.0, "estimated")
    assert rec["duration_is_lower_bound"] is False


def test_closed_without_tcp_info_is_a_lower_bound_from_start():
    t = seeded()
    c = t.on_event(untracked_exit(3, START + 5 * S))
    assert c.duration_ns == 5 * S and c.duration_source == ages.LOWER_BOUND
    assert c.duration_is_lower_bound and c.duration_max_ns is None


def test_estimated_socket_leaving_before_the_threshold_is_not_reported():
    t = seeded()
    assert t.on_event(untracked_exit(2, START + S)) is None      # 1.5 s < 2 s
    assert ep(2) not in t.pre_existing


def test_estimated_socket_leaving_before_the_first_tick_still_gets_closed():
    t = seeded()
    c = t.on_event(untracked_exit(1, START + 5 * MS))
    assert c is not None and not c.reported and c.duration_source == ages.ESTIMATED


def test_seed_never_dates_a_socket_after_the_start():
    # a dump read after start, of a socket without tcp_info
    t = Tracker(threshold_ns=S, start_ns=START)
    t.seed([row(1)], [], observed_ns=START + 300 * MS)
    assert t.pre_existing[ep(1)].enter_ns == START


def test_seed_uses_the_time_the_dump_was_read():
    t = Tracker(threshold_ns=S, start_ns=START)
    t.seed([row(1, 8000, 9000)], [], observed_ns=START + 300 * MS)
    assert t.pre_existing[ep(1)].enter_ns == START + 300 * MS - 8 * S


def test_wrapped_uptime_still_reports_the_reading_at_once_as_a_lower_bound():
    up = ages.U32_WRAP_NS + 60 * S
    t = Tracker(threshold_ns=2 * S, start_ns=up)
    t.seed([row(1, 8000, 9000)], [])
    (l,) = t.due(up)
    assert l.age_source == ages.LOWER_BOUND and l.age_ns(up) == 8 * S


@pytest.mark.parametrize("source, max_ns, lower", [
    (ages.ESTIMATED, START - 9 * S, False),
    (ages.LOWER_BOUND, None, True),
    (ages.TRACED, None, False),
])
def test_linger_and_lingering_entry_say_how_the_age_was_obtained(source, max_ns, lower):
    l = Lingerer(endpoints=ep(1), enter_ns=START - 8 * S, skaddr=None, pre_existing=True,
                 age_source=source, enter_max_ns=max_ns)
    for rec in (records.linger(l, 1.0, l.age_ns(START)),
                records.lingering_entry(l, l.age_ns(START))):
        assert rec["age_s"] == 8.0 and rec["age_source"] == source
        assert rec["age_max_s"] == (9.0 if max_ns else None)
        assert rec["age_is_lower_bound"] is lower
        json.dumps(rec)


def test_with_keepalive_the_ack_clock_is_no_estimate_only_a_range():
    # 1 s probes keep last_ack_recv under a second; the data came 24 s ago.
    est = ages.estimate_entry(900, 24_000, START, keepalive=True)
    assert est == ages.AgeEstimate(START - 900 * MS, START - 24 * S, ages.RANGE)
    # Without a usable upper end, still only a lower bound.
    assert ages.estimate_entry(900, None, START, keepalive=True).source == ages.LOWER_BOUND


def test_a_keepalive_socket_is_due_and_ordered_by_what_it_may_be():
    from closewait_trace.sockets.tcprow import KEEPALIVE_TIMER
    t = Tracker(threshold_ns=5 * S, start_ns=START)
    t.seed([TcpRow(ep(1), tcpstates.CLOSE_WAIT, 0, 1, 0, 5001, last_ack_recv_ms=900,
                   last_data_recv_ms=24_000, timer=KEEPALIVE_TIMER),
            row(2, 8000, 9000)], [])
    due = t.due(START + 10 * MS)
    assert {l.endpoints.rport for l in due} == {1, 2}     # 24 s may be past 5 s
    l = t.pre_existing[ep(1)]
    assert l.age_source == ages.RANGE
    assert l.age_ns(START) == 900 * MS and l.age_bound_ns(START) == 24 * S
    assert sorted(due, key=lambda l: l.earliest_enter_ns)[0].endpoints.rport == 1
    rec = records.lingering_entry(l, l.age_ns(START))
    assert (rec["age_source"], rec["age_s"], rec["age_max_s"]) == ("range", 0.9, 24.0)
    from closewait_trace.output import render
    assert render.age_text(rec) == "<=24.0s"
    # A damaged record without its upper end shows only what it has.
    assert render.age_text(dict(rec, age_max_s=None)) == ">=900ms"


def test_read_over_a_while_the_latest_entry_counts_from_its_end_the_earliest_from_its_start():
    """A dump is read over up to 0.2 s: tcp_info's times are the kernel's at
    the moment each row was dumped, somewhere in it."""
    est = ages.estimate_entry(2_000, 5_000, 100 * S, observed_from_ns=99 * S)
    assert (est.enter_ns, est.enter_max_ns) == (98 * S, 94 * S)


def test_a_row_is_aged_within_its_namespaces_read_widened_by_a_jiffy():
    t = Tracker(threshold_ns=S, start_ns=200 * S)
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 80, "127.0.0.1", 5000, netns=7)
    row = TcpRow(ep, tcpstates.CLOSE_WAIT, 0, 1, 0, 900,
                 last_ack_recv_ms=2_000, last_data_recv_ms=5_000)
    t.seed([row], [], 200 * S, read_at={7: (99 * S, 100 * S)})
    [l] = t.pre_existing.values()
    jiffy = 10_000_000
    assert (l.enter_ns, l.enter_max_ns) == (98 * S + jiffy, 94 * S - jiffy)
