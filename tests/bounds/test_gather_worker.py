"""The gathering worker (evidence/worker.py): reads of other people's /proc
that block are abandoned at their deadline, the loop keeps going, and what
was not read is said. tests/unit/blocking_calls.py stands for a read that
never returns (the real one, a FUSE page, is in tests/kernel/test_fuse_live.py)."""

import os
import signal
import time

import pytest

from closewait_trace.evidence import gathering, spawn, worker
from closewait_trace.sockets import owners
from closewait_trace.evidence.resolver import PROCESS_DEADLINE_S, ProcResolver
from closewait_trace.evidence.worker import GatherFailed, GatherWorker
from tests.unit.fakeproc import FakeProc
from tests.unit.fakeprobe import endpoints
from tests.unit.test_loop import World
from tests.unit.blocking_calls import BLOCKED_PIDS_ENV


def block_reads_of(proc, pid: int, name: str = "") -> None:
    """Every read of pid's /proc in the worker never returns."""
    blocked = [p for p in os.environ.get(BLOCKED_PIDS_ENV, "").split(",") if p]
    os.environ[BLOCKED_PIDS_ENV] = ",".join(blocked + [str(pid)])


@pytest.fixture
def gatherer(monkeypatch):
    monkeypatch.setenv(BLOCKED_PIDS_ENV, "")
    g = GatherWorker(calls_module="tests.unit.blocking_calls")
    yield g
    g.close()


def a_new_worker_answers(gatherer, proc) -> None:
    """After a worker was abandoned: the next call gets a new one, and works."""
    proc.process(200, comm="other", state="S")
    assert gatherer.call("holder_states", [200], proc.root, deadline_s=10) == {200: ("S", 0)}


def test_a_call_runs_in_another_process(tmp_path, gatherer):
    proc = FakeProc(tmp_path / "proc")
    proc.process(100, comm="srv", state="T")
    assert gatherer.call("holder_states", [100, 101], proc.root, deadline_s=10) == {
        100: ("T", 0), 101: ("gone", 0)}
    assert gatherer._proc.pid != os.getpid()


def test_a_blocking_read_is_abandoned_at_its_deadline(tmp_path, gatherer):
    proc = FakeProc(tmp_path / "proc")
    proc.process(100, comm="srv", state="S")
    block_reads_of(proc, 100)
    started = time.monotonic()
    with pytest.raises(GatherFailed) as failed:
        gatherer.call("holder_states", [100], proc.root, deadline_s=0.5)
    took = time.monotonic() - started
    assert failed.value.why == worker.TIMED_OUT
    assert took < 0.5 + 5, took          # the deadline, not the read, ended it
    assert gatherer.timeouts == 1
    a_new_worker_answers(gatherer, proc)


def test_a_stop_request_ends_the_wait_at_once(tmp_path, gatherer):
    proc = FakeProc(tmp_path / "proc")
    proc.process(100, comm="srv", state="S")
    block_reads_of(proc, 100)
    asked = time.monotonic() + 0.3
    gatherer.abort = lambda: time.monotonic() > asked
    with pytest.raises(GatherFailed) as failed:
        gatherer.call("holder_states", [100], proc.root, deadline_s=60)
    assert failed.value.why == worker.STOPPED
    assert time.monotonic() - asked < 1.0


def test_streamed_items_before_a_block_are_kept(tmp_path, gatherer):
    """One holder process blocks: the ones read before it are kept, and
    the ones after it are read in a new worker."""
    from closewait_trace.sockets.owners import Holder
    proc = FakeProc(tmp_path / "proc")
    for pid in (100, 200, 300):
        proc.process(pid, comm=f"p{pid}", state="S")
    block_reads_of(proc, 200)
    resolver = ProcResolver(proc.root, worker=gatherer, stacks=False)
    from closewait_trace.evidence import diagnosis

    class Own:                # the two attributes gather_processes reads
        def __init__(self, pids):
            self.holders = [Holder(pid=p, comm=f"p{p}", fd=3, state="S", ppid=1,
                                   cmdline="", tracer_pid=0, uid=1000) for p in pids]
            self.listener_holders = []

    cache = diagnosis.Batch(stacks=False)
    started = time.monotonic()
    resolver.gather_processes([Own([100, 200, 300])], cache)
    took = time.monotonic() - started
    assert cache.processes[100].unreadable == ""
    assert cache.processes[100].threads          # read in full
    assert cache.processes[200].unreadable == f"not read: {worker.TIMED_OUT}"
    assert cache.processes[300].unreadable == ""
    assert took < PROCESS_DEADLINE_S + 5, took
    # A holder that timed out is read without stacks next, then not at all.
    for _ in range(2):
        cache = diagnosis.Batch(stacks=False)
        resolver.gather_processes([Own([200])], cache)
    assert cache.processes[200].unreadable == f"not read: {worker.TIMED_OUT} before"


def test_the_loop_reports_and_ticks_past_a_holder_that_blocks(tmp_path, gatherer):
    """The live loop with the real worker: a holder whose /proc blocks is
    reported with what was not read; another holder's socket in the same
    batch is reported with its evidence, and the tick ends within the
    deadlines."""
    resolver = ProcResolver(str(tmp_path / "proc"), worker=gatherer, stacks=False)
    w = World(tmp_path, resolver=resolver)
    w.hold(100, 40001, 5001)
    w.hold(200, 40002, 5002, comm="good", state="T")
    block_reads_of(w.proc, 100)
    w.probe.enter(0xA, endpoints(40001), ago_s=2.0)
    w.probe.enter(0xB, endpoints(40002), ago_s=2.0)
    w.tracer.start()
    started = time.monotonic()
    w.step()
    took = time.monotonic() - started
    lingers = {r["rport"]: r for r in w.of("linger")}
    assert set(lingers) == {40001, 40002}
    assert "not read: timed out" in lingers[40001]["diagnosis"]["summary"]
    assert lingers[40002]["diagnosis"]["cause"] == "stopped"
    assert took < PROCESS_DEADLINE_S + 5, took
    lost = w.of("lost")
    assert [r["counter"] for r in lost] == [] or all(r["counter"] == "evidence_timeouts"
                                                     for r in lost)
    w.step()
    assert [r["counter"] for r in w.of("lost")] == ["evidence_timeouts"]


def test_sigint_ends_run_while_the_worker_is_blocked(tmp_path, gatherer):
    """Ctrl-C while a holder's read blocks: the loop ends within a second
    with its summary, leaving the blocked worker behind."""
    resolver = ProcResolver(str(tmp_path / "proc"), worker=gatherer, stacks=False)
    w = World(tmp_path, resolver=resolver)
    w.hold(100, 40001, 5001)
    block_reads_of(w.proc, 100)
    w.probe.enter(0xA, endpoints(40001), ago_s=2.0)
    sent = []

    def interrupt_soon(probe):
        # The tick is waiting for the worker: interrupt it from here.
        if not sent and gatherer._proc is not None:
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    w.probe.on_poll = interrupt_soon
    w.tracer.start()
    w.tracer.run()
    assert sent
    assert time.monotonic() - sent[0] < 1.0
    assert w.sink.records[-1]["type"] == "summary"


def test_worker_dies_with_the_tracer(tmp_path):
    """PR_SET_PDEATHSIG: a tracer killed outright leaves no worker."""
    import subprocess
    import sys
    code = ("import sys, time; from closewait_trace.evidence.worker import GatherWorker;"
            "g = GatherWorker(); g.call('holder_states', [1], deadline_s=30);"
            "print(g._proc.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ")[1][0] in "ZX":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"worker {child} outlived its tracer")


def test_a_long_call_that_keeps_reading_is_not_cut(gatherer):
    """Owners of 100,000 sockets take seconds: completed reads keep the
    call alive past its stall time; one read blocked that long ends it."""
    assert gatherer.call("reading_for", 2.0, deadline_s=30, progress_s=0.8) == "done"
    started = time.monotonic()
    with pytest.raises(GatherFailed) as failed:
        gatherer.call("silent_for", 30.0, deadline_s=60, progress_s=0.8)
    assert failed.value.why == worker.TIMED_OUT
    assert time.monotonic() - started < 0.8 + 5


def test_a_worker_slow_to_start_is_not_a_stalled_read(gatherer, monkeypatch):
    """Issue 19 §2, under systemd in a QEMU guest (scripts/systemd-vm.sh): the
    service restarted while 5 sockets lingered and reported none of them for
    10 minutes. The tracer's first call, the snapshot of the sockets already
    in CLOSE_WAIT, starts the worker, and its imports took longer than the
    call's 2 s stall time: abandoned, and they are in no kernel map. The
    stall time counts from the worker's start-up, not before; a worker that
    never starts is still bounded by the call's deadline."""
    from tests.unit.blocking_calls import SLOW_IMPORT_ENV
    monkeypatch.setenv(SLOW_IMPORT_ENV, "1.5")
    assert gatherer.call("reading_for", 0.1, deadline_s=30, progress_s=0.5) == "done"
    # Started, a silent read is a stall again.
    with pytest.raises(GatherFailed) as failed:
        gatherer.call("silent_for", 30.0, deadline_s=60, progress_s=0.5)
    assert failed.value.why == worker.TIMED_OUT
    gatherer.close()
    monkeypatch.setenv(SLOW_IMPORT_ENV, "30")
    started = time.monotonic()
    with pytest.raises(GatherFailed) as failed:
        gatherer.call("reading_for", 0.1, deadline_s=2, progress_s=0.5)
    assert failed.value.why == worker.TIMED_OUT
    assert 2 <= time.monotonic() - started < 2 + 5


def test_the_worker_does_not_hold_the_tracers_stderr(gatherer):
    """A worker abandoned while blocked in the kernel outlives the tracer;
    holding the tracer's stderr, it kept a reader of that stderr (a pipe,
    a test harness) waiting for an end that never came (seen in CI: a
    snapshot's captured stderr never closed)."""
    gatherer.call("holder_states", [1], "/proc", deadline_s=30)
    assert os.readlink(f"/proc/{gatherer._proc.pid}/fd/2") == "/dev/null"
    fds = set(os.listdir(f"/proc/{gatherer._proc.pid}/fd"))
    assert fds <= {"0", "1", "2", "3"}, fds        # nothing else of the tracer's


# ------------------------------------------- workers left blocked in the kernel

@pytest.fixture
def left_blocked():
    """Stand-ins for abandoned workers that SIGKILL could not end (a task
    waiting on a FUSE request its server read and never answered): live
    processes in the gatherer's abandoned list, tagged with a user."""
    import subprocess
    made = []

    def leave(gatherer, count, tag=None):
        for _ in range(count):
            p = subprocess.Popen(["sleep", "600"])
            made.append(p)
            gatherer._abandoned.append([p, tag])
    yield leave
    for p in made:
        p.kill()
        p.wait()


class Own:                # the two attributes gather_processes reads
    def __init__(self, pids, uid=1000):
        from closewait_trace.sockets.owners import Holder
        self.holders = [Holder(pid=p, comm=f"p{p}", fd=3, state="S", ppid=1,
                               cmdline="", tracer_pid=0, uid=uid) for p in pids]
        self.listener_holders = []


def test_blocked_workers_suspend_memory_reads_first_never_owners(gatherer, left_blocked):
    """Whoever leaves workers blocked costs everyone their stacks at most:
    with MAX_STUCK_WORKERS left, reads of memory are refused at once, the
    reads of /proc's own files (owners, states) go on; only past
    MAX_STUCK_WORKERS_ANY is everything refused (and said)."""
    left_blocked(gatherer, worker.MAX_STUCK_WORKERS)
    states = gatherer.call("holder_states", [os.getpid()], "/proc", deadline_s=30)
    assert states[os.getpid()][0] != "gone"
    with pytest.raises(GatherFailed) as e:
        gatherer.call("holder_states", [os.getpid()], "/proc", deadline_s=30,
                      reads_memory=True)
    assert e.value.why.startswith(worker.SUSPENDED)
    left_blocked(gatherer, worker.MAX_STUCK_WORKERS_ANY - worker.MAX_STUCK_WORKERS)
    with pytest.raises(GatherFailed) as e:
        gatherer.call("holder_states", [os.getpid()], "/proc", deadline_s=30)
    assert e.value.why.startswith(worker.SUSPENDED)


def test_suspended_memory_reads_leave_holders_read_without_stacks(tmp_path, gatherer,
                                                                  left_blocked):
    """Holders are still read (threads, states, identity) when stacks are
    suspended, and each says why it has no stacks; none is 'not read'."""
    from closewait_trace.evidence import diagnosis
    proc = FakeProc(tmp_path / "proc")
    for pid in (100, 200):
        proc.process(pid, comm=f"p{pid}", state="S")
    left_blocked(gatherer, worker.MAX_STUCK_WORKERS)
    resolver = ProcResolver(proc.root, worker=gatherer, stacks=True)
    cache = diagnosis.Batch(stacks=True)
    resolver.gather_processes([Own([100, 200])], cache)
    for pid in (100, 200):
        ev = cache.processes[pid]
        assert ev.unreadable == "", ev.unreadable
        assert ev.threads
        assert ev.stacks_not_read.startswith(worker.SUSPENDED), ev.stacks_not_read


def test_a_user_whose_read_stays_blocked_is_read_without_stacks(tmp_path, gatherer,
                                                                left_blocked):
    """A worker left blocked reading one user's process: that user's other
    processes are read without stacks while it stays blocked (so one user
    cannot leave a worker behind per process), other users' with them."""
    from closewait_trace.evidence import diagnosis
    proc = FakeProc(tmp_path / "proc")
    for pid in (100, 200):
        proc.process(pid, comm=f"p{pid}", state="S")
    left_blocked(gatherer, 1, tag=1000)
    resolver = ProcResolver(proc.root, worker=gatherer, stacks=True)
    cache = diagnosis.Batch(stacks=True)
    resolver.gather_processes([Own([100], uid=1000), Own([200], uid=2000)], cache)
    assert cache.processes[100].stacks_not_read == "a read of its user's memory is still blocked"
    assert cache.processes[200].stacks_not_read == ""
    assert cache.processes[100].unreadable == cache.processes[200].unreadable == ""


def test_a_timed_out_read_is_tagged_with_its_user(tmp_path, gatherer):
    """The worker abandoned for a holder's read carries that holder's user."""
    from closewait_trace.evidence import diagnosis
    proc = FakeProc(tmp_path / "proc")
    proc.process(100, comm="p100", state="S")
    block_reads_of(proc, 100)
    resolver = ProcResolver(proc.root, worker=gatherer, stacks=True)
    resolver.gather_processes([Own([100], uid=4242)], diagnosis.Batch(stacks=True))
    assert cache_tag(gatherer) == 4242


def cache_tag(gatherer):
    return gatherer._last_abandoned[1]


def test_answers_keep_every_field_and_shared_object():
    """The worker pickles its answers' dataclasses as constructor calls
    (worker.dumps): what arrives equals what was sent, objects shared in
    the answer stay shared, and an object with an attribute beyond its
    fields goes the default way, attribute included."""
    import pickle

    from closewait_trace.evidence import diagnosis
    from closewait_trace.kernel.events import Endpoints
    from closewait_trace.sockets.tracker import Lingerer
    from closewait_trace.sockets import owners, procfs
    from closewait_trace.sockets.tcprow import TcpRow

    ep = Endpoints(2, "127.0.0.1", 80, "10.0.0.1", 4000, 4026531840)
    holder = owners.Holder(pid=7, comm="srv", fd=3, state="S", ppid=1, uid=0,
                           cmdline="srv --x", cloexec=True)
    listener = TcpRow(Endpoints(2, "0.0.0.0", 80, "0.0.0.0", 0), 10, 128, 0, 0, 99,
                      last_ack_recv_ms=5, timer=2)
    own = owners.Ownership(kind=owners.OWNER_FD, holders=[holder], netns=4026531840,
                           inode=1234, rx_queue=1, listener=listener,
                           listener_holders=[holder], denied_named=["9/x"])
    lingerer = Lingerer(endpoints=ep, enter_ns=5, skaddr=None, pre_existing=True,
                        age_source="range", enter_max_ns=3, ownership=own)
    ev = diagnosis.ProcessEvidence(pid=7, identity={"user": "root"}, tracer_comm="gdb")
    sent = ([lingerer], {ep: own}, ev)
    got = pickle.loads(worker.dumps(sent))
    assert got[1] == sent[1] and got[2] == ev
    (back,) = got[0]
    assert [getattr(back, n) for n in Lingerer.__slots__] == \
        [getattr(lingerer, n) for n in Lingerer.__slots__]
    assert back.ownership is got[1][back.endpoints]
    assert back.ownership.holders[0] is back.ownership.listener_holders[0]

    # The holders of one process share its fields (pid, ppid...) once
    # unpickled, not two new ints per socket (issue 20: 100,000 sockets'
    # state); holders that differ in any of them do not.
    snap = procfs.ProcessSnapshot(123456, "srv", "S", 98765, 0, 5, 0, 0, 1, "srv --x")
    other = procfs.ProcessSnapshot(123457, "srv", "S", 98765, 0, 5, 0, 0, 1, "srv --x")
    many = [owners.Holder.of(snap, 1000 + fd, fd % 2 == 0) for fd in range(3)]
    many.append(owners.Holder.of(other, 1000, True))
    many.append(owners.Holder.of(snap, 1004, None))
    many[-1].state = "T"
    got = pickle.loads(worker.dumps(many))
    assert got == many
    assert got[0].pid is got[1].pid is got[2].pid and got[0].ppid is got[2].ppid
    assert got[0].process is got[2].process and got[0].process == snap
    assert got[3].pid == 123457 and got[4].state == "T" and got[0].state == "S"

    loose = procfs.ProcessInfo(pid=1, comm="a", state="S", ppid=0)
    loose.extra = "kept"
    again = pickle.loads(worker.dumps(loose))
    assert again == loose and again.extra == "kept"

    # A dataclass that is its own field's value goes the default way; one
    # reached again through a list is rebuilt once either way.
    looped = Lingerer(endpoints=ep, enter_ns=1, skaddr=None)
    looped.ownership = looped
    back = pickle.loads(worker.dumps(looped))
    assert back.ownership is back and back.enter_ns == 1
    looped.ownership = [looped]
    back = pickle.loads(worker.dumps(looped))
    assert back.ownership[0] is back and back.enter_ns == 1


def test_a_large_answer_is_unpickled_without_a_copy():
    """A 100,000-socket answer is about 60 MB: unpickled from the receive
    buffer itself, the tracer's peak grows by the answer's objects, not by
    another copy of its bytes first."""
    import tracemalloc
    payload = [bytes([i % 256]) * 1000 for i in range(16_000)]      # 16 MB of objects
    data = worker.dumps(("done", payload))
    w = worker.GatherWorker()
    w._buf = bytearray(worker._HEADER.pack(len(data)) + data + worker._HEADER.pack(9))
    del data
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        (got,) = list(w._frames())          # the second frame is incomplete: kept
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert got == ("done", payload)
    assert bytes(w._buf) == worker._HEADER.pack(9)
    assert peak < 20 << 20, f"peak {peak / 2**20:.1f} MiB for 16 MB of objects"


def test_the_worker_adopts_fds_and_holds_them_until_its_end():
    """At the start the tracer gives the worker a copy of the tracepoints
    that make no events (their detach waits for RCU grace periods; the
    worker's end then waits, not the tracer's exit): the worker holds a
    duplicate, so our close is not the last, until the worker is killed;
    the check it returns says whether it still holds them."""
    import select
    g = GatherWorker()
    assert g.adopt([0]) is None          # no worker up: none is started for it
    g.call("holder_states", [], deadline_s=30)
    r, w = os.pipe()
    try:
        g.abort = lambda: True           # a stop requested: adopting still works
        held = g.adopt([w])
        assert held is not None and held()
        os.close(w)
        assert select.select([r], [], [], 0.3)[0] == []     # the worker's copy is open
        g.close()                        # killed: its copy goes with it
        assert not held()
        assert select.select([r], [], [], 10)[0] == [r]
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        g.close()


def test_owners_of_many_sockets_come_back_in_chunks_each_to_its_socket(tmp_path, gatherer):
    """The owner lookup answers in chunks (gathering.owners_in_order) in the
    order asked: across chunk boundaries, every socket gets its own
    ownership, once, through a real worker."""
    proc = FakeProc(tmp_path / "proc")
    proc.process(100, comm="srv")
    asked = []
    for i in range(23):
        proc.tcp(100, 2, "127.0.0.1", 8000 + i, "127.0.0.1", 40000 + i, 8, 1000 + i)
        proc.fd(100, 10 + i, 1000 + i)
        asked.append(endpoints(40000 + i, 8000 + i))
    asked.reverse()                         # not the table's order
    chunks = gatherer.call("owners_in_order", asked, proc.root, float("inf"), owners.LookupMemory(), 5, deadline_s=10, stream=True)
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]
    # The tracer's call (one chunk of 8,192 here) and the one without a
    # worker give the same.
    resolver = ProcResolver(proc=proc.root, worker=gatherer)
    found = resolver.owners(asked)
    assert list(found) == asked
    for ep, own in found.items():
        i = ep.lport - 8000
        assert own.inode == 1000 + i and [(h.pid, h.fd) for h in own.holders] == [(100, 10 + i)]
    assert ProcResolver(proc=proc.root).owners(asked) == found


@pytest.mark.parametrize("preload", [True, False])
def test_the_preload_is_imported_before_ready_only_when_asked(monkeypatch, preload):
    """The live tracer's worker imports what its start-up scans use before
    it says "ready"; snapshot's (preload=False) never makes those calls and
    does not pay for them (pyelftools: 25-40 ms before its first answer)."""
    monkeypatch.setenv(BLOCKED_PIDS_ENV, "")
    g = GatherWorker(calls_module="tests.unit.blocking_calls", preload=preload)
    from tests.unit import blocking_calls
    assert blocking_calls.PRELOAD
    try:
        for module in blocking_calls.PRELOAD:
            assert g.call("imported", module, deadline_s=30) is preload
    finally:
        g.close()


@pytest.mark.parametrize("collect", [True, False])
def test_the_collector_is_off_in_a_worker_only_when_asked(monkeypatch, collect):
    """snapshot's worker (collect=False) answers two calls and is ended: its
    collector would only walk the answer's objects. The live tracer's keeps
    it (a worker that lives as long as the trace)."""
    monkeypatch.setenv(BLOCKED_PIDS_ENV, "")
    g = GatherWorker(calls_module="tests.unit.blocking_calls", collect=collect)
    try:
        assert g.call("collecting", deadline_s=30) is collect
    finally:
        g.close()


def test_the_owner_lookups_run_with_the_collector_paused(monkeypatch):
    """Issue 20 target 2: the live tracer's worker keeps its collector, but
    not for the owner lookups, whose ~10 objects a socket it walked again
    and again while they waited to be pickled (a quarter of a 100,000-socket
    lookup). Paused for the whole call, a streamed answer included, and on
    again after it."""
    monkeypatch.setenv(BLOCKED_PIDS_ENV, "")
    g = GatherWorker(calls_module="tests.unit.blocking_calls")
    try:
        assert g.call("collecting", deadline_s=30) is True
        assert g.call("collecting_paused", deadline_s=30) is False
        assert g.call("collecting_each", 3, deadline_s=30, stream=True) == [False] * 3
        assert g.call("collecting", deadline_s=30) is True
    finally:
        g.close()
    g = GatherWorker(calls_module="tests.unit.blocking_calls", collect=False)
    try:
        g.call("collecting_paused", deadline_s=30)
        assert g.call("collecting", deadline_s=30) is False     # never turned on
    finally:
        g.close()


def test_the_calls_paused_are_the_socket_lookups_only():
    """The reads of processes' memory and binaries keep the collector
    (pyelftools' objects make cycles, a long read would keep them all)."""
    assert gathering.WITHOUT_COLLECTOR <= set(gathering.CALLS)
    assert {"owners_in_order", "snapshot_close_wait", "rescan_close_wait"} <= \
        gathering.WITHOUT_COLLECTOR
    assert not {"process_evidence", "captured_stacks", "python_processes",
                "identity"} & gathering.WITHOUT_COLLECTOR


def test_a_large_request_is_written_with_looks_at_the_ring_between_pieces(gatherer):
    """Issue 20 (a burst of departures): the owner lookup of 100,000
    sockets writes their endpoints to the worker, as fast as the worker
    reads them; with 10 processes exiting on 2 CPUs the loop waited there
    with its ring buffer filling. The request goes in WRITE_PIECE pieces,
    while_waiting (the loop's look at the ring) between them."""
    looks = []
    gatherer.while_waiting = lambda: looks.append(1)
    bulk = "x" * (16 * worker.WRITE_PIECE)      # a 4 MiB request that reads nothing
    assert gatherer.call("holder_states", [], bulk, deadline_s=60) == {}
    assert len(looks) >= 16, len(looks)


@pytest.fixture
def no_early_worker():
    """No worker left started ahead by a test, whatever it asserted."""
    yield
    early, spawn._early = spawn._early, None
    if early is not None:
        early[1].kill()
        early[1].wait()


def test_a_worker_started_ahead_is_the_one_taken_once(monkeypatch, no_early_worker):
    """`snapshot`'s worker is started by the entry point, before the command
    line's imports (entry.py); the GatherWorker made next for the same
    arguments takes that process instead of starting another, and only one
    GatherWorker takes it."""
    monkeypatch.setenv(BLOCKED_PIDS_ENV, "")
    spawn.prestart("tests.unit.blocking_calls", preload=False, collect=False)
    early = spawn._early[1]
    g = GatherWorker(calls_module="tests.unit.blocking_calls", preload=False, collect=False)
    second = GatherWorker(calls_module="tests.unit.blocking_calls", preload=False,
                          collect=False)
    try:
        assert g.call("collecting", deadline_s=30) is False
        assert g._proc is early
        assert second.call("collecting", deadline_s=30) is False
        assert second._proc.pid != early.pid
    finally:
        g.close()
        second.close()


@pytest.mark.parametrize("wanted", [
    {"calls_module": "tests.unit.blocking_calls", "preload": False, "collect": True},
    {"calls_module": "tests.unit.blocking_calls", "preload": True, "collect": False},
])
def test_a_worker_started_ahead_for_other_arguments_is_not_taken(
        monkeypatch, no_early_worker, wanted):
    monkeypatch.setenv(BLOCKED_PIDS_ENV, "")
    spawn.prestart("tests.unit.blocking_calls", preload=False, collect=False)
    early = spawn._early[1]
    g = GatherWorker(**wanted)
    try:
        assert g.call("collecting", deadline_s=30) is wanted["collect"]
        assert g._proc.pid != early.pid
    finally:
        g.close()


def test_a_worker_started_ahead_that_died_is_not_taken(monkeypatch, no_early_worker):
    monkeypatch.setenv(BLOCKED_PIDS_ENV, "")
    spawn.prestart("tests.unit.blocking_calls", preload=False, collect=False)
    early = spawn._early[1]
    early.kill()
    early.wait()
    g = GatherWorker(calls_module="tests.unit.blocking_calls", preload=False, collect=False)
    try:
        assert g.call("collecting", deadline_s=30) is False
        assert g._proc.pid != early.pid
    finally:
        g.close()


ENTRY_PROBE = r"""
import sys
sys.argv = ["closewait-trace"] + sys.argv[1:]
from closewait_trace.evidence import spawn
started = spawn.start_process
def start_process(*args):
    # What the command had imported when its worker was started.
    print("worker started;", "cli" if "closewait_trace.cli" in sys.modules else "no cli",
          "click" if "click" in sys.modules else "no click", flush=True)
    return started(*args)
spawn.start_process = start_process
from closewait_trace.entry import main
main()
"""


@pytest.mark.parametrize("args, started", [
    (["snapshot", "-p", "1"], ["worker started; no cli no click"]),
    (["snapshot", "--help"], ["worker started; no cli no click"]),
    (["--version"], []),
])
def test_the_entry_point_starts_snapshots_worker_before_the_command_lines_imports(
        args, started):
    """The command's entry point (entry.py), in a fresh interpreter: for
    `snapshot`, its worker is started before click and cli are imported,
    and it is the only one started (the snapshot takes it); nothing is
    started for any other command."""
    import subprocess
    import sys
    package_root = os.path.dirname(os.path.dirname(gathering.__file__))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(package_root))
    done = subprocess.run([sys.executable, "-c", ENTRY_PROBE] + args, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [l for l in lines if l.startswith("worker started")] == started
    if args[:2] == ["snapshot", "-p"]:
        assert "socket" in done.stdout        # the snapshot ran, with that worker


def test_a_worker_that_cannot_be_started_fails_the_call_not_the_caller(monkeypatch):
    """No process to be had (a process or task limit, no memory): the call
    fails as a read that could not be made, counted, instead of an OSError
    through the tracer's loop or the snapshot; the next call starts one."""
    import errno
    monkeypatch.setenv(BLOCKED_PIDS_ENV, "")
    started = spawn.start_process

    def no_process(*args):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(spawn, "start_process", no_process)
    g = GatherWorker(calls_module="tests.unit.blocking_calls")
    try:
        g.start()                                   # nothing started, nothing raised
        with pytest.raises(GatherFailed) as failed:
            g.call("collecting", deadline_s=30)
        assert failed.value.why == f"{worker.NO_WORKER} (Resource temporarily unavailable)"
        assert g.failures == 1
        monkeypatch.setattr(spawn, "start_process", started)
        assert g.call("collecting", deadline_s=30) is True
    finally:
        g.close()


def test_a_call_begun_is_answered_later_and_a_call_between_waits_for_it(
        tmp_path, gatherer):
    """GatherWorker.begin: the call sent, its answer taken by result()
    later (the loop writes a batch while the next batch's owners are looked
    up). A call made before that waits for the begun one first (one call at
    a time in the worker) and keeps its answer for result()."""
    proc = FakeProc(tmp_path / "proc")
    proc.process(100, comm="srv", state="T")
    begun = gatherer.begin("holder_states", [100], proc.root, deadline_s=10)
    assert not begun.done
    assert gatherer.call("holder_states", [101], proc.root, deadline_s=10) == {
        101: ("gone", 0)}
    assert begun.done
    assert begun.result() == {100: ("T", 0)}
    assert begun.result() == {100: ("T", 0)}                 # kept


def test_a_call_begun_keeps_its_deadline_from_when_it_began(tmp_path, gatherer):
    proc = FakeProc(tmp_path / "proc")
    proc.process(100, comm="srv", state="S")
    block_reads_of(proc, 100)
    begun = gatherer.begin("holder_states", [100], proc.root, deadline_s=0.5)
    time.sleep(0.6)
    started = time.monotonic()
    with pytest.raises(GatherFailed) as failed:
        begun.result()
    assert failed.value.why == worker.TIMED_OUT
    assert time.monotonic() - started < 1.0      # its deadline had passed already
    assert gatherer.timeouts == 1
    a_new_worker_answers(gatherer, proc)


def test_a_call_begun_whose_worker_is_ended_gets_no_answer(tmp_path, gatherer):
    proc = FakeProc(tmp_path / "proc")
    proc.process(100, comm="srv", state="S")
    block_reads_of(proc, 100)
    begun = gatherer.begin("holder_states", [100], proc.root, deadline_s=30)
    gatherer.close()
    with pytest.raises(GatherFailed) as failed:
        begun.result()
    assert failed.value.why == worker.STOPPED


def test_a_large_batchs_successors_are_looked_up_while_it_is_written(
        tmp_path, gatherer, monkeypatch):
    """Issue 20, target 2: in a flood the worker looked up one batch's
    owners, then waited while the loop wrote that batch (1.6 s for 50,000),
    then looked up the next. Now the sockets due when a large batch is
    about to be written are looked up meanwhile (_look_ahead), and the next
    batch takes that answer: no lookup of its own, the same records."""
    from closewait_trace.live import tracer as tracer_module
    monkeypatch.setattr(tracer_module, "AHEAD_BATCH", 2)
    lookups = []

    class Slow(ProcResolver):
        world = None

        def owners(self, endpoints, *args, **kwargs):
            lookups.append(sorted(ep.rport for ep in endpoints))
            self.world.clock.advance(1.0)          # the lookup takes a second
            return super().owners(endpoints, *args, **kwargs)

    resolver = Slow(str(tmp_path / "proc"), worker=gatherer, stacks=False)
    w = World(tmp_path, resolver=resolver)
    resolver.world = w
    for i in range(3):                              # due at the first tick
        w.hold(100, 40001 + i, 5001 + i)
        w.probe.enter(0xA + i, endpoints(40001 + i), ago_s=2.0)
    for i in range(3):                              # due a second later
        w.hold(200, 40101 + i, 5101 + i, comm="other")
        w.probe.enter(0xB0 + i, endpoints(40101 + i), ago_s=0.5)
    w.tracer.start()
    w.step()
    assert lookups == [[40001, 40002, 40003]]
    assert sorted(r["rport"] for r in w.of("linger")) == [40001, 40002, 40003]
    assert w.tracer._ahead is not None
    w.step(0.1)
    assert lookups == [[40001, 40002, 40003]]       # none of their own
    lingers = {r["rport"]: r for r in w.of("linger")}
    assert sorted(lingers) == [40001, 40002, 40003, 40101, 40102, 40103]
    assert all(lingers[p]["owners"][0]["pid"] == 200 for p in (40101, 40102, 40103))
    assert w.tracer.ahead_taken == 3
    assert w.tracer.summary()["tracer_cost"]["owners_ahead"] == 3


def ahead_world(tmp_path, gatherer, monkeypatch, lookups=None):
    """Two sockets of pid 100 due at the first tick; two of pid 200 due
    after its lookup (which takes a second of the fake clock): looked up
    ahead while the first two are written (AHEAD_BATCH 2)."""
    from closewait_trace.live import tracer as tracer_module
    monkeypatch.setattr(tracer_module, "AHEAD_BATCH", 2)
    lookups = [] if lookups is None else lookups

    class Slow(ProcResolver):
        world = None

        def owners(self, endpoints, *args, **kwargs):
            lookups.append(sorted(ep.rport for ep in endpoints))
            self.world.clock.advance(1.0)
            return super().owners(endpoints, *args, **kwargs)

    resolver = Slow(str(tmp_path / "proc"), worker=gatherer, stacks=False)
    w = World(tmp_path, resolver=resolver)
    resolver.world = w
    for i in range(2):
        w.hold(100, 40001 + i, 5001 + i)
        w.probe.enter(0xA + i, endpoints(40001 + i), ago_s=2.0)
    for i in range(2):
        w.hold(200, 40101 + i, 5101 + i, comm="other")
        w.probe.enter(0xB0 + i, endpoints(40101 + i), ago_s=0.5)
    return w


def test_a_socket_that_left_after_it_was_looked_up_ahead_is_not_reported(
        tmp_path, gatherer, monkeypatch):
    """Looked up ahead; it leaves CLOSE_WAIT after the next tick read the
    map (so it is among that tick's due sockets), its exit event still to
    be taken: the check after the lookup (_still_lingering) drops it, as
    after any lookup. Reported with the answer taken ahead, it would be
    said to linger after its CLOSED line."""
    w = ahead_world(tmp_path, gatherer, monkeypatch)
    w.tracer.start()
    w.step()
    assert w.tracer._ahead is not None
    real_read = w.probe.tracked_entries
    armed = [True]

    def map_read_then_leave():
        got = real_read()
        if armed:
            armed.clear()
            w.probe.leave(0xB0)                 # 40101 closed by its holder
        return got
    w.probe.tracked_entries = map_read_then_leave
    w.probe.counts["cw_enter"] += 1             # the map is read at this tick
    w.step(0.1)
    assert sorted(r["rport"] for r in w.of("linger")) == [40001, 40002, 40102]
    assert w.tracer.summary()["tracer_cost"]["owners_ahead"] == 1


def test_an_answer_begun_ahead_is_no_stall_when_the_loop_was_busy(
        tmp_path, gatherer, monkeypatch):
    """Nothing reads the worker while the loop writes a batch: its answer
    may wait whole in the pipe for longer than the stall time (STALL_S).
    That is no stall: counted from when the loop began waiting, the answer
    is taken, the worker kept, nothing counted as timed out. (A review:
    2.3 s between the ticks timed the lookahead out and killed the worker.)"""
    lookups = []
    w = ahead_world(tmp_path, gatherer, monkeypatch, lookups)
    w.tracer.start()
    w.step()
    assert w.tracer._ahead is not None
    worker_pid = gatherer._proc.pid
    time.sleep(2.3)                         # the batch's writing, and the tick's wait
    w.step(0.1)
    assert lookups == [[40001, 40002]]
    assert gatherer.timeouts == 0 and gatherer._proc.pid == worker_pid
    assert sorted(r["rport"] for r in w.of("linger")) == [40001, 40002, 40101, 40102]
    assert w.tracer.summary()["tracer_cost"]["owners_ahead"] == 2


def test_a_stop_while_an_answer_is_begun_ahead_does_not_wait_or_kill_the_worker(
        tmp_path, gatherer, monkeypatch):
    """The last tick of a stop takes no answer begun ahead (nothing will be
    reported), and the worker is not abandoned for it: the tracepoints it
    holds for the exit stay held."""
    w = ahead_world(tmp_path, gatherer, monkeypatch)
    w.tracer.start()
    held = gatherer.adopt([0])
    assert held is not None and held()
    w.step()
    assert w.tracer._ahead is not None
    w.tracer.stopping = True
    gatherer.abort = lambda: w.tracer.stopping
    started = time.monotonic()
    w.tracer.tick(resolve=False)
    assert time.monotonic() - started < 0.5
    assert w.tracer._ahead is None and gatherer.stuck_workers() == 0 and held()
    # Busy with that call, the worker is asked nothing more at the exit.
    assert gatherer.adopt([0]) is None


def test_a_call_made_while_one_is_begun_keeps_its_own_deadline(gatherer):
    """The begun call's answer is read first, but no longer than the new
    call's deadline: past it, that worker is abandoned (the begun call gets
    no answer) and the new call fails as any call past its deadline."""
    gatherer.call("reading_for", 0.1, deadline_s=30, progress_s=0.8)
    begun = gatherer.begin("reading_for", 3.0, deadline_s=60, progress_s=0.8)
    started = time.monotonic()
    with pytest.raises(GatherFailed) as failed:
        gatherer.call("collecting", deadline_at=time.monotonic() + 0.5)
    assert failed.value.why == worker.TIMED_OUT
    assert time.monotonic() - started < 1.5
    assert begun.done and begun.error.why == worker.TIMED_OUT
    assert gatherer.call("collecting", deadline_s=30) is True     # a new worker


def test_sockets_found_gone_are_not_looked_up_ahead_and_not_counted(
        tmp_path, gatherer, monkeypatch):
    """The rows of pid 200's sockets are gone from the table before the
    lookahead: found gone, not reported, and not counted as reported with
    an answer taken ahead (owners_ahead counts sockets reported)."""
    lookups = []
    w = ahead_world(tmp_path, gatherer, monkeypatch, lookups)
    w.forget_row(40101, 40102)
    w.tracer.start()
    w.step()
    w.step(0.1)
    assert sorted(r["rport"] for r in w.of("linger")) == [40001, 40002]
    assert w.tracer.summary()["tracer_cost"]["owners_ahead"] == 0


def test_a_call_begun_is_polled_without_waiting(gatherer):
    """Pending.poll: the loop looks at a call it began (the census) once a
    tick and goes on while the worker works: never a wait; True once the
    answer is in, which result() then gives at once."""
    gatherer.call("collecting", deadline_s=30)              # started, ready
    begun = gatherer.begin("reading_for", 0.6, deadline_s=30, progress_s=5)
    polls = []
    while True:
        started = time.monotonic()
        answered = begun.poll()
        polls.append(time.monotonic() - started)
        if answered:
            break
        time.sleep(0.05)
    # The progress frames the worker writes meanwhile are taken, not waited on.
    assert len(polls) >= 5 and max(polls) < 0.05
    assert gatherer.idle()
    started = time.monotonic()
    assert begun.result() == "done" and time.monotonic() - started < 0.05
    assert gatherer.call("collecting", deadline_s=30) is True


def test_a_call_polled_past_its_deadline_is_ended_as_waiting_would(gatherer):
    gatherer.call("collecting", deadline_s=30)
    begun = gatherer.begin("reading_for", 5.0, deadline_s=0.3, progress_s=5)
    assert not begun.poll() and not gatherer.idle()
    time.sleep(0.4)
    assert begun.poll()
    with pytest.raises(GatherFailed) as failed:
        begun.result()
    assert failed.value.why == worker.TIMED_OUT and gatherer.timeouts == 1
    assert gatherer.call("collecting", deadline_s=30) is True     # a new worker


def test_a_polled_call_that_stalls_is_ended_at_its_stall_time(tmp_path, gatherer):
    """Pending.poll set the stall clock back at every look: the loop polls
    a begun call every tick, so a read blocked in the kernel (a page of a
    process turned into a FUSE file's) held the worker until the call's
    overall deadline (30 s for a scan) instead of its stall time (a
    review)."""
    proc = FakeProc(tmp_path / "proc")
    proc.process(100, comm="srv", state="S")
    block_reads_of(proc, 100)
    gatherer.call("collecting", deadline_s=30)              # started, ready
    begun = gatherer.begin("holder_states", [100], proc.root, deadline_s=30, progress_s=0.5)
    started = time.monotonic()
    while not begun.poll():
        time.sleep(0.05)
        assert time.monotonic() - started < 10, "polled past its stall time"
    with pytest.raises(GatherFailed) as failed:
        begun.result()
    assert failed.value.why == worker.TIMED_OUT
