"""The kernel probe itself (no tracer loop): losses, the duration sum and the
map reads, on the ring buffer and on the perf buffer that kernels before 5.8
get, against real sockets on this kernel."""

import contextlib
import errno
import os
import socket
import time

import pytest

from closewait_trace.kernel import kernel_headers
from closewait_trace.kernel.events import KIND_CLOSED, event_of_row
from closewait_trace.kernel.probe import KernelProbe, ProbeConfig, detect_features
from tests.kernel.harness import free_port, stretch

pytestmark = pytest.mark.kernel

HOUR_NS = 3600 * 10**9


def make_probe(force: str, **config) -> tuple[KernelProbe, list]:
    kernel_headers.apply(kernel_headers.choose_headers())
    features = detect_features(environ={"CLOSEWAIT_TRACE_FORCE": force})
    probe = KernelProbe(ProbeConfig(features=features, **config))
    events = []
    # The probe hands raw rows (events.EventLayout); the test reads them as
    # KernelEvents, the same fields decoded.
    probe.start(lambda row: events.append(event_of_row(row)) and False)
    return probe, events


@contextlib.contextmanager
def started_probe(force: str, **config):
    """make_probe's probe and events for the block; closed however it ends."""
    probe, events = make_probe(force, **config)
    try:
        yield probe, events
    finally:
        probe.close()


def drain(probe: KernelProbe, events: list, quiet_polls: int = 5) -> None:
    """Poll until several polls in a row bring nothing new."""
    quiet = 0
    while quiet < quiet_polls:
        before = len(events)
        probe.poll(100)
        quiet = quiet + 1 if len(events) == before else 0


def churn(listener: socket.socket, count: int) -> None:
    """count connections opened and closed at once: ~8 transitions each."""
    for _ in range(count):
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        client.close()
        conn.close()


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1024)
    yield srv
    srv.close()


@pytest.mark.parametrize("force", ["perfbuf", "ringbuf"])
def test_a_flood_into_a_tiny_buffer_counts_every_lost_event_once(force, listener):
    """--all into a one-page buffer that is not read while 300 connections
    churn: most events are lost. Every event the program tried to send is
    either delivered or counted lost, exactly once (the kernel counts its
    own attempts, so other traffic on the machine does not upset this)."""
    with started_probe(force, threshold_ns=HOUR_NS, all_transitions=True,
                       ringbuf_pages=1) as (probe, events):
        churn(listener, 300)
        drain(probe, events)
        if force == "perfbuf":
            # A perf buffer reports a CPU's losses (PERF_RECORD_LOST) with the
            # next record that fits: let a trickle through, and read it.
            for _ in range(5):
                churn(listener, 1)
                drain(probe, events, quiet_polls=2)
            assert probe.buffer_lost > 0, "the perf buffer's lost callback never ran"
        counters = probe.counters()
        sent = counters["transitions"] + counters["exit_untracked"]
        assert counters["events_lost"] > 0
        assert len(events) + counters["events_lost"] == sent, (len(events), counters)


@pytest.mark.parametrize("force", ["ringbuf,boottime", "perfbuf,monotonic"])
def test_histogram_sum_is_the_exact_sum_of_timed_durations(force):
    """Threshold 0: the program reports every timed stay in CLOSE_WAIT with
    its duration, so the per-CPU sum must equal their sum to the nanosecond,
    and match the holds this test made."""
    port = free_port()
    holds = [0.05, 0.1, 0.2, 0.3]
    with started_probe(force, threshold_ns=0, lports=(port,)) as (probe, events), \
            socket.socket() as srv:
        srv.bind(("127.0.0.1", port))
        srv.listen(16)
        held = []
        for _ in holds:
            client = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            client.close()
            held.append(conn)
        time.sleep(0.05)
        closed_at = []
        start = time.monotonic()
        for conn, hold in zip(held, holds):
            time.sleep(max(0.0, start + hold - time.monotonic()))
            conn.close()
            closed_at.append(time.monotonic())
        drain(probe, events)
        closed = [ev for ev in events if ev.kind == KIND_CLOSED]
        assert len(closed) == len(holds)
        assert sum(probe.histogram()) == len(holds)
        assert probe.histogram_sum_ns() == sum(ev.duration_ns for ev in closed)
        # Each stay lasted from the client's close to ours: at least the hold,
        # and not much more (loose: the machine is shared).
        total_s = probe.histogram_sum_ns() / 1e9
        assert sum(holds) <= total_s < sum(holds) + 0.4 + stretch(0.5), total_s


@contextlib.contextmanager
def five_in_close_wait(port: int):
    """Five sockets in CLOSE_WAIT on port for the block: the clients'
    ports."""
    clients = []
    with socket.socket() as srv, contextlib.ExitStack() as held:
        srv.bind(("127.0.0.1", port))
        srv.listen(16)
        for _ in range(5):
            client = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            clients.append(client.getsockname()[1])
            client.close()
            held.enter_context(conn)
        yield clients


def tracked_when(probe: KernelProbe, count: int) -> list:
    deadline = time.monotonic() + stretch(5.0)
    while len(tracked := probe.tracked()) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return tracked


@pytest.mark.parametrize("force,expected", [("batch", "batched"), ("perkey", "per-key")])
def test_map_reads_find_every_tracked_socket(force, expected):
    port = free_port()
    with started_probe(force, threshold_ns=HOUR_NS, lports=(port,)) as (probe, _events), \
            five_in_close_wait(port) as clients:
        tracked = tracked_when(probe, 5)
        assert probe.map_read == expected
        assert sorted(t.endpoints.rport for t in tracked) == sorted(clients)
        assert {(t.endpoints.laddr, t.endpoints.lport) for t in tracked} == {("127.0.0.1", port)}


@contextlib.contextmanager
def batched_reads_failing(error: int, tries: int):
    """A probe tracking five sockets in CLOSE_WAIT whose next `tries`
    batched reads fail with error once they have read the map, with an
    entry no socket has added to what they got (a failed try's data must
    not be used): (probe, the clients' ports, the batched reads' calls)."""
    port = free_port()
    with started_probe("batch", threshold_ns=HOUR_NS, lports=(port,)) as (probe, _events), \
            five_in_close_wait(port) as clients:
        assert len(tracked_when(probe, 5)) == 5
        real = probe._read_batches
        calls = []

        def fails_after_reading(fd, keys, raw):
            calls.append(fd)
            real(fd, keys, raw)
            if len(calls) <= tries:
                keys.append(1)                          # no socket's
                raw += bytes(probe._layout.size)
                raise OSError(error, os.strerror(error))

        probe._read_batches = fails_after_reading
        yield probe, clients, calls


@pytest.mark.parametrize("error,later", [(errno.EBUSY, "batched"), (errno.ETIMEDOUT, "batched"),
                                         (errno.EINVAL, "per-key"), (524, "per-key")])
def test_a_batched_read_that_fails_once_is_not_taken_for_an_old_kernel(error, later):
    """A batched read failing mid-way: what it got is not used, and only an
    error that says the kernel cannot do it (EINVAL before 5.6, ENOTSUPP)
    makes every later read key by key. Any failure did, for the rest of
    the run: 0.84-0.93 s a read instead of 0.4-0.5 at 100,000 sockets
    (docs/benchmarks.md)."""
    with batched_reads_failing(error, 1) as (probe, clients, calls):
        tracked = probe.tracked()
        assert sorted(t.endpoints.rport for t in tracked) == sorted(clients)
        assert probe.batch_read_failures == {error: 1}
        retried = later == "batched"
        assert probe.map_read == later
        assert (len(calls), probe.per_key_reads) == ((2, 0) if retried else (1, 1))
        tracked = probe.tracked()
        assert sorted(t.endpoints.rport for t in tracked) == sorted(clients)
        assert probe.map_read == later
        assert (len(calls), probe.per_key_reads) == ((3, 0) if retried else (1, 2))


def test_a_batched_read_that_keeps_failing_is_made_key_by_key_that_once():
    """Every try of one read failing (BATCH_READ_TRIES): that read key by
    key, the next batched again."""
    from closewait_trace.kernel.probe import BATCH_READ_TRIES
    with batched_reads_failing(errno.EBUSY, BATCH_READ_TRIES) as (probe, clients, calls):
        tracked = probe.tracked()
        assert sorted(t.endpoints.rport for t in tracked) == sorted(clients)
        assert (probe.map_read, probe.per_key_reads) == ("per-key", 1)
        assert probe.batch_read_failures == {errno.EBUSY: BATCH_READ_TRIES}
        tracked = probe.tracked()
        assert sorted(t.endpoints.rport for t in tracked) == sorted(clients)
        assert (probe.map_read, probe.per_key_reads) == ("batched", 1)
        assert len(calls) == BATCH_READ_TRIES + 1


def test_close_leaves_nothing_for_a_late_destructor(monkeypatch):
    """The exit traceback of kernels before 5.8: bcc's perf table outlived
    cleanup() and its __del__ failed on the closed map ("Exception ignored
    in ... PerfEventArray.__del__"). After close(), collecting everything
    must raise nothing, and every perf reader is freed."""
    import gc
    import sys
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    probe, _events = make_probe("perfbuf", threshold_ns=HOUR_NS)
    bpf = probe.bpf
    assert bpf.perf_buffers, "perf readers were opened"
    probe.close()
    assert bpf.perf_buffers == {}
    del bpf, probe
    gc.collect()
    assert [str(u.exc_value) + repr(u.object) for u in unraisable] == []


def test_low_address_space_limit_is_one_line_and_exit_4():
    """A real RLIMIT_AS too small for bcc's LLVM: ctypes raises OSError, not
    ImportError, when the libraries cannot be mapped."""
    import resource
    import subprocess
    import sys
    from closewait_trace.errors import EXIT_NO_BCC

    limit = 150 << 20        # enough for Python and click, not for libLLVM

    def low_limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "closewait_trace", "-t", "1s"],
                            capture_output=True, text=True, timeout=stretch(60),
                            preexec_fn=low_limit)
    assert result.returncode == EXIT_NO_BCC, result.stderr[-2000:]
    assert result.stderr.count("\n") <= 1 and "Traceback" not in result.stderr
    assert "could not be loaded" in result.stderr and "ulimit -v" in result.stderr


def test_all_records_reserved_in_place_are_whole_when_the_ring_is_reused(listener):
    """--all fills each transition's record in the ring buffer itself (no
    zeroed copy from the stack, issue 20): in a one-page ring, reused
    dozens of times, and read a batch at a time from its mapping, every
    record of the port is whole: no field left over from an earlier record
    (a socket's first transition has no time in the state before, the
    namespace is not read for transitions), the task named where it is
    ours, and each connection's five server-side transitions there, in
    order, none lost."""
    import os
    from closewait_trace.kernel.events import (KIND_TRANSITION, R_COMM, R_DURATION, R_KIND,
                                               R_NETNS, R_NEW, R_OLD, R_PID, R_SPORT)
    port = listener.getsockname()[1]
    kernel_headers.apply(kernel_headers.choose_headers())
    features = detect_features(environ={"CLOSEWAIT_TRACE_FORCE": "ringbuf"})
    probe = KernelProbe(ProbeConfig(features=features, threshold_ns=HOUR_NS,
                                    all_transitions=True, ringbuf_pages=1, lports=(port,)))
    rows = []
    probe.start(lambda row: rows.append(row) and False, rows.extend)
    n = 200
    try:
        assert probe._ring is not None, "not the direct reader"
        for _ in range(n):
            churn(listener, 1)
            probe.poll(0)
            while probe._ring.pending_bytes():
                probe.poll(0)
        drain(probe, rows, quiet_polls=2)
        counters = probe.counters()
    finally:
        probe.close()
    with open("/proc/self/comm", "rb") as f:
        comm = f.read().strip()
    mine = [r for r in rows if r[R_SPORT] == port]
    # 36 records of 104 bytes (112 with the header) fill the page: the
    # ring went round about 27 times.
    assert counters["events_lost"] == 0 and len(mine) == 5 * n, (len(mine), counters)
    changes = [(r[R_OLD], r[R_NEW]) for r in mine]
    assert changes == [(10, 3), (3, 1), (1, 8), (8, 9), (9, 7)] * n
    for i, r in enumerate(mine):
        assert r[R_KIND] == KIND_TRANSITION and r[R_NETNS] == 0, r
        if i % 5 == 0:
            assert r[R_DURATION] == 0, r          # the child socket's first sight
        else:
            assert 0 < r[R_DURATION] < 10**10, r
        if (r[R_OLD], r[R_NEW]) == (8, 9):        # our close(): our task
            assert r[R_PID] == os.getpid() and r[R_COMM].rstrip(b"\0") == comm, r


def test_the_compile_thread_finds_a_one_line_kallsyms_and_the_process_the_real_one(
        monkeypatch, listener):
    """bcc 0.26 reads all of /proc/kallsyms at every compile (0.09 s here,
    for one answer: has the kernel bpf_probe_read_kernel?). The background
    load gives its thread a mount namespace of its own with a one-line file
    there: what bcc reads in that thread is that line; the rest of the
    process (and the system) still sees the real file, no mount of ours is
    left in the process's namespace, bcc's chdir() into the header tree
    does not move the process, and the program so compiled traces."""
    from closewait_trace.kernel import probe as probe_module
    import os

    real_bpf = probe_module.import_bcc()
    seen = {}

    def bpf_seeing(**kwargs):
        with open("/proc/kallsyms", "rb") as f:
            seen["kallsyms"] = f.read()
        os.chdir("/")                   # as bcc's compile does, into its header tree
        return real_bpf(**kwargs)

    monkeypatch.setattr(probe_module, "import_bcc", lambda: bpf_seeing)
    kernel_headers.apply(kernel_headers.choose_headers())
    here = os.getcwd()
    port = listener.getsockname()[1]
    probe = KernelProbe(ProbeConfig(threshold_ns=0, lports=(port,),
                                    features=detect_features(environ={})))
    events = []
    probe.load_in_background()
    try:
        probe.start(lambda row: events.append(event_of_row(row)) and False)
        assert seen["kallsyms"] == b"ffffffff81000000 T bpf_probe_read_kernel\n"
        assert probe.kallsyms_read is None
        with open("/proc/kallsyms", "rb") as f:
            assert f.read().count(b"\n") > 1000       # the process: the real file
        with open("/proc/self/mountinfo") as f:
            mounts = f.read()
        assert "cw-kallsyms" not in mounts and " /proc/kallsyms " not in mounts
        assert os.getcwd() == here
        churn(listener, 20)
        drain(probe, events)
        # Threshold 0: each server side's stay in CLOSE_WAIT is reported.
        closed = [ev for ev in events if ev.kind == KIND_CLOSED]
        assert len(closed) == 20 and {ev.endpoints.lport for ev in closed} == {port}
    finally:
        probe.close()


def test_the_stand_in_is_never_made_in_the_main_thread():
    """Its namespace lasts as long as the thread: in the main thread that is
    the whole process, whose /proc/kallsyms must stay the real one."""
    from closewait_trace.kernel.probe import stand_in_kallsyms
    assert stand_in_kallsyms(True) == "not in the main thread"
    with open("/proc/kallsyms", "rb") as f:
        assert f.read().count(b"\n") > 1000
