"""Which reader answers for a namespace's TCP table: sock_diag for a real
procfs wherever it is mounted, files for anything else; and the two
readers' module layering (no import cycle)."""

import os
import subprocess
import sys

from closewait_trace.sockets import procnet, sockdiag
from closewait_trace.kernel import tcpstates
from tests.unit.fakeproc import FakeProc


def test_is_procfs_by_filesystem_not_by_path(tmp_path):
    assert procnet.is_procfs("/proc")
    assert not procnet.is_procfs(str(tmp_path))
    assert not procnet.is_procfs(str(tmp_path / "missing"))
    host_proc = tmp_path / "host-proc"          # a container's view of the host's /proc
    host_proc.symlink_to("/proc")
    assert procnet.is_procfs(str(host_proc))


def test_real_procfs_under_another_path_is_asked_through_sock_diag(tmp_path, monkeypatch):
    host_proc = tmp_path / "host-proc"
    host_proc.symlink_to("/proc")
    calls = []

    def fake_dump(states, ns_path=None, with_info=True):
        calls.append((list(states), ns_path))
        return []

    monkeypatch.setattr(sockdiag, "tcp_sockets", fake_dump)
    assert procnet.tcp_rows(os.getpid(), str(host_proc), states=[tcpstates.CLOSE_WAIT]) == []
    assert calls == [([tcpstates.CLOSE_WAIT], None)]    # our own namespace: no setns


def test_a_crafted_tree_is_read_as_files_even_with_our_namespace_inode(tmp_path, monkeypatch):
    ours = os.readlink("/proc/self/ns/net")
    inode = int(ours[ours.index("[") + 1:-1])
    fake = FakeProc(tmp_path).process(10, netns=inode)
    fake.tcp(10, 2, "127.0.0.1", 80, "127.0.0.1", 5555, tcpstates.CLOSE_WAIT, 4242)

    def refuse(*_a, **_k):
        raise AssertionError("sock_diag asked about a crafted tree")

    monkeypatch.setattr(sockdiag, "tcp_sockets", refuse)
    rows = procnet.tcp_rows(10, fake.root, states=[tcpstates.CLOSE_WAIT])
    assert [(r.endpoints.rport, r.inode) for r in rows] == [(5555, 4242)]
    assert rows[0].last_ack_recv_ms is None        # /proc has no tcp_info


def test_sockdiag_does_not_import_procnet():
    code = ("import sys, closewait_trace.sockets.sockdiag; "
            "sys.exit('closewait_trace.sockets.procnet' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
