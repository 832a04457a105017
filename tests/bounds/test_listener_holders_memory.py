"""A listener held by many processes (a user's forks) costs the tracer
memory once, not once per socket accepted from it that lingers: every owner
lookup answers with its own tuple of the listener's holders (a Holder and a
ProcessSnapshot each, unpickled from the gathering worker), and a socket
kept the tuple of its lookup for as long as it lingered, and was watched
under every pid in it. One socket a tick from a listener of 1,000 forks
grew the tracer 1.3-1.6 MB/s, without a plateau (review F3, 2026-12-07)."""

import gc
import socket
import tracemalloc

from closewait_trace.evidence.resolver import ProcResolver
from closewait_trace.evidence.worker import GatherWorker
from closewait_trace.kernel import tcpstates
from closewait_trace.live import tracer as tracer_mod
from closewait_trace.sockets import owners
from tests.unit.fakeprobe import endpoints
from tests.unit.test_loop import World

LISTENER_INODE = 7000
FORKS = 100        # processes holding the listener besides the server
TICKS = 10         # one socket accepted from it enters CLOSE_WAIT at each


def held_listener(tmp_path, resolver=None) -> World:
    """pid 100 listens on 127.0.0.1:5000 and accepts; FORKS children hold
    the listener too (a prefork server, or anyone's forks)."""
    w = World(tmp_path, resolver=resolver)
    w.proc.process(100, comm="srv")
    w.proc.fd(100, 3, inode=LISTENER_INODE)
    for pid in range(1000, 1000 + FORKS):
        w.proc.process(pid, comm="child", ppid=100)
        w.proc.fd(pid, 3, inode=LISTENER_INODE)
    w.proc.tcp(100, socket.AF_INET, "127.0.0.1", 5000, "0.0.0.0", 0,
               tcpstates.LISTEN, LISTENER_INODE)
    return w


def sockets_a_tick(w: World, start: int, stop: int) -> None:
    """At each tick one more accepted socket, held by pid 100 alone, crosses
    the threshold and is reported (its own owner lookup)."""
    for i in range(start, stop):
        inode, rport = 8000 + i, 40000 + i
        w.proc.fd(100, 10 + i, inode=inode)
        w.proc.tcp(100, socket.AF_INET, "127.0.0.1", 5000, "127.0.0.1", rport,
                   tcpstates.CLOSE_WAIT, inode)
        w.probe.enter(0x100 + i, endpoints(rport), ago_s=2.0)
        w.step(1.0)
        # Its record carries the listener's holders whole, as before; then
        # let go (the list sink's records are not the tracer's memory).
        lines = w.of("linger")
        assert len(lines) == 1 and lines[0]["rport"] == rport
        assert len(lines[0]["listener"]["owners"]) == FORKS + 1
        w.sink.records.clear()


def live_holders() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is owners.Holder)


def test_listener_holders_kept_once_not_per_socket(tmp_path):
    """Through the real gathering worker (the answers unpickled as the
    tracer gets them): the Holder objects alive after TICKS sockets do not
    grow with TICKS x the listener's holders, nor does the watch."""
    gatherer = GatherWorker()
    try:
        w = held_listener(tmp_path, ProcResolver(str(tmp_path / "proc"), worker=gatherer, stacks=False))
        before = live_holders()
        tracemalloc.start()
        try:
            w.tracer.start()
            sockets_a_tick(w, 0, 2)
            gc.collect()
            first = tracemalloc.get_traced_memory()[0]
            sockets_a_tick(w, 2, TICKS)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - first
        finally:
            tracemalloc.stop()
        held = live_holders() - before
        sizes = w.tracer.state_sizes()
    finally:
        gatherer.close()
    per_socket = grown / (TICKS - 2)
    kept = getattr(tracer_mod, "LISTENER_HOLDERS_WATCHED", 8)     # (the code before had none)
    print(f"holders alive {held}, watched {sizes['watched_sockets']}, "
          f"{per_socket:.0f} bytes a socket")
    # Before: FORKS + 1 holders kept per socket (1,020 alive here), each
    # socket watched under all of them (1,010 entries), 87 KB a socket; now
    # 119 alive (this lookup's 101, the 8 kept), 80 entries, 5-6 KB.
    assert held <= TICKS * (1 + kept) + FORKS + 1, held
    assert sizes["watched_sockets"] <= TICKS * (1 + kept)
    assert per_socket < 8_000, per_socket


def test_a_socket_keeps_and_watches_the_listener_holders_its_diagnosis_names(tmp_path):
    """Never accepted, on the listener of FORKS forks: its record lists them
    all; then it keeps the first LISTENER_HOLDERS_WATCHED (those its
    diagnosis names, with their states), one tuple for every socket with
    the same, without command lines or process snapshots; a change of state
    of one of those makes its diagnosis again, as before."""
    w = held_listener(tmp_path)
    for i in range(2):
        # inode 0: in the listener's accept queue, no fd on it yet.
        w.proc.tcp(100, socket.AF_INET, "127.0.0.1", 5000, "127.0.0.1", 40000 + i,
                   tcpstates.CLOSE_WAIT, 0)
        w.probe.enter(0x100 + i, endpoints(40000 + i), ago_s=2.0)
    w.tracer.start()
    w.step()
    first = w.of("linger")
    assert [len(r["listener"]["owners"]) for r in first] == [FORKS + 1] * 2
    assert first[0]["diagnosis"]["summary"].endswith(
        "held by 100/srv [S], 1000/child [S], 1001/child [S], 1002/child [S], "
        "1003/child [S], 1004/child [S], 1005/child [S], 1006/child [S] "
        f"and {FORKS + 1 - 8} more")
    a, b = (l.ownership.listener_holders for l in w.tracer.tracker.lingering())
    assert a is b
    holders = a
    assert [h.pid for h in holders] == [100] + list(range(1000, 1007))
    assert all(h.process is None and h.cmdline == "" for h in holders)
    assert w.tracer.state_sizes()["watched_sockets"] == 2 * tracer_mod.LISTENER_HOLDERS_WATCHED
    w.proc.process(1003, comm="child", ppid=100, state="T")
    w.step()
    updates = [r for r in w.of("linger") if r["update"]]
    assert len(updates) == 2
    assert "1003/child [T]" in updates[0]["diagnosis"]["summary"]
    # Its record lists every holder again, from its new lookup.
    assert len(updates[0]["listener"]["owners"]) == FORKS + 1
