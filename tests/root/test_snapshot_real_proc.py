"""`closewait-trace snapshot` over the machine's real /proc, as root: the
notice that no process matches a holder filter, which, run by another
user, says "no process visible to you" instead (their processes hidden).
The pure parts and the crafted trees are in tests/unit/test_snapshot.py."""

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.root


def test_a_holder_filter_no_process_matches_is_said_in_one_line():
    # A typo (--unit ngnix) or a service that is not running would give an
    # empty list that reads as good news; real processes here.
    me = str(os.getpid())
    out = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot",
                          "--unit", "no-such-unit-here", "--pid", me, "--comm", "no\x1bsuch"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    notice = [l for l in out.stderr.splitlines() if "no process matches" in l]
    assert notice == ["closewait-trace: notice: no process matches --comm no\\x1bsuch, "
                      "--unit no-such-unit-here now; no socket this snapshot shows is theirs"]
    mine = subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot", "--pid", me],
                          capture_output=True, text=True, timeout=60)
    assert mine.returncode == 0 and "no process matches" not in mine.stderr, mine.stderr


def test_the_notice_compares_names_as_the_owners_are_read(tmp_path):
    # The name of a holder comes from /proc/PID/stat; a name ending in a
    # newline must not be matched by the same name without it, or the other
    # way round (the notice would then be false).
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, sys, time; libc = ctypes.CDLL(None); "
        "libc.prctl(15, b'cwnotice\\n', 0, 0, 0); "
        f"open({str(ready)!r}, 'w').close(); time.sleep(60)")])
    try:
        for _ in range(200):
            if ready.exists():
                break
            time.sleep(0.05)
        def notice(*args):
            return subprocess.run([sys.executable, "-m", "closewait_trace", "snapshot", *args],
                                  capture_output=True, text=True, timeout=60).stderr
        # --comm is a prefix: the name with its newline matches, and the
        # notice shows the name as read (escaped), so nobody is misled.
        said = notice("--comm", "cwnotice")
        assert "no process matches" not in said
        assert "--comm cwnotice matches cwnotice\\n now" in said, said
        assert "no process matches" not in notice("--comm", "cwnotice\n")
        assert "no process matches --comm cwnoticeX" in notice("--comm", "cwnoticeX")
    finally:
        child.kill()
        child.wait()
