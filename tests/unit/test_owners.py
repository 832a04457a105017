import os
import shutil
import socket

import pytest

from closewait_trace.evidence import diagnosis
from closewait_trace.sockets import owners, procfs, procnet
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints
from tests.unit.fakeproc import FakeProc

V4 = socket.AF_INET
CW, LISTEN = tcpstates.CLOSE_WAIT, tcpstates.LISTEN


def ep(lport, rport, laddr="127.0.0.1", raddr="127.0.0.1", family=V4, netns=0):
    return Endpoints(family, laddr, lport, raddr, rport, netns)


@pytest.fixture
def fake(tmp_path):
    return FakeProc(tmp_path)


def test_parse_tcp_table_decodes_addresses_ports_queues(fake):
    fake.process(10).tcp(10, V4, "10.1.2.3", 5555, "192.168.0.9", 40000, CW, 777, rx=14)
    fake.tcp(10, socket.AF_INET6, "::1", 6000, "2001:db8::5", 41000, CW, 778)
    rows = procnet.tcp_rows(10, fake.root)
    # Each row carries the namespace it was read in (pid 10's).
    assert rows[0].endpoints == ep(5555, 40000, "10.1.2.3", "192.168.0.9", netns=4026531840)
    assert rows[0].rx_queue == 14 and rows[0].inode == 777 and rows[0].state == CW
    assert rows[1].endpoints == Endpoints(socket.AF_INET6, "::1", 6000, "2001:db8::5", 41000,
                                          4026531840)


def test_resolve_lists_every_holder_with_fd(fake):
    fake.process(10, comm="server").process(11, comm="child", ppid=10)
    fake.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, CW, 900, rx=1)
    fake.fd(10, 5, 900).fd(11, 7, 900).fd(11, 3, 123)
    result = owners.resolve([ep(5555, 40000)], fake.root)[ep(5555, 40000)]
    assert result.kind == owners.OWNER_FD
    assert [(h.pid, h.comm, h.fd) for h in result.holders] == [(10, "server", 5), (11, "child", 7)]
    assert result.unread_bytes == 0 and not result.eof_read


def test_resolve_accept_queue_names_listener_holders(fake):
    fake.process(20, comm="lazy")
    fake.tcp(20, V4, "0.0.0.0", 8080, "0.0.0.0", 0, LISTEN, 500, rx=3)
    fake.tcp(20, V4, "127.0.0.1", 8080, "127.0.0.1", 40001, CW, 0)
    fake.fd(20, 3, 500)
    result = owners.resolve([ep(8080, 40001)], fake.root)[ep(8080, 40001)]
    assert result.kind == owners.OWNER_ACCEPT_QUEUE
    assert list(result.holders) == []
    assert result.listener.inode == 500 and result.listener.rx_queue == 3
    assert [h.pid for h in result.listener_holders] == [20]


def _same_addresses_in_three_namespaces(fake):
    fake.process(30, netns=111).process(31, netns=222).process(32, netns=333)
    for pid, inode in ((30, 1), (31, 2), (32, 3)):
        fake.tcp(pid, V4, "127.0.0.1", 80, "127.0.0.1", 5000, CW, inode)
        fake.fd(pid, 4, inode)


def test_resolve_finds_each_socket_in_its_own_namespace(fake):
    """The same addresses in CLOSE_WAIT in three namespaces are three
    sockets: each is its own namespace's holder's (the old code named the
    first namespace's holder for all three)."""
    _same_addresses_in_three_namespaces(fake)
    wanted = [ep(80, 5000, netns=ns) for ns in (333, 111, 222)]
    got = owners.resolve(wanted, fake.root)
    assert {w.netns: ([h.pid for h in got[w].holders], got[w].netns, got[w].inode)
            for w in wanted} == {111: ([30], 111, 1), 222: ([31], 222, 2), 333: ([32], 333, 3)}
    assert all(got[w].kind == owners.OWNER_FD and list(got[w].other_netns) == [] for w in wanted)


def test_resolve_enters_only_the_namespaces_of_the_sockets(fake, monkeypatch):
    """1,500 namespaces made by one user delayed another user's report by
    19 s: with each socket's namespace known, no other one is read."""
    _same_addresses_in_three_namespaces(fake)
    for pid in range(100, 160):
        fake.process(pid, netns=10_000 + pid)        # a user's empty namespaces
    read = []
    real = owners.procnet.tcp_rows
    monkeypatch.setattr(owners.procnet, "tcp_rows",
                        lambda pid, *a, **k: read.append(pid) or real(pid, *a, **k))
    got = owners.resolve([ep(80, 5000, netns=222)], fake.root)
    assert [h.pid for h in got[ep(80, 5000, netns=222)].holders] == [31]
    assert read == [31]


def test_resolve_without_a_namespace_says_ambiguous_and_names_no_holder(fake):
    _same_addresses_in_three_namespaces(fake)
    result = owners.resolve([ep(80, 5000)], fake.root)[ep(80, 5000)]
    assert result.kind == owners.OWNER_AMBIGUOUS
    assert list(result.holders) == [] and result.netns is None and result.inode == 0
    assert result.other_netns == [111, 222, 333]


def test_resolve_without_a_namespace_still_names_a_unique_match(fake):
    fake.process(30, netns=111).process(31, netns=222)
    fake.tcp(30, V4, "127.0.0.1", 80, "127.0.0.1", 5000, CW, 1).fd(30, 4, 1)
    fake.tcp(31, V4, "127.0.0.1", 80, "127.0.0.1", 5001, CW, 2).fd(31, 4, 2)
    result = owners.resolve([ep(80, 5000)], fake.root)[ep(80, 5000)]
    assert result.kind == owners.OWNER_FD and result.netns == 111
    assert [h.pid for h in result.holders] == [30]


def test_resolve_in_a_namespace_without_the_socket_is_gone(fake):
    """Known namespace, addresses only elsewhere: gone, not the other's."""
    fake.process(30, netns=111).process(31, netns=222)
    fake.tcp(30, V4, "127.0.0.1", 80, "127.0.0.1", 5000, CW, 1).fd(30, 4, 1)
    result = owners.resolve([ep(80, 5000, netns=222)], fake.root)[ep(80, 5000, netns=222)]
    assert result.kind == owners.OWNER_GONE and list(result.holders) == []


def test_resolve_gone_and_unheld(fake):
    fake.process(40)
    fake.tcp(40, V4, "127.0.0.1", 81, "127.0.0.1", 5001, CW, 4242)
    got = owners.resolve([ep(81, 5001), ep(82, 5002)], fake.root)
    assert got[ep(81, 5001)].kind == owners.OWNER_NONE
    assert got[ep(82, 5002)].kind == owners.OWNER_GONE


def test_vanishing_process_is_a_missing_row_not_a_crash(fake, monkeypatch):
    fake.process(50).process(51)
    fake.tcp(50, V4, "127.0.0.1", 83, "127.0.0.1", 5003, CW, 77)
    fake.fd(50, 3, 77).fd(51, 3, 77)
    real = owners.procfs.read_process

    def racing(pid, proc, **kwargs):
        if pid == 51:                  # 51 exits between its fd scan and its stat read
            shutil.rmtree(f"{proc}/51")
        return real(pid, proc, **kwargs)

    monkeypatch.setattr(owners.procfs, "read_process", racing)
    got = owners.resolve([ep(83, 5003)], fake.root)[ep(83, 5003)]
    assert [h.pid for h in got.holders] == [50]


def test_a_file_path_too_long_to_read_does_not_hide_the_processs_sockets(fake, monkeypatch):
    """Review of 2026-12-05: one fd on a path longer than a page makes its
    link unreadable (ENAMETOOLONG), which any user can arrange; it was
    taken for the process's failure, and every socket the process held
    had no holder ("no process holds a file descriptor on it")."""
    import errno
    fake.process(70, comm="server")
    fake.tcp(70, V4, "127.0.0.1", 84, "127.0.0.1", 5004, CW, 78)
    fake.fd(70, 3, target="/deep/file").fd(70, 4, 78)
    real = owners.procfs.readlink

    def too_long(path, dir_fd=None):
        if path == "3" and dir_fd is not None:
            raise owners.procfs.ProcError(path, errno.ENAMETOOLONG)
        return real(path, dir_fd)

    monkeypatch.setattr(owners.procfs, "readlink", too_long)
    got = owners.resolve([ep(84, 5004)], fake.root)[ep(84, 5004)]
    assert got.kind == owners.OWNER_FD
    assert [(h.pid, h.fd) for h in got.holders] == [(70, 4)]


def test_a_holder_closing_one_socket_meanwhile_still_holds_the_others(fake, monkeypatch):
    """The check against a reused pid read the first matched fd's link
    again: a holder that closed that one socket meanwhile (it leaves
    CLOSE_WAIT) had every other socket it holds said "held by no process"
    in that lookup. One link still there proves the process; with every
    one closed it is skipped as before."""
    fake.process(71, comm="server")
    fake.tcp(71, V4, "127.0.0.1", 85, "127.0.0.1", 5005, CW, 81)
    fake.tcp(71, V4, "127.0.0.1", 85, "127.0.0.1", 5006, CW, 82)
    fake.fd(71, 3, 81).fd(71, 4, 82)
    real = owners.procfs.read_process
    closing = {3}

    def closes(pid, proc, **kwargs):
        for fd in closing:              # between the fd scan and the check
            os.remove(f"{proc}/71/fd/{fd}")
        closing.clear()
        return real(pid, proc, **kwargs)

    monkeypatch.setattr(owners.procfs, "read_process", closes)
    got = owners.resolve([ep(85, 5005), ep(85, 5006)], fake.root)
    assert [(h.pid, h.fd) for h in got[ep(85, 5006)].holders] == [(71, 4)]
    closing.add(4)                      # now the last one too
    got = owners.resolve([ep(85, 5006)], fake.root)
    assert got[ep(85, 5006)].holders == ()


def test_unreadable_entries_are_skipped(fake, tmp_path):
    fake.process(60)
    # A dangling fd link and a garbage pid directory must not break the scan.
    (tmp_path / "60" / "fd" / "9").symlink_to("pipe:[1]")
    (tmp_path / "notapid").mkdir()
    assert owners.find_holders([1, 2], fake.root) == {}


def test_snapshot_close_wait_across_namespaces(fake):
    fake.process(70, netns=1).process(71, netns=2).process(72, netns=2)
    fake.tcp(70, V4, "127.0.0.1", 1, "127.0.0.1", 2, CW, 5)
    fake.tcp(71, V4, "127.0.0.1", 3, "127.0.0.1", 4, CW, 6)
    fake.tcp(71, V4, "127.0.0.1", 9, "127.0.0.1", 9, tcpstates.ESTABLISHED, 7)
    rows = owners.snapshot_close_wait(fake.root)
    assert sorted((ns, r.endpoints.lport) for ns, r in rows) == [(1, 1), (2, 3)]


def test_close_on_exec_read_from_one_read_or_the_whole_file(tmp_path):
    """fdinfo's flags from the first read when it holds the whole line, else
    from the file read as before (a line cut, or "flags:" not at a line's
    start): the same answer either way."""
    cases = {
        "pos:\t0\nflags:\t02000002\nmnt_id:\t9\n": True,
        "pos:\t0\nflags:\t00000002\nmnt_id:\t9\n": False,
        "flags:\t02000000\n": True,
        "pos:\t0\nxflags:\t02000000\nflags:\t0\n": False,
        "pos:\t0\rflags:\t02000000\n": True,          # a line as splitlines() cuts it
        "pos:\t0\nflags:\tzz\n": None,
        "pos:\t0\n": None,
        "x" * 4090 + "\nflags:\t02000000\n": None,    # past the bound
        "x" * 4080 + "\nflags:\t02000000\n": True,
    }
    for i, (text, want) in enumerate(cases.items()):
        path = tmp_path / str(i)
        path.write_text(text)
        assert owners._fd_cloexec(str(path)) is want, text[-30:]
    assert owners._fd_cloexec(str(tmp_path / "missing")) is None


def test_empty_fields_of_many_sockets_are_one_shared_object(fake):
    """An ownership's empty sequences (no listener's holders, no other
    namespace, nobody denied) are one shared object, not three new lists
    per socket: 168 bytes of every socket's state and of every pickled
    answer (issue 20, memory at 100,000 sockets)."""
    _same_addresses_in_three_namespaces(fake)
    wanted = [ep(80, 5000, netns=ns) for ns in (333, 111, 222)]
    resolved = owners.resolve(wanted, fake.root)
    got = [resolved[w] for w in wanted]
    for name in ("listener_holders", "other_netns", "denied_named"):
        values = [getattr(own, name) for own in got]
        assert all(not v for v in values)
        assert all(v is values[0] for v in values), name
    assert len({id(own.holders) for own in got}) == 3      # each its own holders


def test_without_fd_flags_cloexec_is_read_only_where_it_decides(fake, monkeypatch):
    """snapshot's text without -v shows no fd's close-on-exec; it matters
    only to tell a socket inherited from the listener's server (held by one
    other process, diagnosis._decide). So without fd_flags the fdinfo of
    that holder is read and no other: the server's 30 sockets none."""
    fake.process(10, comm="server").process(13, comm="child", ppid=10)
    fake.tcp(10, V4, "0.0.0.0", 5555, "0.0.0.0", 0, LISTEN, 800)
    fake.fd(10, 3, 800, cloexec=True)
    for i in range(30):                          # the server's own sockets
        fake.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40000 + i, CW, 1000 + i)
        fake.fd(10, 10 + i, 1000 + i, cloexec=i % 2 == 0)
    fake.tcp(10, V4, "127.0.0.1", 5555, "10.1.2.4", 41002, CW, 2000)
    fake.fd(13, 5, 2000)                         # inherited: no close-on-exec
    fake.fd(13, 6, 2001, cloexec=True)           # and one with it
    fake.tcp(10, V4, "127.0.0.1", 5555, "10.1.2.5", 41003, CW, 2001)
    wanted = [ep(5555, 40000 + i) for i in range(30)] + [
        ep(5555, 41002, raddr="10.1.2.4"), ep(5555, 41003, raddr="10.1.2.5")]
    every = owners.resolve(wanted, fake.root)
    reads = []
    real = owners._fd_cloexec
    monkeypatch.setattr(owners, "_fd_cloexec",
                        lambda path, dir_fd=None: reads.append(path) or real(path, dir_fd))
    some = owners.resolve(wanted, fake.root, fd_flags=False)
    assert sorted(reads) == ["5", "6"]                  # pid 13's fds only
    for e in wanted:
        flags = [h.cloexec for h in some[e].holders]
        if e.rport >= 41000:
            assert flags == [h.cloexec for h in every[e].holders]
        else:
            assert flags == [None]
    assert [h.cloexec for h in some[wanted[30]].holders] == [False]
    assert [h.cloexec for h in some[wanted[31]].holders] == [True]
    assert [h.cloexec for h in every[wanted[0]].holders] == [True]    # read with fd_flags


def test_a_decisive_flag_of_a_reused_pid_stays_unknown(fake, monkeypatch):
    """The flags read after the scan are checked as the scan checks its
    own: the fd still links to the socket, else the pid was reused and the
    flags are not that holder's (left None)."""
    fake.process(10, comm="server").process(13, comm="child", ppid=10)
    fake.tcp(10, V4, "0.0.0.0", 5555, "0.0.0.0", 0, LISTEN, 800)
    fake.fd(10, 3, 800, cloexec=True)
    fake.tcp(10, V4, "127.0.0.1", 5555, "10.1.2.4", 41002, CW, 2000)
    fake.fd(13, 5, 2000)
    real = owners._cloexec_flags

    def then_reused(fd_dir, fds):
        flags = real(fd_dir, fds)
        if fd_dir.endswith("/13/fd"):            # fd 5 is now another socket
            os.unlink(os.path.join(fd_dir, "5"))
            fake.fd(13, 5, 9999)
        return flags

    wanted = [ep(5555, 41002, raddr="10.1.2.4")]
    monkeypatch.setattr(owners, "_cloexec_flags", then_reused)
    some = owners.resolve(wanted, fake.root, fd_flags=False)
    assert [h.pid for h in some[wanted[0]].holders] == [13]
    assert [h.cloexec for h in some[wanted[0]].holders] == [None]


def test_a_rescan_gives_each_user_a_turn_not_each_namespace():
    """One user's thousand namespaces come after another user's few: the
    users take turns, each user's least recently read first (never read
    before all)."""
    owner_of = {1000 + i: 65534 for i in range(1000)}
    owner_of.update({5: 0, 6: 0, 7: 1001})
    order = owners.fair_order(owner_of, {})
    assert sorted(order) == sorted(owner_of)
    assert set(order[:3]) == {5, 7, 1000} and set(order[3:5]) == {6, 1001}
    assert order[5:] == list(range(1002, 2000))
    # 1000 and 5 read by the last rescan, 6 never: 6 and 1001 come first.
    order = owners.fair_order(owner_of, {1000: 3, 5: 3, 7: 3})
    assert set(order[:2]) == {6, 1001} and set(order[2:5]) == {5, 7, 1002}
    assert order.index(1000) == len(order) - 1


def test_a_rescan_where_every_namespace_was_read_starts_with_the_oldest():
    owner_of = {10: 0, 11: 0, 12: 0}
    assert owners.fair_order(owner_of, {10: 5, 11: 2, 12: 4}) == [11, 12, 10]
    assert owners.fair_order({}, {10: 1}) == []


def test_a_namespace_is_read_through_its_next_process_when_the_first_is_gone(monkeypatch):
    """read_by_turns enters each namespace through one of its processes,
    listed a moment before: that one may have exited since (a short-lived
    process of a periodic job, whose pid came first after the counter
    wrapped), or its pid been reused in another namespace. Then the next
    process of that namespace is tried; before, such a namespace was
    silently not read (its sockets missing from `snapshot` and from the
    start-up, with no notice). A namespace no process of which answers is
    left for the next read, never taken as read."""
    from closewait_trace.sockets import procfs, sockdiag
    own = procfs.ns_inode(procfs.read_link("/proc/thread-self/ns/net"))
    victim, reused = 500, 600
    row = owners.TcpRow(ep(7702, 40000, netns=victim), CW, 0, 1, 0, 99)
    monkeypatch.setattr(procnet, "scan_network_namespace_pids",
                        lambda proc, most=3: ({own: [1], victim: [300, 400], reused: [700]}, set()))
    monkeypatch.setattr(procfs, "real_uid", lambda pid, proc: 0)
    entered = []

    def tcp_sockets_in(states, ns_path, with_info=True, deadline=None, ports=None):
        entered.append(ns_path)
        if ns_path is None:
            return own, []
        if ns_path.endswith("/300/ns/net"):
            raise FileNotFoundError(2, "No such process")      # exited since the listing
        if ns_path.endswith("/400/ns/net"):
            return victim, [row]
        return 999, []                                         # 700: reused elsewhere

    monkeypatch.setattr(sockdiag, "tcp_sockets_in", tcp_sockets_in)
    read = owners.read_by_turns([CW], "/proc", budget_s=10)
    assert entered == [None, "/proc/300/ns/net", "/proc/400/ns/net", "/proc/700/ns/net"]
    assert read.rows == [row]
    assert read.dumped == {own, victim}
    assert read.tried == [victim, reused] and read.unread == [] and not read.cut
    assert read.left == [reused] and read.not_read == []


def test_a_namespace_cut_short_counts_as_not_read():
    read = owners.RescanRead([], {11}, [11, 12], [13, 14], {}, 12)
    assert read.not_read == [13, 14, 12]
    assert read.left == [13, 14, 12]


def test_the_owner_lookup_enters_a_namespace_through_its_next_process(monkeypatch):
    """The owner lookup enters each due socket's namespace through one of
    its processes too: when that one had exited since the listing, its
    empty answer said the socket had left CLOSE_WAIT (OWNER_GONE), and the
    live tracer forgot a socket from before the start without reporting
    it. Now the next process is tried (procnet.namespace_rows)."""
    from closewait_trace.sockets import procfs, sockdiag
    own = procfs.ns_inode(procfs.read_link("/proc/thread-self/ns/net"))
    victim = 500
    wanted = ep(7702, 40000, netns=victim)
    row = owners.TcpRow(wanted, CW, 0, 1, 0, 987654321)
    monkeypatch.setattr(procnet, "scan_network_namespace_pids",
                        lambda proc, most=3: ({own: [1], victim: [300, 400]}, set()))
    entered = []

    def tcp_sockets_in(states, ns_path, with_info=True, deadline=None, ports=None):
        entered.append(ns_path)
        if ns_path.endswith("/300/ns/net"):
            raise FileNotFoundError(2, "No such process")      # exited since the listing
        return victim, [row]

    monkeypatch.setattr(sockdiag, "tcp_sockets_in", tcp_sockets_in)
    found = owners.resolve([wanted], "/proc")
    assert entered == ["/proc/300/ns/net", "/proc/400/ns/net"]
    assert found[wanted].kind != owners.OWNER_GONE
    assert found[wanted].inode == 987654321


def _timed_namespaces(monkeypatch, others, cost_s):
    """The tracer's own namespace and `others`, one socket in CLOSE_WAIT
    each (lport 7000 + netns % 1000), through sock_diag stand-ins whose
    dumps of other namespaces cost cost_s (or cost_s[netns]) on owners'
    clock and honour the dump's deadline as sockdiag does (DumpCut)."""
    from closewait_trace.sockets import procfs, sockdiag
    own = procfs.ns_inode(procfs.read_link("/proc/thread-self/ns/net"))
    clock = {"now": 0.0}
    listing = {own: [1]}
    listing.update({ns: [10_000 + i] for i, ns in enumerate(others)})
    pid_ns = {pids[0]: ns for ns, pids in listing.items()}
    monkeypatch.setattr(procnet, "scan_network_namespace_pids", lambda proc, most=3: (listing, set()))
    # One user's namespaces, whatever runs here: the lookup takes each
    # namespace's user from its first process's real uid, and these pids
    # are made up. Read from the machine's /proc, a real process that had
    # one of them (a kworker, pid 10003, after a few thousand test
    # processes) made its namespace another user's, read in its own turn.
    monkeypatch.setattr(procfs, "real_uid", lambda pid, proc="/proc": 65534)
    monkeypatch.setattr(owners.time, "monotonic", lambda: clock["now"])
    entered = []

    def tcp_sockets_in(states, ns_path, with_info=True, deadline=None, ports=None):
        netns = own if ns_path is None else pid_ns[int(ns_path.split("/")[2])]
        entered.append(netns)
        if netns != own:
            cost = cost_s[netns] if isinstance(cost_s, dict) else cost_s
            if deadline is not None and clock["now"] + cost > deadline:
                clock["now"] = deadline
                raise sockdiag.DumpCut([])
            clock["now"] += cost
        row = owners.TcpRow(ep(7000 + netns % 1000, 40000, netns=netns), CW, 0, 0, 0,
                            987_000_000 + netns % 1000)
        return netns, [row]

    monkeypatch.setattr(sockdiag, "tcp_sockets_in", tcp_sockets_in)
    return own, entered, clock


def test_the_owner_lookup_reads_other_namespaces_for_its_budget_only(monkeypatch):
    """Issue 20's scale review: 20 of a user's namespaces with 16M-bucket
    TCP hashes (140 ms a dump, even empty) made one owner lookup 3-4 s.
    With others_budget_s, the tracer's own namespace is read first, then
    the others in the order of the sockets asked (oldest first), at least
    one, then each that the slowest so far says would fit (a dump cut at
    the deadline is work thrown away); the sockets of the namespaces left
    are OWNER_NOT_READ, not gone."""
    others = [900 + i for i in range(20)]
    own, entered, clock = _timed_namespaces(monkeypatch, others, cost_s=0.14)
    asked = [ep(7000 + ns % 1000, 40000, netns=ns) for ns in reversed(others)]
    asked.append(ep(7000 + own % 1000, 40000, netns=own))
    found = owners.resolve(asked, "/proc", others_budget_s=0.2)
    # Own first; 919 whole (0.14 s); 918, never read, is not started: its
    # user's slowest read here (919's) says it would not fit.
    assert entered == [own, 919]
    # Read: in the table, held by nobody this process may see.
    looked = {owners.OWNER_NONE, owners.OWNER_DENIED}
    kinds = {e.netns: found[e].kind for e in asked}
    assert kinds.pop(own) in looked and kinds.pop(919) in looked
    assert set(kinds.values()) == {owners.OWNER_NOT_READ}
    # What each took, for the caller's memory.
    took = {e.netns: found[e].netns_read_s for e in asked}
    assert took.pop(919) == pytest.approx(0.14) and set(took.values()) == {None}
    # The next lookup, told 919 was read by the last and that 917 took
    # 10 ms: 918 first (least recently read), then 917 by its own time,
    # which is wrong: its dump is cut, and it is taken to need the budget.
    entered.clear()
    memory = owners.LookupMemory({919: 1}, {}, {917: 0.01})
    found = owners.resolve(asked, "/proc", others_budget_s=0.2, memory=memory)
    assert entered == [own, 918, 917]
    assert found[asked[2]].kind == owners.OWNER_NOT_READ and found[asked[2]].netns_read_s == 0.2
    # Without a budget (snapshot), all are read.
    entered.clear()
    found = owners.resolve(asked, "/proc")
    assert sorted(entered) == sorted([own] + others)
    assert {found[e].kind for e in asked} <= looked


def test_a_namespace_dump_the_deadline_cuts_is_not_read(monkeypatch):
    """One that the slowest so far said would fit, and did not: its dump
    is cut at the deadline, and its socket is OWNER_NOT_READ (a socket
    missing from part of a table has not left CLOSE_WAIT)."""
    others = [901, 902, 903]
    own, entered, clock = _timed_namespaces(monkeypatch, others,
                                     cost_s={901: 0.05, 902: 0.5, 903: 0.01})
    asked = [ep(7000 + ns % 1000, 40000, netns=ns) for ns in others]
    found = owners.resolve(asked, "/proc", others_budget_s=0.2)
    assert entered == [901, 902]
    assert [found[e].kind != owners.OWNER_NOT_READ for e in asked] == [True, False, False]


def test_the_budget_starts_after_the_tracers_own_namespace(monkeypatch):
    """A review found the own namespace's read (0.64 s with a user's 95,000
    listeners in it) spent the others' budget: one other namespace a
    lookup. The budget starts with the first other namespace."""
    from closewait_trace.sockets import sockdiag
    others = [900 + i for i in range(5)]
    own, entered, clock = _timed_namespaces(monkeypatch, others, cost_s=0.01)
    real = sockdiag.tcp_sockets_in

    def slow_own(states, ns_path, with_info=True, deadline=None, ports=None):
        if ns_path is None:
            clock["now"] += 0.64
        return real(states, ns_path, with_info, deadline, ports)

    monkeypatch.setattr(sockdiag, "tcp_sockets_in", slow_own)
    asked = [ep(7000 + ns % 1000, 40000, netns=ns) for ns in [own] + others]
    found = owners.resolve(asked, "/proc", others_budget_s=0.2)
    assert {found[e].kind for e in asked} <= {owners.OWNER_NONE, owners.OWNER_DENIED}


def test_the_owner_lookup_reads_every_namespace_when_one_is_unknown(monkeypatch):
    """A socket whose namespace is not known (no BTF offsets) may be in any
    namespace: a lookup that left some unread could call it gone. No budget
    applies then."""
    others = [900 + i for i in range(5)]
    own, entered, clock = _timed_namespaces(monkeypatch, others, cost_s=0.14)
    asked = [ep(7000 + ns % 1000, 40000, netns=ns) for ns in others] + [ep(7903, 40000)]
    found = owners.resolve(asked, "/proc", others_budget_s=0.2)
    assert sorted(entered) == sorted([own] + others)
    assert {found[e].kind for e in asked} <= {owners.OWNER_NONE, owners.OWNER_DENIED}


def test_the_fd_walk_takes_the_users_with_most_fds_last_and_counts_what_its_time_left(
        fake, monkeypatch):
    """A user can hold as many fds as RLIMIT_NOFILE allows in each of their
    processes, and every owner lookup read them all before any socket's
    holders were known (200,000 as nobody: 0.8 s a lookup). Past
    FDS_IN_ANY_ORDER fds, the users with the fewest are walked first, the
    walk stops when FD_WALK_BUDGET_S is up, and the processes left are
    counted: a socket they alone hold is unknown, not "no holder", and one
    another process holds may have more holders. The hog's pids come first
    (pid order would walk it first). The clock jumps past the budget once
    the walk enters the hog's first fd table."""
    from closewait_trace.sockets import procfs
    for pid in (5, 6):
        fake.process(pid, comm="hog", uid=65534)
        for fd in range(3, 40):
            fake.fd(pid, fd, target="/dev/null")
    fake.process(10, comm="server", uid=0)
    fake.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, CW, 900, rx=1)
    fake.fd(10, 5, 900)
    fake.tcp(6, V4, "127.0.0.1", 40001, "127.0.0.1", 5556, CW, 901, rx=1)
    fake.fd(6, 50, 901)
    # The hog's listener, a connection in its queue: not "held by no process".
    fake.tcp(6, V4, "0.0.0.0", 7000, "0.0.0.0", 0, LISTEN, 902)
    fake.fd(6, 51, 902)
    fake.tcp(6, V4, "127.0.0.1", 7000, "127.0.0.1", 41000, CW, 0, rx=1)
    # A user with more fds still: walked after the hog; of theirs, one
    # without fds is not counted as not read.
    fake.process(8, comm="big", uid=70000)
    for fd in range(3, 103):
        fake.fd(8, fd, target="/dev/null")
    fake.process(9, comm="idle", uid=70000)
    monkeypatch.setattr(owners, "FDS_IN_ANY_ORDER", 20)
    monkeypatch.setattr(owners, "_LINKS_PER_CLOCK", 4)
    now = [0.0]
    opened = procfs.opened_dir

    def opening(path, *args, **kw):
        if path.startswith(f"{fake.root}/5/") or path.startswith(f"{fake.root}/6/"):
            now[0] = 100.0               # the hog's table is where the time goes
        return opened(path, *args, **kw)

    monkeypatch.setattr(procfs, "opened_dir", opening)
    monkeypatch.setattr(owners, "_clock", lambda: now[0])
    assert owners.walk_order(fake.root)[0] == [10, 5, 6, 9, 8]
    server, hogs, queued = ep(5555, 40000), ep(40001, 5556), ep(7000, 41000)
    got = owners.resolve([server, hogs, queued], fake.root)
    assert got[server].kind == owners.OWNER_FD
    assert [h.pid for h in got[server].holders] == [10]
    assert got[server].fds_not_read == (3, ["5/hog", "6/hog", "8/big"])
    assert got[hogs].kind == owners.OWNER_FDS_NOT_READ and not got[hogs].holders
    said = diagnosis.gather(got[server], fake.root, machine="x86_64")
    assert said.summary.endswith("; holders may be missing: the file descriptors of 3 "
                                 "other processes (5/hog, 6/hog, 8/big) were not read in "
                                 "time"), said.summary
    assert said.evidence["fds_not_read_processes"] == 3
    said = diagnosis.gather(got[hogs], fake.root, machine="x86_64")
    assert said.cause == diagnosis.UNKNOWN
    assert said.summary == ("unknown: no holder among the processes read; the file "
                            "descriptors of 3 processes (5/hog, 6/hog, 8/big) were not read "
                            "in time")
    said = diagnosis.gather(got[queued], fake.root, machine="x86_64")
    assert said.summary.endswith(", held by none of the processes read"), said.summary
    now[0] = 0.0
    assert owners.held_now([900, 901], fake.root) == [True, None]
    # Within the time, every table is read, in the same order.
    monkeypatch.setattr(procfs, "opened_dir", opened)
    got = owners.resolve([server, hogs, queued], fake.root)
    assert got[server].fds_not_read is None and got[hogs].fds_not_read is None
    assert [h.pid for h in got[hogs].holders] == [6]
    said = diagnosis.gather(got[queued], fake.root, machine="x86_64")
    assert said.summary.endswith(", held by 6/hog [S]"), said.summary
    assert owners.held_now([900, 901], fake.root) == [True, True]


def test_a_table_grown_far_past_its_count_is_left_and_counted(fake, monkeypatch):
    """The walk's order rests on each table's count, taken first: a process
    counted small (a zombie leader's empty directory, or a dup() loop after
    the count) was walked early and spent the budget on its fds, and root's
    holder after it went unread (a review). One that grows past twice its
    count and _GROWTH_SLACK is left, counted as not read, and the walk goes
    on to the others."""
    fake.process(5, comm="grower", uid=65534)
    for fd in range(3, 40):
        fake.fd(5, fd, target="/dev/null")
    fake.process(10, comm="server", uid=0)
    fake.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, CW, 900, rx=1)
    fake.fd(10, 5, 900)
    monkeypatch.setattr(owners, "_LINKS_PER_CLOCK", 4)
    monkeypatch.setattr(owners, "_GROWTH_SLACK", 8)
    counted = owners._fd_count
    monkeypatch.setattr(owners, "_fd_count",
                        lambda pid, proc, sized: 0 if pid == 5 else counted(pid, proc, sized))
    server = ep(5555, 40000)
    got = owners.resolve([server], fake.root)[server]
    assert [h.pid for h in got.holders] == [10]
    assert got.fds_not_read == (1, ["5/grower"])


def test_a_zombie_leaders_table_is_counted_through_its_live_thread(fake):
    """A leader that called pthread_exit() has an empty fd directory (size
    0 on Linux 6.2 on) while a live thread's table holds the fds: counted
    as the walk reads it, through the thread (the size on a real /proc:
    tests/root/test_fd_walk_budget.py)."""
    fake.process(7, comm="zombie", state="Z", threads={7: ("Z", "running", "0"),
                                                     8: ("S", "running", "0")})
    for fd in range(3, 13):
        fake.fd(7, fd, target="/dev/null", tid=8)
    # Its 10 fds, and 1 for its other thread (a kcmp: _own_tables).
    assert owners._fd_count(7, fake.root, sized=False) == 11


def _threads(pid, *tids):
    return {tid: ("S", "running", "0") for tid in (pid, *tids)}


def test_a_socket_in_a_threads_own_table_is_its_process(fake):
    """A thread that called unshare(CLONE_FILES) has a table of its own,
    which /proc/PID/fd does not show: a socket only it holds was "held by
    no process". Its process is the holder, with the fd of that table and
    its flags; a socket in both tables (the copy unshare made) is one
    holder, the leader's fd. On a real /proc: tests/root/test_thread_fd_tables.py."""
    fake.process(7, comm="server", threads=_threads(7, 8, 9))
    fake.tcp(7, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, CW, 900, rx=1)
    fake.tcp(7, V4, "127.0.0.1", 5555, "127.0.0.1", 40001, CW, 901, rx=1)
    fake.fd(7, 4, 901)
    fake.fd(7, 5, 901, tid=8)           # the copy
    fake.fd(7, 6, 900, tid=8, cloexec=True)
    only_thread, both = ep(5555, 40000), ep(5555, 40001)
    got = owners.resolve([only_thread, both], fake.root)
    assert got[only_thread].kind == owners.OWNER_FD
    assert [(h.pid, h.fd, h.cloexec) for h in got[only_thread].holders] == [(7, 6, True)]
    assert [(h.pid, h.fd) for h in got[both].holders] == [(7, 4)]
    assert owners.held_now([900, 901], fake.root) == [True, True]


def test_a_threads_own_table_past_the_processs_count_leaves_it_unread(fake, monkeypatch):
    """The walk's order rests on each process's count, taken first: its
    table's fds and one for each other thread (each costs a kcmp), not
    its threads' own tables (listing them all for the order was 0.4 s for
    one user's 28,000 threads, before the budget's clock: a review). A
    thread's own table with more than twice that and _GROWTH_SLACK leaves
    the process unread and counted, as a table that grew does; the walk
    goes on to the others."""
    monkeypatch.setattr(owners, "_LINKS_PER_CLOCK", 4)
    monkeypatch.setattr(owners, "_GROWTH_SLACK", 8)
    fake.process(7, comm="hider", uid=65534, threads=_threads(7, 8))
    fake.fd(7, 3, target="/dev/null")
    for fd in range(3, 40):
        fake.fd(7, fd, target="/dev/null", tid=8)
    assert owners._fd_count(7, fake.root, sized=False) == 2
    fake.process(10, comm="server", uid=0)
    fake.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, CW, 900, rx=1)
    fake.fd(10, 5, 900)
    server = ep(5555, 40000)
    got = owners.resolve([server], fake.root)[server]
    assert [h.pid for h in got.holders] == [10]
    assert got.fds_not_read == (1, ["7/hider"])


def test_a_socket_not_found_while_threads_tables_change_is_not_said_unheld(fake, monkeypatch):
    """A socket can go from one thread's own table to the next's (the
    successor unshares, then the holder closes its copy or ends) faster
    than a walk reads them: not found, it was "held by no process" (a
    review: 33 of 200 lookups). A thread with a table of its own that was
    not there when its process's tables were read, or one gone before its
    table was read, makes that process unread: "unknown", not "none"."""
    fake.process(7, comm="rotator", threads=_threads(7, 8))
    fake.tcp(7, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, CW, 900, rx=1)
    fake.fd(7, 5, 900, tid=8)
    server = ep(5555, 40000)
    assert [h.pid for h in owners.resolve([server], fake.root)[server].holders] == [7]
    # The walk read 7's threads {7, 8}; by the time it looks again the
    # socket is in thread 9's table, not in 8's.
    listed = owners._threads

    def moving(pid, proc):
        tids = listed(pid, proc)
        if pid == 7 and tids == {7, 8} and not os.path.exists(
                os.path.join(fake.root, "7", "task", "9")):
            os.unlink(os.path.join(fake.root, "7", "task", "8", "fd", "5"))
            fake.process(7, comm="rotator", threads=_threads(7, 8, 9))
            fake.fd(7, 5, 900, tid=9)
        return tids
    monkeypatch.setattr(owners, "_threads", moving)
    got = owners.resolve([server], fake.root)[server]
    assert got.kind == owners.OWNER_FDS_NOT_READ, got
    assert got.fds_not_read == (1, ["7/rotator"])
    # Looked up again, now that it stays in 9's table: found there.
    assert [(h.pid, h.fd) for h in owners.resolve([server], fake.root)[server].holders] == \
        [(7, 5)]


def test_a_thread_that_ends_while_its_table_is_read_costs_only_that_table(fake, monkeypatch):
    """A thread with a table of its own that ends between the listing of
    its table and the reading of its links: the whole process was skipped
    as gone (its leader's holders with it), and the socket only its other
    threads held was "held by no process" (a review, in 1 of 300 lookups).
    Now only that table is left: the leader's fds are named, and a socket
    not found is "unknown" (its process had tables of its own)."""
    fake.process(7, comm="rotator", threads=_threads(7, 8))
    fake.tcp(7, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, CW, 900, rx=1)
    fake.tcp(7, V4, "127.0.0.1", 5555, "127.0.0.1", 40001, CW, 901, rx=1)
    fake.fd(7, 5, 900)
    fake.fd(7, 6, 901, tid=8)
    listed = procfs.listdir
    own_table = os.path.join(fake.root, "7", "task", "8", "fd")

    def ending(path):
        names = listed(path)
        if path == own_table:
            shutil.rmtree(path)             # the thread ends: its table goes
        return names
    monkeypatch.setattr(procfs, "listdir", ending)
    leaders, threads = ep(5555, 40000), ep(5555, 40001)
    got = owners.resolve([leaders, threads], fake.root)
    assert [(h.pid, h.fd) for h in got[leaders].holders] == [(7, 5)]
    assert got[threads].kind == owners.OWNER_FDS_NOT_READ, got[threads]
