import os
import signal

import pytest

from tests.kernel.harness import Tracer, children_of


@pytest.fixture
def procs():
    """Processes a test started; all killed afterwards, newest first (a
    tracer such as gdb or strace goes before its tracee, whose parent could
    not reap it otherwise), with their children (socat's forks)."""
    started = []
    yield started
    for p in reversed(started):
        if isinstance(p, Tracer):
            p.kill()
            continue
        for pid in children_of(p.pid) + [p.pid]:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
