"""`closewait-trace top` in a real terminal (tmux): the seed scenario's five
stopped socat children, keys that change the grouping and quit, a holder
whose name carries terminal escapes; and the plain form in a pipe.
Cross-checked with ss."""

import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from tests.kernel.harness import (TRACER, Tmux, connect_and_close, free_port, ss_close_wait,
                                  start_holding_server, start_seed_scenario, stretch,
                                  wait_until)
from tests.kernel.test_attribution_live import Cgroups

pytestmark = pytest.mark.kernel

# A holder that names itself with a terminal escape (prctl PR_SET_NAME).
EVIL_HOLDER = r"""
import ctypes, socket, sys, time
port = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(1)
c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept(); c.close()
ctypes.CDLL(None).prctl(15, b"\x1b[2Jpwn", 0, 0, 0)
print("ready", flush=True)
time.sleep(3600)
"""


def test_top_in_a_terminal_groups_changes_and_quits(procs, tmp_path):
    port = free_port()
    start_seed_scenario(port, procs)
    wait_until(lambda: len(ss_close_wait(port)) == 5, what="5 CLOSE-WAIT")
    with Tmux(tmp_path, TRACER + ["top", "-p", str(port)]) as term:
        screen = term.wait_for(lambda s: "5 sockets in CLOSE_WAIT" in s, "the view")
        assert "by process" in screen
        # The five forks of one socat listener are one row (output/fold.py:
        # same parent, uid and exe), as many processes as ss names; it was
        # one row per stopped child.
        assert not re.search(r"\d+/socat", screen), screen
        (row,) = [l for l in screen.splitlines() if "socat [" in l]
        assert len(_holders(port)) == 5
        # At 80 columns the counts whole (they were "~1m2…") and the cause
        # (it was cut first: "[stop"), the executable's directory cut if
        # anything.
        assert re.search(r"^\W*5\W+~\d+(\.\d+)?m?s\W+\d+\W+\d+\W+socat \[\S*/socat\] "
                         r"\(5 processes\) \[stopped\]\s*$", row), screen
        term.tmux("send-keys", "g")
        screen = term.wait_for(lambda s: "by cause" in s, "grouping by cause")
        assert re.search(r"^\s*5\s+\S+\s+\d+\s+\d+\s+stopped\s*$", screen, re.M), screen
        # The keys on one line at the screen's width, however narrow the
        # table (a table's caption wrapped them to the table's: "...port,"
        # then "container)" on the next line, on a 100-column terminal).
        assert "q quit, g grouping (process, cause, peer, port, container)" in screen, screen
        term.tmux("send-keys", "q")
        wait_until(lambda: term.exit_code() is not None, timeout=30, what="top to quit")
        assert term.exit_code() == 0
        # Quitting ends the trace the normal way: its summary is printed.
        history = term.tmux("capture-pane", "-p", "-S", "-200")
        assert "Summary after" in history and "Still lingering at exit: 5" in history, history


def _holders(port: int) -> set:
    out = subprocess.run(["ss", "-Htanp", "state", "close-wait", "sport", "=", f":{port}"],
                         capture_output=True, text=True).stdout
    return set(re.findall(r"pid=(\d+)", out))


def test_top_never_passes_a_holders_escape_to_the_terminal(procs, tmp_path):
    port = free_port()
    evil = subprocess.Popen([sys.executable, "-c", EVIL_HOLDER, str(port)],
                            stdout=subprocess.PIPE, text=True)
    procs.append(evil)
    assert evil.stdout.readline().strip() == "ready"
    with Tmux(tmp_path, TRACER + ["top", "-p", str(port)]) as term:
        screen = term.wait_for(lambda s: "1 socket in CLOSE_WAIT" in s, "the view")
        # Shown escaped; a raw ESC [2J would have cleared the screen.
        assert "\\x1b[2Jpwn" in screen, screen
        raw = term.tmux("capture-pane", "-p", "-e")
        assert "\x1b[2J" not in raw
        term.tmux("send-keys", "q")
        wait_until(lambda: term.exit_code() is not None, timeout=30, what="top to quit")
        assert term.exit_code() == 0


def test_top_in_a_pipe_prints_text_blocks(procs):
    port = free_port()
    start_seed_scenario(port, procs)
    wait_until(lambda: len(ss_close_wait(port)) == 5, what="5 CLOSE-WAIT")
    time.sleep(1.0)         # the youngest past the 500 ms threshold from the first refresh
    out = subprocess.run(TRACER + ["top", "-p", str(port), "--by", "cause", "-n", "2",
                                   "-t", "500ms"],
                         capture_output=True, text=True, timeout=stretch(120))
    assert out.returncode == 0, out.stderr
    blocks = [l for l in out.stdout.splitlines() if l.startswith("--- ")]
    assert len(blocks) == 2 and all("5 sockets in CLOSE_WAIT >= 500ms, by cause" in b
                                    for b in blocks), out.stdout
    assert re.search(r"^\s*5\s+\S+\s+\d+\s+\d+\s+stopped$", out.stdout, re.M), out.stdout
    assert "\x1b" not in out.stdout                      # no terminal control in a pipe
    assert all(len(l) <= 80 for l in out.stdout.splitlines())


# ---------------------------------------------------------------- by container

@pytest.fixture
def cgroups():
    made = Cgroups()
    yield made
    made.cleanup()


def test_top_groups_by_container_from_real_cgroups(procs, cgroups, tmp_path):
    """Two holders in real cgroups the test makes: one a unit root's tools
    would make (system.slice/NAME.service), one at the top of the tree
    with a name carrying a terminal escape (a cgroup name is whoever made
    it's choice). `g` cycles from process to container; the rows are the
    cgroups' labels, counted, the escape shown escaped."""
    tag = uuid.uuid4().hex[:8]
    unit = f"cwtop-{tag}.service"
    evil = f"cwtop-{tag}-\x1b[2Jpwn"
    ports = free_port(), free_port()
    holders = []
    for rel, port in ((f"system.slice/{unit}", ports[0]), (evil, ports[1])):
        cgroups.mkdir(rel)
        server = start_holding_server(port)
        procs.append(server)
        cgroups.move(server.pid, rel)
        # The kernel's statement of where it is, the path top reads.
        with open(f"/proc/{server.pid}/cgroup") as f:
            assert f"0::/{rel}\n" in f.read()
        holders.append(server)
    connect_and_close(ports[0], 3)
    connect_and_close(ports[1], 2)
    wait_until(lambda: len(ss_close_wait(ports[0])) == 3 and len(ss_close_wait(ports[1])) == 2,
               what="3 + 2 CLOSE-WAIT")
    with Tmux(tmp_path, TRACER + ["top", "-p", f"{ports[0]},{ports[1]}"]) as term:
        term.wait_for(lambda s: "5 sockets in CLOSE_WAIT" in s and "by process" in s,
                      "the view")
        for _ in range(4):                         # process -> cause -> peer -> port -> container
            term.tmux("send-keys", "g")
            time.sleep(0.3)
        screen = term.wait_for(lambda s: "by container" in s, "grouping by container")
        assert "CONTAINER / UNIT / CGROUP" in screen
        assert re.search(rf"^\s*3\s+\S+\s+\d+\s+\d+\s+{re.escape(unit)} \[", screen, re.M), screen
        evil_shown = f"/cwtop-{tag}-\\x1b[2Jpwn"
        assert re.search(rf"^\s*2\s+\S+\s+\d+\s+\d+\s+{re.escape(evil_shown)} \[", screen,
                         re.M), screen
        assert "\x1b[2J" not in term.tmux("capture-pane", "-p", "-e")
        term.tmux("send-keys", "q")
        wait_until(lambda: term.exit_code() is not None, timeout=30, what="top to quit")
        assert term.exit_code() == 0


def test_top_in_a_pipe_by_container(procs, cgroups):
    tag = uuid.uuid4().hex[:8]
    rel = f"cwtop-{tag}/app"
    port = free_port()
    cgroups.mkdir(rel)
    server = start_holding_server(port)
    procs.append(server)
    cgroups.move(server.pid, rel)
    connect_and_close(port, 2)
    wait_until(lambda: len(ss_close_wait(port)) == 2, what="2 CLOSE-WAIT")
    out = subprocess.run(TRACER + ["top", "-p", str(port), "--by", "container", "-n", "2",
                                   "-t", "1s", "-i", "1s"],
                         capture_output=True, text=True, timeout=stretch(120))
    assert out.returncode == 0, out.stderr
    assert re.search(rf"^\s*2\s+\S+\s+\d+\s+\d+\s+/{re.escape(rel)} \[", out.stdout, re.M), \
        out.stdout


# ---------------------------------------------------------------- 5,000 in one process

MANY = 5000
MANY_HOLDER = os.path.join(os.path.dirname(__file__), "many_holder.py")


def test_top_with_5000_sockets_in_one_process(procs, tmp_path):
    """The pile-up the issue met: 5,000 sockets in CLOSE_WAIT held by one
    process. One row with the count ss gives, refreshed (its oldest age
    grows), and q quits. The refresh's cost is bench/top_scale.py's."""
    port = free_port()
    holder = subprocess.Popen([sys.executable, MANY_HOLDER, str(MANY), str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "ready"
    ss = subprocess.run(["ss", "-Htan", "state", "close-wait", "sport", "=", f":{port}"],
                        capture_output=True, text=True).stdout
    assert len(ss.splitlines()) == MANY
    with Tmux(tmp_path, TRACER + ["top", "-p", str(port)]) as term:
        screen = term.wait_for(lambda s: f"{MANY} sockets in CLOSE_WAIT" in s, "the view")
        rows = [l for l in screen.splitlines() if re.search(rf"\b{holder.pid}/python", l)]
        assert len(rows) == 1, screen                  # one holder, one row
        cells = rows[0].split()
        assert cells[0] == str(MANY), rows[0]
        first = cells[1]
        # Refreshed: the oldest's age is shown again, older.
        screen = term.wait_for(
            lambda s: any(re.search(rf"\b{holder.pid}/python", l) and l.split()[1] != first
                          for l in s.splitlines()), "a refresh")
        assert f"{MANY} sockets in CLOSE_WAIT" in screen
        term.tmux("send-keys", "q")
        wait_until(lambda: term.exit_code() is not None, timeout=30, what="top to quit")
        assert term.exit_code() == 0
        history = term.tmux("capture-pane", "-p", "-S", "-200")
        assert f"Still lingering at exit: {MANY}" in history, history
