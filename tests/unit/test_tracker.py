import dataclasses
import socket
from array import array

from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import (KIND_CLOSED, KIND_UNTRACKED_EXIT, Endpoints,
                                    KernelEvent, TrackedSocket)
from closewait_trace.sockets.owners import OWNER_FD, Holder, Ownership
from closewait_trace.sockets.tcprow import TcpRow, census_key
from closewait_trace.sockets.tracker import GONE_BLOCK, Tracker, attribute_close

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


def test_the_search_for_departed_sockets_calls_between_as_it_goes():
    """A burst of departures (100,000 sockets leaving at once): finding
    which tracked sockets the map no longer holds was one comprehension
    over all of them, 290 ms without a look at the ring under load. It is
    done a block at a time, between() after each."""
    n = 5 * GONE_BLOCK
    t = Tracker(threshold_ns=S, start_ns=0)
    t.sync_entries({k: 0 for k in range(n)}, ep, S)
    seen = []       # sockets still tracked at each call of between()
    t.sync_entries({}, ep, 2 * S, between=lambda: seen.append(len(t.by_skaddr)))
    assert not t.by_skaddr
    assert seen.count(n) >= n // GONE_BLOCK, seen[:10]


def test_attribute_close():
    assert attribute_close(tcpstates.LAST_ACK, 5, set()) == "close"
    assert attribute_close(tcpstates.CLOSE, 5, {5}) == "abort"
    assert attribute_close(tcpstates.CLOSE, 6, {5}) == "reset"
    assert attribute_close(tcpstates.CLOSE, 6, set()) == "unknown"


def test_departed_sockets_are_forgotten_after_the_grace_without_a_map_read():
    from closewait_trace.sockets.tracker import DEPARTED_GRACE_NS
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


def ns_row(rport, netns):
    return TcpRow(ep(rport).in_netns(netns), tcpstates.CLOSE_WAIT, 0, 1, 0, netns + rport)


def ns_event(kind, rport, netns, ts, skaddr=0):
    return KernelEvent(kind=kind, ts_ns=ts, skaddr=skaddr, duration_ns=0, pid=7, tid=7,
                       comm="srv", endpoints=ep(rport).in_netns(netns),
                       oldstate=tcpstates.CLOSE_WAIT, newstate=tcpstates.LAST_ACK)


def test_seed_keeps_one_socket_per_namespace_with_the_same_addresses():
    """Four namespaces, one 4-tuple: four pre-existing sockets (the old
    tracker kept the first and dropped three)."""
    t = Tracker(threshold_ns=S, start_ns=100 * S)
    assert t.seed([ns_row(1, ns) for ns in (11, 22, 33, 44)], []) == 4
    # The kernel tracked the one in namespace 22 already: only it is skipped.
    t2 = Tracker(threshold_ns=S, start_ns=100 * S)
    kernel_has = TrackedSocket(skaddr=9, enter_ns=100 * S, endpoints=ep(1).in_netns(22))
    assert t2.seed([ns_row(1, ns) for ns in (11, 22, 33)], [kernel_has]) == 2
    assert sorted(e.netns for e in t2.pre_existing) == [11, 33]
    # A kernel entry without a namespace (no BTF) may be any of them.
    t3 = Tracker(threshold_ns=S, start_ns=100 * S)
    unknown = TrackedSocket(skaddr=9, enter_ns=100 * S, endpoints=ep(1))
    assert t3.seed([ns_row(1, ns) for ns in (11, 22)], [unknown]) == 0


def test_untracked_exit_ends_the_socket_of_its_own_namespace():
    t = Tracker(threshold_ns=S, start_ns=100 * S)
    t.seed([ns_row(1, ns) for ns in (11, 22, 33)], [])
    closed = t.on_event(ns_event(KIND_UNTRACKED_EXIT, 1, 22, 105 * S))
    assert closed.lingerer.endpoints.netns == 22
    assert sorted(e.netns for e in t.pre_existing) == [11, 33]


def test_untracked_exit_without_a_namespace_blames_no_socket_when_several_match():
    """No BTF: which of two pre-existing sockets with these addresses left
    cannot be told. Neither is taken for it (no holder is named as the
    closer); both are put back to be looked up again."""
    t = Tracker(threshold_ns=S, start_ns=100 * S)
    t.seed([ns_row(1, ns) for ns in (11, 22)], [])
    for l in t.due(102 * S):
        t.mark_reported(l)
    # The objects themselves, held: an id() of a freed object can be reused.
    before = list(t.pre_existing.values())
    assert t.on_event(ns_event(KIND_UNTRACKED_EXIT, 1, 0, 105 * S)) is None
    again = t.due(105 * S)
    assert sorted(l.endpoints.netns for l in again) == [11, 22]
    assert all(not l.reported and l.pre_existing for l in again)
    assert not any(old is new for old in before for new in t.pre_existing.values())
    # With only one left by these addresses, an exit without a namespace is its.
    t.forget_pre_existing(ep(1).in_netns(11))
    closed = t.on_event(ns_event(KIND_UNTRACKED_EXIT, 1, 0, 106 * S))
    assert closed.lingerer.endpoints.netns == 22 and t.pre_existing == {}
    assert t.pre_by_address == {}


def test_departed_sockets_are_forgotten_a_bounded_number_a_tick():
    """Issue 20 (idle tick): forgetting a departed socket frees its state.
    85,885 reported sockets whose CLOSED events were lost were forgotten in
    one idle tick 5 s after they left (363 ms at 100,000): now at most
    EXPIRE_PER_TICK a tick, and every one past MAX_DEPARTED at once."""
    from closewait_trace.sockets import tracker as tr
    t = Tracker(threshold_ns=1, start_ns=0)
    n = 2 * tr.EXPIRE_PER_TICK + 10
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 80, "127.0.0.1", 1)
    t.sync_entries({k: 0 for k in range(n)}, lambda k: ep, 10)
    for l in list(t.by_skaddr.values()):
        t.mark_reported(l)
    t.sync_entries({}, lambda k: ep, 100)            # all leave, no CLOSED event
    assert len(t.departed) == n
    after = 101 + tr.DEPARTED_GRACE_NS
    sizes = []
    for tick in range(3):
        t.due(after + tick)
        sizes.append(len(t.departed))
    assert sizes == [n - tr.EXPIRE_PER_TICK, n - 2 * tr.EXPIRE_PER_TICK, 0]
    assert min(t.departed or [n]) == n                # the first to leave went first
    # Past MAX_DEPARTED waiting, the excess goes at once: memory stays bounded.
    t.sync_entries({k: 0 for k in range(n)}, lambda k: ep, after + 10)
    for l in list(t.by_skaddr.values()):
        t.mark_reported(l)
    t.sync_entries({}, lambda k: ep, after + 20)
    t.due(after + 21 + tr.DEPARTED_GRACE_NS)
    assert len(t.departed) == n - tr.EXPIRE_PER_TICK
    import unittest.mock
    with unittest.mock.patch.object(tr, "MAX_DEPARTED", 5):
        t.due(after + 22 + tr.DEPARTED_GRACE_NS)
    assert len(t.departed) == 5


def test_departed_sockets_wait_past_their_grace_while_events_wait_to_be_taken():
    """A burst's CLOSED events can be written 20-60 s after the map read saw
    their sockets leave (100,000, load 3): while the loop has events not yet
    taken (hold_departed), the departed sockets are not forgotten at the
    end of their grace, so each CLOSED line still finds its socket (before:
    1,453 of 100,000 written as never reported, without their holders).
    Only those past MAX_DEPARTED go, so the memory stays bounded."""
    import unittest.mock
    from closewait_trace.sockets import tracker as tr
    t = Tracker(threshold_ns=1, start_ns=0)
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 80, "127.0.0.1", 1)
    t.sync_entries({k: 0 for k in range(10)}, lambda k: ep, 10)
    for l in list(t.by_skaddr.values()):
        t.mark_reported(l)
    t.sync_entries({}, lambda k: ep, 100)            # all leave; events not yet taken
    t.hold_departed = True
    t.due(101 + 10 * tr.DEPARTED_GRACE_NS)
    assert len(t.departed) == 10
    closed = t.on_event(KernelEvent(kind=KIND_CLOSED, ts_ns=90, skaddr=3, duration_ns=80,
                                    pid=7, tid=7, comm="srv", endpoints=ep,
                                    oldstate=tcpstates.CLOSE_WAIT, newstate=tcpstates.LAST_ACK))
    assert closed.reported and closed.lingerer is not None
    with unittest.mock.patch.object(tr, "MAX_DEPARTED", 4):
        t.due(102 + 10 * tr.DEPARTED_GRACE_NS)
    assert sorted(t.departed) == [6, 7, 8, 9]         # the oldest over the bound went
    t.hold_departed = False                           # caught up: the grace applies again
    t.due(103 + 10 * tr.DEPARTED_GRACE_NS)
    assert len(t.departed) == 0


# ------------------------------------------------- rescan after a loss

NS = 4026531840


def ns_ep(rport, netns=NS):
    return ep(rport).in_netns(netns)


def dumped_row(rport, netns=NS, ack_ms=None, data_ms=None):
    """A rescan's sock_diag row, tagged with its namespace."""
    return TcpRow(ns_ep(rport, netns), tcpstates.CLOSE_WAIT, 0, 1, 0, 1000 + rport,
                  last_ack_recv_ms=ack_ms, last_data_recv_ms=data_ms)


def rescan(t, rows, observed_ns, dumped_netns, dump_began_ns, between=None,
           before_start_netns=frozenset(), kernel_missed=True):
    """A rescan whose lookups after the map read find every socket the dump
    showed still there: (adopted, gone)."""
    found, gone = t.rescan(rows, dumped_netns, dump_began_ns, between)
    return t.adopt_found(found, observed_ns, before_start_netns, kernel_missed), gone


def test_rescan_adopts_a_socket_the_map_never_had_as_found_late_not_pre_existing():
    t = Tracker(threshold_ns=S, start_ns=100 * S)
    t.sync_entries({1: 110 * S}, lambda k: ns_ep(1000), 120 * S)
    adopted, gone = rescan(t, [dumped_row(1000), dumped_row(2000, ack_ms=7_000, data_ms=7_500),
                              dumped_row(3000)], 130 * S, {NS}, 129 * S)
    assert (adopted, gone) == (2, [])
    found = {l.endpoints.rport: l for l in t.pre_existing.values()}
    assert set(found) == {2000, 3000} and 1000 not in found      # the tracked one stays tracked
    assert all(l.found_late and l.pre_existing and not l.before_start for l in found.values())
    assert found[2000].enter_ns == 123 * S and found[2000].age_source == "estimated"
    # Nothing but "it was there when found": never older than that.
    assert found[3000].enter_ns == 130 * S and found[3000].age_source == "lower_bound"
    assert {l.endpoints.rport for l in t.due(131 * S + 1)} >= {2000, 3000}
    # Its leaving comes as an untracked exit: its CLOSED is not "pre-existing".
    closed = t.on_event(KernelEvent(kind=KIND_UNTRACKED_EXIT, ts_ns=140 * S, skaddr=0,
                                    duration_ns=0, pid=7, tid=7, comm="srv",
                                    endpoints=ns_ep(2000), oldstate=tcpstates.CLOSE_WAIT,
                                    newstate=tcpstates.LAST_ACK))
    assert closed is not None and closed.pre_existing is False
    assert closed.duration_ns == 17 * S


def test_a_first_read_of_a_namespace_the_start_left_finds_sockets_from_before_the_start():
    """The start-up's read of the sockets already in CLOSE_WAIT leaves some
    namespaces to the rescans (a user's thousands must not hold the start).
    What a rescan then finds there that nothing here knows was in CLOSE_WAIT
    before the start, as the seed's are, unless the kernel has missed a
    socket since (then tcp_info's estimate says which); elsewhere, as
    before, it is a socket the kernel missed (found late)."""
    other = NS + 1
    rows = [dumped_row(1000),                                   # no tcp_info
            dumped_row(2000, ack_ms=40_000, data_ms=40_000),    # entered ~40 s ago
            dumped_row(3000, ack_ms=7_000, data_ms=7_500)]      # ~7 s ago: after the start
    elsewhere = dumped_row(4000, netns=other)

    t = Tracker(threshold_ns=S, start_ns=100 * S)
    assert rescan(t, rows + [elsewhere], 130 * S, {NS, other}, 129 * S,
                    before_start_netns={NS}, kernel_missed=False) == (4, [])
    found = {l.endpoints.rport: l for l in t.pre_existing.values()}
    assert all(found[p].before_start and not found[p].found_late for p in (1000, 2000, 3000))
    assert found[4000].found_late                       # not a namespace the start left
    # Never younger than the start: it was there before it.
    assert found[1000].enter_ns == 100 * S and found[1000].age_source == "lower_bound"
    assert found[2000].enter_ns == 90 * S
    assert found[3000].enter_ns == 100 * S

    missed = Tracker(threshold_ns=S, start_ns=100 * S)
    # 5000: its ACKs kept young by what its holder sends (entered 25 s ago
    # at most, by the ACK; its last data 40 s ago, before the start).
    young = dumped_row(5000, ack_ms=5_000, data_ms=40_000)
    rescan(missed, rows + [young], 130 * S, {NS}, 129 * S, before_start_netns={NS},
           kernel_missed=True)
    found = {l.endpoints.rport: l for l in missed.pre_existing.values()}
    assert found[2000].before_start                     # its last ACK: before the start
    # Its last data after the start: entered since, unseen.
    assert found[3000].found_late and not found[3000].entry_unknown
    assert found[3000].enter_ns == 123 * S
    # Either (it was said to have entered unseen, aged from the ACK).
    assert found[1000].entry_unknown and found[1000].enter_ns == 130 * S
    assert found[5000].entry_unknown and not found[5000].before_start
    assert (found[5000].enter_ns, found[5000].enter_max_ns) == (125 * S, 90 * S)


def test_when_the_start_kept_fewer_than_it_found_a_rescan_dates_what_it_finds_by_tcp_info():
    """Sockets from before the start beyond max_untracked, adopted by a later
    rescan (once others left, or with room): from before the start by
    their tcp_info age, as in a namespace the start left unread. Before,
    each was found late ("its entry not seen", aged from the rescan); one
    that entered since the start still is."""
    t = Tracker(threshold_ns=S, start_ns=100 * S, max_untracked=1)
    assert t.seed([dumped_row(1000, ack_ms=30_000, data_ms=30_000),
                   dumped_row(2000, ack_ms=50_000, data_ms=50_000)], [], 100 * S) == 1
    assert t.untracked_over == 1
    t.max_untracked = 3
    rows = [dumped_row(1000, ack_ms=60_000, data_ms=60_000),
            dumped_row(2000, ack_ms=80_000, data_ms=80_000),       # entered at 50 s
            dumped_row(3000, ack_ms=7_000, data_ms=7_500)]         # at 123 s: since the start
    assert rescan(t, rows, 130 * S, {NS}, 129 * S) == (2, [])
    found = {l.endpoints.rport: l for l in t.pre_existing.values()}
    assert found[2000].before_start and found[2000].enter_ns == 50 * S
    assert found[3000].found_late and found[3000].enter_ns == 123 * S
    assert t.seed_incomplete
    complete = Tracker(threshold_ns=S, start_ns=100 * S)
    complete.seed([dumped_row(1000)], [], 100 * S)
    assert not complete.seed_incomplete


def test_a_second_rescan_adopts_nothing_twice():
    t = Tracker(threshold_ns=S, start_ns=0)
    assert rescan(t, [dumped_row(2000)], 10 * S, {NS}, 9 * S)[0] == 1
    assert rescan(t, [dumped_row(2000)], 20 * S, {NS}, 19 * S) == (0, [])
    assert len(t.pre_existing) == 1


def known_in_and_out_of_namespaces() -> Tracker:
    """Tracked at 5 s: 1001 and 1005 in NS, 1002 in another, 1003 with its
    namespace not known; 1004 in NS at 10 s; followed without the map from
    the start: 2001 and 2002 in NS."""
    t = Tracker(threshold_ns=S, start_ns=0)
    t.sync_entries({1: 5 * S, 2: 5 * S, 3: 5 * S, 4: 10 * S, 5: 5 * S},
                   {1: ns_ep(1001), 2: ns_ep(1002, NS + 1), 3: ep(1003), 4: ns_ep(1004),
                    5: ns_ep(1005)}.__getitem__, 10 * S)
    t.seed([dumped_row(2001), dumped_row(2002)], [], 0)
    return t


def test_rescan_finds_gone_only_what_entered_before_it_in_a_namespace_it_read():
    t = known_in_and_out_of_namespaces()
    # 1: gone. 2: its namespace not read. 3: its namespace not known. 4:
    # entered after the dump began. 5 and 2002: in the dump. 2001: gone.
    adopted, gone = rescan(t, [dumped_row(1005), dumped_row(2002)], 10 * S, {NS}, 9 * S)
    assert adopted == 0
    assert sorted(l.endpoints.rport for l in gone) == [1001, 2001]
    assert all(t.drop_unseen(l) for l in gone)
    assert sorted(l.endpoints.rport for l in t.lingering()) == [1002, 1003, 1004, 1005, 2002]
    assert not any(t.drop_unseen(l) for l in gone)      # once only


def test_a_rescan_for_some_keys_judges_gone_only_the_sockets_it_looked_for():
    """A rescan the censuses set off has the rows of the sockets they
    differ on alone (owners.rescan_close_wait's only): a known socket not
    among those keys is not in its rows and is not gone for that; one
    among them and not in its rows is."""
    t = known_in_and_out_of_namespaces()
    secret = b"k"
    only = {NS: {census_key(ns_ep(1001), secret), census_key(ns_ep(3001), secret)}}
    found, gone = t.rescan([dumped_row(3001)], {NS}, 9 * S, only=only, secret=secret)
    assert [row.endpoints.rport for row in found] == [3001]
    assert [l.endpoints.rport for l in gone] == [1001]
    # Keys made with another secret name other sockets: none looked for.
    assert t.rescan([], {NS}, 9 * S, only=only, secret=b"other") == ([], [])


def test_a_socket_dropped_unseen_is_told_to_the_observers_and_unwatched():
    class Seen:
        def __init__(self):
            self.gone = []

        def added(self, l):
            pass

        def changed(self, l):
            pass

        def removed(self, l):
            self.gone.append(l.endpoints.rport)

    t = Tracker(threshold_ns=S, start_ns=0)
    seen = Seen()
    t.observers.append(seen)
    due = t.sync_entries({1: 1 * S}, lambda k: ns_ep(1001), 5 * S)
    t.mark_reported(due[0])
    _adopted, gone = rescan(t, [], 6 * S, {NS}, 6 * S)
    assert [l.endpoints.rport for l in gone] == [1001]
    assert t.drop_unseen(gone[0])
    assert seen.gone == [1001]
    assert [l.endpoints.rport for l in t.take_left()] == [1001]   # its watch is dropped
    assert t.by_skaddr == {} and t.pending == {}


def test_a_rescan_of_many_sockets_calls_between_as_it_goes():
    t = Tracker(threshold_ns=S, start_ns=0)
    n = 5000
    t.sync_entries({k: S for k in range(1, n + 1)}, lambda k: ns_ep(k), 2 * S)
    calls = []
    rows = [dumped_row(k) for k in range(1, n + 1)] + [dumped_row(n + 1)]
    adopted, gone = rescan(t, rows, 3 * S, {NS}, 3 * S, between=lambda: calls.append(1))
    assert (adopted, gone) == (1, [])
    assert len(calls) >= 2 * (n // 1024)


def test_untracked_sockets_are_kept_up_to_max_untracked_and_the_rest_counted():
    """What the kernel's map bounds for tracked sockets, max_untracked bounds
    for those found at start or by a rescan: a user's million sockets in
    CLOSE_WAIT must not cost a million entries."""
    t = Tracker(threshold_ns=S, start_ns=10 * S, max_untracked=2)
    assert t.seed([dumped_row(1), dumped_row(2), dumped_row(3)], [], 10 * S) == 2
    assert t.untracked_over == 1
    assert rescan(t, [dumped_row(1), dumped_row(2), dumped_row(3), dumped_row(4)],
                    20 * S, {NS}, 19 * S) == (0, [])
    assert t.untracked_over == 2 and len(t.pre_existing) == 2
    # The same two again at the next rescan: still two, not four.
    rescan(t, [dumped_row(1), dumped_row(2), dumped_row(3), dumped_row(4)], 30 * S, {NS}, 29 * S)
    assert t.untracked_over == 2
    # None over at the next look; the most at one look stays.
    rescan(t, [dumped_row(1), dumped_row(2)], 40 * S, {NS}, 39 * S)
    assert (t.untracked_over, t.untracked_over_most) == (0, 2)


def test_an_untracked_socket_is_known_by_its_inode_not_by_its_addresses():
    """Anyone can close a socket and open the next on the same addresses:
    the next one is not the first, which a rescan then finds gone, and is
    not known here until a rescan finds it (with its own age)."""
    t = Tracker(threshold_ns=S, start_ns=0)
    first = dumped_row(2000)
    assert rescan(t, [first], 10 * S, {NS}, 9 * S)[0] == 1
    [l] = t.pre_existing.values()
    assert l.inode == first.inode
    reopened = TcpRow(first.endpoints, tcpstates.CLOSE_WAIT, 0, 1, 0, first.inode + 1)
    found, gone = t.rescan([reopened], {NS}, 19 * S)
    assert found == [reopened] and gone == [l]
    # Not adopted while the first is known: it waits for the first to go.
    assert t.adopt_found(found, 20 * S) == 0 and t.pre_existing[first.endpoints] is l
    assert t.drop_unseen(l)
    assert t.adopt_found(found, 20 * S) == 1
    assert t.pre_existing[first.endpoints].inode == reopened.inode
    assert t.pre_existing[first.endpoints].enter_ns == 20 * S
    # The same inode again: known, nothing found, nothing gone.
    assert t.rescan([reopened], {NS}, 29 * S) == ([], [])


def test_which_socket_is_told_by_cookie_first_then_inode_never_by_addresses():
    """A socket in a listener's accept queue has inode 0; its cookie (the
    kernel's number for it, never reused) still tells it from the next
    socket on its addresses. Cycled so, a user's sockets were each taken
    for the one before and reported lingering for up to 41 s."""
    from closewait_trace.sockets.tcprow import same_socket
    assert same_socket(5, 0, 5, 0) is True and same_socket(5, 0, 6, 0) is False
    assert same_socket(5, 900, 6, 900) is False         # the cookie decides
    assert same_socket(0, 900, 6, 901) is False and same_socket(0, 900, 6, 900) is True
    assert same_socket(0, 0, 6, 900) is None and same_socket(5, 0, 0, 0) is None
    t = Tracker(threshold_ns=S, start_ns=0)
    queued = dataclasses.replace(dumped_row(2000), inode=0, cookie=41)
    assert rescan(t, [queued], 10 * S, {NS}, 9 * S)[0] == 1
    next_one = dataclasses.replace(queued, cookie=42)
    found, gone = t.rescan([next_one], {NS}, 19 * S)
    assert found == [next_one] and [l.cookie for l in gone] == [41]
    assert t.rescan([queued], {NS}, 19 * S) == ([], [])


def census(*rows_by_ns):
    """owners.close_wait_census's keys: namespace -> the rows' census keys."""
    keys = {}
    for netns, r in rows_by_ns:
        keys.setdefault(netns, array("Q")).append(census_key(r.endpoints))
    return {netns: found.tobytes() for netns, found in keys.items()}


def test_the_census_key_is_the_addresses_the_same_in_every_process():
    a = Endpoints(socket.AF_INET, "127.0.0.1", 80, "127.0.0.1", 1001, NS)
    assert census_key(a) == census_key(dataclasses.replace(a, family=int(socket.AF_INET)))
    assert census_key(a) == census_key(dataclasses.replace(a, netns=0))    # by namespace apart
    assert len({census_key(a), census_key(dataclasses.replace(a, rport=1002)),
                census_key(dataclasses.replace(a, lport=81)),
                census_key(dataclasses.replace(a, raddr="127.0.0.2"))}) == 4
    assert 0 <= census_key(a) < 1 << 64
    # Fixed, not Python's per-process hash of a string (PYTHONHASHSEED).
    assert census_key(a) == int.from_bytes(bytes.fromhex("115fec1ea8a4e477"), "little")


def test_the_census_differs_where_a_rescan_would_find_or_find_gone():
    t = known_in_and_out_of_namespaces()
    # 1 and 2001: known, not in it. 2: its namespace not read. 3: its
    # namespace not known. 4: entered after it began. 5 and 2002: in it.
    # 3001: in it, known nowhere. 1003: in it, known without a namespace.
    keys = census((NS, dumped_row(1005)), (NS, dumped_row(2002)), (NS, dumped_row(3001)),
                  (NS, dumped_row(1003)), (NS + 2, dumped_row(4001)))
    diff = t.census_diff(keys, {NS}, 9 * S)
    assert diff == {(NS, census_key(ns_ep(r))) for r in (1001, 2001, 3001)}
    # No room to follow another untracked socket: only the gone differ.
    t.max_untracked = len(t.pre_existing)
    assert t.census_diff(keys, {NS}, 9 * S) == {(NS, census_key(ns_ep(r))) for r in (1001, 2001)}


def test_a_known_socket_is_gone_from_a_namespace_the_census_read_with_none_left():
    """The namespace was read whole and had no socket in CLOSE_WAIT left
    (no keys at all): the one known there is gone. Before, a namespace
    without keys was taken for one not read, and a lone socket whose exit
    the hook missed stayed reported for as long as the tracer ran."""
    t = Tracker(threshold_ns=S, start_ns=0)
    t.sync_entries({1: 5 * S}, {1: ns_ep(1001)}.__getitem__, 10 * S)
    assert t.census_diff({}, {NS}, 9 * S) == {(NS, census_key(ns_ep(1001)))}
    assert t.census_diff({}, set(), 9 * S) == set()                 # not read: not known


def test_the_census_differs_by_no_more_unknown_sockets_than_there_is_room_for():
    """No more than could be followed (max_untracked), and the same ones at
    each census (the lowest keys), so that two in a row agree: a user's
    many untracked sockets cannot make the difference, kept between
    censuses, grow with them."""
    t = Tracker(threshold_ns=S, start_ns=0, max_untracked=3)
    rows = [dumped_row(3000 + i) for i in range(50)]
    keys = census(*[(NS, r) for r in rows])
    first = t.census_diff(keys, {NS}, 9 * S)
    assert len(first) == 3
    lowest = sorted(((NS, census_key(r.endpoints)) for r in rows), key=lambda i: i[1])[:3]
    assert first == set(lowest)
    assert t.census_diff(census(*[(NS, r) for r in reversed(rows)]), {NS}, 9 * S) == first


def test_the_census_key_is_keyed_by_the_tracers_secret():
    """Which differences are kept is by the lowest keys: with the run's own
    secret in the hash, nobody who picks addresses picks which."""
    a = ns_ep(1001)
    assert census_key(a, b"k1") == census_key(a, b"k1") != census_key(a, b"k2")
    assert census_key(a, b"k1") != census_key(a)
    t = Tracker(threshold_ns=S, start_ns=0)
    t.sync_entries({1: 5 * S}, {1: a}.__getitem__, 10 * S)
    keys = {NS: array("Q", [census_key(a, b"k1")]).tobytes()}
    assert t.census_diff(keys, {NS}, 9 * S, secret=b"k1") == set()
    assert t.census_diff(keys, {NS}, 9 * S, secret=b"k2") != set()
