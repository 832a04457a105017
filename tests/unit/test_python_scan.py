"""The scan of new CPython processes (pyframes.scan_python_processes with
only_pids, the tracer's look at the processes that exec()ed since the last
tick), on a fake /proc: what each process may cost the others. The real
scan on real interpreters: tests/kernel/test_python_frames_live.py and
test_python_registration_live.py."""

import time

from closewait_trace.evidence import procimage, pyframes
from tests.unit.fakeproc import FakeProc


class Image:
    def __init__(self, pid, proc):
        self.pid = pid

    def close(self):
        pass


def test_a_new_process_whose_binary_is_slow_to_search_costs_the_others_a_share(
        tmp_path, monkeypatch):
    """A user's program named python3.X whose symbol table takes the whole
    deadline to search, exec()ed at every tick, had every scan spend its
    time on it: another user's new CPython process was never read (a
    review, with a 1,000,000-symbol binary: 3 scans of 3). Each process
    gets at most a share of the scan's time; the others are read after."""
    fake = FakeProc(tmp_path / "proc")
    fake.process(10, uid=1000, exe="/home/mallory/python3.11")     # the slow one
    fake.process(20, uid=65534, exe="/usr/bin/python3.11")
    deadlines = {}

    def runtime(image, deadline):
        deadlines[image.pid] = deadline - time.monotonic()
        if image.pid == 10:
            time.sleep(max(0.0, deadline - time.monotonic()))     # searched to the end
            return None
        return object()

    class Runtime:
        @staticmethod
        def kernel_walk():
            return {}
    monkeypatch.setattr(pyframes, "_runtime_or_none",
                        lambda image, deadline: Runtime() if runtime(image, deadline) else None)
    monkeypatch.setattr(procimage, "ProcessImage", Image)
    monkeypatch.setattr(pyframes, "pid_namespace", lambda proc, pid: {"pidns_dev": 1})
    items = list(pyframes.scan_python_processes(fake.root, time.monotonic() + 2.0, 16,
                                                only_pids=[10, 20]))
    assert ("reading", 20, 65534) in items and any(
        kind == "walk" and pid == 20 for kind, pid, _w in items), items
    assert deadlines[10] <= 2.0 / pyframes.NEW_PROCESS_SHARES + 0.01
    assert items[-1] == ("left", 0, [])
