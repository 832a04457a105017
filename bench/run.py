#!/usr/bin/env python3
"""closewait-trace benchmark: overhead at saturation against bcc's tcpstates,
startup and shutdown times, and scale to many lingering sockets.

    sudo .venv/bin/python bench/run.py                 # everything (about 6 minutes)
    sudo .venv/bin/python bench/run.py churn --rounds 5
    sudo .venv/bin/python bench/run.py scale --sockets 1000,10000,100000
    sudo .venv/bin/python bench/run.py --smoke         # seconds; what CI runs

Prints a Markdown report (the one in docs/benchmarks.md) and, with --json,
the raw numbers. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRACER = [sys.executable, "-m", "closewait_trace"]
if os.environ.get("PROF_OUT"):
    # The tracer under cProfile (bench/profile_run.py writes PROF_OUT at exit).
    TRACER = [sys.executable, os.path.join(HERE, "profile_run.py")]
TCPSTATES = shutil.which("tcpstates-bpfcc") or "/usr/share/bcc/tools/tcpstates"


def _churn_binary() -> str:
    """Where bench/churn.c is built: named by its source's hash. One path
    for every checkout (as before) let a benchmark from another tree, run
    at the same time on a shared machine, rebuild it from its own churn.c
    under a run of this one (its output changed: see parse_churn)."""
    import hashlib
    with open(os.path.join(HERE, "churn.c"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return os.path.join("/tmp", f"closewait-bench-churn-{os.getuid()}-{digest}")


CHURN = _churn_binary()


def proc_cpu_s(pid: int) -> "float | None":
    """User + system CPU seconds of a live process so far (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def bpf_programs(pid: int) -> list[dict]:
    """The fdinfo fields (name -> text) of each BPF program pid holds. The
    listing of pid's fds raises OSError (the process is gone); an fd that
    closes meanwhile is skipped."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        except (OSError, ValueError):
            continue
        if "prog_type" in info:
            out.append(dict(info, fd=fd))
    return out


def bpf_recursion_misses(pid: int) -> "int | None":
    """Runs of pid's BPF programs the kernel skipped because another BPF
    program was running on that CPU (an interrupt's tracepoint hit during
    one): each is an event the program never saw, lost without any count
    the tracer could keep (recursion_misses in /proc/PID/fdinfo)."""
    try:
        programs = bpf_programs(pid)
    except OSError:
        return None
    counted = [int(p["recursion_misses"]) for p in programs if "recursion_misses" in p]
    return sum(counted) if counted else None


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def build_churn() -> None:
    # Built aside and renamed into place: a run of another benchmark using
    # the same binary never sees it half written.
    part = f"{CHURN}.{os.getpid()}"
    subprocess.run(["gcc", "-O2", "-o", part, os.path.join(HERE, "churn.c")], check=True)
    os.replace(part, CHURN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bcc_env() -> dict:
    """tcpstates needs a header tree too; give it the one closewait-trace uses."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sys.path.insert(0, os.path.join(REPO, "src"))
    from closewait_trace.kernel import kernel_headers
    choice = kernel_headers.choose_headers()
    if choice.path:
        env["BCC_KERNEL_SOURCE"] = choice.path
    return env


# Testing knob: the header trees tcpstates may try, ':'-separated, instead of
# those installed (tests/kernel/test_bench_smoke.py makes it fail on purpose).
TCPSTATES_HEADERS_ENV = "BENCH_TCPSTATES_HEADERS"


def tcpstates_envs(env: dict) -> list[dict]:
    """Environments to try tcpstates in, one per header tree. Unlike our
    program, tcpstates includes kernel headers, and bcc 0.26 cannot compile
    it against every tree (6.12's fails): closewait-trace's choice first,
    then every other installed generic tree, oldest first."""
    forced = os.environ.get(TCPSTATES_HEADERS_ENV)
    if forced is not None:
        return [dict(env, BCC_KERNEL_SOURCE=p) for p in forced.split(":") if p]
    from closewait_trace.kernel import kernel_headers
    import platform
    envs = [env]
    trees = kernel_headers.generic_trees("/usr/src", platform.machine(), os.uname().release)
    for tree in sorted(trees, key=lambda t: kernel_headers._version_key(os.path.basename(t))):
        try:
            path = tree if kernel_headers._complete(tree) else kernel_headers.merged_tree(tree)
        except Exception:       # a broken tree is one fewer to try
            continue
        if path != env.get("BCC_KERNEL_SOURCE"):
            envs.append(dict(env, BCC_KERNEL_SOURCE=path))
    return envs


def first_error(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in lines:
        if "error" in line.lower():
            return line[:200]
    return (lines[-1] if lines else "no output")[:200]


STARTUP_LIMIT_S = 180


class TcpstatesStarter:
    """Finds, once, a header tree tcpstates starts with; afterwards starts it
    there, or says why it could not start at all."""

    def __init__(self, env: dict):
        self.candidates = tcpstates_envs(env)
        self.env = None
        self.reason = None

    def start(self, port: int):
        if self.env is not None:
            return Traced("tcpstates", port, self.env)
        if self.reason is not None:
            return None
        reasons = []
        for env in self.candidates:
            tracer = Traced("tcpstates", port, env)
            try:
                # tcpstates compiles kernel headers: slow on a loaded machine.
                tracer.wait_ready(timeout=STARTUP_LIMIT_S)
            except RuntimeError:
                if tracer.proc.poll() is None:      # still compiling, or stuck
                    tracer.proc.kill()
                    tracer.proc.wait()
                    why = f"did not start within {STARTUP_LIMIT_S} s"
                else:
                    tracer.proc.wait()
                    time.sleep(0.2)                 # let the stderr reader finish
                    why = first_error(tracer.stderr)
                reasons.append(f"{env.get('BCC_KERNEL_SOURCE', 'default headers')}: {why}")
                continue
            self.env = env
            return tracer
        self.reason = "; ".join(reasons) or "no header tree to try"
        return None


EMPTY_PROBE = r"""
import signal, sys
from bcc import BPF
b = BPF(text="TRACEPOINT_PROBE(sock, inet_sock_set_state) { return 0; }")
print("ready", flush=True)
signal.signal(signal.SIGINT, lambda *a: sys.exit(0))
signal.pause()
"""
# The floor of the raw tracepoint, which the tracer attaches to where the
# kernel's BTF gives the socket's fields.
EMPTY_RAW_PROBE = EMPTY_PROBE.replace("TRACEPOINT_PROBE(sock, inet_sock_set_state)",
                                      "RAW_TRACEPOINT_PROBE(inet_sock_set_state)")


class Traced:
    """A tracer process whose output is drained (as a terminal would take it)
    and whose readiness line is awaited."""

    def __init__(self, mode: str, port: int, env: dict, cmd: "list | None" = None):
        """cmd: another command line for the mode's tracer (bench/startup.py:
        another tree's code, other options)."""
        override = cmd
        self.mode = mode
        if mode in ("default", "default-nobtf", "default-noeof", "default-perftp"):
            cmd = TRACER + ["--json", "-p", str(port)]
            self.ready = lambda line: line.startswith('{"type": "start"')
            if mode == "default-nobtf":
                # Without the namespace reads (as on a kernel without BTF):
                # what reading each socket's namespace costs per connection.
                env = dict(env, CLOSEWAIT_TRACE_FORCE="nobtf")
            if mode == "default-noeof":
                # Without the EOF-read capture (as on 6.1): what
                # copying the reader's stack costs. In bench/churn.c every
                # connection's server reads EOF, so every one is captured.
                env = dict(env, CLOSEWAIT_TRACE_FORCE="noeof")
            if mode == "default-perftp":
                # The state changes through the tracepoint's perf event (as
                # without BTF, or before 5.6) instead of the raw tracepoint.
                env = dict(env, CLOSEWAIT_TRACE_FORCE="perftp")
        elif mode in ("all", "all-before"):
            cmd = TRACER + ["--all", "--json", "-p", str(port)]
            self.ready = lambda line: line.startswith('{"type": "start"')
            if mode == "all-before":
                # The same, from another tree (CLOSEWAIT_BENCH_BEFORE: a
                # checkout of the code before a change, its src/ and bpf/),
                # for before/after side by side in one run.
                env = dict(env, PYTHONPATH=os.path.join(os.environ["CLOSEWAIT_BENCH_BEFORE"], "src"))
        elif mode == "empty":
            # The floor: an empty program on the same tracepoint. What it
            # costs is the tracepoint's own price, paid by any tracer of it.
            cmd = ["/usr/bin/python3", "-c", EMPTY_PROBE]
            self.ready = lambda line: line.startswith("ready")
        elif mode == "empty-raw":
            cmd = ["/usr/bin/python3", "-c", EMPTY_RAW_PROBE]
            self.ready = lambda line: line.startswith("ready")
        elif mode == "tcpstates":
            cmd = [sys.executable if TCPSTATES.endswith(".py") else "/usr/bin/python3",
                   TCPSTATES, "-L", str(port)]
            self.ready = lambda line: "SKADDR" in line
        else:
            raise ValueError(mode)
        if override is not None:
            cmd = override
        self.launched = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
        self.lines = 0
        self.transitions = 0        # --all's transition records / tcpstates' rows
        self.last_line_at = None
        self.last_json = None
        self.stderr = ""
        self.ready_at = None
        self.cpu_at_ready = None
        self.misses_at_ready = None
        self._ready = threading.Event()
        self._drained = threading.Event()       # the output read to its end
        threading.Thread(target=self._drain, daemon=True).start()
        threading.Thread(target=self._drain_err, daemon=True).start()

    def _drain(self):
        """Reads the output as a terminal would take it, in large chunks and
        counting lines in C: at 200,000 lines a second a reader that split
        and decoded every line would take a CPU of its own from the tracer
        it measures on this 2-core machine."""
        fd = self.proc.stdout.fileno()
        head, tail = b"", b""
        mark = b'{"type": "transition"'
        carry = b""             # a mark may straddle two reads (a pipe gives 64 KiB)
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            self.lines += chunk.count(b"\n")
            self.last_line_at = time.monotonic()
            if self.mode in ("all", "all-before"):
                joined = carry + chunk
                self.transitions += joined.count(mark)
                # Keep what could start a mark, never a whole one (counted).
                carry = joined[-(len(mark) - 1):]
                if mark in carry:
                    carry = b""
            elif self.mode == "tcpstates":
                self.transitions += chunk.count(b"\n")
            if self.ready_at is None:
                head += chunk
                for line in head.decode("utf-8", "replace").splitlines():
                    if self.ready(line):
                        self.ready_at = time.monotonic()
                        self.cpu_at_ready = proc_cpu_s(self.proc.pid)
                        self.misses_at_ready = bpf_recursion_misses(self.proc.pid)
                        self._ready.set()
                        break
                if self.ready_at is not None and self.mode == "tcpstates":
                    self.transitions -= 1           # its header
                head = head[-65536:]
            tail = (tail + chunk)[-(1 << 20):]
        for line in tail.decode("utf-8", "replace").splitlines():
            if line.startswith('{"type": "summary"'):
                try:
                    self.last_json = json.loads(line)
                except ValueError:
                    pass
        self._ready.set()
        self._drained.set()

    def wait_written(self, limit_s: float = 60.0, quiet_s: float = 1.0) -> float:
        """Until the tracer has written what the kernel gave it: no new
        output for quiet_s (at most limit_s). Returns how long after the
        call its output went quiet (its lag behind the workload)."""
        since = time.monotonic()
        while time.monotonic() - since < limit_s:
            last = self.last_line_at or since
            if time.monotonic() - max(last, since) >= quiet_s:
                return max(0.0, last - since)
            time.sleep(0.05)
        return limit_s

    def _drain_err(self):
        self.stderr = self.proc.stderr.read().decode("utf-8", "replace")

    def wait_ready(self, timeout=60) -> float:
        if not self._ready.wait(timeout) or self.ready_at is None:
            raise RuntimeError(f"{self.mode} did not start: {self.stderr[-500:]}")
        return self.ready_at - self.launched

    def stop(self, deadline_s: float = 10.0) -> dict:
        # Reaped by a thread blocked in wait4(), as a shell waits for its
        # command: the time is taken as the wait returns (a poll every 10 ms
        # added 0-10 ms, and under load often more, to every figure).
        reaped = {}

        def reap():
            try:
                reaped["usage"] = os.wait4(self.proc.pid, 0)[2]
            except ChildProcessError:
                reaped["usage"] = None
            reaped["at"] = time.monotonic()
        misses = bpf_recursion_misses(self.proc.pid)
        skipped = (misses - self.misses_at_ready
                   if misses is not None and self.misses_at_ready is not None else None)
        waiter = threading.Thread(target=reap, daemon=True)
        waiter.start()
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        killed = False
        waiter.join(deadline_s)
        if waiter.is_alive():
            # Did not exit in time: say so, and do not let it skew the next run.
            self.proc.kill()
            killed = True
            waiter.join()
        usage = reaped.get("usage")
        exit_s = reaped["at"] - sent
        self.proc.returncode = 0
        # The summary is the output's last line: read to the end (a fixed
        # 0.2 s wait missed it on a loaded machine, 1 run in 24).
        self._drained.wait(10)
        lost = 0
        if self.mode == "tcpstates":
            for line in self.stderr.splitlines() + []:
                if "lost" in line.lower():
                    lost += int("".join(ch for ch in line.split("lost")[1] if ch.isdigit()) or 0)
        elif self.last_json:
            c = self.last_json["counters"]
            # What was still in the buffer at exit was never written: lost too.
            lost = c.get("events_lost", 0) + c.get("map_full", 0) + c.get("events_unread", 0)
        counters = (self.last_json or {}).get("counters", {})
        return {"exit_s": None if killed else exit_s, "killed": killed,
                # closewait-trace's split of `lost`: the buffer full while
                # it ran, and what was still unread at the stop.
                "events_lost": counters.get("events_lost"),
                "events_unread": counters.get("events_unread"),
                "cpu_s": (usage.ru_utime + usage.ru_stime) if usage else None,
                "lost": lost, "summary": self.last_json, "written": self.transitions,
                # Program runs the kernel skipped, on any socket of the
                # machine (not only the traced port's): an upper bound.
                "skipped": skipped}


# The workload runs in a network namespace of its own with TIME_WAIT off
# (tcp_max_tw_buckets is per namespace; the host's is untouched). Otherwise
# every run leaves ~75,000 TIME_WAIT sockets behind, and once their table
# overflows, connect() stops searching past them and later runs go several
# times faster whatever the tracer: measured here, 14,900 -> 82,900 conn/s.
NETNS = f"closewait-bench-{os.getpid()}"
_ports = iter(range(20000, 60000))


def setup_netns() -> None:
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    subprocess.run(["ip", "-n", NETNS, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "netns", "exec", NETNS, "sysctl", "-qw",
                    "net.ipv4.tcp_max_tw_buckets=0"], check=True)


def teardown_netns() -> None:
    subprocess.run(["ip", "netns", "del", NETNS], check=False)


def fresh_port() -> int:
    """A port never used before in the workload's namespace."""
    return next(_ports)


def churn_cmd(port: int, seconds: float, clients: int, servers: int, rate: float = 0) -> list:
    cmd = ["ip", "netns", "exec", NETNS, CHURN, str(port), str(seconds), str(clients), str(servers)]
    return cmd + [str(rate)] if rate else cmd


class Churned(tuple):
    """What one run of bench/churn.c made: its rate, and the transitions it
    made on the server's side of its port (what a tracer filtered to that
    local port must see; bench/churn.c counts them per connection)."""
    __slots__ = ()
    rate = property(lambda self: self[0])
    connections = property(lambda self: self[1])
    served = property(lambda self: self[2])
    transitions = property(lambda self: self[3])


def parse_churn(stdout: str) -> Churned:
    """bench/churn.c's line: "connections seconds served transitions"."""
    connections, seconds, served, transitions = stdout.split()
    return Churned((int(connections) / float(seconds), int(connections), int(served),
                    int(transitions)))


def churned(seconds: float, clients: int, servers: int, port: int, rate: float = 0) -> Churned:
    return parse_churn(subprocess.run(churn_cmd(port, seconds, clients, servers, rate),
                                      capture_output=True, text=True, check=True).stdout)


def run_churn(seconds: float, clients: int, servers: int, port: int, rate: float = 0) -> float:
    return churned(seconds, clients, servers, port, rate).rate


# Tracers whose every transition on the port is a line of their output.
STREAMERS = ("all", "all-before", "tcpstates")


def not_written(made: Churned, written: int) -> int:
    """The loss measured the same way for every tracer: transitions the
    workload made (bench/churn.c's own count, per the local-port filter
    both tracers are given) minus the transition lines the tracer wrote.
    What a tracer says it lost (closewait-trace's events_lost and
    events_unread, tcpstates' 'Possibly lost' on stderr) is only what it
    knows of: tcpstates says nothing of what its perf buffers still hold
    when it is stopped, and neither tracer sees a program run the kernel
    skipped (a tracepoint hit while a BPF program already runs on that
    CPU: its recursion_misses)."""
    return made.transitions - written


def churn_bench(rounds: int, seconds: float, modes: list[str], clients: int, servers: int) -> dict:
    env = bcc_env()
    tcpstates = TcpstatesStarter(env)
    results = {m: {"rate": [], "cpu_s": [], "lost": [], "startup_s": [], "exit_s": []} for m in modes}
    for r in range(rounds):
        for mode in modes:          # interleaved: A B C D, A B C D, ...
            port = fresh_port()
            tracer = None
            if mode == "tcpstates":
                tracer = tcpstates.start(port)
                if tracer is None:
                    results[mode]["could_not_start"] = tcpstates.reason
                    print(f"  tcpstates could not start: {tcpstates.reason}", file=sys.stderr)
                    continue
                results[mode]["startup_s"].append(tracer.wait_ready())
            elif mode != "none":
                tracer = Traced(mode, port, env)
                results[mode]["startup_s"].append(tracer.wait_ready())
            made = churned(seconds, clients, servers, port)
            rate = made.rate
            results[mode]["rate"].append(rate)
            if tracer:
                # Shutdown is timed under load: a second churn runs meanwhile.
                load = subprocess.Popen(churn_cmd(fresh_port(), 3, clients, servers),
                                        stdout=subprocess.DEVNULL)
                time.sleep(1.0)
                stopped = tracer.stop()
                load.wait()
                results[mode]["exit_s"].append(stopped["exit_s"])
                results[mode].setdefault("killed", []).append(stopped["killed"])
                results[mode]["cpu_s"].append(stopped["cpu_s"])
                results[mode]["lost"].append(stopped["lost"])
                results[mode].setdefault("events_lost", []).append(stopped["events_lost"])
                results[mode].setdefault("events_unread", []).append(stopped["events_unread"])
                if mode in STREAMERS:
                    results[mode].setdefault("made", []).append(made.transitions)
                    results[mode].setdefault("written", []).append(stopped["written"])
                    results[mode].setdefault("not_written", []).append(
                        not_written(made, stopped["written"]))
                    results[mode].setdefault("skipped", []).append(stopped["skipped"])
            print(f"  round {r + 1} {mode:>9}: {rate:9.0f} conn/s"
                  + (f", made {made.transitions}, written {stopped['written']}, not written "
                     f"{not_written(made, stopped['written'])}, counted lost {stopped['lost']}, "
                     f"program runs skipped by the kernel {stopped['skipped']}"
                     if tracer and mode in STREAMERS else ""), file=sys.stderr)
            time.sleep(1.0)
    return results


def sweep_bench(rates: list, seconds: float, modes: list, clients: int, servers: int,
                rounds: int = 1) -> dict:
    """Paced churn at increasing rates: where does each transition streamer
    start losing events? (Every connection is 5 server-side transitions.)

    Each tracer is stopped only once it has written what the kernel gave it
    (its output quiet for a second, at most 60 s after the workload): a
    tracer that lags is not charged with what it would still have written,
    and its lag is reported. What it still holds at the stop is counted as
    lost (closewait-trace's events_unread). Per event: the tracer's CPU
    from ready to that point over the events it wrote. Rates and tracers
    are interleaved, round after round, so that a change of the shared
    machine's load weighs on both."""
    env = bcc_env()
    tcpstates = TcpstatesStarter(env)
    out = {m: [] for m in modes}
    for r in range(rounds):
        for rate in rates:
            for mode in list(modes):
                if mode == "tcpstates":
                    tracer = tcpstates.start(fresh_port_peek())
                    if tracer is None:
                        print(f"  tcpstates could not start: {tcpstates.reason}", file=sys.stderr)
                        modes = [m for m in modes if m != "tcpstates"]
                        out.pop("tcpstates", None)
                        continue
                else:
                    tracer = Traced(mode, fresh_port_peek(), env)
                tracer.wait_ready(timeout=STARTUP_LIMIT_S)
                load = load_average()
                made = churned(seconds, clients, servers, next_port(), rate)
                achieved = made.rate
                lag = tracer.wait_written()
                cpu = proc_cpu_s(tracer.proc.pid)
                stopped = tracer.stop()
                written = stopped["written"]
                busy = (cpu - tracer.cpu_at_ready) if cpu is not None and tracer.cpu_at_ready is not None else None
                counters = (stopped["summary"] or {}).get("counters", {})
                transitions = counters.get("transitions")
                out[mode].append({"round": r + 1, "rate": rate, "achieved": achieved,
                                  "made": made.transitions,
                                  "not_written": not_written(made, written),
                                  "lost": stopped["lost"], "written": written,
                                  "transitions": transitions, "lag_s": round(lag, 2),
                                  "events_lost": counters.get("events_lost"),
                                  "events_unread": counters.get("events_unread"),
                                  "map_full": counters.get("map_full"),
                                  "cpu_s": busy,
                                  "us_per_event": round(busy / written * 1e6, 2) if busy and written else None,
                                  "load": load,
                                  "exit_s": stopped["exit_s"], "killed": stopped["killed"]})
                print(f"  round {r + 1} sweep {rate:>7} conn/s {mode:>9}: achieved {achieved:.0f}, "
                      f"made {made.transitions}, written {written}, not written "
                      f"{not_written(made, written)}, counted lost {stopped['lost']}, lag {lag:.1f} s, "
                      f"{out[mode][-1]['us_per_event']} us/event, load {load}", file=sys.stderr)
                time.sleep(1.0)
    return out


def sweep_markdown(sweep: dict) -> str:
    """One row per rate and round; then each tracer's highest rate with no
    transition left unwritten in any round, and their ratio. "not written"
    is the workload's count minus the lines written (see not_written), the
    same measure for every tracer; "counted" is what the tracer itself says
    it lost."""
    modes = list(sweep)
    names = {"all": "closewait-trace --all", "all-before": "--all before",
             "tcpstates": "tcpstates-bpfcc"}
    out = ["| round | conn/s asked | " + " | ".join(
        f"{names.get(m, m)}: achieved conn/s, written, not written (counted lost), lag s, "
        f"us/event" for m in modes) + " |",
        "|---|---|" + "---|" * len(modes)]
    first = sweep[modes[0]]
    for i, row in enumerate(first):
        cells = []
        for m in modes:
            x = sweep[m][i] if i < len(sweep[m]) else None
            cells.append("-" if x is None else
                         f"{x['achieved']:.0f}, {x['written']}, {x['not_written']} ({x['lost']}), "
                         f"{x['lag_s']}, {x['us_per_event']}")
        out.append(f"| {row['round']} | {row['rate']} | " + " | ".join(cells) + " |")
    best = {}
    for m in modes:
        rates = sorted({x["rate"] for x in sweep[m]})
        clean = [rt for rt in rates
                 if all(x["not_written"] == 0 and x["lost"] == 0 for x in sweep[m] if x["rate"] == rt)]
        # The highest rate below which every rate was lossless too.
        top = None
        for rt in rates:
            if rt not in clean:
                break
            top = rt
        best[m] = top
    out.append("")
    for m in modes:
        out.append(f"- {names.get(m, m)}: every transition written in every round up to "
                   f"{best[m]} conn/s asked")
    if len(modes) == 2 and all(best.values()):
        out.append(f"- ratio: {best[modes[0]] / best[modes[1]]:.2f}")
    return "\n".join(out)


def fresh_port_peek() -> int:
    global _peeked
    _peeked = next(_ports)
    return _peeked


def next_port() -> int:
    return _peeked


_peeked = 0


# ------------------------------------------------------------------ scale

HOLDER = r"""
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(4096)
print("ready", flush=True)
held = [s.accept()[0] for _ in range(count)]
print("held", flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, count = int(sys.argv[1]), int(sys.argv[2])
conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
print("connected", flush=True)
sys.stdin.readline()
for c in conns:
    c.close()
print("closed", flush=True)
"""


LPORT = re.compile(r'"lport": (\d+)')
RPORT = re.compile(r'"rport": (\d+)')
# follow_reports stops waiting this long after the last report when ss shows
# sockets in CLOSE_WAIT that the tracer did not report (and says which).
STALL_S = 10.0
# What the last follow_reports found unreported (for the benches' output).
unreported: dict = {}


def ss_close_wait(ports) -> set:
    """(local port, peer port) of the sockets in CLOSE_WAIT on ports."""
    filt = " or ".join(f"sport = :{p}" for p in ports)
    out = subprocess.run(["ss", "-Htn", "state", "close-wait", f"( {filt} )"],
                         capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 4:
            found.add((int(cols[2].rsplit(":", 1)[1]), int(cols[3].rsplit(":", 1)[1])))
    return found


def ss_close_wait_count(ports) -> int:
    return len(ss_close_wait(ports))


def follow_reports(tracer, ports, total: int, closed_at: float, limit_s: float,
                   first: "list | None" = None) -> tuple:
    """Read the tracer's JSON lines (in a thread, into a queue) and count its
    linger records on ports until every socket the workload really left in
    CLOSE_WAIT (ss, not what it asked for: at 100,000 a few connections do
    not stay there) is reported, its output ends, or limit_s after
    closed_at. Returns (the queue, which goes on filling: stop_for_summary
    reads the summary from it; reported; reported with owners; seconds
    from closed_at to the last report). first: a list given gets the
    seconds from closed_at to the first report appended.

    When ss still shows sockets in CLOSE_WAIT that were not reported STALL_S
    after the last report, it stops waiting and says which, with the runs
    of the tracer's BPF programs the kernel skipped (recursion_misses: a
    socket whose entry into CLOSE_WAIT was never seen is never reported);
    `unreported` keeps that. (It waited the whole limit_s, 120 s, for them.)"""
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in tracer.stdout] + [lines.put("")],
                     daemon=True).start()
    wanted = set(ports)
    reported = owners_ok = 0
    seen: set = set()
    last = checked = closed_at
    expected = total
    unreported.clear()
    while reported < expected and time.monotonic() < closed_at + limit_s:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if time.monotonic() - checked > 2:
                in_close_wait = ss_close_wait(ports)
                expected = min(total, len(in_close_wait))
                checked = time.monotonic()
                missing = in_close_wait - seen
                if missing and reported < expected and checked - last > STALL_S:
                    unreported.update(
                        count=len(missing), sockets=sorted(missing)[:20],
                        after_last_report_s=round(checked - last, 1),
                        bpf_recursion_misses=bpf_recursion_misses(tracer.pid))
                    print(f"bench: {len(missing)} socket(s) in CLOSE_WAIT on the workload's "
                          f"ports not reported {checked - last:.0f} s after the last report: "
                          f"{unreported}", file=sys.stderr)
                    break
            continue
        if not line:
            break
        if line.startswith('{"type": "linger"'):
            # Parsing 100k records of ~6 KB would make this reader, not
            # the tracer, the bottleneck: pick out the fields cheaply.
            m = LPORT.search(line)
            if m and int(m.group(1)) in wanted:
                r = RPORT.search(line)
                key = (int(m.group(1)), int(r.group(1)) if r else 0)
                if key not in seen:         # an update line is not another socket
                    seen.add(key)
                    reported += 1
                    owners_ok += '"owners": [{"pid"' in line
                last = time.monotonic()
                if first is not None and not first:
                    first.append(last - closed_at)
    return lines, reported, owners_ok, last - closed_at


def bpf_map_memory(pid: int) -> int:
    """Bytes the kernel charges for the tracer's BPF maps (fdinfo memlock)."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("memlock:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def rss_kb(pid: int, key="VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def start_lingering(groups: list, ports: list, holders: list, clients: list) -> float:
    """The scale workload: on each port a holder accepts n connections and
    keeps them; its client then closes them all, which leaves n sockets in
    CLOSE_WAIT per port. The processes go into holders and clients as they
    start (for the caller's clean-up). Returns when the clients had closed."""
    for n, port in zip(groups, ports):
        h = subprocess.Popen([sys.executable, "-c", HOLDER, str(port), str(n)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        holders.append(h)
        assert h.stdout.readline().strip() == "ready"
        c = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(n)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        clients.append(c)
        assert c.stdout.readline().strip() == "connected"
    for h in holders:
        assert h.stdout.readline().strip() == "held"
    for c in clients:
        c.stdin.write("close\n")
        c.stdin.flush()
    for c in clients:
        assert c.stdout.readline().strip() == "closed"
    return time.monotonic()


def stop_for_summary(tracer, lines, closed: "dict | None" = None) -> "dict | None":
    """SIGINT, then the summary record from the tracer's remaining --json
    lines (a queue fed by a reader thread; "" marks the end). closed: counts
    the CLOSED records read on the way, by their "reported" field."""
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=60)
    summary = None
    while True:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            break
        if not line:
            break
        if line.startswith('{"type": "summary"'):
            summary = json.loads(line)
        elif closed is not None and line.startswith('{"type": "closed"'):
            key = "reported" if '"reported": true' in line else "not_reported"
            closed[key] = closed.get(key, 0) + 1
    return summary


def stop_all(procs: list) -> None:
    for p in procs:
        try:
            if p.stdin:
                p.stdin.close()
        except OSError:
            pass
        if p.poll() is None:
            p.kill()
        p.wait()


def scale_one(total: int, per_process: int = 10_000, threshold: str = "1s",
              own_ports: bool = False) -> dict:
    """own_ports: the tracer watches the workload's ports only (-p each),
    so that another user's sockets in CLOSE_WAIT on a shared machine are
    not traced and reported with ours (they still cost the owner lookup,
    which reads every socket table and every process's fds)."""
    groups = [per_process] * (total // per_process) + ([total % per_process] if total % per_process else [])
    ports = [free_port() for _ in groups] if own_ports else []
    holders, clients = [], []
    filters = [arg for port in ports for arg in ("-p", str(port))]
    tracer = subprocess.Popen(TRACER + ["--json", "-t", threshold, "-i", "500ms"] + filters,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = tracer.stdout.readline()
        assert first.startswith('{"type": "start"'), first
        if not own_ports:
            ports += [free_port() for _ in groups]
        closed_at = start_lingering(groups, ports, holders, clients)
        summary = None
        first: list = []
        lines, reported, owners_ok, report_s = follow_reports(tracer, ports, total, closed_at,
                                                              60, first)
        time.sleep(3.0)               # idle ticks: nothing changes any more
        rss = rss_kb(tracer.pid)
        hwm = rss_kb(tracer.pid, "VmHWM")
        maps = bpf_map_memory(tracer.pid)
        summary = stop_for_summary(tracer, lines) or summary
        cost = (summary or {}).get("tracer_cost", {})
        counters = (summary or {}).get("counters", {})
        return {"sockets": total, "in_close_wait_per_ss": ss_close_wait_count(ports),
                "reported": reported, "with_owners": owners_ok,
                "kernel_cw_enter": counters.get("cw_enter"),
                "summary_lingering": len((summary or {}).get("still_lingering", [])),
                "report_s_after_close": round(report_s, 2), "threshold_s": 1.0,
                "first_report_s_after_close": round(first[0], 2) if first else None,
                "rss_mb": round(rss / 1024, 1), "rss_peak_mb": round(hwm / 1024, 1),
                "bpf_maps_mb": round(maps / 2**20, 1),
                "idle_tick_max_ms": cost.get("idle_max_ms"),
                "map_read_max_ms": cost.get("map_read_max_ms"),
                "resolve_max_ms": cost.get("resolve_max_ms"),
                "gc_max_ms": cost.get("gc_max_ms"), "gc_total_ms": cost.get("gc_total_ms"), "gc_collections": cost.get("gc_collections"),
                # Reads of the map made key by key (seconds each at 100,000).
                "map_reads_per_key": cost.get("map_reads_per_key"),
                "map_read_failures": cost.get("map_read_failures"),
                # Rescans (after a loss, or when two censuses found the same
                # difference) and censuses (once a minute:
                # CLOSEWAIT_TRACE_RECONCILE_S=N makes that every N s, to
                # measure one at this scale), and the longest of each.
                "rescans": cost.get("rescans"), "rescan_max_ms": cost.get("rescan_max_ms"),
                "censuses": cost.get("censuses"), "census_max_ms": cost.get("census_max_ms"),
                # Reported with owners looked up while a batch was written.
                "owners_ahead": cost.get("owners_ahead"),
                # What sets a rescan off besides the censuses: a loss the
                # summary counted, and what the rescans found.
                "losses": {name: counters[name] for name in (
                    "events_lost", "map_full", "transitions_skipped", "exit_untracked",
                    "found_unseen", "left_unseen", "untracked_over", "untracked_over_most")
                    if counters.get(name)}}
    finally:
        stop_all(clients + holders + [tracer])


# ----------------------------------------------------------------- report

def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def markdown(churn: dict, scale: list, args) -> str:
    out = [f"Machine: {machine()}", ""]
    if churn:
        base = med(churn["none"]["rate"]) if "none" in churn else None
        out += [f"Churn: {args.seconds:g} s per run, {args.rounds} interleaved rounds, "
                f"{args.clients} client + {args.servers} server processes "
                f"(bench/churn.c); every connection passes through CLOSE_WAIT.", "",
                "| tracer | conn/s median | min-max | vs none | tracer CPU s/run | lost (counted by the tracer) "
                "| not written (made - written), each run | startup s | SIGINT->exit s |",
                "|---|---|---|---|---|---|---|---|---|"]
        names = {"none": "no tracer", "empty": "empty BPF program (floor)",
                 "empty-raw": "empty BPF program, raw tracepoint (floor)",
                 "default": "closewait-trace", "all": "closewait-trace --all",
                 "all-before": "closewait-trace --all, before (CLOSEWAIT_BENCH_BEFORE)",
                 "tcpstates": "tcpstates-bpfcc",
                 "default-nobtf": "closewait-trace, namespaces not read (nobtf)",
                 "default-noeof": "closewait-trace, EOF reads not captured (noeof)",
                 "default-perftp": "closewait-trace, state changes by perf event (perftp)"}
        for mode, r in churn.items():
            if r.get("could_not_start"):
                out.append(f"| {names[mode]} | could not start: "
                           f"{r['could_not_start'].replace('|', '/')} | | | | | | | |")
                continue
            lo, hi = spread(r["rate"])
            ratio = f"{100 * med(r['rate']) / base:.1f}%" if base else "-"
            cpu = f"{med(r['cpu_s']):.2f}" if r["cpu_s"] else "-"
            lost = str(sum(r["lost"])) if r["lost"] else "-"
            # The same measure for every tracer that streams transitions.
            unwritten = " / ".join(f"{x:,}" for x in r["not_written"]) if r.get("not_written") else "-"
            st = f"{med(r['startup_s']):.2f}" if r["startup_s"] else "-"
            exits = [x for x in r["exit_s"] if x is not None]
            killed = sum(r.get("killed", []))
            ex = f"{max(exits):.2f} (max)" if exits else "-"
            if killed:
                ex = f"did not exit within 10 s in {killed}/{len(r['exit_s'])} runs" + (
                    f"; others {ex}" if exits else "")
            out.append(f"| {names[mode]} | {med(r['rate']):.0f} | {lo:.0f}-{hi:.0f} | {ratio} | "
                       f"{cpu} | {lost} | {unwritten} | {st} | {ex} |")
        out.append("")
    if scale:
        out += ["| sockets asked / in CLOSE_WAIT (ss, kernel) | reported with owner | last reported (s after close) | tracer RSS MB (peak) | BPF maps MB | idle tick max ms | full map read max ms | resolve batch max ms | longest GC pass ms |",
                "|---|---|---|---|---|---|---|---|---|"]
        for s in scale:
            out.append(f"| {s['sockets']} / {s['in_close_wait_per_ss']}, {s['kernel_cw_enter']} | "
                       f"{s['with_owners']}/{s['reported']} | "
                       f"{s['report_s_after_close']} | {s['rss_mb']} ({s['rss_peak_mb']}) | "
                       f"{s['bpf_maps_mb']} | {s['idle_tick_max_ms']} | {s['map_read_max_ms']} | "
                       f"{s['resolve_max_ms']} | {s.get('gc_max_ms')} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", choices=["all", "churn", "scale", "sweep"], default="all")
    ap.add_argument("--rates", default="2000,5000,10000,20000,40000",
                    help="sweep: paced connection rates to try")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--sockets", default="1000,10000,100000")
    ap.add_argument("--no-tcpstates", action="store_true")
    ap.add_argument("--own-ports", action="store_true",
                    help="scale: trace the workload's ports only (-p), not other users' "
                         "sockets in CLOSE_WAIT on a shared machine")
    ap.add_argument("--modes", help="churn: only these tracers (e.g. none,tcpstates; "
                                    "default-nobtf: without the namespace reads; "
                                    "default-noeof: without the EOF-read capture; "
                                    "default-perftp: state changes by the tracepoint's "
                                    "perf event)")
    ap.add_argument("--smoke", action="store_true", help="tiny version, for CI")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it loads BPF programs)", file=sys.stderr)
        return 3
    if args.smoke:
        args.rounds, args.seconds, args.sockets = 1, 1.0, "200"
    build_churn()
    modes = ["none", "empty", "default", "all"]
    if not args.no_tcpstates and os.path.exists(TCPSTATES):
        modes.append("tcpstates")
    extra = ["default-nobtf", "default-noeof", "default-perftp", "empty-raw"]
    if os.environ.get("CLOSEWAIT_BENCH_BEFORE"):
        extra.append("all-before")      # --modes all-before,all,tcpstates
    if args.modes:
        modes = [m for m in args.modes.split(",") if m in modes + extra]
    churn = {}
    if args.what in ("all", "churn"):
        setup_netns()
        try:
            churn = churn_bench(args.rounds, args.seconds, modes, args.clients, args.servers)
        finally:
            teardown_netns()
    sweep = {}
    if args.what == "sweep":
        setup_netns()
        try:
            print(f"load average at start: {load_average()}", file=sys.stderr)
            sweep = sweep_bench([int(r) for r in args.rates.split(",")], args.seconds,
                                [m for m in modes if m in ("all", "all-before", "tcpstates")],
                                args.clients, args.servers, rounds=args.rounds)
        finally:
            teardown_netns()
        print(f"Machine: {machine()}; load average at the end: {load_average()}")
        print(sweep_markdown(sweep))
    scale = [scale_one(int(n), own_ports=args.own_ports) for n in args.sockets.split(",")] \
        if args.what in ("all", "scale") else []
    if churn or scale:
        print(markdown(churn, scale, args))
    if churn:
        print("\nPer run (conn/s, lost):")
        for mode, r in churn.items():
            print(f"  {mode}: " + ", ".join(f"{rate:.0f}" + (f" ({lost})" if lost is not None else "")
                                          for rate, lost in zip(r["rate"], r["lost"] or [None] * len(r["rate"]))))
            if r.get("not_written"):
                print("    made / written / not written: " + ", ".join(
                    f"{a} / {b} / {c}" for a, b, c in zip(r["made"], r["written"], r["not_written"])))
            if any(x is not None for x in r.get("events_unread", [])):
                print("    of which the buffer full / unread at the stop: " + ", ".join(
                    f"{a} / {b}" for a, b in zip(r["events_lost"], r["events_unread"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "churn": churn, "scale": scale, "sweep": sweep}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
