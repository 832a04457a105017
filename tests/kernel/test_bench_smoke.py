"""A tiny run of the benchmark, so that it cannot rot (the real one is run
by hand: see docs/benchmarks.md)."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.kernel.harness import Tracer, free_port, stretch, wait_until

pytestmark = pytest.mark.kernel
BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "run.py")
CHURN_C = os.path.join(os.path.dirname(BENCH), "churn.c")
HOOKCOUNT = os.path.join(os.path.dirname(__file__), "hookcount.py")
sys.path.insert(0, os.path.dirname(BENCH))
import run as bench_run  # noqa: E402  (bench/run.py: parse_churn)


BPF_PROG_TYPE_RAW_TRACEPOINT = 17       # include/uapi/linux/bpf.h


def recursion_misses(pid: int) -> int:
    """Runs of pid's BPF programs the kernel skipped (a tracepoint hit on a
    CPU already running a BPF program: recursion_misses in fdinfo); 0 where
    the kernel does not say."""
    return bench_run.bpf_recursion_misses(pid) or 0


def wait_until_gone(netns: str, port: int) -> list:
    """Waits until no TCP socket on local port `port` is left in netns;
    returns the states of those there when the wait began."""
    def left():
        out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htan",
                              f"( sport = :{port} )"], capture_output=True, text=True,
                             check=True, timeout=stretch(10)).stdout
        return [line.split()[0] for line in out.splitlines()]
    first = left()
    wait_until(lambda: not left(), timeout=60,
               what=f"the workload's sockets on port {port} to be gone")
    return first


def tcp_mib(netns: str) -> dict:
    """The namespace's TCP counters (/proc/net/snmp's Tcp: lines): the
    kernel's own counts, kept in the code paths themselves, never skipped."""
    text = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True,
                          timeout=stretch(10)).stdout
    names, values = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    return dict(zip(names, map(int, values)))


def by_transitions(stderr: str) -> dict:
    """churn.c's connections by the transitions it counted for each
    ("connections by transitions counted: 3:0 4:24 5:29734 6:0")."""
    line = next(l for l in stderr.splitlines() if l.startswith("connections by transitions"))
    return {int(k): int(v) for k, v in re.findall(r"(\d):(\d+)", line.split(":", 1)[1])}


def test_churn_counts_exactly_the_transitions_it_makes(procs, tmp_path):
    """The benchmark measures every tracer's loss as the transitions
    bench/churn.c says its workload made on the port minus the lines the
    tracer wrote: that count must be the kernel's own. Saturating, with one
    server so that the accept queue backs up, in a namespace with TIME_WAIT
    off as in the benchmark (the clients' sockets vanish early, and resets
    race the server's close). Before churn.c counted per connection, 5 per
    connection + 2 was off by 1,300-2,900 here (connections still queued
    when the servers were killed: four transitions each) and by 2-26 (a
    reset in CLOSE_WAIT: four).

    Checked against the kernel's TCP counters in the namespace (exact,
    whatever attaches where): every connection churn.c served is one
    passive open, and each it counted as reset (three or four transitions)
    one reset from ESTABLISHED or CLOSE_WAIT.

    And against the hook: not against churn.c's count, which the hook does
    not always reach. Now and then the kernel gives no program at the raw
    tracepoint a connection's first two transitions and counts nothing
    (tests/kernel/hookcount.py). With the tracer, this test failed so in 6
    of 119 runs; in 4 of them a second program at the hook, which skipped
    no run, had missed two as well. So a second program
    counts what the hook gave it, and the tracer must have seen all of that
    or counted the runs the kernel skipped (transitions_skipped: its
    program's recursion_misses), and the second likewise of the tracer's.
    Through the tracepoint's perf event (the pre-5.6 path) the kernel can
    skip a program without counting it, so this is asserted where the tool
    claims it: the raw tracepoint."""
    churn = tmp_path / "churn"
    subprocess.run(["gcc", "-O2", "-o", str(churn), CHURN_C], check=True)
    netns = f"cw-churncount-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw",
                        "net.ipv4.tcp_max_tw_buckets=0"], check=True)
        port = free_port()
        tracer = Tracer(["-p", str(port), "--all", "-t", "1h"]).start()
        procs.append(tracer)
        hook = subprocess.Popen([sys.executable, HOOKCOUNT, str(port)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(hook)
        assert hook.stdout.readline() == "ready\n"
        misses = recursion_misses(tracer.proc.pid)
        programs = bench_run.bpf_programs(tracer.proc.pid)
        before = tcp_mib(netns)
        out = subprocess.run(["ip", "netns", "exec", netns, str(churn), str(port), "1", "2", "1"],
                             capture_output=True, text=True, timeout=stretch(60), check=True)
        made = bench_run.parse_churn(out.stdout)
        # A server socket churn.c closed while still in LAST_ACK (its
        # peer's ACK not yet processed after 2 s, as under a starved
        # softirq) makes its last transition as an orphan, after the
        # workload ended: the count is read once the kernel is done with
        # every socket of the workload.
        left = wait_until_gone(netns, port)
        after = tcp_mib(netns)
        misses = recursion_misses(tracer.proc.pid) - misses
        hook_skipped = bench_run.bpf_recursion_misses(hook.pid)
        hook.send_signal(signal.SIGINT)
        given = json.loads(hook.communicate(timeout=stretch(30))[0])
        summary = tracer.stop()
        skipped = summary["counters"]["transitions_skipped"]
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    seen = summary["counters"]["transitions"]
    counted = by_transitions(out.stderr)
    assert made.connections > 1000, out.stdout
    assert made.served == made.connections, out.stdout
    assert made.transitions == 2 + sum(k * n for k, n in counted.items()), (out.stdout, counted)
    # The kernel's own counts: each connection one passive open (LISTEN ->
    # SYN_RECV), each counted as reset one reset from ESTABLISHED or
    # CLOSE_WAIT (the clients close first: none of theirs is reset there).
    assert after["PassiveOpens"] - before["PassiveOpens"] == made.connections, (before, after)
    assert after["EstabResets"] - before["EstabResets"] == counted[3] + counted[4], (
        before, after, counted)
    # Its state changes came from the raw tracepoint (program type 17).
    assert [p["prog_type"].strip() for p in programs].count(str(BPF_PROG_TYPE_RAW_TRACEPOINT)) == 1, \
        programs
    assert isinstance(skipped, int) and skipped >= 0, skipped
    why = (out.stdout, out.stderr, seen, skipped, given, hook_skipped, misses, left)
    assert isinstance(hook_skipped, int), why          # the kernel says (5.12+)
    assert seen <= made.transitions and given["seen"] <= made.transitions, why
    assert given["seen"] <= seen + skipped, why
    assert seen <= given["seen"] + hook_skipped, why
    print(f"{made.connections} connections: churn.c counted {made.transitions} transitions; "
          f"the tracer saw {seen} (skipped: {skipped}), the second program {given['seen']} "
          f"(skipped: {hook_skipped}); runs of all the tracer's programs skipped: {misses}")


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, BENCH, "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=stretch(300))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    churn = data["churn"]
    assert {"none", "empty", "default", "all"} <= set(churn)
    # The default mode loses nothing even at saturation; --all may (it says
    # how many), which is why its count is only checked for being reported.
    assert churn["default"]["lost"] == [0]
    assert isinstance(churn["all"]["lost"][0], int)
    for mode in ("default", "all"):
        assert churn[mode]["rate"][0] > 1000
        assert churn[mode]["startup_s"][0] < 10
        assert churn[mode]["exit_s"][0] is not None and churn[mode]["exit_s"][0] < 5
    scale = data["scale"][0]
    assert scale["sockets"] == scale["reported"] == scale["with_owners"] == 200
    assert "| closewait-trace |" in result.stdout


def test_benchmark_says_why_tcpstates_could_not_start(tmp_path):
    """Whatever header trees a machine has, the benchmark finishes: a
    tcpstates that cannot compile is a row saying so, not a failure. Forced
    here with a header tree that has nothing in it."""
    empty = tmp_path / "no-headers"
    empty.mkdir()
    result = subprocess.run([sys.executable, BENCH, "churn", "--smoke", "--modes",
                             "none,tcpstates"], capture_output=True, text=True, timeout=stretch(300),
                            env=dict(os.environ, BENCH_TCPSTATES_HEADERS=str(empty)))
    assert result.returncode == 0, result.stderr[-2000:]
    row = [l for l in result.stdout.splitlines() if l.startswith("| tcpstates-bpfcc |")]
    assert len(row) == 1 and f"could not start: {empty}:" in row[0], result.stdout
    assert "| no tracer |" in result.stdout


def test_startup_benchmark_smoke():
    """bench/startup.py, one round of each mode under load: it runs, and
    each exit's summary was read and accounts for every transition."""
    startup = os.path.join(os.path.dirname(BENCH), "startup.py")
    result = subprocess.run([sys.executable, startup, "--rounds", "1", "--load",
                             "--modes", "port,all"],
                            capture_output=True, text=True, timeout=stretch(300))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| port ")
            or line.startswith("| all ")]
    assert len(rows) == 2, result.stdout
    assert all(row.rstrip().endswith("| 1/1 |") for row in rows), rows
    assert "| 0 | 1/1 |" in rows[1], rows[1]          # --all: nothing uncounted
