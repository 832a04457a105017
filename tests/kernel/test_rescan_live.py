"""After the kernel says it missed something, the loop reads the sockets in
CLOSE_WAIT again (tracer.rescan_dump): the ones its map never had are
reported, an entry whose socket is gone is forgotten. Made for real: a
tracking map too small for a real pile-up (map_full, a real kernel count),
and in it an entry such as a skipped exit leaves (its socket gone), put
there through bpf(2)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

from tests.kernel import bpfmaps
from tests.kernel.harness import Tracer, free_port, record_row, ss_close_wait

MANY_HOLDER = os.path.join(os.path.dirname(__file__), "many_holder.py")
CAPACITY = 1024              # --max-tracked's least
SOCKETS = 1100
GHOST_KEY = struct.pack("=Q", 0x1234)      # no socket's address


def cw_entry(enter_ns: int, lport: int, rport: int, netns: int) -> bytes:
    """struct cw_entry (bpf/closewait.bpf.c): enter_ns, then cw_endpoint
    (saddr[16], daddr[16], sport, dport, family, pad, netns, pad), eof_ns."""
    loopback = socket.inet_aton("127.0.0.1") + bytes(12)
    return (struct.pack("=Q", enter_ns) + loopback + loopback
            + struct.pack("=HHHHII", lport, rport, socket.AF_INET, 0, netns, 0)
            + struct.pack("=Q", 0))


def test_a_full_map_and_an_entry_left_behind_are_put_right_by_the_rescan(procs):
    port = free_port()
    tracer = Tracer(["--threshold", "4", "-p", str(port),
                     "--max-tracked", str(CAPACITY)]).start()
    procs.append(tracer)
    found = bpfmaps.find_map("cw_tracking", CAPACITY)
    assert found is not None, "the tracer's tracking map was not found"
    fd, info = found
    try:
        entry = cw_entry(time.clock_gettime_ns(time.CLOCK_BOOTTIME), port, free_port(),
                         os.stat("/proc/self/ns/net").st_ino)
        assert info.value_size == len(entry), "struct cw_entry changed: update cw_entry()"
        bpfmaps.update(fd, GHOST_KEY, entry)        # its socket is nowhere
        holder = subprocess.Popen([sys.executable, MANY_HOLDER, str(SOCKETS), str(port)],
                                  stdout=subprocess.PIPE, text=True)
        procs.append(holder)
        assert holder.stdout.readline().strip() == "ready"
        in_close_wait = ss_close_wait(port)
        assert len(in_close_wait) == SOCKETS
        lines = tracer.wait_for(lambda r: r["type"] == "linger", count=SOCKETS, timeout=60)
        tracer.settle(1.0)
        # The ghost is forgotten, its map slot freed.
        assert bpfmaps.lookup(fd, GHOST_KEY, info.value_size) is None
    finally:
        os.close(fd)
    lines = [r for r in tracer.records if r["type"] == "linger"]
    assert {record_row(r) for r in lines} == in_close_wait, "not what ss shows"
    assert len(lines) == SOCKETS                     # each once
    late = [r for r in lines
            if (r["code"]["eof_read_unknown"] or "").startswith("its entry into")]
    summary = tracer.stop()
    counters = summary["counters"]
    # The map had room for CAPACITY - 1 of them (the ghost held a slot).
    assert counters["map_full"] == SOCKETS - (CAPACITY - 1)
    assert counters["found_unseen"] == len(late) == counters["map_full"]
    assert counters["left_unseen"] == 1
    assert summary["tracer_cost"]["rescans"] >= 1
    assert not any(r["pre_existing"] for r in lines)
    assert all(r["owners"] and r["owners"][0]["pid"] == holder.pid for r in lines)
    assert len(summary["still_lingering"]) == SOCKETS
