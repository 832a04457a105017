"""The tracer's registration of CPython processes in the kernel's map
(LiveTracer.register_pythons), without root: a fake probe holds the map
(a capacity, the exec()s the kernel saw), a fake /proc the processes.
The kernel tests (tests/kernel/test_python_registration_live.py) meet the
same rules with real processes."""

import os

import pytest

from closewait_trace.kernel.probe import ProbeConfig
from closewait_trace.sockets.filters import SocketFilter
from closewait_trace.live.tracer import LiveTracer, ProcResolver
from tests.unit.fakeproc import FakeProc

WALK = {"interp_head": 0x9ecb60, "interp_threads_head": 16, "tstate_next": 8,
        "tstate_native_tid": 160, "tstate_cframe": 56, "cframe_current": 8,
        "frame_code": 32, "frame_previous": 48, "frame_prev_instr": 56}


class MapProbe:
    """cw_py and cw_exec_ns as far as registration sees them."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.py: dict = {}
        self.execs: dict = {}           # pid -> kernel time of its last exec
        self.exec_map_full = False

    def register_python(self, pid, walk):
        if pid not in self.py and len(self.py) >= self.capacity:
            return False
        self.py[pid] = {k: walk[k] for k in WALK}
        return True

    def unregister_python(self, pid):
        self.py.pop(pid, None)

    def python_registered(self):
        return set(self.py)

    def exec_since(self, pid, ts_ns):
        if pid in self.execs:
            return self.execs[pid] > ts_ns
        return None if self.exec_map_full else False


@pytest.fixture
def world(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    probe = MapProbe(capacity=4)
    tracer = LiveTracer(config=ProbeConfig(threshold_ns=10**9), socket_filter=SocketFilter(),
                        probe=probe, resolver=ProcResolver(str(tmp_path / "proc")),
                        clock=lambda: 1000)
    return proc, probe, tracer


def walk(uid, start_time=100):
    return {**WALK, "uid": uid, "start_time": start_time, "exe": "/usr/bin/python3.11"}


def test_a_pid_that_names_another_process_now_is_not_registered(world):
    """Read at start time 100; the pid is now a process started at 200 (the
    one read exited, its pid was taken): the kernel would walk the new one's
    memory with the old one's addresses."""
    proc, probe, tracer = world
    proc.process(10, start_time=200)
    tracer.register_pythons({10: walk(1000, start_time=100)}, seen_ns=500)
    assert probe.python_registered() == set()


def test_a_process_that_ran_another_program_since_the_read_is_not_registered(world):
    proc, probe, tracer = world
    proc.process(10)
    proc.process(11)
    probe.execs[10] = 600               # after the read at 500
    probe.execs[11] = 400               # before it: the program read is the new one
    tracer.register_pythons({10: walk(1000), 11: walk(1000)}, seen_ns=500)
    assert probe.python_registered() == {11}


def test_when_the_kernel_could_not_record_every_exec_the_program_decides(world):
    """Anyone can fill the kernel's map of exec()s with live processes:
    registrations go on, an exec() since the read told by the program's
    path (/proc/PID/exe) instead."""
    proc, probe, tracer = world
    for pid in (10, 11):
        proc.process(pid)
    os.symlink("/usr/bin/python3.11", os.path.join(proc.root, "10", "exe"))
    os.symlink("/usr/bin/sleep", os.path.join(proc.root, "11", "exe"))
    probe.exec_map_full = True
    tracer.register_pythons({10: walk(1000), 11: walk(1000)}, seen_ns=500)
    assert probe.python_registered() == {10}


def test_a_full_map_gives_a_user_with_fewer_the_place_of_one_with_the_most(world):
    proc, probe, tracer = world
    for pid in range(10, 16):
        proc.process(pid)
    proc.process(20, uid=2000)
    proc.process(21, uid=2000)
    tracer.register_pythons({pid: walk(1000) for pid in range(10, 16)}, seen_ns=500)
    assert len(probe.py) == 4 and tracer.python_unregistered == 2
    tracer.register_pythons({20: walk(2000), 21: walk(2000)}, seen_ns=500)
    assert {20, 21} <= probe.python_registered()
    owners = [tracer.python_owners[p] for p in probe.python_registered()]
    assert sorted(owners) == [1000, 1000, 2000, 2000]
    # Balanced now: the user with the most takes no one's place, nor does
    # the other (it would then hold more).
    proc.process(16)
    proc.process(22, uid=2000)
    tracer.register_pythons({16: walk(1000), 22: walk(2000)}, seen_ns=500)
    assert sorted(tracer.python_owners[p] for p in probe.python_registered()) == \
        [1000, 1000, 2000, 2000]


def test_places_freed_by_exits_are_counted_as_free(world):
    """The kernel deletes a process's entry at its exit: the owners the
    tracer remembers are checked against the map before anyone is evicted."""
    proc, probe, tracer = world
    for pid in range(10, 14):
        proc.process(pid)
    tracer.register_pythons({pid: walk(1000) for pid in range(10, 14)}, seen_ns=500)
    for pid in (10, 11):
        probe.py.pop(pid)               # exited
    proc.process(20, uid=2000)
    proc.process(21, uid=2000)
    proc.process(22, uid=2000)
    tracer.register_pythons({20: walk(2000), 21: walk(2000), 22: walk(2000)}, seen_ns=500)
    assert probe.python_registered() == {12, 13, 20, 21}
    assert tracer.python_unregistered == 1


def test_the_owners_of_processes_that_exited_are_forgotten(world):
    """A long trace registers processes that come and go (each diagnosed
    one): what the tracer remembers of them stays within twice the map."""
    proc, probe, tracer = world
    probe.capacity = 2
    tracer.config.max_py_procs = 2
    for pid in range(10, 30):
        proc.process(pid)
        tracer.register_pythons({pid: walk(1000)}, seen_ns=500)
        probe.py.pop(pid)               # exited
    assert len(tracer.python_owners) <= 4


class ExecProbe(MapProbe):
    """MapProbe with cw_exec_new: the exec()s the kernel saw since the
    tracer last took them."""

    def __init__(self, capacity):
        super().__init__(capacity)
        self.new: dict = {}             # pid -> kernel time of the exec

    def take_execs(self, before_ns):
        taken = [(pid, t) for pid, t in self.new.items() if t < before_ns]
        for pid, _t in taken:
            del self.new[pid]
        return taken


class ScanResolver(ProcResolver):
    """What the worker's scan of new processes answers (no /proc read):
    a walk for each pid in `pythons`, those past `limit` left."""

    def __init__(self, proc):
        super().__init__(proc)
        self.pythons: dict = {}         # pid -> uid
        self.scans: list = []           # the pids each scan was given
        self.busy = False               # a call begun and not answered

    def worker_idle(self):
        return not self.busy

    def new_pythons(self, pids, limit, seconds):
        self.scans.append(list(pids))
        found = [pid for pid in pids if pid in self.pythons]
        items = [item for pid in found[:limit]
                 for item in (("reading", pid, self.pythons[pid]),
                              ("walk", pid, walk(self.pythons[pid])))]
        return items + [("left", 0, found[limit:])]


@pytest.fixture
def execs(tmp_path):
    proc = FakeProc(tmp_path / "proc")
    probe = ExecProbe(capacity=64)
    resolver = ScanResolver(str(tmp_path / "proc"))
    now = [10**12]
    tracer = LiveTracer(config=ProbeConfig(threshold_ns=10**9), socket_filter=SocketFilter(),
                        probe=probe, resolver=resolver, clock=lambda: now[0])
    return proc, probe, resolver, tracer, now


def test_a_cpython_program_that_exec_ed_after_the_start_is_registered_at_a_tick(execs):
    """A server started after the trace was registered only once its first
    lingering socket was diagnosed: its first EOF read had no Python frames.
    Its exec() is looked at a tick later (once 50 ms old: a shell's `exec
    python3` comes a few ms after its own), in the worker, and registered
    the tick after; a program that is not CPython is not."""
    proc, probe, resolver, tracer, now = execs
    proc.process(10)
    proc.process(11)
    resolver.pythons[10] = 1000
    probe.new = {10: now[0] - 10**8, 11: now[0] - 10**8, 12: now[0] - 10**6}
    tracer.register_new_pythons()
    assert resolver.scans == [[10, 11]] and probe.new == {12: now[0] - 10**6}
    assert probe.python_registered() == set()           # begun, not yet taken
    tracer.register_new_pythons()
    assert probe.python_registered() == {10} and tracer.python_owners == {10: 1000}
    now[0] += 10**8
    tracer.register_new_pythons()
    assert resolver.scans[-1] == [12] and probe.new == {}


def test_new_processes_wait_while_the_worker_is_busy_and_within_bounds(execs, monkeypatch):
    """Never a call that would wait for the worker (a census it reads): the
    processes wait their turn, at most EXECS_WAITING (the oldest dropped:
    found when first diagnosed, as before), PY_SCAN_PIDS a scan; those a
    scan left (its limit) go first next time; one registered and exec()ed
    again is looked at again (the kernel forgot it at the exec)."""
    from closewait_trace.live import tracer as tracer_module
    monkeypatch.setattr(tracer_module, "EXECS_WAITING", 5)
    monkeypatch.setattr(tracer_module, "PY_SCAN_PIDS", 3)
    monkeypatch.setattr(tracer_module, "PY_SCAN_FOUND", 1)
    proc, probe, resolver, tracer, now = execs
    for pid in range(20, 28):
        proc.process(pid)
    resolver.pythons = {21: 1000, 22: 1000}
    resolver.busy = True
    probe.new = {pid: now[0] - 10**8 + pid for pid in range(20, 28)}
    tracer.register_new_pythons()
    assert resolver.scans == [] and list(tracer._execs_waiting) == [23, 24, 25, 26, 27]
    resolver.busy = False
    probe.new = {21: now[0] - 10**8, 22: now[0] - 10**8 + 1}
    tracer.register_new_pythons()
    assert resolver.scans == [[25, 26, 27]]
    tracer.register_new_pythons()                       # taken: none of them CPython
    tracer.register_new_pythons()
    assert resolver.scans[-1] == [21, 22]
    tracer.register_new_pythons()                       # 21 read, 22 left for the limit
    assert probe.python_registered() == {21} and list(tracer._execs_waiting)[0] == 22
    tracer.register_new_pythons()
    tracer.register_new_pythons()
    assert probe.python_registered() == {21, 22}
    probe.py.pop(21)                                    # exec()ed again: the kernel forgot it
    probe.new = {21: now[0] - 10**8}
    tracer.register_new_pythons()
    assert resolver.scans[-1] == [21]


def test_a_process_registered_since_its_exec_is_taken_out_when_the_exec_is_taken(execs):
    """A registration made after an exec the loop had not taken yet (at a
    diagnosis meanwhile) stayed in the kernel's map when the exec was
    taken, no longer counted in its user's share (a review): taken out,
    and the process looked at again."""
    proc, probe, resolver, tracer, now = execs
    proc.process(10)
    tracer.register_pythons({10: walk(1000)}, seen_ns=500)
    assert probe.python_registered() == {10} and tracer.python_owners == {10: 1000}
    probe.new = {10: now[0] - 10**8}
    tracer.register_new_pythons()
    assert probe.python_registered() == set() and tracer.python_owners == {}
    assert resolver.scans == [[10]]


def test_the_scan_of_new_processes_is_begun_after_the_ticks_reports(tmp_path):
    """A scan begun before a tick's reports made their first call to the
    worker wait for it (a review): it is begun after them."""
    import socket as socketlib
    from tests.unit.fakeprobe import FakeClock, FakeProbe, endpoints
    from tests.unit.fakeproc import FakeProc as Fake

    class Probe(FakeProbe, ExecProbe):
        def __init__(self, clock):
            FakeProbe.__init__(self, clock)
            ExecProbe.__init__(self, capacity=64)

    order = []

    class Ordered(ScanResolver):
        def owners(self, *args, **kw):
            order.append("owners")
            return super().owners(*args, **kw)

        def new_pythons(self, pids, limit, seconds):
            order.append("scan")
            return super().new_pythons(pids, limit, seconds)

    clock = FakeClock()
    probe = Probe(clock)
    fake = Fake(tmp_path / "proc")
    fake.process(1, comm="init")
    fake.process(100)
    fake.fd(100, 3, 50000)
    fake.tcp(100, socketlib.AF_INET, "127.0.0.1", 5000, "127.0.0.1", 30000,
             tcpstates_cw(), 50000)
    tracer = LiveTracer(config=ProbeConfig(threshold_ns=10**9), socket_filter=SocketFilter(),
                        probe=probe, resolver=Ordered(str(tmp_path / "proc")), clock=clock,
                        tick_s=0.01)
    probe.enter(0x1000, endpoints(30000), ago_s=2.0)
    tracer.start()
    probe.new = {200: clock.ns - 10**8}
    tracer.tick()
    assert order[:2] == ["owners", "scan"], order


def tcpstates_cw():
    from closewait_trace.kernel import tcpstates
    return tcpstates.CLOSE_WAIT
