"""Decoding what the kernel program sends (events and map entries)."""

import ctypes
import socket

from closewait_trace.kernel.events import KIND_CLOSED, Endpoints, decode_event, format_address


class RawEndpoint(ctypes.Structure):
    """Mirrors struct cw_endpoint's field names; bcc gives the real layout."""
    _fields_ = [("saddr", ctypes.c_uint8 * 16), ("daddr", ctypes.c_uint8 * 16),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("family", ctypes.c_uint16), ("_pad", ctypes.c_uint16)]


class RawEvent(ctypes.Structure):
    """Mirrors struct cw_event field names for the decoder; the layout itself
    comes from bcc in real use."""
    _fields_ = [("ts_ns", ctypes.c_uint64), ("skaddr", ctypes.c_uint64),
                ("duration_ns", ctypes.c_uint64), ("pid", ctypes.c_uint32),
                ("tid", ctypes.c_uint32), ("ep", RawEndpoint),
                ("oldstate", ctypes.c_uint8), ("newstate", ctypes.c_uint8),
                ("kind", ctypes.c_uint8), ("comm", ctypes.c_char * 16)]


def test_decode_event_ipv4_and_comm():
    raw = RawEvent(ts_ns=5, skaddr=0xffff8880, duration_ns=7, pid=42, tid=43,
                   ep=RawEndpoint(sport=5555, dport=40000, family=socket.AF_INET),
                   oldstate=8, newstate=9, kind=KIND_CLOSED, comm=b"socat")
    raw.ep.saddr[:4] = [127, 0, 0, 1]
    raw.ep.daddr[:4] = [10, 0, 0, 2]
    ev = decode_event(raw)
    assert ev.endpoints == Endpoints(socket.AF_INET, "127.0.0.1", 5555, "10.0.0.2", 40000)
    assert (ev.pid, ev.comm, ev.kind, ev.duration_ns) == (42, "socat", KIND_CLOSED, 7)


def test_format_address_ipv6_and_mapped():
    assert format_address(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, "::1")) == "::1"
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.1.1.1")
    assert format_address(socket.AF_INET6, mapped) == "::ffff:10.1.1.1"


class RawEntry(ctypes.Structure):
    """Field names of struct cw_entry; real offsets come from bcc's class."""
    _fields_ = [("enter_ns", ctypes.c_uint64), ("ep", RawEndpoint)]


def test_entry_layout_decodes_raw_map_values():
    from closewait_trace.kernel.events import EntryLayout
    entries = (RawEntry * 2)()
    entries[1].enter_ns = 123456789
    entries[1].ep.family = socket.AF_INET6
    entries[1].ep.sport, entries[1].ep.dport = 443, 50000
    entries[1].ep.saddr[:] = list(socket.inet_pton(socket.AF_INET6, "2001:db8::1"))
    entries[1].ep.daddr[:] = list(socket.inet_pton(socket.AF_INET6, "::1"))
    layout = EntryLayout(RawEntry)
    raw = bytes(entries)
    assert layout.size == ctypes.sizeof(RawEntry) and layout.enter_ns(raw, 1) == 123456789
    assert layout.endpoints(raw, 1) == Endpoints(socket.AF_INET6, "2001:db8::1", 443, "::1", 50000)


class RawEndpointNs(ctypes.Structure):
    _fields_ = [("saddr", ctypes.c_uint8 * 16), ("daddr", ctypes.c_uint8 * 16),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("family", ctypes.c_uint16), ("_pad", ctypes.c_uint16), ("netns", ctypes.c_uint32)]


class RawEntryNs(ctypes.Structure):
    _fields_ = [("enter_ns", ctypes.c_uint64), ("ep", RawEndpointNs), ("extra", ctypes.c_uint32)]


def test_entry_layout_unpacks_at_once_what_the_field_reads_give():
    """The map's entries decoded by one struct per entry and one cast for
    all entry times (100,000 sockets: about 1.9 s of the loop's CPU by
    field reads) give what the field-by-field reads give."""
    import random
    from closewait_trace.kernel.events import EntryLayout
    rng = random.Random(5)
    for entry_type in (RawEntry, RawEntryNs):
        entries = (entry_type * 300)()
        for e in entries:
            e.enter_ns = rng.getrandbits(64)
            e.ep.family = rng.choice([socket.AF_INET, socket.AF_INET6])
            e.ep.sport, e.ep.dport = rng.getrandbits(16), rng.getrandbits(16)
            e.ep.saddr[:] = [rng.getrandbits(8) for _ in range(16)]
            e.ep.daddr[:] = [rng.getrandbits(8) for _ in range(16)]
            if entry_type is RawEntryNs:
                e.ep.netns = rng.getrandbits(32)
        layout = EntryLayout(entry_type)
        assert layout._fast is not None
        raw = bytearray(bytes(entries))
        assert layout.enter_ns_all(raw, 300) == [layout.enter_ns(raw, i) for i in range(300)] \
            == [e.enter_ns for e in entries]
        got = [layout.endpoints(raw, i) for i in range(300)]
        assert got == [layout.endpoints_slow(raw, i) for i in range(300)]
        assert got[7].lport == entries[7].ep.sport and got[7].family == entries[7].ep.family
        if entry_type is RawEntryNs:
            assert got[9].netns == entries[9].ep.netns != 0


def test_decoded_ports_and_namespaces_share_one_int_object_per_value(monkeypatch):
    """Every lingering socket keeps its Endpoints: the local port and the
    namespace, the same for the many sockets of one server, are one object
    per value (a new int each was 56 bytes of every socket at 100,000),
    and the table of them is bounded."""
    from closewait_trace.kernel import events
    from closewait_trace.kernel.events import EntryLayout
    entries = (RawEntryNs * 2)()
    for e, rport in zip(entries, (40000, 40001)):
        e.ep.family, e.ep.sport, e.ep.dport, e.ep.netns = socket.AF_INET, 8080, rport, 4026531840
    layout = EntryLayout(RawEntryNs)
    raw = bytearray(bytes(entries))
    a, b = layout.endpoints(raw, 0), layout.endpoints(raw, 1)
    assert (a.lport, a.netns, a.rport, b.rport) == (8080, 4026531840, 40000, 40001)
    assert a.lport is b.lport and a.netns is b.netns
    monkeypatch.setattr(events, "SHARED_INTS_MAX", 10)
    monkeypatch.setattr(events, "_SHARED_INTS", {})
    for value in range(100_000, 100_050):
        assert events.shared_int(value) == value
    assert len(events._SHARED_INTS) <= 10
