"""TCP sockets by state through NETLINK_SOCK_DIAG (what ss uses).

Better than /proc/net/tcp for us on two counts: the kernel filters by state,
so the cost follows the sockets we ask about rather than every connection
on the host, and a listener's reply carries its backlog limit. A netlink
socket belongs to the network namespace it was created in, so for another
namespace it is created on a short-lived thread that setns()es there first
(a namespace switch affects only the calling thread).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import socket
import struct
import threading
import time
from typing import Iterable, Optional

from closewait_trace.kernel.events import Endpoints, format_address
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.tcpstates import LISTEN as TCP_LISTEN
from closewait_trace.sockets import procfs
from closewait_trace.sockets.tcprow import TcpRow

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
CLONE_NEWNET = 0x40000000
# Extensions asked for in the same dump: INET_DIAG_INFO (struct tcp_info)
# carries the times since the last ACK and the last data were received.
INET_DIAG_INFO = 2
NLA_TYPE_MASK = 0x3FFF       # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid
_REQ = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport big
# endian, src[16], dst[16], if, cookie[2]: low half, high half), expires,
# rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
_RTATTR = struct.Struct("=HH")
_PORT_PAIR = struct.Struct(">HH")     # idiag_sport, idiag_dport as the kernel sends them
_U32 = struct.Struct("=I")
# struct tcp_info (include/uapi/linux/tcp.h) begins with eight u8 fields,
# then u32s; these two sit at the same offsets since Linux 2.6. A kernel may
# send a shorter struct than ours (older) or a longer one (newer): each
# field is read only when the attribute is long enough to hold it.
TCPI_LAST_DATA_RECV = 52
TCPI_LAST_ACK_RECV = 56
# tcpi_last_data_recv and tcpi_last_ack_recv, adjacent, in one unpack.
_LAST_DATA_ACK = struct.Struct("=II")
_LAST_BOTH = TCPI_LAST_ACK_RECV + _U32.size


def build_request(family: int, states: Iterable[int], seq: int = 1,
                  with_info: bool = True) -> bytes:
    mask = 0
    for state in states:
        mask |= 1 << state
    ext = 1 << (INET_DIAG_INFO - 1) if with_info else 0
    body = _REQ.pack(family, socket.IPPROTO_TCP, ext, 0, mask)
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                            NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + body


def build_lookup(ep: Endpoints, seq: int = 1) -> bytes:
    """A request for the one socket with these addresses (no dump): the
    kernel looks it up in its hash tables at once (inet_diag_find_one_icsk),
    which a dump, walked over several reads while sockets come and go, does
    not promise. Any cookie (INET_DIAG_NOCOOKIE), any interface."""
    family = int(ep.family)
    src = socket.inet_pton(family, ep.laddr).ljust(16, b"\0")
    dst = socket.inet_pton(family, ep.raddr).ljust(16, b"\0")
    sockid = (struct.pack("!HH", ep.lport, ep.rport) + src + dst
              + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                            NLM_F_REQUEST, seq, 0)
    return header + body


# The states in which sock_diag gives a connection's own uid (a full socket's
# sk_uid); not TIME_WAIT, FIN_WAIT2, SYN_RECV or NEW_SYN_RECV, whose entry
# may be a time-wait or request socket the kernel reports as uid 0.
_OWN_UID_STATES = frozenset({tcpstates.ESTABLISHED, tcpstates.SYN_SENT, tcpstates.FIN_WAIT1,
                             tcpstates.CLOSE_WAIT, tcpstates.LAST_ACK, tcpstates.CLOSING})


def socket_uid(nl: socket.socket, ep: Endpoints, seq: int) -> Optional[int]:
    """The uid of the one socket with these addresses in nl's namespace
    (build_lookup), None when there is none or no answer. nl is a
    non-blocking NETLINK_SOCK_DIAG socket: the kernel answers a lookup
    within the send, so the answer is there to read at once and this never
    waits. An answer to an earlier request (its seq) is skipped; at most a
    few reads. Raises OSError only from send (the socket unusable)."""
    nl.send(build_lookup(ep, seq))
    for _ in range(4):
        try:
            data = nl.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return None
        if len(data) < _NLMSGHDR.size or _NLMSGHDR.unpack_from(data)[3] != seq:
            continue
        try:
            rows, _done = parse_messages(data)
        except OSError:                 # ENOENT: no such socket (here, any more)
            return None
        # The kernel falls back to a listener on the local address when no
        # connection has these addresses (the client gone): not the client.
        # Nor is a closed client's time-wait entry (TIME_WAIT, or FIN_WAIT2
        # once orphaned) or a request socket, whose uid the kernel gives as
        # 0: a client that closed looked like root (a review, 2026-12-07).
        if rows and rows[0].state in _OWN_UID_STATES and rows[0].endpoints.lport == ep.lport \
                and rows[0].endpoints.rport == ep.rport:
            return rows[0].uid
        return None
    return None


def tcp_info_times(tcp_info: bytes) -> tuple[Optional[int], Optional[int]]:
    """(tcpi_last_ack_recv, tcpi_last_data_recv) in ms from a struct tcp_info
    of any length; None for a field the struct is too short to hold."""
    def field(offset: int) -> Optional[int]:
        if len(tcp_info) < offset + _U32.size:
            return None
        return _U32.unpack_from(tcp_info, offset)[0]
    return field(TCPI_LAST_ACK_RECV), field(TCPI_LAST_DATA_RECV)


def _attribute(data: bytes, start: int, end: int, wanted: int) -> Optional[bytes]:
    """The payload of the first rtattr of type wanted between start and end.
    A length that points outside the message ends the walk."""
    pos = start
    while pos + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, pos)
        if length < _RTATTR.size or pos + length > end:
            return None
        if kind & NLA_TYPE_MASK == wanted:
            return data[pos + _RTATTR.size:pos + length]
        pos += (length + 3) & ~3
    return None


# Most sockets share a handful of local and remote addresses; formatting one
# through ipaddress costs more than the rest of a row (bounded cache).
_address = functools.lru_cache(maxsize=4096)(format_address)


def _row(data: bytes, offset: int, end: int, netns: int = 0, with_info: bool = True) -> TcpRow:
    """with_info: tcp_info was asked for (else its attribute is not looked
    for: the kernel sends it only when asked)."""
    (family, state, timer, _retrans, sport, dport, src, dst, _if, cookie_lo, cookie_hi,
     _expires, rqueue, wqueue, uid, inode) = _MSG.unpack_from(data, offset)
    info = _attribute(data, offset + _MSG.size, end, INET_DIAG_INFO) if with_info else None
    if info is not None and len(info) >= _LAST_BOTH:
        # Both fields there (every kernel since 2.6): one unpack, no checks
        # per field; tcp_info_times does the same for a shorter struct.
        last_data, last_ack = _LAST_DATA_ACK.unpack_from(info, TCPI_LAST_DATA_RECV)
    else:
        last_ack, last_data = tcp_info_times(info) if info is not None else (None, None)
    # Positional, in the fields' order (TcpRow, Endpoints): a row per
    # socket of a lookup, 100,000 in a flood, and keywords cost 0.7 us more.
    return TcpRow(
        Endpoints(family, _address(family, src), int.from_bytes(sport, "big"),
                  _address(family, dst), int.from_bytes(dport, "big"), netns),
        state, wqueue, rqueue, uid, inode, last_ack, last_data, timer,
        cookie_lo | cookie_hi << 32)


def port_pairs(pairs: Iterable[tuple[int, int]]) -> frozenset:
    """(local port, remote port) pairs as parse_messages' ports filter
    takes them: the 4 bytes of a message's sport and dport, as sent. A pair
    with a port outside 0-65535 (a crafted table, not the kernel's) can
    match no message and is left out, not raised on."""
    pack = _PORT_PAIR.pack
    return frozenset([pack(lport, rport) for lport, rport in pairs
                      if 0 <= lport <= 0xFFFF and 0 <= rport <= 0xFFFF])


def parse_messages(data: bytes, netns: int = 0, ports: Optional[frozenset] = None,
                   with_info: bool = True) -> tuple[list[TcpRow], bool]:
    """Rows in one netlink read, and whether the dump is finished; each
    row's endpoints carry netns, the namespace the socket was opened in.

    ports (from port_pairs): only the listeners and the sockets with one of
    those port pairs are made rows; the others are passed over on the
    message's two port fields. An owner lookup of a few sockets among
    100,000 in CLOSE_WAIT made a row of each (4 us, 0.4 s a lookup); the
    ports are a superset test (the addresses are matched by the caller).

    Every length is checked against the buffer before it is used: a message
    whose length does not fit ends this read's parsing (the next message's
    start cannot be known); one too short for its type, or of an address
    family other than IPv4/IPv6, is skipped. The kernel's own error reply is raised as
    OSError (the caller falls back to /proc); nothing else escapes."""
    rows: list[TcpRow] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        body = offset + _NLMSGHDR.size
        end = offset + length
        if kind == NLMSG_DONE:
            return rows, True
        if kind == NLMSG_ERROR:
            code = struct.unpack_from("=i", data, body)[0] if end - body >= 4 else -71  # EPROTO
            if code:
                raise OSError(-code, os.strerror(-code))
            # errno 0 is an acknowledgement, not an error
        elif (kind == SOCK_DIAG_BY_FAMILY and end - body >= _MSG.size
              and data[body] in (socket.AF_INET, socket.AF_INET6)):
            # idiag_state at body + 1; idiag_sport and idiag_dport, big
            # endian, at body + 4 to body + 8.
            if (ports is None or data[body + 1] == TCP_LISTEN
                    or data[body + 4:body + 8] in ports):
                rows.append(_row(data, body, end, netns, with_info))
        offset += (length + 3) & ~3
    return rows, False


class DumpCut(Exception):
    """A dump stopped at its deadline: rows holds what was read (real
    sockets, but not all of that namespace's)."""

    def __init__(self, rows: list[TcpRow]):
        super().__init__("sock_diag: the dump's deadline passed")
        self.rows = rows


def _dump(sock: socket.socket, states: Iterable[int], netns: int = 0,
          with_info: bool = True, deadline: Optional[float] = None,
          ports: Optional[frozenset] = None) -> list[TcpRow]:
    rows: list[TcpRow] = []
    for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
        sock.send(build_request(family, states, seq, with_info))
        while True:
            data = sock.recv(1 << 20)
            if not data:
                raise OSError("sock_diag: the netlink socket returned nothing")
            batch, done = parse_messages(data, netns, ports, with_info)
            rows.extend(batch)
            procfs.note_progress()      # a large dump is progress, not a stall
            if done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise DumpCut(rows)     # the socket is closed: the rest is dropped
    return rows


def lookup_each(wanted: list[Endpoints], ns_path: Optional[str] = None
                ) -> tuple[int, list[Optional[TcpRow]]]:
    """Each socket looked up alone (build_lookup) in the namespace at
    ns_path: (that namespace's inode, its row or None where the kernel has
    no socket with those addresses). Raises OSError on any other answer."""
    sock, netns = _open_in_netns(ns_path)
    out: list[Optional[TcpRow]] = []
    try:
        sock.settimeout(5)
        for seq, ep in enumerate(wanted, start=1):
            sock.send(build_lookup(ep, seq))
            try:
                rows, _done = parse_messages(sock.recv(1 << 16), netns)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                rows = []
            out.append(rows[0] if rows else None)
    finally:
        sock.close()
    return netns, out


def _open_in_netns(ns_path: Optional[str]) -> tuple[socket.socket, int]:
    """A sock_diag socket in the namespace at ns_path (None: ours), and that
    namespace's inode, taken from the very file entered (fstat of the open
    nsfs file): whatever happens to the process ns_path named, the rows
    this socket returns are of that namespace."""
    if ns_path is None:
        inode = os.stat("/proc/thread-self/ns/net").st_ino
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG), inode
    # Nothing made here is left in a reference cycle, on errors too: the
    # owner lookups run with the cyclic collector paused (gathering.
    # WITHOUT_COLLECTOR) and enter every namespace a user made, up to
    # tens of thousands. One libc handle serves them all (procfs.libc), and
    # an exception kept in `result` would hold its traceback, whose frame
    # holds `result`: errors are kept as their errno, strerror and
    # filename, and raised as a new OSError.
    result: dict = {}

    def work():
        try:
            fd = os.open(ns_path, os.O_RDONLY)
        except OSError as exc:
            result["error"] = (exc.errno, exc.strerror, exc.filename)
            return
        try:
            result["inode"] = os.fstat(fd).st_ino
            if procfs.libc().setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                result["error"] = (err, os.strerror(err), ns_path)
                return
            try:
                result["sock"] = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                               NETLINK_SOCK_DIAG)
            except OSError as exc:      # EMFILE: said to the caller, not lost in the thread
                result["error"] = (exc.errno, exc.strerror, exc.filename)
        finally:
            os.close(fd)
        # This thread now lives in the other namespace and ends here; it is
        # never reused, so nothing else runs in the wrong namespace.

    thread = threading.Thread(target=work, name="closewait-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise OSError(*result["error"])
    return result["sock"], result["inode"]


def tcp_sockets(states: Iterable[int], ns_path: Optional[str] = None,
                with_info: bool = True) -> list[TcpRow]:
    """TCP sockets in these states, in the namespace at ns_path (None: ours),
    their endpoints tagged with that namespace's inode; with_info False, no
    tcp_info times (None: the owner lookup does not use them, and 100,000
    of them are 23 MB for the kernel to fill and this process to walk).
    Raises OSError when sock_diag is unavailable; callers fall back."""
    return tcp_sockets_in(states, ns_path, with_info)[1]


def tcp_sockets_in(states: Iterable[int], ns_path: Optional[str] = None,
                   with_info: bool = True, deadline: Optional[float] = None,
                   ports: Optional[frozenset] = None) -> tuple[int, list[TcpRow]]:
    """tcp_sockets, with the inode of the namespace that was dumped: an
    empty list then says "none in that namespace", not "nothing known".
    deadline (monotonic): raises DumpCut when it passes before the dump is
    whole (looked at between the kernel's replies, about 1 MiB each).
    ports: parse_messages' filter (None: every socket is a row)."""
    states = list(states)
    sock, netns = _open_in_netns(ns_path)
    try:
        sock.settimeout(5)
        return netns, _dump(sock, states, netns, with_info, deadline, ports)
    finally:
        sock.close()
