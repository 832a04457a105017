import pytest

from closewait_trace.kernel.probe import FORCE_ENV
from tests.kernel.harness import Tracer, end_tree

# What a kernel before 5.6 gets (Ubuntu 20.04's 5.4, RHEL 8's 4.18): perf
# buffer, CLOCK_MONOTONIC, the map walked key by key, and the state changes
# through the tracepoint's perf event (sk_protocol is a bitfield there: the
# raw tracepoint's reading of the socket needs 5.6).
PRE_5_6 = "perfbuf,monotonic,perkey,perftp"
KERNEL_PATHS = ("native", PRE_5_6)


def pytest_generate_tests(metafunc):
    """A test that takes `kernel_path` runs once on this kernel's own path and
    once forced onto the oldest kernels' fallbacks, on every run."""
    if "kernel_path" in metafunc.fixturenames:
        metafunc.parametrize("kernel_path", KERNEL_PATHS, indirect=True,
                             ids=["native", "pre-5.6"])


@pytest.fixture
def kernel_path(request, monkeypatch):
    """Sets CLOSEWAIT_TRACE_FORCE for the tracers this test starts."""
    if request.param == "native":
        monkeypatch.delenv(FORCE_ENV, raising=False)
    else:
        monkeypatch.setenv(FORCE_ENV, request.param)
    return request.param


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
        else:
            end_tree(p)
