"""A kernel probe without a kernel: scripted map contents and events, for
running the live loop (tracer.LiveTracer) in unit tests without root.

It keeps what the BPF program keeps: the tracking map (socket address ->
entry time and endpoints), the counters and the histogram, and a queue of
events delivered by poll() the way the ring buffer delivers them (a true
return from the callback ends the poll early).
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Callable, Optional

from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import (KIND_CLOSED, KIND_TRANSITION, KIND_UNTRACKED_EXIT,
                                    Endpoints, KernelEvent, TrackedSocket)

SECOND = 1_000_000_000


class FakeClock:
    """The kernel clock, moved by the test."""

    def __init__(self, ns: int = 1_000 * SECOND):
        self.ns = ns

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * SECOND)


def endpoints(rport: int, lport: int = 5000, family=socket.AF_INET) -> Endpoints:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    return Endpoints(family, host, lport, host, rport)


class FakeProbe:
    boot_clock = False
    transport = "fake ring buffer"

    def __init__(self, clock: FakeClock, batches: bool = False):
        self.clock = clock
        self.batches = batches          # events delivered a list at a time (on_batch)
        self.batch_callback = None
        self.entries: dict[int, tuple[int, Endpoints]] = {}
        self.events: deque = deque()
        self.counts = {"cw_enter": 0, "cw_exit": 0, "exit_untracked": 0,
                       "events_lost": 0, "map_full": 0}
        self.slots = [0] * 64
        self.sum_ns = 0
        self.on_poll: Optional[Callable[["FakeProbe"], None]] = None
        self.callback = None
        self.started = False
        self.closed = False
        self.polls = 0
        self.map_reads = 0

    # ----------------------------------------------------- the interface

    def start(self, on_event, on_batch=None) -> None:
        self.callback = on_event
        self.batch_callback = on_batch if self.batches else None
        self.started = True

    def poll(self, timeout_ms: int, limit: int = 4096) -> None:
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll(self)
        if self.batch_callback is not None:
            # As the ring buffer read from its mapping: up to limit at once.
            batch = [self.events.popleft() for _ in range(min(limit, len(self.events)))]
            if batch:
                self.batch_callback(batch)
            return
        while self.events:
            if self.callback(self.events.popleft()):
                break           # the loop asked to get control back

    def counters(self) -> dict:
        return dict(self.counts)

    def histogram(self) -> list:
        return list(self.slots)

    def histogram_sum_ns(self) -> int:
        return self.sum_ns

    def unread(self) -> int:
        return len(self.events)

    def tracked(self) -> list:
        return [TrackedSocket(k, enter, ep) for k, (enter, ep) in self.entries.items()]

    def tracked_entries(self) -> tuple:
        self.map_reads += 1
        entries = {k: enter for k, (enter, _ep) in self.entries.items()}
        snapshot = dict(self.entries)
        return entries, lambda k: snapshot[k][1]

    def still_tracked(self, entries: list) -> list:
        """As the probe: whether each (skaddr, enter_ns) entry is still there."""
        return [self.entries.get(skaddr, (None,))[0] == enter_ns for skaddr, enter_ns in entries]

    def forget_entry(self, skaddr: int, enter_ns: int) -> bool:
        """As the probe: the entry deleted only if it is still that one."""
        if self.entries.get(skaddr, (None,))[0] != enter_ns:
            return False
        del self.entries[skaddr]
        return True

    def close(self) -> None:
        self.closed = True

    # ----------------------------------------------------- the script

    def enter(self, skaddr: int, ep: Endpoints, ago_s: float = 0.0) -> None:
        """A socket enters CLOSE_WAIT (ago_s seconds before now)."""
        self.entries[skaddr] = (self.clock.ns - int(ago_s * SECOND), ep)
        self.counts["cw_enter"] += 1

    def leave(self, skaddr: int, pid: int = 0, comm: str = "",
              newstate: int = tcpstates.LAST_ACK, lost: bool = False) -> None:
        """A tracked socket leaves CLOSE_WAIT; its CLOSED event is queued,
        or lost (ring buffer full) and counted."""
        enter, ep = self.entries.pop(skaddr)
        duration = self.clock.ns - enter
        self.counts["cw_exit"] += 1
        self.slots[min(63, max(0, duration // 1000).bit_length())] += 1
        self.sum_ns += duration
        if lost:
            self.counts["events_lost"] += 1
            return
        self.events.append(KernelEvent(kind=KIND_CLOSED, ts_ns=self.clock.ns, skaddr=skaddr,
                                       duration_ns=duration, pid=pid, tid=pid, comm=comm,
                                       endpoints=ep, oldstate=tcpstates.CLOSE_WAIT,
                                       newstate=newstate))

    def untracked_exit(self, ep: Endpoints, pid: int = 0, comm: str = "") -> None:
        """A socket the map never had (in CLOSE_WAIT before the attach) leaves."""
        self.counts["exit_untracked"] += 1
        self.events.append(KernelEvent(kind=KIND_UNTRACKED_EXIT, ts_ns=self.clock.ns,
                                       skaddr=0, duration_ns=0, pid=pid, tid=pid, comm=comm,
                                       endpoints=ep, oldstate=tcpstates.CLOSE_WAIT,
                                       newstate=tcpstates.LAST_ACK))

    def transition(self, ep: Endpoints, skaddr: int = 1) -> None:
        """--all: one state transition event."""
        self.events.append(KernelEvent(kind=KIND_TRANSITION, ts_ns=self.clock.ns,
                                       skaddr=skaddr, duration_ns=1000, pid=1, tid=1,
                                       comm="x", endpoints=ep, oldstate=tcpstates.SYN_SENT,
                                       newstate=tcpstates.ESTABLISHED))
