"""Ages of sockets older than the trace, and `snapshot`, against real
sockets, processes and users, cross-checked with ss and a monotonic clock."""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.kernel.harness import stretch
from tests.kernel.harness import (start_seed_scenario, HOLDING_SERVER, TRACER, Tracer, children_of, connect_and_close, free_port,
                                  record_row, ss_close_wait, start_holding_server, wait_until)

pytestmark = pytest.mark.kernel


def monotonic_of(wall_ts: float) -> float:
    """A record's wall-clock ts on this process's monotonic clock."""
    return wall_ts - (time.time() - time.monotonic())


def snapshot(*args, user=None, check=True):
    cmd = TRACER + ["snapshot"] + list(args)
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=stretch(120))
    if check:
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr, out.stderr
    return out


def lingers_of(out) -> list:
    return [r for r in map(json.loads, out.stdout.splitlines()) if r["type"] == "linger"]


def test_sockets_older_than_the_trace_get_estimated_ages_at_once(procs):
    port = free_port()
    server = start_holding_server(port)
    procs.append(server)
    entered = connect_and_close(port, 3)
    wait_until(lambda: len(ss_close_wait(port)) == 3, what="3 CLOSE-WAIT")
    time.sleep(8 - (time.monotonic() - entered[0]))

    tracer = Tracer(["-p", str(port), "-t", "2s"]).start()
    procs.append(tracer)
    (start,) = tracer.of("start")
    assert start["pre_existing"] == 3
    lingers = tracer.wait_for(lambda r: r["type"] == "linger", count=3, timeout=20)
    for rec in lingers:
        assert rec["pre_existing"] is True
        assert rec["age_source"] == "estimated" and rec["age_is_lower_bound"] is False
        at = monotonic_of(rec["ts"])
        true_ages = [at - t for t in entered]
        assert min(abs(rec["age_s"] - a) for a in true_ages) < 1.0, (rec["age_s"], true_ages)
        assert rec["age_s"] >= 7.0
        # The upper bound (from the last data received: the connection's
        # start here, no data was sent) holds.
        assert rec["age_max_s"] >= max(true_ages) - 0.05, (rec["age_max_s"], true_ages)
    assert {record_row(r) for r in lingers} == ss_close_wait(port)

    server.kill()
    server.wait()
    killed_at = time.monotonic()
    closed = tracer.wait_for(lambda r: r["type"] == "closed", count=3, timeout=15)
    expected = sorted(killed_at - t for t in entered)
    measured = sorted(r["duration_s"] for r in closed)
    for want, got in zip(expected, measured):
        assert abs(got - want) < 1.0, (expected, measured)
    for rec in closed:
        assert rec["duration_source"] == "estimated"
        assert rec["duration_is_lower_bound"] is False
        assert rec["duration_max_s"] >= rec["duration_s"]
        assert rec["pre_existing"] is True and rec["reported"] is True
    summary = tracer.stop()
    assert summary["counters"]["exit_untracked"] == 3
    # Reported from the estimate within one tick (-t 2s: a tick every 1 s)
    # of the start, once owners were resolved (which may take seconds on a
    # loaded machine: symbolizing stacks); tracing alone would have needed
    # the 2 s threshold first.
    resolve_s = summary["tracer_cost"]["resolve_max_ms"] / 1000
    for rec in lingers:
        assert rec["ts"] - start["ts"] - resolve_s < 1.0, (rec["ts"], start["ts"], resolve_s)




def test_snapshot_of_the_seed_scenario(procs):
    port = free_port()
    server, entered = start_seed_scenario(port, procs)
    wait_until(lambda: len(ss_close_wait(port)) == 5, what="5 CLOSE-WAIT")
    time.sleep(1.5)
    out = snapshot("--json", "-p", str(port))
    done = time.monotonic()
    lingers = lingers_of(out)
    assert len(lingers) == 5
    # the same five connections and owners as `ss -tnp` says
    assert {record_row(r) for r in lingers} == ss_close_wait(port)
    children = set(children_of(server.pid))
    for rec in lingers:
        (owner,) = rec["owners"]
        assert owner["pid"] in children and owner["comm"] == "socat" and owner["state"] == "T"
        assert rec["diagnosis"]["cause"] == "stopped"
        assert rec["age_source"] == "estimated"
    assert len({r["owners"][0]["pid"] for r in lingers}) == 5
    # ages within 1 s of the truth, oldest first
    measured = [r["age_s"] for r in lingers]
    assert measured == sorted(measured, reverse=True)
    at = monotonic_of(lingers[0]["ts"])
    for want, got in zip(sorted((at - t for t in entered), reverse=True), measured):
        assert abs(got - want) < 1.0, (want, got)
        assert got <= done - min(entered) + 0.05

    text = snapshot("-p", str(port)).stdout
    later = time.monotonic() - done          # the text's ages: this much older at most
    assert text.splitlines()[0] == f"5 sockets in CLOSE_WAIT (local port {port}), oldest first"
    # The five forks of one socat server are one footer line (output/fold.py;
    # it was one line per child), with as many processes as ss names.
    footer = text[text.index("By holder process:"):].splitlines()[1:]
    exe = os.path.realpath(shutil.which("socat"))
    ss_pids = {p for _l, _r, pids in ss_close_wait(port) for p in pids}
    assert len(ss_pids) == 5
    assert footer == [f"  socat [{exe}] (5 processes): 5 sockets, oldest "
                      f"~{footer[0].split('oldest ~')[1].split(';')[0]}; stopped"], footer
    oldest = float(footer[0].split("oldest ~")[1].split("s;")[0])
    assert max(measured) - 1.0 < oldest < max(measured) + later + 1.0, (oldest, measured)


def test_a_users_forking_server_is_not_folded_into_roots(procs):
    """Two socat fork servers, root's and nobody's, same binary, same comm:
    one footer line each, each with its own five processes and sockets (as
    ss says), told apart by their parent; never one line of ten."""
    ports = [free_port(), free_port()]
    roots, _ = start_seed_scenario(ports[0], procs)
    nobodys, _ = start_seed_scenario(ports[1], procs, as_user=[
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    for port in ports:
        wait_until(lambda: len(ss_close_wait(port)) == 5, what="5 CLOSE-WAIT")
    text = snapshot("-p", f"{ports[0]},{ports[1]}").stdout
    # A line that does not fit 80 columns goes on under its indentation.
    footer = text[text.index("By holder process:"):].replace("\n    ", " ").splitlines()[1:]
    exe = os.path.realpath(shutil.which("socat"))
    assert len(footer) == 2, footer
    for server, port in ((roots, ports[0]), (nobodys, ports[1])):
        ss_pids = {p for _l, _r, pids in ss_close_wait(port) for p in pids}
        assert len(ss_pids) == 5 and ss_pids <= set(children_of(server.pid))
        (line,) = [f for f in footer if f"of {server.pid})" in f]
        assert line.startswith(f"  socat [{exe}] (5 processes of {server.pid}): "
                               f"5 sockets, oldest ~"), footer


NEVER_ACCEPTS = r"""
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
time.sleep(3600)
"""


def test_a_never_accepted_socket_names_the_listener(procs):
    port = free_port()
    listener = subprocess.Popen([sys.executable, "-c", NEVER_ACCEPTS, str(port)],
                                stdout=subprocess.PIPE, text=True)
    procs.append(listener)
    assert listener.stdout.readline().strip() == "ready"
    connect_and_close(port, 1)
    wait_until(lambda: len(ss_close_wait(port)) == 1, what="CLOSE-WAIT in the accept queue")
    (rec,) = lingers_of(snapshot("--json", "-p", str(port)))
    assert rec["owner_kind"] == "accept_queue" and rec["owners"] == []
    assert rec["listener"]["local"] == f"127.0.0.1:{port}"
    assert [o["pid"] for o in rec["listener"]["owners"]] == [listener.pid]
    assert rec["diagnosis"]["cause"] == "never_accepted"
    text = snapshot("-p", str(port)).stdout
    assert "(not accepted)" in text
    assert f"(not accepted) listener 127.0.0.1:{port} held by {listener.pid}/python" in text


NOBODY = 65534


def test_snapshot_as_a_non_root_user(procs):
    mine, theirs = free_port(), free_port()
    # a holder of nobody's, and one of root's
    own = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            sys.executable, "-c", HOLDING_SERVER,
                            "4", str(mine)], stdout=subprocess.PIPE, text=True)
    procs.append(own)
    assert own.stdout.readline().strip() == "ready"
    root_server = start_holding_server(theirs)
    procs.append(root_server)
    connect_and_close(mine, 2)
    connect_and_close(theirs, 1)
    wait_until(lambda: len(ss_close_wait(mine)) == 2 and len(ss_close_wait(theirs)) == 1,
               what="CLOSE-WAIT for both users")
    out = snapshot("--json", "-p", f"{mine},{theirs}", user=NOBODY)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not root" in lines[0] and "other users' processes are hidden" in lines[0]
    lingers = lingers_of(out)
    assert {r["lport"] for r in lingers} == {mine}       # root's socket: holder unseen, not listed
    assert len(lingers) == 2
    for rec in lingers:
        assert [o["pid"] for o in rec["owners"]] == [own.pid]
        assert rec["age_source"] == "estimated"
    assert "1 socket(s) whose holder could not be seen" in lines[0]
    # The text headline counts them too: never "2 sockets" with 3 there.
    text = snapshot("-p", f"{mine},{theirs}", user=NOBODY).stdout.splitlines()
    assert text[0].startswith("2 sockets in CLOSE_WAIT"), text
    assert text[1] == "1 more not listed: held by processes this user may not read (run as root)"
    # and as root both are listed, with no warning
    out = snapshot("--json", "-p", f"{mine},{theirs}")
    assert len(lingers_of(out)) == 3 and out.stderr == ""


def test_snapshot_holder_filters(procs):
    """--pid, --comm (and the cgroup filters, same code as live) in snapshot:
    only sockets whose holders match are listed (issue 12 §2)."""
    one, two = free_port(), free_port()
    first, second = start_holding_server(one), start_holding_server(two)
    procs += [first, second]
    connect_and_close(one, 2)
    connect_and_close(two, 1)
    wait_until(lambda: len(ss_close_wait(one)) == 2 and len(ss_close_wait(two)) == 1,
               what="CLOSE-WAIT on both ports")
    ports = f"{one},{two}"
    assert len(lingers_of(snapshot("--json", "-p", ports))) == 3
    only_first = lingers_of(snapshot("--json", "-p", ports, "--pid", str(first.pid)))
    assert {r["lport"] for r in only_first} == {one} and len(only_first) == 2
    assert all(r["owners"][0]["pid"] == first.pid for r in only_first)
    comm = only_first[0]["owners"][0]["comm"]
    assert len(lingers_of(snapshot("--json", "-p", ports, "--comm", comm))) == 3
    assert lingers_of(snapshot("--json", "-p", ports, "--comm", "no-such-comm")) == []
    text = snapshot("-p", ports, "--pid", str(second.pid)).stdout
    assert f"pid {second.pid}" in text.splitlines()[0] and text.count(" LINGER ") == 1


# Accepts one connection, turns keepalive on with 1 s probes, reads the
# client's byte and its EOF, then holds the socket (CLOSE_WAIT) and sleeps.
KEEPALIVE_HOLDER = r"""
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
while conn.recv(10):
    pass
time.sleep(3600)
"""


def test_a_keepalive_socket_is_shown_by_the_range_its_age_lies_in(procs):
    """Keepalive probes are ACKed every second, and each ACK renews
    tcp_info's last_ack_recv: a socket 8 s in CLOSE_WAIT read ~1 s, hidden
    by -t 4s and ordered as young (issue 19 §4). Now its age is a range,
    shown and compared by its upper end (the last data received)."""
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", KEEPALIVE_HOLDER, str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(holder)
    assert holder.stdout.readline().strip() == "listening"
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"x")
    time.sleep(0.5)
    client.close()
    closed = time.monotonic()
    wait_until(lambda: len(ss_close_wait(port)) == 1, what="1 CLOSE-WAIT")
    time.sleep(8 - (time.monotonic() - closed))

    out = snapshot("--json", "-p", str(port), "-t", "4s")
    true_age = time.monotonic() - closed
    [rec] = lingers_of(out)
    assert record_row(rec) in ss_close_wait(port)
    assert rec["age_source"] == "range", rec
    assert rec["age_s"] < 3.0, rec                 # the ACK clock: the probe interval
    # The upper end: since the byte, 0.5 s before the FIN (and the dump
    # came before true_age was taken).
    assert true_age - 1.0 <= rec["age_max_s"] <= true_age + 1.0, (rec, true_age)

    text = snapshot("-p", str(port), "-t", "4s").stdout
    [row] = [l for l in text.splitlines() if f":{port} " in l and "LINGER" in l]
    shown = row.split()[4]
    assert shown.startswith("<=") and float(shown[2:].rstrip("s")) >= 7.0, row
    verbose = snapshot("-v", "-p", str(port), "-t", "4s").stdout
    assert "(keepalive:" in verbose and "at least" in verbose


def consecutive_free_ports(n: int) -> int:
    """n consecutive free ports, below the ephemeral range: next to a port
    the kernel just gave out (free_port), the neighbours are other clients'
    recent ports, often still in TIME_WAIT after a long run of tests, and a
    run of 50 tries found none (seen once in a full run)."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10_000, max(10_001, low - n))
        try:
            held = []
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                held.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError("no run of free ports")


def test_a_port_range_and_a_name_prefix_as_people_type_them(procs):
    """Issue 19 §6: `--comm python` found nothing while python3 held the
    sockets; ranges like -p 8080-8090 were refused."""
    a = consecutive_free_ports(3)
    for port in (a, a + 1, a + 2):
        procs.append(start_holding_server(port))
        connect_and_close(port, 1)
    wait_until(lambda: all(len(ss_close_wait(p)) == 1 for p in (a, a + 1, a + 2)),
               what="3 CLOSE-WAIT")
    comm = open(f"/proc/{procs[0].pid}/comm").read().strip()     # python or python3
    out = snapshot("--json", "-p", f"{a}-{a + 1}", "--comm", "pyth")
    lingers = lingers_of(out)
    assert {r["lport"] for r in lingers} == {a, a + 1}
    assert {record_row(r) for r in lingers} == ss_close_wait(a) | ss_close_wait(a + 1)
    assert f"--comm pyth matches {comm}" in out.stderr
    # A glob; and a range given backwards is one line, exit 2.
    assert len(lingers_of(snapshot("--json", "-p", f"{a}-{a + 2}", "--comm", "*yth*"))) == 3
    bad = snapshot("-p", f"{a + 2}-{a}", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "from low to high" in bad.stderr


# A fork-per-connection server (as PostgreSQL's postmaster, inetd): each
# accepted connection is held by a child that never closes it; the server
# itself keeps copies of the first `keep`.
FORK_SERVER = r"""
import os, signal, socket, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
port, keep = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(128)
print("ready", flush=True)
kept = []
while True:
    c, _ = srv.accept()
    if os.fork() == 0:
        srv.close()
        time.sleep(3600)
        os._exit(0)
    if len(kept) < keep:
        kept.append(c)
    else:
        c.close()
"""


def test_forty_forks_of_one_server_are_one_footer_line(procs):
    """40 connections, each held by its own forked child, the server holding
    copies of 3 of them: one footer line of 41 processes and 40 sockets
    (a socket its server and its child both hold counts once), the
    processes those ss names."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER, str(port), "3"],
                              stdout=subprocess.PIPE, text=True)
    procs.append(server)
    assert server.stdout.readline().strip() == "ready"
    for _ in range(40):
        socket.create_connection(("127.0.0.1", port)).close()
    wait_until(lambda: len(ss_close_wait(port)) == 40, what="40 CLOSE-WAIT")
    wait_until(lambda: len({p for _l, _r, pids in ss_close_wait(port) for p in pids}) == 41,
               what="41 holders")
    ss_pids = {p for _l, _r, pids in ss_close_wait(port) for p in pids}
    assert server.pid in ss_pids and ss_pids - {server.pid} <= set(children_of(server.pid))
    text = snapshot("-p", str(port)).stdout
    assert text.splitlines()[0].startswith(f"40 sockets in CLOSE_WAIT (local port {port})")
    footer = text[text.index("By holder process:"):].replace("\n    ", " ").splitlines()[1:]
    assert len(footer) == 1, footer
    m = re.match(r"^  (\S+) \[(.+)\] \(41 processes\): 40 sockets, oldest ", footer[0])
    assert m, footer
    with open(f"/proc/{server.pid}/comm") as f:
        assert m.group(1) == f.read().strip()
    assert m.group(2) == os.readlink(f"/proc/{server.pid}/exe")
