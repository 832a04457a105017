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
