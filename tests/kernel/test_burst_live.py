"""A burst of departures: 19,000 sockets in CLOSE_WAIT, all reported, held
by two processes that then exit at once (a service restarted after a
leak). Their exit closes them all within a fraction of a second, twice the
CLOSED events the default mode's 1 MiB ring buffer holds (9,362), while the
loop is busy with their leaving (the departures' tick, writing the lines).
Every CLOSED line must be written, each with its duration and its closer,
and nothing counted lost: before the loop looked at its ring between the
steps of that work (LiveTracer.sip), thousands were lost
(docs/benchmarks.md, "A burst of departures").

The first test's tracer writes to a file. The second's writes to a pipe
that the test stops reading during the burst: the loop is then blocked in
a write, not between steps, and a thread sips the ring meanwhile
(ringreader.sip_in_background); before it, every event past the ring's
9,362 was lost."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

from closewait_trace.output import schema
from tests.kernel.harness import TRACER, free_port, stretch

PER_HOLDER = 9_500                      # each holder: 2 x 9,500 + 64 fds (many_holder.py)
BURST = 2 * PER_HOLDER
RING_EVENTS = (1 << 20) // 112          # the default ring's capacity in events
MANY_HOLDER = os.path.join(os.path.dirname(__file__), "many_holder.py")


def count_until(path: str, kind: str, wanted: int, timeout: float) -> int:
    """Lines of records of `kind` in the tracer's output once `wanted` came,
    a loss of events was said, or the timeout passed (counted cheaply: a
    record's type is its first field). Not a state change the kernel
    skipped the program for (transitions_skipped): setting up 19,000
    loopback connections makes some (146 in one run, none in others),
    most not of a socket in CLOSE_WAIT; the test accounts for them."""
    head = '{"type": "%s"' % kind
    deadline = time.monotonic() + stretch(timeout)
    while True:
        with open(path) as f:
            lines = f.read().splitlines()
        found = sum(1 for line in lines if line.startswith(head))
        lost = any(line.startswith('{"type": "lost"') and '"transitions_skipped"' not in line
                   for line in lines)
        if found >= wanted or lost or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def start_holders(procs, ports) -> list:
    holders = []
    for port in ports:
        holder = subprocess.Popen([sys.executable, MANY_HOLDER, str(PER_HOLDER), str(port)],
                                  stdout=subprocess.PIPE, text=True)
        procs.append(holder)
        holders.append(holder)
    for holder in holders:
        assert holder.stdout.readline().strip() == "ready"
    return holders


def kill_all(holders) -> None:
    for holder in holders:
        holder.kill()               # their exits close the 19,000 at once
    for holder in holders:
        holder.wait()


def other_threads_cpu(pid: int) -> dict:
    """CPU clock ticks of each of the process's threads but the main one."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) != pid:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks


def assert_sipper_asleep(pid: int) -> None:
    """Once the burst was taken the ring is empty: the thread that sips it
    (ringreader.sip_in_background) waits on it and uses no CPU (one that
    spun would use about 100 ticks in this second)."""
    before = other_threads_cpu(pid)
    assert before, "no sipping thread"
    time.sleep(1)
    after = other_threads_cpu(pid)
    assert all(after.get(tid, t) - t <= 5 for tid, t in before.items()), (before, after)


def check_every_closed_line(records, reported, holders, ports) -> None:
    """Nothing lost or left unread; every socket reported lingering has
    its CLOSED line, once, with its duration and its closer."""
    for rec in records:
        assert schema.problem(rec) is None, (schema.problem(rec), rec["type"])
    (summary,) = [r for r in records if r["type"] == "summary"]
    counters = summary["counters"]
    closed = [r for r in records if r["type"] == "closed" and r["lport"] in ports]
    assert counters["events_lost"] == 0 and counters["events_unread"] == 0, \
        (len(closed), counters)
    assert not [r for r in records if r["type"] == "lost"
                and r["counter"] != "transitions_skipped"]
    skipped = counters.get("transitions_skipped", 0)
    assert BURST - skipped <= reported <= BURST, (reported, skipped)
    lingered = {(r["lport"], r["rport"]) for r in records
                if r["type"] == "linger" and r["lport"] in ports}
    assert len(lingered) == reported
    assert len(closed) == reported and {(r["lport"], r["rport"]) for r in closed} == lingered
    pids = {h.pid for h in holders}
    for r in closed:
        # In CLOSE_WAIT since before the threshold; closed by the exit of
        # the process that held it.
        assert r["duration_source"] == "traced" and r["duration_s"] >= 1.0, r
        assert r["reported"] and r["how"] == "close", r
        assert r["closed_by"]["pid"] in pids, r


def test_every_closed_line_of_a_burst_larger_than_the_ring_is_written(procs, tmp_path):
    assert BURST > 2 * RING_EVENTS
    ports = [free_port(), free_port()]
    out = str(tmp_path / "out.json")
    with open(out, "w") as f:
        tracer = subprocess.Popen(TRACER + ["--json", "-t", "1s", "-i", "200ms",
                                            "-p", ",".join(map(str, ports))],
                                  stdout=f, stderr=subprocess.PIPE, text=True)
    procs.append(tracer)
    assert count_until(out, "start", 1, 30) == 1
    holders = start_holders(procs, ports)
    # All reported first: their leaving is then the departures' tick's
    # work (unwatching them, bringing the tracker in line with the map).
    # Every socket reported, but one whose entry into CLOSE_WAIT the kernel
    # did not run the program for (counted: transitions_skipped; rare).
    reported = count_until(out, "linger", BURST, 60)
    kill_all(holders)
    count_until(out, "closed", reported, 40)
    assert_sipper_asleep(tracer.pid)
    tracer.send_signal(signal.SIGINT)
    assert tracer.wait(timeout=stretch(20)) == 0
    assert "Traceback" not in tracer.stderr.read()
    with open(out) as f:
        records = [json.loads(line) for line in f]
    check_every_closed_line(records, reported, holders, ports)


class HeldPipe:
    """The tracer's standard output read in a thread into lines, except
    while held (hold()): then the pipe fills and the tracer's writes block."""

    def __init__(self, stream):
        self.stream = stream
        self.lines: list = []
        self.reading = threading.Event()
        self.reading.set()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            self.reading.wait()
            line = self.stream.readline()
            if not line:
                return
            self.lines.append(line)

    def hold(self) -> None:
        self.reading.clear()

    def release(self) -> None:
        self.reading.set()

    def count(self, kind: str) -> int:
        head = '{"type": "%s"' % kind
        return sum(1 for line in list(self.lines) if line.startswith(head))

    def until(self, kind: str, wanted: int, timeout: float) -> int:
        deadline = time.monotonic() + stretch(timeout)
        while True:
            found = self.count(kind)
            if found >= wanted or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def in_pipe_write(pid: int) -> bool:
    """Whether the process's main thread (the loop) sleeps in a write to a
    full pipe (its wait channel: pipe_write, anon_pipe_write on 6.18)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() in ("pipe_write", "anon_pipe_write")
    except OSError:
        return False


def test_a_burst_while_the_output_is_not_read_is_kept(procs):
    """The same burst while nobody reads the tracer's output (a terminal
    scrolled back, a pipe's reader stopped): the pipe is full, the loop's
    write blocked, before the holders exit and for 3 s after. A third
    holder's 1,000 sockets fill it: their lingering lines (about 2.3 MB)
    are more than the pipe holds (the tracer widens it to 1 MiB,
    terminal.widen_pipe)."""
    ports = [free_port(), free_port()]
    filler_port = free_port()
    tracer = subprocess.Popen(TRACER + ["--json", "-t", "1s", "-i", "200ms",
                                        "-p", ",".join(map(str, ports + [filler_port]))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(tracer)
    pipe = HeldPipe(tracer.stdout)
    assert pipe.until("start", 1, 30) == 1
    holders = start_holders(procs, ports)
    reported = pipe.until("linger", BURST, 60)
    pipe.hold()                     # (its readline() under way takes one more chunk)
    filler = subprocess.Popen([sys.executable, MANY_HOLDER, "1000", str(filler_port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(filler)
    assert filler.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + stretch(30)
    while not in_pipe_write(tracer.pid):
        assert time.monotonic() < deadline, "the tracer's output never blocked"
        time.sleep(0.05)
    kill_all(holders)
    time.sleep(3)
    assert in_pipe_write(tracer.pid)        # held all along
    pipe.release()
    pipe.until("closed", reported, 40)
    assert_sipper_asleep(tracer.pid)
    tracer.send_signal(signal.SIGINT)
    assert tracer.wait(timeout=stretch(20)) == 0
    pipe.thread.join(timeout=stretch(10))
    assert "Traceback" not in tracer.stderr.read()
    check_every_closed_line([json.loads(line) for line in pipe.lines], reported, holders, ports)
