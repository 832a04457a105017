"""What each lingering socket costs the tracer's memory, in the two places a
flood of 100,000 made the peak (issue 20, target 2: peak RSS at most 200
MB): the batch's diagnoses, all alive until the batch's records are
written, and the metrics' series (--metrics), kept as long as the sockets
linger. Measured with tracemalloc over real objects, per socket; each bound
sits between what the code before took and what it takes now."""

import gc
import socket
import tracemalloc

from closewait_trace.evidence import diagnosis as d
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints
from closewait_trace.output.metrics import LiveSeries
from closewait_trace.sockets import owners
from closewait_trace.sockets.tracker import Lingerer
from tests.unit.fakeproc import FakeProc

SOCKETS = 2000


def held_by_one_process(fake: FakeProc) -> list[Endpoints]:
    """pid 10 listens on :5555 and holds SOCKETS accepted sockets in
    CLOSE_WAIT (a service that stopped reading)."""
    fake.process(10, comm="srv", state="T")
    fake.tcp(10, socket.AF_INET, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 500)
    fake.fd(10, 3, 500)
    eps = []
    for i in range(SOCKETS):
        fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 30000 + i,
                 tcpstates.CLOSE_WAIT, 1000 + i)
        fake.fd(10, 4 + i, 1000 + i)
        eps.append(Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 30000 + i))
    return eps


def test_a_batchs_diagnoses_cost_under_240_bytes_a_socket(tmp_path):
    """The diagnoses of a batch live until its records are written. Each
    socket's holder evidence copied its process's 18 fields (176 bytes):
    312 bytes a socket here (30 MB at the peak of a batch of 95,000). Now
    the evidence refers to the holder and the process (64 bytes): 200."""
    fake = FakeProc(str(tmp_path / "proc"))
    eps = held_by_one_process(fake)
    found = owners.resolve(eps, fake.root)
    cache = d.Batch()
    d.gather(found[eps[0]], fake.root, machine="x86_64", cache=cache)    # the process read
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [d.gather(found[ep], fake.root, machine="x86_64", cache=cache) for ep in eps]
        gc.collect()
        per_socket = (tracemalloc.get_traced_memory()[0] - before) / SOCKETS
    finally:
        tracemalloc.stop()
    assert {x.cause for x in kept} == {d.STOPPED}
    assert [x._holders[0].fd for x in kept] == list(range(4, 4 + SOCKETS))
    assert per_socket < 240, per_socket


def test_the_metrics_series_cost_under_150_bytes_a_socket(tmp_path):
    """--metrics keeps each lingering socket in its series: keyed by its
    id, a list per socket and the id again in every heap entry, 213 bytes a
    socket here (the peak at 100,000 went from 191 to 207-209 MB with
    --metrics). Keyed by the socket itself: 101."""
    fake = FakeProc(str(tmp_path / "proc"))
    eps = held_by_one_process(fake)
    found = owners.resolve(eps, fake.root)
    lingering = []
    for i, ep in enumerate(eps):
        l = Lingerer(endpoints=ep, enter_ns=10**9 + i, skaddr=0x1000 + i)
        l.ownership = found[ep]
        l.reported = True
        lingering.append(l)
    live = LiveSeries(threshold_ns=10**9, filter_active=False)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for l in lingering:
            live.added(l)
        assert live.current(10**10) == {("srv", "5555", "server"): [SOCKETS, 9.0]}
        gc.collect()
        per_socket = (tracemalloc.get_traced_memory()[0] - before) / SOCKETS
    finally:
        tracemalloc.stop()
    assert per_socket < 150, per_socket
    for l in lingering:
        live.removed(l)
    assert live.current(10**10) == {} and not live.tracked


def test_a_series_that_only_loses_sockets_drops_their_entries(tmp_path):
    """A flood's sockets join the "unresolved" series when they cross the
    threshold and move to their holder's as they are reported. The series
    they leave kept every one's heap entry until it was empty (a heap is
    cleaned at a push, and that one gets none): 100,000 entries beside the
    new series' 100,000 at the flood's peak. Now at most twice its sockets
    (and a margin) at any time."""
    fake = FakeProc(str(tmp_path / "proc"))
    eps = held_by_one_process(fake)
    found = owners.resolve(eps, fake.root)
    live = LiveSeries(threshold_ns=10**9, filter_active=False)
    lingering = [Lingerer(endpoints=ep, enter_ns=10**9 + i, skaddr=0x1000 + i)
                 for i, ep in enumerate(eps)]
    for l in lingering:
        live.added(l)
    [unresolved] = live.current(10**10)
    most = 0
    for n, l in enumerate(lingering, 1):
        l.ownership = found[l.endpoints]
        live.changed(l)
        left = SOCKETS - n
        if left:
            assert len(live.oldest[unresolved]) <= 2 * left + 16
            most = max(most, sum(len(heap) for heap in live.oldest.values()))
    assert most <= 2 * SOCKETS + 16, most
    assert live.current(10**10) == {("srv", "5555", "server"): [SOCKETS, 9.0]}
