"""Recording into a shared (sticky, 1777) directory where another local user
plants files at the names of the parts to come: real files made by a real
unprivileged user (setpriv to nobody). Needs root, no kernel."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from closewait_trace.files import parts, recording
from tests.unit import recordfactory
from closewait_trace.errors import EXIT_FILE

pytestmark = pytest.mark.root

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def sticky_dir():
    path = tempfile.mkdtemp(prefix="cw-sticky-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nobody():
    """Run commands as nobody; processes left running are killed afterwards."""
    started = []

    def run(script: str, background: bool = False):
        cmd = AS_NOBODY + [sys.executable, "-c", script]
        if background:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            started.append(proc)
            assert proc.stdout.readline().strip() == "ready"
            return proc
        subprocess.run(cmd, check=True, timeout=30)
    yield run
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.fixture
def alarm():
    """Fail instead of hanging: a blocked open() is interrupted by SIGALRM."""
    def on_alarm(signum, frame):
        raise TimeoutError("blocked: the recorder hung")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def linger(i):
    return recordfactory.linger(ts=1000.0 + i, rport=40000 + i, padding="x" * 300)


def recorder(path, **kw):
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=recordfactory.NO_FILTERS,
                           clock_offset_ns=0, max_bytes=1024,
                           snapshot_source=lambda: recordfactory.snapshot(), **kw)
    r.open()
    return r


def write_until_rotated(r, count=12):
    for i in range(count):
        r.write(linger(i))
        r.flush()


PLANT_OPEN_FILE = """
import os, sys, time
fd = os.open(sys.argv[1] if len(sys.argv) > 1 else PATH, os.O_RDWR | os.O_CREAT, 0o666)
os.fchmod(fd, 0o666)
print("ready", flush=True)
time.sleep(600)
"""


def test_planted_open_file_never_receives_a_part(sticky_dir, nobody, alarm, capsys):
    """A 0666 F.1 made (after the tracer started) and kept open by another
    user: root must not truncate or write into it; the recording stops with
    one line, the writes after it are counted, nothing raises."""
    base = os.path.join(sticky_dir, "cw.jsonl")
    r = recorder(base)
    planted = base + ".1"
    holder = nobody(PLANT_OPEN_FILE.replace("PATH", repr(planted)), background=True)
    write_until_rotated(r)
    r.close()
    st = os.stat(planted)
    assert st.st_uid == NOBODY and st.st_size == 0          # untouched
    assert holder.poll() is None                            # still holding it open
    assert r.stopped is not None and r.stopped.exit_code == EXIT_FILE
    assert "owned by uid 65534" in r.stopped.message
    assert r.write_errors > 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recording stopped at part 1" in err[0], err
    # What was written before stays a valid recording of its own.
    rec = parts.read([base])
    assert rec.of("header") and rec.of("linger")


@pytest.mark.parametrize("plant,kind", [
    ("os.mkfifo(PATH, 0o666)", "a FIFO"),
    ("os.symlink(TARGET, PATH)", "a symbolic link"),
    ("os.mkdir(PATH)", "a directory"),
])
def test_planted_fifo_symlink_directory_stop_the_recording_cleanly(
        sticky_dir, nobody, alarm, capsys, plant, kind):
    base = os.path.join(sticky_dir, "cw.jsonl")
    target = os.path.join(sticky_dir, "root-owned")
    with open(target, "w") as f:
        f.write("precious")
    r = recorder(base)
    planted = base + ".1"
    nobody(f"import os\nPATH = {planted!r}\nTARGET = {target!r}\n{plant}\n")
    write_until_rotated(r)          # hangs in open() on a FIFO without O_NONBLOCK
    r.close()                       # the old double close raised EBADF here
    assert open(target).read() == "precious"
    assert r.stopped is not None and kind in r.stopped.message
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and kind in err[0] and "Bad file descriptor" not in err[0]


def test_file_planted_before_start_is_refused_at_start(sticky_dir, nobody):
    """--force replaces our own files only: another user's file at a part's
    name is one line and exit 7 before anything is traced."""
    base = os.path.join(sticky_dir, "cw.jsonl")
    nobody(f"import os\nos.close(os.open({base + '.2'!r}, os.O_CREAT | os.O_WRONLY, 0o666))\n")
    with pytest.raises(recording.UserError) as exc:
        recorder(base, force=True)
    assert exc.value.exit_code == EXIT_FILE and "owned by uid 65534" in exc.value.message
    assert os.stat(base + ".2").st_uid == NOBODY and not os.path.exists(base)


def report(*args):
    return subprocess.run([sys.executable, "-m", "closewait_trace", "report", "--json", *args],
                          capture_output=True, text=True, timeout=60)


def test_report_skips_planted_siblings_and_says_why(sticky_dir, nobody):
    base = os.path.join(sticky_dir, "cw.jsonl")
    r = recorder(base, max_files=None)
    r.max_bytes = None
    for i in range(3):
        r.write(linger(i))
    r.close()
    header = json.loads(open(base).readline())
    # nobody copies the header (capture id guessed: host-pid-time) with a fake socket
    forged = dict(header, part=1)
    fake = dict(linger(99), owners=[{"pid": 1, "comm": "innocent"}])
    lines = json.dumps(forged) + "\n" + json.dumps(fake) + "\n"
    nobody(f"import os\nfd = os.open({base + '.1'!r}, os.O_CREAT | os.O_WRONLY, 0o644)\n"
           f"os.write(fd, {lines.encode()!r})\n")
    # and a file of ours (same owner) from another capture
    other = dict(header, part=2, capture_id="another-capture")
    with open(base + ".2", "w") as f:
        f.write(json.dumps(other) + "\n" + json.dumps(fake) + "\n")
    result = report(base)
    assert result.returncode == 0, result.stderr
    rep = json.loads(result.stdout)
    assert rep["files"] == [base]
    assert 40099 not in [s.get("rport") for s in rep.get("still_lingering", [])]
    assert "innocent" not in result.stdout
    assert f"skipped {base}.1: owned by uid 65534" in result.stderr
    assert f"skipped {base}.2: its header belongs to another capture" in result.stderr


def test_writer_never_writes_through_a_part_swapped_after_the_check(sticky_dir, nobody, alarm):
    """Between our check and our create another user can take the name:
    O_EXCL makes the create fail, never reuse what is there."""
    base = os.path.join(sticky_dir, "cw.jsonl")
    path = base + ".1"
    real_unlink = os.unlink

    def unlink_then_plant(p, *a, **kw):
        real_unlink(p, *a, **kw)
        if os.path.basename(p) == os.path.basename(path):     # (by name, in our directory)
            nobody(f"import os\nos.close(os.open({path!r}, os.O_CREAT | os.O_WRONLY, 0o666))\n")

    r = recorder(base, max_files=2)
    write_until_rotated(r, count=30)     # wraps: part 2 replaces our own cw.jsonl
    assert r.stopped is None and r.part >= 2
    os.unlink = unlink_then_plant
    try:
        for _ in range(100):
            if r.stopped is not None:
                break
            write_until_rotated(r, count=1)
    finally:
        os.unlink = real_unlink
    r.close()
    assert "taken by someone else" in r.stopped.message
    assert os.stat(path).st_size == 0 and os.stat(path).st_uid == NOBODY


def test_a_directory_of_another_users_is_refused_before_anything_is_written(
        sticky_dir, nobody, tmp_path):
    """Red-team finding: a directory of another user's in the path, renamed
    and replaced by a link to a root directory while we record, made root
    unlink and recreate root's own files there at each rotation. Parts were
    then made through a handle on the directory as it was at start; since
    review finding F6 (a link in such a directory, made before the start,
    led --force into root's directories) a directory another user owns is
    refused at start, anywhere on the path (test_recording_dir_path.py,
    with the handle's test)."""
    precious = tmp_path / "ro"
    precious.mkdir(mode=0o700)
    (precious / "cw.jsonl.1").write_text("PRECIOUS 1\n")
    theirs = os.path.join(sticky_dir, "theirs")
    nobody(f"import os\nos.mkdir({theirs!r}, 0o777)\nos.chmod({theirs!r}, 0o777)\n")
    with pytest.raises(recording.UserError) as exc:
        recorder(os.path.join(theirs, "cw.jsonl"), force=True)
    assert exc.value.exit_code == EXIT_FILE
    assert f"it is owned by uid {NOBODY}" in exc.value.message
    assert os.listdir(theirs) == []
    assert (precious / "cw.jsonl.1").read_text() == "PRECIOUS 1\n"


def test_a_recording_another_user_may_not_read_says_why_and_what_to_do(sticky_dir):
    """Recordings are written private to root (0600): a user who reads one
    gets one line that says so and what to do, not "check permissions"
    (a newcomer's walk through the README)."""
    base = os.path.join(sticky_dir, "cw.jsonl")
    r = recorder(base, max_files=None)
    r.max_bytes = None
    r.write(linger(0))
    r.close()
    assert os.stat(base).st_mode & 0o777 == 0o600
    result = subprocess.run(AS_NOBODY + [sys.executable, "-m", "closewait_trace", "report", base],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_FILE
    assert result.stderr.splitlines() == [
        f"closewait-trace: cannot read {base}: Permission denied; recordings are written "
        f"private to root (mode 0600): read it as root, or have root make a copy you may read"]
