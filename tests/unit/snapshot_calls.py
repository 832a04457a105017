"""The gathering worker's calls (evidence/gathering.py) over a fake /proc
tree, for tests/unit/test_snapshot_output.py: every call asked about /proc
reads the tree named by CLOSEWAIT_TEST_FAKE_PROC instead, the kernel clock
is fixed, and the rows get tcp_info times (a crafted tree has none), so
that every kind of age is shown. Imported in the worker, and in the test
itself (rows_with_tcp_info) for the run without a worker."""

import dataclasses
import os

from closewait_trace.evidence import gathering
from closewait_trace.sockets import procfs, procnet
from closewait_trace.sockets.tcprow import KEEPALIVE_TIMER

FAKE_PROC_ENV = "CLOSEWAIT_TEST_FAKE_PROC"
TAKEN_NS = 1_000_000 * 1_000_000_000        # the kernel clock: 1,000,000 s after boot


def with_tcp_info(row):
    """tcp_info times as a function of the remote port: some sockets with
    none (lower bound), some with keepalive (range), the others estimated."""
    port = row.endpoints.rport
    if row.state != 8 or port % 7 == 0:      # not CLOSE_WAIT, or no tcp_info
        return row
    ack_ms = (port % 97) * 1000 + port % 1000
    return dataclasses.replace(row, last_ack_recv_ms=ack_ms, last_data_recv_ms=ack_ms + 250,
                               timer=KEEPALIVE_TIMER if port % 5 == 0 else 0)


def rows_with_tcp_info(real):
    """procnet._read_rows, with tcp_info times."""
    def read_rows(pid, proc, states):
        return [with_tcp_info(row) for row in real(pid, proc, states)]
    read_rows.with_tcp_info = True
    return read_rows


def install() -> None:
    """In the worker, once (the test's own process patches with monkeypatch)."""
    if not getattr(procnet._read_rows, "with_tcp_info", False):
        procnet._read_rows = rows_with_tcp_info(procnet._read_rows)
        gathering.now_ns = lambda: TAKEN_NS


def _proc(path: str) -> str:
    return os.environ.get(FAKE_PROC_ENV, path) if path == procfs.PROC else path


def _call(name):
    real = gathering.CALLS[name]

    def call(*args):
        install()
        # Every call takes proc right after its own arguments; it is the
        # only argument equal to "/proc".
        return real(*[_proc(a) if isinstance(a, str) else a for a in args])
    return call


CALLS = {name: _call(name) for name in gathering.CALLS}
