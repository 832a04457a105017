"""Durations, decoding, filters, attribution, records and rendering."""

import ctypes
import json
import socket
import struct

import pytest

from closewait_trace import records, render, sockdiag, tcpstates
from closewait_trace.durations import format_age, parse_duration_ns
from closewait_trace.events import KIND_CLOSED, Endpoints, decode_event, format_address
from closewait_trace.filters import SocketFilter, parse_ports
from closewait_trace.tracker import attribute_close


@pytest.mark.parametrize("text,ns", [("500ms", 500_000_000), ("2s", 2_000_000_000),
                                     ("1m", 60_000_000_000), ("1.5", 1_500_000_000),
                                     ("250us", 250_000), (" 3 s ", 3_000_000_000)])
def test_parse_duration(text, ns):
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("bad", ["", "abc", "-1s", "0", "1d", "1.2.3s", "0ms"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration_ns(bad)


@pytest.mark.parametrize("ns,text", [(850_000_000, "850ms"), (1_240_000_000, "1.2s"),
                                     (59_940_000_000, "59.9s"), (723_000_000_000, "12m03s"),
                                     (3 * 3600 * 10**9 + 240 * 10**9, "3h04m"),
                                     (2 * 86400 * 10**9 + 3 * 3600 * 10**9, "2d03h")])
def test_format_age(ns, text):
    assert format_age(ns) == text
    assert len(text) <= 7


def test_parse_ports():
    assert parse_ports(["80,443", "8080", "80"]) == (80, 443, 8080)
    for bad in (["0"], ["65536"], ["http"], ["1,-2"]):
        with pytest.raises(ValueError):
            parse_ports(bad)


def test_filter_matches():
    ep = Endpoints(socket.AF_INET, "1.2.3.4", 80, "5.6.7.8", 4000)
    assert SocketFilter().matches(ep)
    assert SocketFilter(lports=(80,)).matches(ep)
    assert not SocketFilter(lports=(81,)).matches(ep)
    assert not SocketFilter(rports=(80,)).matches(ep)
    assert not SocketFilter(family=socket.AF_INET6).matches(ep)


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


def test_attribute_close():
    assert attribute_close(tcpstates.LAST_ACK, 5, set()) == "close"
    assert attribute_close(tcpstates.CLOSE, 5, {5}) == "abort"
    assert attribute_close(tcpstates.CLOSE, 6, {5}) == "reset"
    assert attribute_close(tcpstates.CLOSE, 6, set()) == "unknown"


def test_process_context_transitions():
    assert tcpstates.runs_in_process_context(tcpstates.CLOSE_WAIT, tcpstates.LAST_ACK)
    assert not tcpstates.runs_in_process_context(tcpstates.ESTABLISHED, tcpstates.CLOSE_WAIT)


def test_histogram_buckets():
    slots = [0] * 64
    slots[0], slots[1], slots[11] = 2, 3, 1
    assert records.histogram_buckets(slots) == [
        {"from_us": 0, "to_us": 1, "count": 2},
        {"from_us": 1, "to_us": 2, "count": 3},
        {"from_us": 1024, "to_us": 2048, "count": 1}]


def linger_record(**over):
    rec = {"type": "linger", "ts": 1_800_000_000.0, "family": "ipv4",
           "laddr": "255.255.255.255", "lport": 65535, "raddr": "255.255.255.255",
           "rport": 65535, "age_s": 723.0, "age_is_lower_bound": True,
           "owners": [{"pid": 4194304, "comm": "averylongcomm15", "fd": 3, "state": "T",
                       "cmdline": "x"}], "owner_kind": "fd",
           "diagnosis": {"summary": "stopped by a signal: " + "x" * 100}}
    rec.update(over)
    return rec


def test_default_text_fits_80_columns_even_at_the_widest_ipv4():
    r = render.TextRenderer()
    assert len(r.header()) <= 80
    for line in r.render(linger_record()):
        assert len(line) <= 80, line
    closed = dict(linger_record(), type="closed", duration_s=5.0,
                  duration_is_lower_bound=False, how="close",
                  closed_by={"pid": 4194304, "comm": "averylongcomm15"})
    for line in r.render(closed):
        assert len(line) <= 80
    assert all(len(l) <= 80 for l in render.banner(10**9, "local port 80,443; remote port 5432; ipv4 only"))


def test_text_linger_and_closed_lines():
    r = render.TextRenderer()
    rec = linger_record(laddr="127.0.0.1", lport=5555, raddr="127.0.0.1", rport=33836,
                        age_s=1.42, age_is_lower_bound=False,
                        owners=[{"pid": 4242, "comm": "socat", "fd": 6, "state": "T", "cmdline": ""}],
                        diagnosis={"summary": "stopped by a signal: 4242/socat"})
    line, why = r.render(rec)
    assert line.split()[1:] == ["LINGER", "127.0.0.1:5555", "127.0.0.1:33836", "1.4s", "4242/socat"]
    assert why.strip() == "[T] stopped by a signal: 4242/socat"
    closed = dict(rec, type="closed", duration_s=7.0, duration_is_lower_bound=True,
                  how="reset", closed_by=None)
    assert r.render(closed)[0].split()[1:] == ["RESET", "127.0.0.1:5555", "127.0.0.1:33836", ">=7.0s", "-"]


def test_ipv6_uses_brackets_and_wide_mode():
    rec = linger_record(family="ipv6", laddr="2001:db8::1", lport=443, raddr="2001:db8::2",
                        rport=50000, age_is_lower_bound=False)
    line = render.TextRenderer(wide=True).render(rec)[0]
    assert "[2001:db8::1]:443" in line and "[2001:db8::2]:50000" in line


def test_summary_lines_mention_losses():
    rec = records.summary(10.0, 0.0, {"cw_enter": 3, "cw_exit": 2, "events_lost": 4,
                                      "map_full": 1, "exit_untracked": 0},
                          [0] * 64, [], 1, 0)
    text = "\n".join(render.summary_lines(rec))
    assert "4 events lost" in text and "1 sockets not timed" in text
    json.dumps(rec)


def test_sockdiag_request_and_reply_round_trip():
    req = sockdiag.build_request(socket.AF_INET, [tcpstates.CLOSE_WAIT, tcpstates.LISTEN])
    length, kind, flags, _seq, _pid = struct.unpack_from("=IHHII", req)
    assert length == len(req) == 16 + 56 and kind == 20 and flags & 0x300
    assert struct.unpack_from("=I", req, 20)[0] == (1 << 8) | (1 << 10)
    src = socket.inet_pton(socket.AF_INET, "127.0.0.1") + bytes(12)
    dst = socket.inet_pton(socket.AF_INET, "10.0.0.9") + bytes(12)
    body = struct.pack("=BBBB", socket.AF_INET, tcpstates.LISTEN, 0, 0) + \
        (8080).to_bytes(2, "big") + (0).to_bytes(2, "big") + src + dst + \
        struct.pack("=I8sIIIII", 0, bytes(8), 0, 3, 128, 1000, 555)
    msg = struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body
    done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + bytes(4)
    rows, finished = sockdiag.parse_messages(msg + done)
    assert finished and len(rows) == 1
    row = rows[0]
    assert (row.endpoints.laddr, row.endpoints.lport, row.endpoints.raddr) == ("127.0.0.1", 8080, "10.0.0.9")
    assert (row.state, row.rx_queue, row.tx_queue, row.uid, row.inode) == (tcpstates.LISTEN, 3, 128, 1000, 555)
    err = struct.pack("=IHHII", 20, 2, 0, 1, 0) + struct.pack("=i", -13)
    with pytest.raises(OSError):
        sockdiag.parse_messages(err)


def test_transition_lines_align_and_fit():
    from closewait_trace.events import KernelEvent
    r = render.TextRenderer()
    start = {"type": "start", "ts": 1.0, "threshold_s": 1.0, "filters": {}, "all_transitions": True}
    header = r.render(start)[-1]
    ev = KernelEvent(kind=3, ts_ns=0, skaddr=1, duration_ns=35_000, pid=7, tid=7, comm="python3",
                     endpoints=Endpoints(socket.AF_INET, "255.255.255.255", 65535,
                                         "255.255.255.255", 65535),
                     oldstate=tcpstates.SYN_SENT, newstate=tcpstates.SYN_RECV)
    rec = records.transition(ev, 1_800_000_000.0)
    assert rec["task"] is None              # softirq transition: no task named
    line = r.render(rec)[0]
    assert len(line) <= 80 and line.index("255.") == header.index("LOCAL")
    assert line.split()[1] == "SYNS>SYNR" and "35us" in line
    first = records.transition(KernelEvent(**{**ev.__dict__, "duration_ns": 0,
                                              "oldstate": tcpstates.CLOSE_WAIT,
                                              "newstate": tcpstates.LAST_ACK}), 1.0)
    assert first["prev_state_s"] is None and first["task"] == {"pid": 7, "comm": "python3"}
    age, task = r.render(first)[0].split()[-2:]
    assert age == "?" and "7/python3".startswith(task)   # cut to fit 80 columns


class RawEntry(ctypes.Structure):
    """Field names of struct cw_entry; real offsets come from bcc's class."""
    _fields_ = [("enter_ns", ctypes.c_uint64), ("ep", RawEndpoint)]


def test_entry_layout_decodes_raw_map_values():
    from closewait_trace.events import EntryLayout
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


def test_verbose_lines_take_threads_and_identity_from_the_process_record():
    r = render.TextRenderer(verbose=True)
    process = {"type": "process", "ts": 1.0, "pid": 4242, "comm": "srv",
               "identity": {"user": "www", "container": {"runtime": "docker", "id": "ab" * 32},
                            "pod_uid": None, "unit": None, "netns": 4026531840},
               "threads": [{"tid": 4242, "state": "S", "syscall": "pause", "wchan": "sys_pause",
                            "stack": [{"pc": "0x1", "function": "pause", "offset": 16,
                                       "module": "/lib/libc.so.6", "method": "pc"}]}]}
    assert r.render(process) == []            # shown through the linger lines
    rec = linger_record(laddr="127.0.0.1", lport=80, raddr="127.0.0.1", rport=5000,
                        owners=[{"pid": 4242, "comm": "srv", "fd": 7, "state": "S",
                                 "cmdline": "srv -d"}],
                        diagnosis={"summary": "blocked in pause", "evidence": {"holders": [
                            {"pid": 4242, "comm": "srv", "fd": 7, "state": "S", "ppid": 1,
                             "cmdline": "srv -d", "cloexec": False}]}})
    text = "\n".join(r.render(rec))
    assert "holder 4242/srv fd 7 no-cloexec [S] ppid 1: srv -d" in text
    assert "user www, docker abababababab, netns 4026531840" in text
    assert "thread 4242 [S] pause wchan sys_pause" in text and "pause+0x10 (libc.so.6) [pc]" in text


def test_pre_6_15_syn_recv_without_peer_is_said_not_printed_as_0_0_0_0():
    """Before Linux 6.15 the accepted socket's LISTEN -> SYN_RECV carries the
    listener's addresses: the record says the peer is unknown, the text
    line says why instead of showing 0.0.0.0:0 as the peer."""
    from closewait_trace.events import KernelEvent
    r = render.TextRenderer()
    r.render({"type": "start", "ts": 1.0, "threshold_s": 1.0, "filters": {},
              "all_transitions": True})
    listener_side = Endpoints(socket.AF_INET, "0.0.0.0", 8080, "0.0.0.0", 0)
    ev = KernelEvent(kind=3, ts_ns=0, skaddr=1, duration_ns=0, pid=7, tid=7, comm="x",
                     endpoints=listener_side, oldstate=tcpstates.LISTEN,
                     newstate=tcpstates.SYN_RECV)
    rec = records.transition(ev, 1_800_000_000.0)
    assert rec["peer_known"] is False
    line = r.render(rec)[0]
    assert "0.0.0.0:0" not in line and render.PEER_NOT_GIVEN in line and len(line) <= 80
    # 6.15+: the same transition with the peer's address is an ordinary line.
    with_peer = KernelEvent(**{**ev.__dict__, "endpoints": Endpoints(
        socket.AF_INET, "127.0.0.1", 8080, "127.0.0.1", 50000)})
    rec = records.transition(with_peer, 1_800_000_000.0)
    assert rec["peer_known"] is True and "127.0.0.1:50000" in r.render(rec)[0]
    # A listener's own transitions (CLOSE -> LISTEN) have no peer by nature.
    listen = KernelEvent(**{**ev.__dict__, "oldstate": tcpstates.CLOSE,
                            "newstate": tcpstates.LISTEN})
    assert records.transition(listen, 1.0)["peer_known"] is True
