"""Root, no kernel: what needs uid 0 itself, or a file another user owns
(which only root can make), from the worker and the metrics socket's
checks. The rest of both is in tests/unit (no root)."""

import os

import pytest

from closewait_trace.output import scrape

pytestmark = pytest.mark.root


def test_the_worker_keeps_the_tracers_capabilities_under_noroot():
    """The unit runs the tracer with SecureBits=noroot-locked: uid 0 gains
    nothing at exec, so a worker started plainly would have no capability
    and could not read other users' processes. It must hold the ones the
    tracer has (CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN)."""
    import subprocess
    import sys
    code = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(28, 1, 0, 0, 0) == 0          # PR_SET_SECUREBITS: SECBIT_NOROOT
from closewait_trace.evidence.worker import GatherWorker
g = GatherWorker()
g.call("holder_states", [1], deadline_s=30)
with open(f"/proc/{g._proc.pid}/status") as f:
    print([l.split()[1] for l in f if l.startswith("CapEff:")][0])
g.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    eff = int(out.stdout.strip(), 16)
    for cap in (2, 19, 21):                  # DAC_READ_SEARCH, SYS_PTRACE, SYS_ADMIN
        assert eff >> cap & 1, (hex(eff), cap)


def test_unix_socket_refuses_a_directory_another_user_owns(tmp_path):
    """A directory of another user's (here nobody's, made by root) could
    have its socket swapped: refused like a shared one."""
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(scrape.UnsafePath):
        scrape.listen_unix(str(other / "m.sock"))
