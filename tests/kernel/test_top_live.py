"""`closewait-trace top` in a real terminal (tmux): the seed scenario's five
stopped socat children, keys that change the grouping and quit, a holder
whose name carries terminal escapes; and the plain form in a pipe.
Cross-checked with ss."""

import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.kernel.harness import (TRACER, free_port, ss_close_wait, start_seed_scenario,
                                  stretch, wait_until)

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


class Tmux:
    def __init__(self, tmp_path):
        self.sock = f"cwtop-{os.getpid()}"
        self.tmp = tmp_path

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.sock] + list(args), capture_output=True,
                              text=True, timeout=stretch(30)).stdout

    def start(self, command: list) -> None:
        done = self.tmp / "exit"
        shell = f"{shlex.join(command)}; echo $? > {shlex.quote(str(done))}; sleep 600"
        subprocess.run(["tmux", "-L", self.sock, "new-session", "-d", "-x", "100", "-y", "30",
                        shell], check=True, timeout=stretch(30))

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def wait_for(self, predicate, what: str) -> str:
        return wait_until(lambda: (lambda s: s if predicate(s) else None)(self.screen()),
                          timeout=60, what=what)

    def exit_code(self):
        done = self.tmp / "exit"
        return int(done.read_text()) if done.exists() and done.read_text().strip() else None

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


def test_top_in_a_terminal_groups_changes_and_quits(procs, tmp_path):
    port = free_port()
    start_seed_scenario(port, procs)
    wait_until(lambda: len(ss_close_wait(port)) == 5, what="5 CLOSE-WAIT")
    term = Tmux(tmp_path)
    try:
        term.start(TRACER + ["top", "-p", str(port)])
        screen = term.wait_for(lambda s: "5 sockets in CLOSE_WAIT" in s, "the view")
        assert "by process" in screen
        rows = [l for l in screen.splitlines() if re.search(r"/socat \[stopped\]", l)]
        assert len(rows) == 5, screen                    # one per stopped child
        pids = {int(re.search(r"(\d+)/socat", l).group(1)) for l in rows}
        assert pids == {int(p) for p in _holders(port)}   # ss names the same holders
        term.tmux("send-keys", "g")
        screen = term.wait_for(lambda s: "by cause" in s, "grouping by cause")
        assert re.search(r"^\s*5\s+\S+\s+\d+\s+\d+\s+stopped\s*$", screen, re.M), screen
        term.tmux("send-keys", "q")
        wait_until(lambda: term.exit_code() is not None, timeout=30, what="top to quit")
        assert term.exit_code() == 0
        # Quitting ends the trace the normal way: its summary is printed.
        history = term.tmux("capture-pane", "-p", "-S", "-200")
        assert "Summary after" in history and "Still lingering at exit: 5" in history, history
    finally:
        term.kill()


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
    term = Tmux(tmp_path)
    try:
        term.start(TRACER + ["top", "-p", str(port)])
        screen = term.wait_for(lambda s: "1 socket in CLOSE_WAIT" in s, "the view")
        # Shown escaped; a raw ESC [2J would have cleared the screen.
        assert "\\x1b[2Jpwn" in screen, screen
        raw = term.tmux("capture-pane", "-p", "-e")
        assert "\x1b[2J" not in raw
        term.tmux("send-keys", "q")
        wait_until(lambda: term.exit_code() is not None, timeout=30, what="top to quit")
        assert term.exit_code() == 0
    finally:
        term.kill()


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
