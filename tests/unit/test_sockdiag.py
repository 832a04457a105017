"""sock_diag replies: decoding struct tcp_info's times, and robustness
against lengths that do not add up (the parser must skip, never raise)."""

import os
import random
import socket
import struct
import time

import pytest

from closewait_trace.sockets import sockdiag
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints
from tests.unit.cycles import cycles_left

# One recv() of a real SOCK_DIAG_BY_FAMILY dump (Linux 6.18, x86-64): a
# socket in CLOSE_WAIT on 127.0.0.1:35885 whose peer sent 5 bytes, then
# closed 0.7 s later; dumped 1.2 s after the close. `ss -tni` would say
# lastrcv:1900 lastack:1200. Attributes: SHUTDOWN, 15, CGROUP_ID, SOCKOPT,
# then INFO (280 bytes of tcp_info).
REAL_DUMP = bytes.fromhex(
    "9801000014000200010000006a350000020800008c2dd2067f00000100000000000000000000"
    "00007f000001000000000000000000000000000000003b100000000000000000000006000000"
    "0000000000000000d1620d00050008000100000008000f00000000000c001500010000000000"
    "000006001600520000001c010200080000000007aa01400d0300409c00000080000018020000"
    "00000000000000000000000000000000000000006c070000000000006c070000b0040000ffff"
    "0000cbff00001d0000000e000000ffffff7f0a000000cbff00000300000000000000cbff0000"
    "000000009ff3bc8407000000ffffffffffffffff000000000000000006000000000000000200"
    "000004000000000000001d000000010000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000001000000000000000000000000000000000000000000"
    "0000000000000000000000000000000001000000010000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000")
REAL_DONE = bytes.fromhex("1400000003000200010000006a35000000000000")

NLMSG = struct.Struct("=IHHII")
DIAG_MSG_SIZE = 72


def diag_message(attributes: bytes, body: bytes = REAL_DUMP[16:16 + DIAG_MSG_SIZE]) -> bytes:
    payload = body + attributes
    return NLMSG.pack(16 + len(payload), 20, 2, 1, 0) + payload


def rtattr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + bytes(-len(raw) % 4)


def real_tcp_info() -> bytes:
    # the INFO attribute is the last one of the captured message
    start = REAL_DUMP.index(bytes.fromhex("1c010200"))
    return REAL_DUMP[start + 4:start + 0x11C]


def test_real_dump_decodes_the_close_wait_socket_and_its_tcp_info_times():
    rows, finished = sockdiag.parse_messages(REAL_DUMP)
    assert not finished and len(rows) == 1
    row = rows[0]
    assert (row.endpoints.laddr, row.endpoints.lport) == ("127.0.0.1", 35885)
    assert (row.endpoints.raddr, row.endpoints.rport) == ("127.0.0.1", 53766)
    assert row.state == tcpstates.CLOSE_WAIT
    assert row.rx_queue == 6            # 5 unread bytes + the FIN
    assert row.inode == 877265
    assert (row.last_ack_recv_ms, row.last_data_recv_ms) == (1200, 1900)
    rows, finished = sockdiag.parse_messages(REAL_DUMP + REAL_DONE)
    assert finished and len(rows) == 1


@pytest.mark.parametrize("size, want", [
    (0, (None, None)),
    (52, (None, None)),          # ends just before tcpi_last_data_recv
    (56, (None, 1900)),          # holds last_data_recv, not last_ack_recv
    (59, (None, 1900)),
    (60, (1200, 1900)),
    (104, (1200, 1900)),         # the 2.6 kernels' struct tcp_info
    (280, (1200, 1900)),         # this kernel's
])
def test_short_and_old_tcp_info_sizes(size, want):
    info = real_tcp_info()
    assert len(info) == 280
    assert sockdiag.tcp_info_times(info[:size]) == want
    rows, _ = sockdiag.parse_messages(diag_message(rtattr(sockdiag.INET_DIAG_INFO, info[:size])))
    assert (rows[0].last_ack_recv_ms, rows[0].last_data_recv_ms) == want


def test_a_longer_tcp_info_from_a_newer_kernel_is_read_at_the_same_offsets():
    info = real_tcp_info() + b"\xff" * 64
    rows, _ = sockdiag.parse_messages(diag_message(rtattr(sockdiag.INET_DIAG_INFO, info)))
    assert (rows[0].last_ack_recv_ms, rows[0].last_data_recv_ms) == (1200, 1900)


def test_u32_counters_are_unsigned():
    info = bytearray(60)
    struct.pack_into("=II", info, 52, 0xFFFFFFFF, 0x80000000)
    assert sockdiag.tcp_info_times(bytes(info)) == (0x80000000, 0xFFFFFFFF)


def test_no_info_attribute_means_no_times():
    rows, _ = sockdiag.parse_messages(diag_message(rtattr(8, b"\x00")))
    assert rows[0].last_ack_recv_ms is None and rows[0].last_data_recv_ms is None
    assert rows[0].inode == 877265


def test_an_attribute_overrunning_its_message_ends_the_attributes_not_the_row():
    info = real_tcp_info()
    bad = struct.pack("=HH", 4 + len(info) + 40, sockdiag.INET_DIAG_INFO) + info
    rows, _ = sockdiag.parse_messages(diag_message(rtattr(8, b"\x00") + bad))
    assert len(rows) == 1 and rows[0].last_ack_recv_ms is None


def test_zero_length_attribute_does_not_loop():
    rows, _ = sockdiag.parse_messages(diag_message(struct.pack("=HH", 0, 2) + bytes(64)))
    assert len(rows) == 1 and rows[0].last_ack_recv_ms is None


def test_nested_flag_bits_do_not_hide_the_info_attribute():
    info = real_tcp_info()
    rows, _ = sockdiag.parse_messages(diag_message(rtattr(sockdiag.INET_DIAG_INFO | 0x8000, info)))
    assert rows[0].last_ack_recv_ms == 1200


def test_message_longer_than_the_read_is_skipped_and_earlier_rows_kept():
    good = diag_message(b"")
    overrun = NLMSG.pack(4096, 20, 2, 1, 0) + REAL_DUMP[16:16 + DIAG_MSG_SIZE]
    rows, finished = sockdiag.parse_messages(good + overrun + REAL_DONE)
    assert len(rows) == 1 and not finished


def test_message_too_short_for_its_type_is_skipped():
    short = NLMSG.pack(16 + 20, 20, 2, 1, 0) + bytes(20)
    rows, finished = sockdiag.parse_messages(short + diag_message(b"") + REAL_DONE)
    assert len(rows) == 1 and finished


def test_header_length_below_header_size_stops_the_read():
    rows, finished = sockdiag.parse_messages(NLMSG.pack(3, 20, 2, 1, 0) + REAL_DUMP)
    assert rows == [] and not finished


def test_the_socket_cookie_is_read_low_half_first():
    """inet_diag_sockid's cookie[2] (u32s, the low half first): 4155 in the
    real dump; a cookie past 32 bits keeps its high half."""
    [row], _ = sockdiag.parse_messages(REAL_DUMP)
    assert row.cookie == 4155
    body = bytearray(REAL_DUMP[16:16 + DIAG_MSG_SIZE])
    body[44:52] = struct.pack("=II", 7, 2)
    [row], _ = sockdiag.parse_messages(diag_message(b"", bytes(body)))
    assert row.cookie == (2 << 32) | 7


def test_unknown_address_family_is_skipped():
    body = bytearray(REAL_DUMP[16:16 + DIAG_MSG_SIZE])
    body[0] = socket.AF_UNIX
    rows, _ = sockdiag.parse_messages(diag_message(b"", bytes(body)) + diag_message(b""))
    assert len(rows) == 1 and rows[0].endpoints.family == socket.AF_INET


def test_kernel_error_reply_is_an_oserror_and_an_ack_is_not():
    with pytest.raises(OSError) as exc:
        sockdiag.parse_messages(NLMSG.pack(20, 2, 0, 1, 0) + struct.pack("=i", -13))
    assert exc.value.errno == 13
    with pytest.raises(OSError):     # truncated error payload: still the kernel saying no
        sockdiag.parse_messages(NLMSG.pack(16, 2, 0, 1, 0))
    ack = NLMSG.pack(20, 2, 0, 1, 0) + struct.pack("=i", 0)
    rows, finished = sockdiag.parse_messages(ack + REAL_DUMP + REAL_DONE)
    assert len(rows) == 1 and finished


def test_random_damage_never_raises_anything_but_oserror():
    rng = random.Random(9)
    whole = REAL_DUMP + REAL_DONE
    for _ in range(3000):
        data = bytearray(whole)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data[:rng.randint(0, len(data))])
        try:
            sockdiag.parse_messages(data)
        except OSError:
            pass
    for _ in range(500):
        try:
            sockdiag.parse_messages(os.urandom(rng.randint(0, 600)))
        except OSError:
            pass


def test_request_asks_for_tcp_info_in_the_same_dump():
    req = sockdiag.build_request(socket.AF_INET6, [tcpstates.CLOSE_WAIT])
    family, protocol, ext = struct.unpack_from("=BBB", req, 16)
    assert (family, protocol) == (socket.AF_INET6, socket.IPPROTO_TCP)
    assert ext == 1 << (sockdiag.INET_DIAG_INFO - 1)
    assert struct.unpack_from("=I", req, 20)[0] == 1 << tcpstates.CLOSE_WAIT

def _message(state: int, lport: int, rport: int, inode: int, rx: int = 0, tx: int = 0) -> bytes:
    """A SOCK_DIAG_BY_FAMILY message of an IPv4 socket 127.0.0.1:lport ->
    10.0.0.9:rport, uid 1000."""
    src = socket.inet_pton(socket.AF_INET, "127.0.0.1") + bytes(12)
    dst = socket.inet_pton(socket.AF_INET, "10.0.0.9") + bytes(12)
    body = struct.pack("=BBBB", socket.AF_INET, state, 0, 0) + \
        lport.to_bytes(2, "big") + rport.to_bytes(2, "big") + src + dst + \
        struct.pack("=I8sIIIII", 0, bytes(8), 0, rx, tx, 1000, inode)
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body


def test_sockdiag_request_and_reply_round_trip():
    req = sockdiag.build_request(socket.AF_INET, [tcpstates.CLOSE_WAIT, tcpstates.LISTEN])
    length, kind, flags, _seq, _pid = struct.unpack_from("=IHHII", req)
    assert length == len(req) == 16 + 56 and kind == 20 and flags & 0x300
    assert struct.unpack_from("=I", req, 20)[0] == (1 << 8) | (1 << 10)
    msg = _message(tcpstates.LISTEN, 8080, 0, 555, rx=3, tx=128)
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4)
    rows, finished = sockdiag.parse_messages(msg + done)
    assert finished and len(rows) == 1
    row = rows[0]
    assert (row.endpoints.laddr, row.endpoints.lport, row.endpoints.raddr) == ("127.0.0.1", 8080, "10.0.0.9")
    assert (row.state, row.rx_queue, row.tx_queue, row.uid, row.inode) == (tcpstates.LISTEN, 3, 128, 1000, 555)
    err = struct.pack("=IHHII", 20, 2, 0, 1, 0) + struct.pack("=i", -13)
    with pytest.raises(OSError):
        sockdiag.parse_messages(err)


def test_every_field_of_a_message_is_read_into_its_own_name():
    """_row builds the row positionally: each field lands in its name,
    asked with tcp_info or without."""
    msg = _message(tcpstates.CLOSE_WAIT, 8080, 40000, 555, rx=3, tx=128)
    at_timer, at_cookie = 16 + 2, 16 + 4 + 2 + 2 + 16 + 16 + 4
    msg = (msg[:at_timer] + bytes([2]) + msg[at_timer + 1:at_cookie]
           + struct.pack("=II", 7, 1) + msg[at_cookie + 8:])
    for with_info in (True, False):
        rows, _ = sockdiag.parse_messages(msg, 4026531840, with_info=with_info)
        row = rows[0]
        assert row.endpoints == Endpoints(socket.AF_INET, "127.0.0.1", 8080, "10.0.0.9", 40000,
                                          4026531840)
        assert (row.state, row.tx_queue, row.rx_queue, row.uid, row.inode, row.timer,
                row.cookie, row.last_ack_recv_ms, row.last_data_recv_ms) == (
            tcpstates.CLOSE_WAIT, 128, 3, 1000, 555, 2, 7 | 1 << 32, None, None)


def test_a_ports_filter_makes_rows_of_listeners_and_those_pairs_only():
    """parse_messages(ports=...): the sockets whose (local, remote) port
    pair is asked for, and every listener; the others passed over. Pairs
    are ordered: (80, 5000) is not (5000, 80)."""
    data = b"".join([
        _message(tcpstates.CLOSE_WAIT, 80, 5000, 1),
        _message(tcpstates.CLOSE_WAIT, 5000, 80, 2),        # the pair reversed
        _message(tcpstates.CLOSE_WAIT, 80, 5001, 3),
        _message(tcpstates.LISTEN, 8080, 0, 4),
        _message(tcpstates.CLOSE_WAIT, 443, 65535, 5),
    ])
    ports = sockdiag.port_pairs([(80, 5000), (443, 65535), (1, 2)])
    rows, _ = sockdiag.parse_messages(data, ports=ports)
    assert [r.inode for r in rows] == [1, 4, 5]
    everything, _ = sockdiag.parse_messages(data)
    assert [r.inode for r in everything] == [1, 2, 3, 4, 5]
    # The rows made are the same rows.
    assert rows == [r for r in everything if r.inode in (1, 4, 5)]
    # Damage is still skipped, never raised: a message too short for its
    # type, with a wanted pair in its first bytes.
    short = _message(tcpstates.CLOSE_WAIT, 80, 5000, 9)
    short = struct.pack("=IHHII", 16 + 8, 20, 2, 1, 0) + short[16:24]
    rows, _ = sockdiag.parse_messages(short + data, ports=ports)
    assert [r.inode for r in rows] == [1, 4, 5]


def test_a_port_outside_sixteen_bits_is_left_out_of_the_filter_not_raised_on():
    """Endpoints read from a crafted table (a /proc/PID/net/tcp line with a
    port of 0x12345) reach port_pairs: the pair can match no message, and
    the owner lookup still answers (it raised struct.error)."""
    assert sockdiag.port_pairs([(0x12345, 80), (80, -1), (80, 5000)]) == \
        sockdiag.port_pairs([(80, 5000)])


def test_the_owner_lookup_asks_the_dump_for_the_wanted_port_pairs(monkeypatch):
    """owners.resolve hands the wanted sockets' port pairs to the dump, so
    that it makes rows of those only (the filter's whole point: a lookup
    of one socket among 100,000 made 100,000 rows)."""
    from closewait_trace.sockets import owners, procfs, procnet
    own = procfs.ns_inode(procfs.read_link("/proc/thread-self/ns/net"))
    monkeypatch.setattr(procnet, "scan_network_namespace_pids",
                        lambda proc, most=3: ({own: [1]}, set()))
    given = []

    def tcp_sockets_in(states, ns_path, with_info=True, deadline=None, ports=None):
        given.append(ports)
        return own, []

    monkeypatch.setattr(sockdiag, "tcp_sockets_in", tcp_sockets_in)
    wanted = [Endpoints(socket.AF_INET, "127.0.0.1", 80, "10.0.0.1", 5000, own),
              Endpoints(socket.AF_INET6, "::1", 443, "::2", 6000, own)]
    owners.resolve(wanted, "/proc")
    assert given == [sockdiag.port_pairs([(80, 5000), (443, 6000)])]


def test_the_owner_lookup_finds_a_socket_among_many_with_the_ports_filter():
    """owners.resolve with sock_diag, filtered on the wanted port pairs:
    the same owner answer as a lookup that made a row of every socket, for
    one socket among 300 of this process in CLOSE_WAIT (their listener
    too), and for all of them."""
    from closewait_trace.sockets import owners
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(512)
    clients = [socket.create_connection(server.getsockname()) for _ in range(300)]
    held = [server.accept()[0] for _ in clients]
    try:
        for c in clients:
            c.close()
        port = server.getsockname()[1]
        for _ in range(200):
            rows = [r for r in sockdiag.tcp_sockets([tcpstates.CLOSE_WAIT], with_info=False)
                    if r.endpoints.lport == port]
            if len(rows) == len(held):
                break
        assert len(rows) == len(held)
        wanted = sorted((r.endpoints for r in rows), key=lambda ep: ep.rport)
        inodes = {os.fstat(h.fileno()).st_ino: h.fileno() for h in held}
        real = sockdiag.port_pairs
        for ask in ([wanted[150]], wanted):
            filtered = owners.resolve(ask)
            sockdiag.port_pairs = lambda pairs: None        # every socket a row
            try:
                whole = owners.resolve(ask)
            finally:
                sockdiag.port_pairs = real
            assert {ep: repr(o) for ep, o in filtered.items()} == \
                {ep: repr(o) for ep, o in whole.items()}
            for ep in ask:
                own = filtered[ep]
                assert own.kind == owners.OWNER_FD, own
                assert [(h.pid, h.fd) for h in own.holders] == [(os.getpid(), inodes[own.inode])]
                assert own.listener is not None and own.listener.endpoints.lport == port
    finally:
        for h in held:
            h.close()
        server.close()


def test_a_dump_without_times_asks_no_tcp_info_and_keeps_queues_and_inode():
    """The owner lookup dumps without tcp_info (it uses addresses, queues
    and inodes only); a real socket in CLOSE_WAIT on this host, dumped
    both ways."""
    without = sockdiag.build_request(socket.AF_INET, [tcpstates.CLOSE_WAIT], with_info=False)
    assert without[16 + 2] == 0         # idiag_ext: no INET_DIAG_INFO asked
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    held, _ = server.accept()
    try:
        client.sendall(b"hello")
        client.close()
        port = server.getsockname()[1]

        def ours(**kw):
            for _ in range(100):
                rows = [r for r in sockdiag.tcp_sockets([tcpstates.CLOSE_WAIT], **kw)
                        if r.endpoints.lport == port]
                if rows:
                    return rows[0]
            raise AssertionError("not in CLOSE_WAIT")
        timed, bare = ours(), ours(with_info=False)
        assert timed.last_data_recv_ms is not None and bare.last_data_recv_ms is None
        assert bare.last_ack_recv_ms is None
        assert (bare.endpoints, bare.inode, bare.rx_queue) == (
            timed.endpoints, timed.inode, timed.rx_queue)
        assert bare.rx_queue == 6 and bare.inode == os.fstat(held.fileno()).st_ino
    finally:
        held.close()
        server.close()


def test_the_owner_lookup_reads_no_times(tmp_path, monkeypatch):
    """owners.resolve asks procnet for rows without tcp_info times."""
    from closewait_trace.sockets import owners, procnet
    asked = []
    monkeypatch.setattr(procnet, "tcp_rows",
                        lambda pid, proc, states=None, times=True: asked.append(times) or [])
    monkeypatch.setattr(procnet, "scan_network_namespace_pids",
                        lambda proc, most=3: ({1: [10]}, []))
    owners.resolve([Endpoints(socket.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2, 1)],
                   str(tmp_path))
    assert asked == [False]


def test_a_socket_looked_up_alone_in_this_namespace():
    """build_lookup/lookup_each against the real kernel (this process's own
    namespace: no privilege needed): a socket in CLOSE_WAIT is found in
    that state, IPv4-mapped on an IPv6 listener too; addresses no socket
    has give no CLOSE_WAIT row; owners.in_close_wait_now says so per
    socket, and None where the namespace is not known."""
    import time
    from closewait_trace.sockets import owners
    held = []
    made = []
    for family, host, listen_on in ((socket.AF_INET, "127.0.0.1", "127.0.0.1"),
                                    (socket.AF_INET6, "::ffff:127.0.0.1", "::")):
        srv = socket.socket(family)
        srv.bind((listen_on, 0))
        srv.listen(4)
        client = socket.create_connection(("127.0.0.1", srv.getsockname()[1]))
        accepted, _ = srv.accept()
        client.shutdown(socket.SHUT_WR)         # the accepted one: CLOSE_WAIT
        held += [srv, client, accepted]
        made.append(Endpoints(family, host, srv.getsockname()[1], host,
                              client.getsockname()[1]))
    try:
        time.sleep(0.05)
        ghost = Endpoints(socket.AF_INET, "127.0.0.1", made[0].lport, "127.0.0.1", 1)
        netns, rows = sockdiag.lookup_each(made + [ghost])
        assert netns == os.stat("/proc/thread-self/ns/net").st_ino
        assert [r.state if r else None for r in rows[:2]] == [tcpstates.CLOSE_WAIT] * 2
        assert [r.endpoints.address_key for r in rows[:2]] == [ep.address_key for ep in made]
        assert rows[2] is None or rows[2].state != tcpstates.CLOSE_WAIT
        mine = [ep.in_netns(netns) for ep in made + [ghost]] + [made[0]]
        assert owners.in_close_wait_now(mine) == [True, True, False, None]
    finally:
        for s in held:
            s.close()


class RepliesInParts:
    """A netlink socket whose dump comes in several replies: each recv()
    one message, the last with NLMSG_DONE."""

    def __init__(self, parts: int):
        self.parts = parts
        self.left = 0

    def send(self, _request: bytes) -> None:
        self.left = self.parts

    def recv(self, _size: int) -> bytes:
        self.left -= 1
        return REAL_DUMP + (REAL_DONE if self.left == 0 else b"")


def test_a_dump_stops_at_its_deadline_with_what_it_read():
    """A rescan reads other users' namespaces under a budget: a dump still
    replying when it passes stops at the next reply (DumpCut, its rows so
    far); without a deadline, or one not passed, it is read whole."""
    import time
    with pytest.raises(sockdiag.DumpCut) as cut:
        sockdiag._dump(RepliesInParts(3), [tcpstates.CLOSE_WAIT], 7,
                       deadline=time.monotonic() - 1)
    assert len(cut.value.rows) == 1 and cut.value.rows[0].endpoints.netns == 7
    assert len(sockdiag._dump(RepliesInParts(3), [tcpstates.CLOSE_WAIT], 7)) == 6
    assert len(sockdiag._dump(RepliesInParts(3), [tcpstates.CLOSE_WAIT], 7,
                              deadline=time.monotonic() + 60)) == 6



@pytest.mark.parametrize("attempts", [1, 20])
def test_entering_a_namespace_that_fails_leaves_nothing_in_a_cycle(tmp_path, attempts):
    """Issue 20 (the collector paused for the owner lookups): each namespace
    entered made a C library handle (~3.5 KB in cycles), and an error was
    kept with its traceback, whose frame kept it: with the collector
    paused, a user's thousands of namespaces would have piled that up for
    a whole lookup. The error is the same OSError, its errno and path."""
    missing = str(tmp_path / "gone" / "ns" / "net")
    with cycles_left() as left:
        for _ in range(attempts):
            with pytest.raises(FileNotFoundError) as raised:
                sockdiag._open_in_netns(missing)
            assert raised.value.filename == missing
            del raised
    assert left.count == 0, left.kinds


def test_a_closed_clients_uid_is_not_taken_from_its_time_wait_entry():
    """The metrics endpoint shares its places by the client socket's uid
    (socket_uid). A client that has closed leaves a time-wait entry (its
    FIN_WAIT2 or TIME_WAIT), which sock_diag gives as uid 0: it looked like
    root (a review, 2026-12-07). Open, it is this process's uid; closed,
    not known."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    ep = Endpoints(socket.AF_INET, "127.0.0.1", client.getsockname()[1],
                   "127.0.0.1", listener.getsockname()[1])
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                       sockdiag.NETLINK_SOCK_DIAG)
    try:
        assert sockdiag.socket_uid(nl, ep, 1) == os.geteuid()
        client.close()
        for seq in range(2, 200):       # the FIN is acknowledged within a few ms
            if sockdiag.socket_uid(nl, ep, seq) is None:
                break
            time.sleep(0.01)
        assert sockdiag.socket_uid(nl, ep, 300) is None
    finally:
        for s in (nl, accepted, listener):
            s.close()
