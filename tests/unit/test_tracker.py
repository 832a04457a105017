import socket

from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import (KIND_CLOSED, KIND_UNTRACKED_EXIT, Endpoints,
                                    KernelEvent, TrackedSocket)
from closewait_trace.sockets.owners import OWNER_FD, Holder, Ownership
from closewait_trace.sockets.tcprow import TcpRow
from closewait_trace.live.tracker import Tracker, attribute_close

S = 1_000_000_000


def ep(rport):
    return Endpoints(socket.AF_INET, "127.0.0.1", 80, "127.0.0.1", rport)


def row(rport):
    """A start-up dump row without tcp_info (as read from /proc)."""
    return TcpRow(ep(rport), tcpstates.CLOSE_WAIT, 0, 1, 0, 1000 + rport)


def tracked(skaddr, enter, rport):
    return TrackedSocket(skaddr=skaddr, enter_ns=enter, endpoints=ep(rport))


def event(kind, skaddr, rport, ts, duration=0, pid=7, newstate=tcpstates.LAST_ACK):
    return KernelEvent(kind=kind, ts_ns=ts, skaddr=skaddr, duration_ns=duration, pid=pid,
                       tid=pid, comm="srv", endpoints=ep(rport), oldstate=tcpstates.CLOSE_WAIT,
                       newstate=newstate)


def test_due_once_after_threshold():
    t = Tracker(threshold_ns=S, start_ns=0)
    assert t.sync([tracked(1, 10 * S, 1000)], 10 * S + S // 2) == []
    due = t.sync([tracked(1, 10 * S, 1000)], 11 * S)
    assert [l.skaddr for l in due] == [1]
    t.mark_reported(due[0])
    assert t.sync([tracked(1, 10 * S, 1000)], 12 * S) == []


def test_reused_socket_address_is_a_new_socket():
    t = Tracker(threshold_ns=S, start_ns=0)
    first = t.sync([tracked(1, 0, 1000)], 2 * S)[0]
    t.mark_reported(first)
    again = t.sync([tracked(1, 3 * S, 2000)], 5 * S)
    assert [l.endpoints.rport for l in again] == [2000]


def test_seed_skips_sockets_already_tracked():
    t = Tracker(threshold_ns=S, start_ns=100 * S)
    count = t.seed([row(1), row(2), row(3)], [tracked(9, 100 * S, 2)])
    assert count == 2
    due = t.sync([tracked(9, 100 * S, 2)], 101 * S)
    pre = sorted(l.endpoints.rport for l in due if l.pre_existing)
    assert pre == [1, 3] and [l.skaddr for l in due if not l.pre_existing] == [9]


def test_closed_event_attributes_to_closer_and_departed_memory():
    t = Tracker(threshold_ns=S, start_ns=0)
    l = t.sync([tracked(1, 0, 1000)], 2 * S)[0]
    t.mark_reported(l)
    l.ownership = Ownership(kind=OWNER_FD, holders=[Holder(7, "srv", 3, "S", 1, 0, "srv")])
    # The map read after the kernel deleted the entry, before the event was read.
    t.sync([], 3 * S)
    c = t.on_event(event(KIND_CLOSED, 1, 1000, 3 * S, duration=3 * S))
    assert c.reported and c.how == "close" and c.closer == (7, "srv")
    assert c.duration_ns == 3 * S and not c.duration_is_lower_bound


def test_reset_in_softirq_is_not_attributed():
    t = Tracker(threshold_ns=S, start_ns=0)
    l = t.sync([tracked(1, 0, 1000)], 2 * S)[0]
    t.mark_reported(l)
    l.ownership = Ownership(kind=OWNER_FD, holders=[Holder(7, "srv", 3, "S", 1, 0, "srv")])
    c = t.on_event(event(KIND_CLOSED, 1, 1000, 3 * S, duration=3 * S, pid=99,
                         newstate=tcpstates.CLOSE))
    assert c.how == "reset" and c.closer is None and c.cpu_task == (99, "srv")


def test_untracked_exit_of_pre_existing_gives_lower_bound():
    t = Tracker(threshold_ns=S, start_ns=100 * S)
    t.seed([row(1), row(2)], [])
    for l in t.sync([], 102 * S):
        t.mark_reported(l)
    c = t.on_event(event(KIND_UNTRACKED_EXIT, 5, 1, 105 * S))
    assert c.duration_is_lower_bound and c.duration_ns == 5 * S and c.pre_existing
    # Unknown to us (e.g. the map was full): nothing to print, the kernel counts it.
    assert t.on_event(event(KIND_UNTRACKED_EXIT, 6, 77, 105 * S)) is None


def test_pre_existing_closing_before_threshold_is_not_reported():
    t = Tracker(threshold_ns=10 * S, start_ns=100 * S)
    t.seed([row(1)], [])
    assert t.on_event(event(KIND_UNTRACKED_EXIT, 5, 1, 101 * S)) is None


def test_idle_due_needs_no_map_and_ignores_reported():
    t = Tracker(threshold_ns=S, start_ns=0)
    entries = {i: i for i in range(1000)}
    due = t.sync_entries(entries, lambda k: ep(k), 2 * S)
    assert len(due) == 1000
    for l in due[:990]:
        t.mark_reported(l)
    assert len(t.pending) == 10
    assert sorted(l.skaddr for l in t.due(3 * S)) == list(range(990, 1000))


def test_sync_entries_decodes_only_new_sockets():
    t = Tracker(threshold_ns=S, start_ns=0)
    decoded = []

    def endpoints_of(k):
        decoded.append(k)
        return ep(k)

    t.sync_entries({1: 0, 2: 0}, endpoints_of, S // 2)
    t.sync_entries({1: 0, 2: 0, 3: 10}, endpoints_of, S)
    assert decoded == [1, 2, 3]
    t.sync_entries({3: 10}, endpoints_of, 2 * S)
    assert set(t.by_skaddr) == {3}


def test_attribute_close():
    assert attribute_close(tcpstates.LAST_ACK, 5, set()) == "close"
    assert attribute_close(tcpstates.CLOSE, 5, {5}) == "abort"
    assert attribute_close(tcpstates.CLOSE, 6, {5}) == "reset"
    assert attribute_close(tcpstates.CLOSE, 6, set()) == "unknown"


def test_departed_sockets_are_forgotten_after_the_grace_without_a_map_read():
    from closewait_trace.live.tracker import DEPARTED_GRACE_NS
    t = Tracker(threshold_ns=1, start_ns=0)
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 80, "127.0.0.1", 1)
    for key in (1, 2):
        t.sync_entries({key: 0}, lambda k: ep, 10)
        t.mark_reported(t.by_skaddr[key])
    t.sync_entries({2: 0}, lambda k: ep, 100)         # 1 leaves
    half = DEPARTED_GRACE_NS // 2
    t.sync_entries({}, lambda k: ep, 100 + half)      # 2 leaves later
    assert set(t.departed) == {1, 2}
    t.due(101 + DEPARTED_GRACE_NS)                    # a tick with no map read
    assert set(t.departed) == {2}
    t.due(101 + half + DEPARTED_GRACE_NS)
    assert t.departed == {}
