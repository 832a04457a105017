"""The cap on holder processes read per batch (gathering.
MAX_PROCESSES_PER_BATCH, chosen by resolver.gather_processes): which are
read first, what a socket whose holder was left says, and the later
re-diagnosis of such a socket (tracer._rediagnose_over_cap). Another user's
many processes must never push a user's holder past the cap (the review's
F2: nobody's listener shared by 300 forks, one of its accepted sockets
older than root's, made root's socket "unknown ... (not gathered)")."""

import socket

from closewait_trace.evidence import diagnosis, gathering
from closewait_trace.evidence.resolver import NOT_READ_OVER_CAP, ProcResolver, holder_order
from closewait_trace.kernel import tcpstates
from tests.unit.fakeproc import FakeProc
from tests.unit.fakeprobe import endpoints
from tests.unit.test_loop import World

V4 = socket.AF_INET
CW, LISTEN = tcpstates.CLOSE_WAIT, tcpstates.LISTEN
NOBODY, ROOT = 65534, 0
ACCEPT4 = ("S", "288 0x3 0x0 0x0", "inet_csk_accept")      # x86_64 accept4 on fd 3
PAUSE = ("S", "34 0x0 0x0 0x0", "do_sys_pause")


class InProcessWorker:
    """The gathering worker's interface, each call run in this process (the
    resolver reads evidence, and applies the cap, only through a worker)."""
    timeouts = failures = 0

    def call(self, name, *args, stream=False, reads_memory=False, **deadlines):
        result = gathering.CALLS[name](*args)
        return list(result) if stream else result

    def idle(self):
        # As ProcResolver.worker_idle without a worker: each call answered
        # in place, none ever begun (no begin()).
        return None

    def stuck_tags(self):
        return set()

    def stuck_workers(self):
        return 0

    def tag_last_abandoned(self, tag):
        pass

    def close(self):
        pass


def listener_forks(f: FakeProc, kids: int, inherit_socket: bool = False) -> FakeProc:
    """nobody's pid 1000 listens on 127.0.0.1:47501 (inode 5000) and holds
    the socket it accepted from :40000, in CLOSE_WAIT (inode 5001); pids
    1001.. (kids of them) hold the listener only, waiting in pause(); with
    inherit_socket, the accepted socket too (forked after accept()).
    root's pid 2000 listens on :47502 (inode 6000) and waits in accept4(),
    holding its accepted socket from :40001 in CLOSE_WAIT (inode 6001)."""
    f.process(1000, comm="hog", uid=NOBODY, threads={1000: ACCEPT4})
    f.process(2000, comm="python3", uid=ROOT, threads={2000: ACCEPT4})
    f.tcp(1000, V4, "127.0.0.1", 47501, "0.0.0.0", 0, LISTEN, 5000)
    f.tcp(1000, V4, "127.0.0.1", 47501, "127.0.0.1", 40000, CW, 5001)
    f.tcp(2000, V4, "127.0.0.1", 47502, "0.0.0.0", 0, LISTEN, 6000)
    f.tcp(2000, V4, "127.0.0.1", 47502, "127.0.0.1", 40001, CW, 6001)
    f.fd(1000, 3, 5000).fd(1000, 4, 5001).fd(2000, 3, 6000).fd(2000, 4, 6001)
    for pid in range(1001, 1001 + kids):
        f.process(pid, comm="hog", ppid=1000, uid=NOBODY, threads={pid: PAUSE})
        f.fd(pid, 3, 5000)
        if inherit_socket:
            f.fd(pid, 4, 5001)
    return f


def diagnose_batch(f: FakeProc):
    """nobody's socket (the older) and root's, diagnosed in one batch as
    the tracer does: owners, the processes read, then each diagnosis."""
    resolver = ProcResolver(f.root, worker=InProcessWorker(), stacks=False)
    hog, root = endpoints(40000, 47501), endpoints(40001, 47502)
    resolved = resolver.owners([hog, root])
    cache = diagnosis.Batch(stacks=False)
    over = resolver.gather_processes([resolved[hog], resolved[root]], cache)
    got = {ep: resolver.diagnose(resolved[ep], cache) for ep in (hog, root)}
    return resolver, cache, over, got[hog], got[root]


# The review's 300 forks and cap of 256, scaled down (a fake /proc of 300
# processes costs seconds): the same order, the same cut.
CAP, KIDS = 16, 20


def test_a_listeners_many_holders_do_not_push_another_sockets_holder_past_the_cap(
        tmp_path, monkeypatch):
    """nobody's forks on its listener (more than the cap), its accepted
    socket older than root's: every socket's own holders are read before
    any listener's, so root's holder is read and diagnosed (before:
    'unknown ... not gathered', the 302nd of 256)."""
    monkeypatch.setattr(gathering, "MAX_PROCESSES_PER_BATCH", CAP)
    f = listener_forks(FakeProc(tmp_path), KIDS)
    resolver, cache, over, hog, root = diagnose_batch(f)
    assert root.cause == diagnosis.IGNORING_EOF, root.summary
    assert "accept4" in root.summary and "not read" not in root.summary
    assert cache.processes[2000].unreadable == "" and cache.processes[2000].identity
    assert hog.cause == diagnosis.IGNORING_EOF, hog.summary
    # KIDS + 2 processes, CAP read: those left are listener holders only,
    # said so in their own process record, and counted once each.
    assert len(over) == KIDS + 2 - CAP == resolver.skipped_processes
    assert over <= set(range(1001, 1001 + KIDS))
    assert all(cache.processes[pid].unreadable == NOT_READ_OVER_CAP for pid in over)


def test_one_users_many_holders_of_its_own_socket_take_turns_with_another_user(
        tmp_path, monkeypatch):
    """The same, nobody's accepted socket itself inherited by the forks:
    the users take turns, so root's one holder is read second, not last;
    nobody's socket is still 'held by N processes'."""
    monkeypatch.setattr(gathering, "MAX_PROCESSES_PER_BATCH", CAP)
    f = listener_forks(FakeProc(tmp_path), KIDS, inherit_socket=True)
    resolver, cache, over, hog, root = diagnose_batch(f)
    assert root.cause == diagnosis.IGNORING_EOF, root.summary
    assert "not read" not in root.summary
    assert hog.cause == diagnosis.LEAKED and f"{KIDS + 1} processes" in hog.summary
    assert len(over) == resolver.skipped_processes == KIDS + 2 - CAP
    assert 2000 not in over


def test_turns_by_user_socket_holders_before_listener_holders():
    """holder_order alone: socket holders (each user's oldest socket's
    first, users in turns), then listener holders not also socket holders."""
    class H:
        def __init__(self, pid, uid):
            self.pid, self.uid = pid, uid

    class Own:
        def __init__(self, holders, listener_holders=()):
            self.holders, self.listener_holders = holders, listener_holders

    a = [H(10 + i, NOBODY) for i in range(3)]
    b, c = H(20, ROOT), H(30, None)
    owns = [Own(a, a + [H(40, NOBODY), H(41, NOBODY)]), Own([b], [b, H(50, ROOT)]), Own([c])]
    assert [h.pid for h in holder_order(owns)] == [10, 20, 30, 11, 12, 40, 50, 41]


def test_a_socket_whose_holder_was_left_for_the_cap_says_so(tmp_path, monkeypatch):
    """Three sockets of three processes, a cap of two: the third's holder is
    not read, and its diagnosis and process record say why."""
    monkeypatch.setattr(gathering, "MAX_PROCESSES_PER_BATCH", 2)
    f = FakeProc(tmp_path)
    for i in range(3):
        f.process(100 + i, uid=ROOT, threads={100 + i: ACCEPT4})
    for i in range(3):
        f.tcp(100, V4, "127.0.0.1", 5000, "127.0.0.1", 30000 + i, CW, 7000 + i)
        f.fd(100 + i, 4, 7000 + i)
    resolver = ProcResolver(f.root, worker=InProcessWorker(), stacks=False)
    eps = [endpoints(30000 + i) for i in range(3)]
    resolved = resolver.owners(eps)
    cache = diagnosis.Batch(stacks=False)
    assert resolver.gather_processes([resolved[ep] for ep in eps], cache) == {102}
    last = resolver.diagnose(resolved[eps[2]], cache)
    assert last.cause == diagnosis.UNKNOWN and NOT_READ_OVER_CAP in last.summary
    records = {r["pid"]: r for r in resolver.process_records(cache)}
    assert records[102]["unreadable"] == NOT_READ_OVER_CAP
    assert resolver.skipped_processes == 1


def cap_world(tmp_path, monkeypatch, cap):
    """The live loop with a cap of `cap` processes and three sockets of
    three processes (pids 100-102), all due at the first tick."""
    monkeypatch.setattr(gathering, "MAX_PROCESSES_PER_BATCH", cap)
    w = World(tmp_path, resolver=ProcResolver(str(tmp_path / "proc"), worker=InProcessWorker(),
                                              stacks=False))
    w.linger(3, holders=3)
    w.tracer.start()
    w.step()
    return w


def test_a_socket_left_for_the_cap_is_diagnosed_again_at_the_next_tick(tmp_path, monkeypatch):
    w = cap_world(tmp_path, monkeypatch, 2)
    first = {r["rport"]: r for r in w.of("linger")}
    assert NOT_READ_OVER_CAP in first[30002]["diagnosis"]["summary"]
    assert all(NOT_READ_OVER_CAP not in first[p]["diagnosis"]["summary"] for p in (30000, 30001))
    w.step(0.1)
    again = [r for r in w.of("linger") if r["update"]]
    assert [r["rport"] for r in again] == [30002]
    assert NOT_READ_OVER_CAP not in again[0]["diagnosis"]["summary"]
    assert 102 in {r["pid"] for r in w.of("process")}
    assert w.tracer.resolver.skipped_processes == 1


def test_a_socket_left_for_the_cap_is_diagnosed_again_a_bounded_number_of_times(
        tmp_path, monkeypatch):
    """A cap nothing fits in: each socket is tried again twice in its life,
    then left as it is; no tick reads them again after that."""
    from closewait_trace.live.tracer import MAX_EVIDENCE_RETRIES
    w = cap_world(tmp_path, monkeypatch, 0)
    for _ in range(6):
        w.step(0.1)
    assert {l.evidence_retries for l in w.tracer.tracker.lingering()} \
        == {MAX_EVIDENCE_RETRIES}
    assert not w.tracer.rediagnose_next
    assert w.tracer.resolver.skipped_processes == 3 * (1 + MAX_EVIDENCE_RETRIES)
