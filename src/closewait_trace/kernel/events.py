"""Decoding what the kernel program sends into plain Python values (pure).

The binary layouts are defined once, in bpf/closewait.bpf.c; bcc turns them
into ctypes classes. Everything here takes any object with those field names,
so it is tested without bcc or root.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import socket
import struct
import sys
from dataclasses import dataclass

# Event kinds, as defined by EV_* in bpf/closewait.bpf.c.
KIND_CLOSED = 1
KIND_UNTRACKED_EXIT = 2
KIND_TRANSITION = 3


@dataclass(frozen=True, order=True, slots=True)
class Endpoints:
    """A TCP connection seen from this host: local and remote address:port."""

    family: int          # socket.AF_INET or socket.AF_INET6
    laddr: str
    lport: int
    raddr: str
    rport: int
    # The socket's network namespace inode; 0 = unknown. The same addresses
    # and ports can be in use in several namespaces at once (containers
    # reuse 127.0.0.1 and ephemeral ports): with the namespace they name one
    # socket. The kernel program reads it when the kernel's BTF gave the
    # offsets (kernel/btf.py); the socket tables are read per namespace.
    netns: int = 0

    @property
    def address_key(self) -> tuple:
        """The addresses alone, whatever the namespace."""
        return (self.family, self.laddr, self.lport, self.raddr, self.rport)

    def in_netns(self, netns: int) -> "Endpoints":
        return Endpoints(self.family, self.laddr, self.lport, self.raddr, self.rport, netns)

    def same_socket_as(self, other: "Endpoints") -> bool:
        """Whether both can name the same socket: same addresses, and the
        same namespace unless either does not know its namespace."""
        return (self.address_key == other.address_key
                and (not self.netns or not other.netns or self.netns == other.netns))

    @property
    def family_name(self) -> str:
        return "ipv4" if self.family == socket.AF_INET else "ipv6"

    @property
    def local(self) -> str:
        return join_host_port(self.laddr, self.lport)

    @property
    def remote(self) -> str:
        return join_host_port(self.raddr, self.rport)


def join_host_port(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@functools.lru_cache(maxsize=65536)
def format_address(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    address = ipaddress.IPv6Address(bytes(raw[:16]))
    # An IPv4 client of a dual-stack listener: show it as the IPv4 it is.
    if address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


# One int object per value of the fields that many sockets share (the local
# port of a server, the network namespace): each decoded int is a new
# 28-byte object, kept by every lingering socket's Endpoints (5.6 MB at
# 100,000 sockets of one server). Bounded: cleared when full (a port takes
# one of 65,536 values; namespaces come and go).
_SHARED_INTS: dict = {}
SHARED_INTS_MAX = 70_000


def shared_int(value: int) -> int:
    """value, as the one object kept for it (the same value either way)."""
    found = _SHARED_INTS.get(value)
    if found is None:
        if len(_SHARED_INTS) >= SHARED_INTS_MAX:
            _SHARED_INTS.clear()
        found = _SHARED_INTS[value] = value
    return found


def endpoints_of(raw) -> Endpoints:
    return Endpoints(
        family=int(raw.family),
        laddr=format_address(int(raw.family), bytes(raw.saddr)),
        lport=int(raw.sport),
        raddr=format_address(int(raw.family), bytes(raw.daddr)),
        rport=int(raw.dport),
        netns=int(getattr(raw, "netns", 0)),
    )


def peer_missing(oldstate: int, newstate: int, endpoints: Endpoints) -> bool:
    """True for the accepted socket's LISTEN -> SYN_RECV transition on a
    kernel before 6.15: it fires before the new socket has the peer's
    address (commit a3a128f611a9 moved the copy earlier), so the tracepoint
    carries the listener's own addresses and remote port 0. No TCP peer
    has port 0, so this is the kernel giving less, not a peer."""
    from closewait_trace.kernel import tcpstates
    return (oldstate == tcpstates.LISTEN and newstate == tcpstates.SYN_RECV
            and endpoints.rport == 0)


@dataclass(frozen=True)
class KernelEvent:
    """One struct cw_event, decoded."""

    kind: int
    ts_ns: int            # kernel clock (boot time) of the transition
    skaddr: int
    duration_ns: int      # time in the state being left; 0 = unknown
    pid: int
    tid: int
    comm: str
    endpoints: Endpoints
    oldstate: int
    newstate: int


# A raw row: struct cw_event unpacked into a tuple by EventLayout, fields in
# the C struct's order (the layout checks it), at these indexes.
ROW_FIELDS = ("ts_ns", "skaddr", "duration_ns", "pid", "tid", "saddr", "daddr", "sport",
              "dport", "family", "netns", "oldstate", "newstate", "kind", "comm")
(R_TS, R_SKADDR, R_DURATION, R_PID, R_TID, R_SADDR, R_DADDR, R_SPORT, R_DPORT, R_FAMILY,
 R_NETNS, R_OLD, R_NEW, R_KIND, R_COMM) = range(len(ROW_FIELDS))

_CTYPE_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


class EventLayout:
    """struct cw_event as a struct.Struct, built from bcc's ctypes class for
    it (so the C file stays the only definition): unpacking a record gives
    a row, a tuple of ROW_FIELDS, without an object per field."""

    def __init__(self, leaf_type):
        import struct
        ep_type = dict(leaf_type._fields_)["ep"]
        ep = leaf_type.ep
        found = []
        for name, _ in leaf_type._fields_:
            if name == "ep":
                for inner_name, _t in ep_type._fields_:
                    inner = getattr(ep_type, inner_name)
                    found.append((ep.offset + inner.offset, inner.size, inner_name))
            else:
                field_ = getattr(leaf_type, name)
                found.append((field_.offset, field_.size, name))
        found = sorted(f for f in found if f[2] in ROW_FIELDS)
        names = tuple(name for _o, _s, name in found)
        if names != ROW_FIELDS:
            raise ValueError(f"struct cw_event's fields are {names}, expected {ROW_FIELDS}")
        fmt, at = "=", 0
        for offset, size, name in found:
            fmt += "x" * (offset - at)
            fmt += f"{size}s" if name in ("saddr", "daddr", "comm") else _CTYPE_CODES[size]
            at = offset + size
        self.size = ctypes.sizeof(leaf_type)
        fmt += "x" * (self.size - at)
        self.struct = struct.Struct(fmt)
        assert self.struct.size == self.size, (fmt, self.size)
        self.unpack_from = self.struct.unpack_from
        self.unpack = self.struct.unpack


_comm_texts: dict = {}


def comm_text(raw: bytes) -> str:
    """A task's comm as the kernel gave it (16 bytes, NUL-padded), decoded
    as decode_event does."""
    text = _comm_texts.get(raw)
    if text is None:
        text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        if len(_comm_texts) >= 4096:
            _comm_texts.clear()
        _comm_texts[raw] = text
    return text


def event_of_row(row: tuple) -> "KernelEvent":
    """The KernelEvent of a raw row (what decode_event gives for the same
    bytes)."""
    family = row[R_FAMILY]
    return KernelEvent(
        kind=row[R_KIND], ts_ns=row[R_TS], skaddr=row[R_SKADDR],
        duration_ns=row[R_DURATION], pid=row[R_PID], tid=row[R_TID],
        comm=comm_text(row[R_COMM]),
        endpoints=Endpoints(family=family,
                            laddr=format_address(family, row[R_SADDR]), lport=row[R_SPORT],
                            raddr=format_address(family, row[R_DADDR]), rport=row[R_DPORT],
                            netns=row[R_NETNS]),
        oldstate=row[R_OLD], newstate=row[R_NEW])


def decode_event(raw) -> KernelEvent:
    return KernelEvent(
        kind=int(raw.kind),
        ts_ns=int(raw.ts_ns),
        skaddr=int(raw.skaddr),
        duration_ns=int(raw.duration_ns),
        pid=int(raw.pid),
        tid=int(raw.tid),
        comm=bytes(raw.comm).split(b"\0", 1)[0].decode("utf-8", "replace"),
        endpoints=endpoints_of(raw.ep),
        oldstate=int(raw.oldstate),
        newstate=int(raw.newstate),
    )


@dataclass(frozen=True)
class TrackedSocket:
    """One cw_tracking entry: a socket in CLOSE_WAIT right now."""

    skaddr: int
    enter_ns: int
    endpoints: Endpoints


@dataclass(frozen=True)
class EofCapture:
    """Where a socket in CLOSE_WAIT was read to its end (struct cw_eof): the
    reading task, its user registers and the top of its user stack, as the
    kernel copied them at the read. Plain values, so the gathering worker
    can unwind it."""

    ts_ns: int
    pid: int
    tid: int
    comm: str
    ip: int
    sp: int
    bp: int
    stack: bytes
    # A CPython process's frames at the event, as the kernel copied them:
    # PY_* status, and (code object address, last instruction address)
    # pairs, innermost first, pointers into the process not yet believed.
    py_status: int = 0
    python: tuple = ()

    @classmethod
    def from_leaf(cls, leaf) -> "EofCapture":
        n = max(0, min(int(leaf.stack_len), ctypes.sizeof(leaf.stack)))
        py = max(0, min(int(getattr(leaf, "py_frames", 0)), len(getattr(leaf, "py_code", ()))))
        return cls(ts_ns=int(leaf.ts_ns), pid=int(leaf.pid), tid=int(leaf.tid),
                   comm=bytes(leaf.comm).split(b"\0", 1)[0].decode("utf-8", "replace"),
                   ip=int(leaf.ip), sp=int(leaf.sp), bp=int(leaf.bp),
                   stack=bytes(bytearray(leaf.stack)[:n]),
                   py_status=int(getattr(leaf, "py_status", 0)),
                   python=tuple((int(leaf.py_code[i]), int(leaf.py_instr[i]))
                                for i in range(py)))


_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


class EntryLayout:
    """Field offsets of struct cw_entry, taken from bcc's ctypes class for it
    (so the C file stays the only definition), for decoding raw map bytes.
    The endpoint's fields are nested in `ep` (struct cw_endpoint)."""

    def __init__(self, leaf_type):
        self.size = ctypes.sizeof(leaf_type)
        ep = leaf_type.ep
        ep_type = dict(leaf_type._fields_)["ep"]
        self.fields = {"enter_ns": (leaf_type.enter_ns.offset, leaf_type.enter_ns.size)}
        for name, _ in ep_type._fields_:
            inner = getattr(ep_type, name)
            self.fields[name] = (ep.offset + inner.offset, inner.size)

        self._fast = self._compile()

    def _compile(self):
        """(offset, struct, positions of family, saddr, sport, daddr, dport,
        netns) to unpack an entry's endpoint at once; None when the fields
        are not plain integers and addresses in increasing offsets."""
        names = ["family", "saddr", "sport", "daddr", "dport"]
        if "netns" in self.fields:
            names.append("netns")
        if any(n not in self.fields for n in names):
            return None
        order = sorted(names, key=lambda n: self.fields[n][0])
        start = cur = self.fields[order[0]][0]
        fmt = "="
        for name in order:
            offset, size = self.fields[name]
            if offset < cur:
                return None
            if offset > cur:
                fmt += f"{offset - cur}x"
            if name in ("saddr", "daddr"):
                fmt += f"{size}s"
            elif size in _INT_CODES:
                fmt += _INT_CODES[size]
            else:
                return None
            cur = offset + size
        return start, struct.Struct(fmt), [order.index(n) for n in names]

    def enter_ns_all(self, buf, count: int) -> list[int]:
        """enter_ns of the first count entries of buf, in order."""
        offset, size = self.fields["enter_ns"]
        if size == 8 and offset % 8 == 0 and self.size % 8 == 0 and len(buf) >= count * self.size:
            view = memoryview(buf)[:count * self.size].cast("Q")
            return view[offset // 8::self.size // 8].tolist()
        return [self.enter_ns(buf, i) for i in range(count)]

    def _int(self, buf, base: int, name: str) -> int:
        offset, size = self.fields[name]
        return int.from_bytes(buf[base + offset:base + offset + size], sys.byteorder)

    def _bytes(self, buf, base: int, name: str) -> bytes:
        offset, size = self.fields[name]
        return bytes(buf[base + offset:base + offset + size])

    def enter_ns(self, buf, index: int) -> int:
        return self._int(buf, index * self.size, "enter_ns")

    def endpoints(self, buf, index: int) -> Endpoints:
        base = index * self.size
        if self._fast is not None:
            start, st, at = self._fast
            v = st.unpack_from(buf, base + start)
            family = v[at[0]]
            return Endpoints(family, format_address(family, v[at[1]]), shared_int(v[at[2]]),
                             format_address(family, v[at[3]]), v[at[4]],
                             shared_int(v[at[5]]) if len(at) > 5 else 0)
        return self.endpoints_slow(buf, index)

    def endpoints_slow(self, buf, index: int) -> Endpoints:
        base = index * self.size
        family = self._int(buf, base, "family")
        return Endpoints(
            family=family,
            laddr=format_address(family, self._bytes(buf, base, "saddr")),
            lport=self._int(buf, base, "sport"),
            raddr=format_address(family, self._bytes(buf, base, "daddr")),
            rport=self._int(buf, base, "dport"),
            netns=self._int(buf, base, "netns") if "netns" in self.fields else 0)
