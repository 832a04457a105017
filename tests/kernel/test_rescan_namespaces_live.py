"""A rescan (owners.rescan_close_wait) among many namespaces: any user can
make them by the thousand, and the loop waits while a rescan reads them.
It reads its own namespace whole and others for a budget, the users who own
them taking turns, so that one user's many namespaces cannot stall the loop
nor put off another user's sockets.

Real namespaces: three of a "victim" user (uid 65533), each with a socket
in CLOSE_WAIT held by a process of that user and checked with `ss` inside
it, and forty of nobody's with a sleeping process each; each rescan is
given no budget at all, so it reads exactly one other namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
from array import array
import re
import socket
import subprocess
import sys
import time

import pytest

from closewait_trace.evidence import gathering
from closewait_trace.kernel import tcpstates
from closewait_trace.sockets import owners, procfs, procnet
from closewait_trace.sockets.filters import SocketFilter
from closewait_trace.output import records
from tests.unit.cycles import cycles_left
from tests.kernel.harness import (HOLDING_SERVER, Tracer, free_port, namespace_bomb, stretch,
                                  wait_until)

VICTIM_UID = 65533
BOMB = 40
BIG_BOMB = 1000
VICTIM = ["setpriv", f"--reuid={VICTIM_UID}", f"--regid={VICTIM_UID}", "--clear-groups"]

CLIENT = r"""
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[1]))).close()
"""


def _netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@pytest.fixture
def victims(procs):
    """{netns inode: (port, peer port)} of three namespaces of VICTIM_UID,
    each with one socket in CLOSE_WAIT that `ss` inside it shows."""
    names = [f"cwt-turn{i}-{os.getpid()}" for i in range(3)]
    made, held = [], {}
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
            port = free_port()
            server = subprocess.Popen(["ip", "netns", "exec", name] + VICTIM
                                      + [sys.executable, "-c", HOLDING_SERVER, "4", str(port)],
                                      stdout=subprocess.PIPE, text=True)
            procs.append(server)
            assert server.stdout.readline().strip() == "ready"
            subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", CLIENT,
                            str(port)], check=True, timeout=stretch(10))

            def in_close_wait(name=name, port=port):
                out = subprocess.run(["ip", "netns", "exec", name, "ss", "-Htn", "state",
                                      "close-wait", f"( sport = :{port} )"],
                                     capture_output=True, text=True, check=True).stdout
                return [line.split()[3] for line in out.splitlines()]
            wait_until(lambda: len(in_close_wait()) == 1,
                       what=f"ss in {name} to show one CLOSE_WAIT socket")
            peer = int(in_close_wait()[0].rsplit(":", 1)[1])
            held[os.stat(f"/run/netns/{name}").st_ino] = (port, peer)
        yield held
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name])


@pytest.fixture
def bomb(procs):
    """The inodes of BOMB namespaces of nobody's, each with a process."""
    yield from namespace_bomb(procs, BOMB)


@pytest.fixture
def big_bomb(procs):
    """A thousand: more than any machine reads in the start-up's budget
    (3-5 ms each here; 1,000 made in 0.6 s)."""
    yield from namespace_bomb(procs, BIG_BOMB)


def test_one_users_many_namespaces_do_not_put_off_anothers(victims, bomb):
    own = os.stat("/proc/thread-self/ns/net").st_ino
    others = set(procnet.network_namespaces()) - {own}
    assert set(victims) | bomb <= others
    last_read: dict[int, int] = {}
    read_in_turn: list[int] = []
    found: dict[int, set] = {}
    for serial in range(1, len(others) + 1):
        read = owners.rescan_close_wait(last_read=last_read, budget_s=0.0)
        # Its own namespace whole every time; with no budget, one other.
        assert own in read.dumped and len(read.tried) == 1, read.tried
        assert set(read.tried) | set(read.unread) | {own} >= set(victims) | bomb
        last_read.update({netns: serial for netns in read.tried})
        read_in_turn += read.tried
        for row in read.rows:
            if row.state == tcpstates.CLOSE_WAIT and row.endpoints.netns in victims:
                found.setdefault(row.endpoints.netns, set()).add(
                    (row.endpoints.lport, row.endpoints.rport))
    assert set(read_in_turn) >= set(victims) | bomb     # every namespace had its turn
    # Each victim namespace was read whole, its socket as ss shows it.
    assert found == {netns: {ports} for netns, ports in victims.items()}
    last_victim = max(read_in_turn.index(netns) for netns in victims)
    bomb_before = sum(1 for netns in read_in_turn[:last_victim] if netns in bomb)
    # Users take turns: nobody's forty cost the victim one turn each round.
    assert bomb_before <= len(victims), (bomb_before, read_in_turn[:last_victim + 1])


def test_the_owner_lookup_reads_other_namespaces_for_its_budget(victims, bomb):
    """The owner lookup of the live tracer's tick (owners.resolve with
    others_budget_s): a user's namespaces with huge TCP hash tables (140
    ms a dump, even empty) made one lookup 3-4 s and held the report of
    everybody's sockets. It reads the tracer's own namespace, then the
    others in the order their sockets are asked (the tick's oldest first)
    until its budget is spent, at least one; those left are OWNER_NOT_READ
    (asked again), never gone. With no budget: its own and exactly one
    other, real holders named; asked again, the next one."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    mine, peer = listener.accept()
    client.close()
    own = os.stat("/proc/thread-self/ns/net").st_ino
    wait_until(lambda: _state_of(mine) == tcpstates.CLOSE_WAIT, what="our socket in CLOSE_WAIT")
    here = owners.Endpoints(socket.AF_INET, "127.0.0.1", listener.getsockname()[1],
                            "127.0.0.1", peer[1], own)
    theirs = [owners.Endpoints(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", rport, netns)
              for netns, (port, rport) in sorted(victims.items(), reverse=True)]
    left, named = theirs, []
    while left:
        found = owners.resolve([here] + left, others_budget_s=0.0)
        assert found[here].kind == owners.OWNER_FD
        assert [h.pid for h in found[here].holders] == [os.getpid()]
        read = [ep for ep in left if found[ep].kind != owners.OWNER_NOT_READ]
        assert read == left[:1], {ep.netns: found[ep].kind for ep in left}
        assert found[read[0]].kind == owners.OWNER_FD
        assert [h.uid for h in found[read[0]].holders] == [VICTIM_UID]
        named += read
        left = left[1:]
    assert named == theirs
    found = owners.resolve([here] + theirs)         # no budget: all of them
    assert {found[ep].kind for ep in theirs} == {owners.OWNER_FD}
    mine.close()
    listener.close()


def _state_of(sock: socket.socket) -> int:
    """The socket's TCP state, from its own tcp_info (first byte)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def test_with_the_budget_to_spare_a_rescan_reads_every_namespace(victims, bomb):
    own = os.stat("/proc/thread-self/ns/net").st_ino
    read = owners.rescan_close_wait(budget_s=float("inf"))
    assert read.unread == [] and {own} | set(victims) | bomb <= read.dumped
    mine = {(row.endpoints.netns, row.endpoints.lport, row.endpoints.rport)
            for row in read.rows if row.endpoints.netns in victims}
    assert mine == {(netns, *ports) for netns, ports in victims.items()}
    assert all(row.endpoints.family == socket.AF_INET for row in read.rows
               if row.endpoints.netns in victims)


def test_a_snapshot_reads_other_namespaces_for_its_budget_and_counts_the_rest(victims, bomb):
    """`snapshot` reads the namespaces by the same turns, for a budget
    (gathering.SNAPSHOT_OTHERS_BUDGET_S): 1,000 of a user's made it take
    4.3 s instead of 0.7. With no budget it reads its own and one other
    whole, and counts the rest by real uid; with time to spare, every one,
    each victim's socket listed with its holder."""
    own = os.stat("/proc/thread-self/ns/net").st_ino
    uid_of = {netns: procfs.real_uid(pid) for netns, pid in procnet.network_namespaces().items()
              if netns != own}
    first = owners.fair_order(uid_of, {})[0]
    read = gathering.snapshot_candidates(SocketFilter(), 0, budget_s=0.0)
    listed = {l.endpoints.netns for l in read.due} - {own}
    assert listed <= {first}
    assert sum(read.unread_by_uid.values()) == len(uid_of) - 1, read.unread_by_uid
    assert read.unread_by_uid.get(65534, 0) >= BOMB - (first in bomb)
    if first in victims:
        [l] = [l for l in read.due if l.endpoints.netns == first]
        assert (l.endpoints.lport, l.endpoints.rport) == victims[first]
        assert read.resolved[l.endpoints].kind == owners.OWNER_FD

    read = gathering.snapshot_candidates(SocketFilter(), 0, budget_s=float("inf"))
    assert read.unread_by_uid == {}
    mine = {l.endpoints.netns: l for l in read.due if l.endpoints.netns in victims}
    assert {netns: (l.endpoints.lport, l.endpoints.rport) for netns, l in mine.items()} == victims
    assert all(read.resolved[l.endpoints].kind == owners.OWNER_FD for l in mine.values())


def test_the_start_reads_other_namespaces_for_a_budget_and_says_what_it_left(victims, big_bomb):
    """The live tracer's start-up read of the sockets already in CLOSE_WAIT:
    1,000 of nobody's namespaces held it 4.6 s (0.6 s without). It now
    reads other namespaces than its own for a budget, users in turn, says
    how many it left and whose, and the rescans read the rest; the victims'
    sockets (each in a namespace of its own, uid 65533) are reported as
    there before the start."""
    ports = set(victims.values())
    with Tracer(["-t", "1s"]) as tr:
        found = tr.wait_for(lambda r: r["type"] == "linger"
                            and (r["lport"], r["rport"]) in ports, count=3, timeout=30)
        summary = tr.stop()
    assert {(r["lport"], r["rport"]) for r in found} == ports
    assert all(r["pre_existing"] and r["code"]["eof_read_unknown"] == records.CODE_PRE_EXISTING
               for r in found)
    assert not summary["counters"].get("found_unseen")
    said = re.search(r"closewait-trace: (\d+) network namespaces not read in 0.2s "
                     r"\(uid 65534: (\d+)[,)].* at start", tr.stderr)
    assert said, tr.stderr
    assert BIG_BOMB >= int(said.group(2)) >= BIG_BOMB // 2


def test_the_paused_socket_lookups_leave_nothing_in_a_cycle(victims, bomb):
    """Issue 20: the worker runs its socket lookups with the cyclic
    collector paused (gathering.WITHOUT_COLLECTOR): what they leave in
    reference cycles stays for the whole call, and a user makes namespaces
    by the thousand. Each call here enters the 43 namespaces of nobody and
    the victim (the owner lookup through a socket whose namespace is not
    known), once to fill what a first use caches, then again with the
    collector off: nothing left in a cycle (each namespace entered left 9
    objects, ~3.5 KB, before)."""
    theirs = [owners.Endpoints(socket.AF_INET, "127.0.0.1", port, "127.0.0.1", rport, netns)
              for netns, (port, rport) in sorted(victims.items())]
    anywhere = owners.Endpoints(socket.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2, 0)
    calls = {
        "snapshot_close_wait": owners.snapshot_close_wait,
        "rescan_close_wait": lambda: owners.rescan_close_wait(budget_s=float("inf")),
        "close_wait_census": lambda: owners.close_wait_census(budget_s=float("inf")),
        "in_close_wait_now": lambda: owners.in_close_wait_now(theirs),
        "held_now": lambda: owners.held_now([1, 2]),
        "owners": lambda: owners.resolve(theirs + [anywhere]),
        "owners_in_order": lambda: list(gathering.owners_in_order(theirs + [anywhere])),
    }
    assert set(calls) == gathering.WITHOUT_COLLECTOR
    for name, call in calls.items():
        call()
        with cycles_left() as left:
            call()
        assert left.count == 0, (name, left.count, left.kinds)


def test_held_now_says_whether_any_process_holds_a_socket():
    """What a rescan asks of a socket whose namespace no process is in any
    more (tracer._gone_with_namespace), read from the real /proc."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    client.shutdown(socket.SHUT_WR)                 # accepted: CLOSE_WAIT
    inode = os.fstat(accepted.fileno()).st_ino
    try:
        assert owners.held_now([inode]) == [True]
        accepted.close()
        # Not held: said only when every process could be looked at (here
        # pid 1, the sandbox's, is not readable even by root: then any of
        # those might hold it, and it is not known).
        denied = owners.scan_holders([inode], procfs.ProcBatch(), fd_flags=False).denied_pids
        assert owners.held_now([inode]) == [None if denied else False]
    finally:
        for s in (client, listener, accepted):
            s.close()


@contextlib.contextmanager
def in_close_wait(n: int):
    """n sockets in CLOSE_WAIT here on 127.0.0.1:PORT, each accepted and its
    peer's side shut: (port, the peers, the accepted), all closed after."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(n)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    accepted = [listener.accept()[0] for _ in clients]
    for c in clients:
        c.shutdown(socket.SHUT_WR)
    try:
        yield port, clients, accepted
    finally:
        for s in clients + accepted + [listener]:
            s.close()


def test_the_census_gives_the_keys_of_the_sockets_in_close_wait_that_pass_the_filter():
    """What the loop compares with what it knows (live/tracer.py census):
    each socket in CLOSE_WAIT as tcprow.census_key of its addresses, by
    namespace, read from the real sock_diag; only those the filter passes,
    the same keys the loop makes of the sockets it knows."""
    from closewait_trace.kernel.events import Endpoints
    from closewait_trace.sockets.tcprow import census_key
    with in_close_wait(2) as (port, clients, accepted):
        netns = os.stat("/proc/self/ns/net").st_ino
        census = owners.close_wait_census(budget_s=0.0, socket_filter=SocketFilter(lports=(port,)))
        assert netns in census.dumped
        mine = {census_key(Endpoints(socket.AF_INET, "127.0.0.1", port, "127.0.0.1",
                                     c.getsockname()[1], netns)) for c in clients}
        keys = array("Q", census.keys[netns])
        assert set(keys) == mine and len(keys) == 2
        none = owners.close_wait_census(budget_s=0.0, socket_filter=SocketFilter(lports=(1,)))
        assert netns in none.dumped and netns not in none.keys


def test_a_rescan_for_some_keys_gives_the_rows_of_those_sockets_alone():
    """A rescan two censuses set off (owners.rescan_close_wait's only): of
    the real sock_diag's rows, those whose census key, made with the
    loop's secret, is among the keys asked for in their namespace."""
    from closewait_trace.kernel.events import Endpoints
    from closewait_trace.sockets.tcprow import census_key
    with in_close_wait(3) as (port, clients, accepted):
        netns = os.stat("/proc/self/ns/net").st_ino
        wanted = Endpoints(socket.AF_INET, "127.0.0.1", port, "127.0.0.1",
                           clients[1].getsockname()[1], netns)
        whole = owners.rescan_close_wait(budget_s=0.0)
        assert sum(1 for r in whole.rows if r.endpoints.lport == port) == 3
        read = owners.rescan_close_wait(budget_s=0.0,
                                        only={netns: {census_key(wanted, b"s")}}, secret=b"s")
        assert netns in read.dumped
        assert [r.endpoints for r in read.rows] == [wanted]
        assert read.rows[0].inode == os.fstat(accepted[1].fileno()).st_ino
        other = owners.rescan_close_wait(budget_s=0.0,
                                         only={netns: {census_key(wanted, b"s")}}, secret=b"t")
        assert other.rows == []


# In a new namespace of its own (lo brought up by the caller): one socket in
# CLOSE_WAIT on 127.0.0.1:PORT; prints its namespace, its peer's port, and
# the wall-clock times just before and after the peer's FIN was sent.
PRE_START_HOLDER = r"""
import json, os, socket, sys, time
srv = socket.socket(); srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(1)
client = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
held, _ = srv.accept()
before = time.time(); client.shutdown(socket.SHUT_WR); after = time.time()
print(json.dumps({"netns": os.stat("/proc/self/ns/net").st_ino,
                  "rport": client.getsockname()[1], "before": before, "after": after}),
      flush=True)
time.sleep(3600)
"""


def test_ages_read_across_many_namespaces_keep_their_bounds(procs):
    """The start-up's read (and a rescan's) takes up to its budget over many
    namespaces, and each row's tcp_info times are the kernel's at the
    moment that row was dumped; counted from one time for all (before the
    read at start, after it in a rescan), ages went past their own stated
    bounds by up to the read's length (0.2 s in an attack as nobody: 57 of
    57 over the truth). 20 namespaces with a socket each from before the
    start, among 60 of nobody's: every age's bounds must hold the truth,
    bracketed by the holder's clock around the FIN."""
    spaces = namespace_bomb(procs, 60)
    next(spaces)
    port = free_port()
    truth = {}
    for _ in range(20):
        holder = subprocess.Popen(
            ["unshare", "-n", "--", "sh", "-c",
             'ip link set lo up && exec "$0" -c "$1" "$2"', sys.executable,
             PRE_START_HOLDER, str(port)], stdout=subprocess.PIPE, text=True)
        procs.append(holder)
        said = json.loads(holder.stdout.readline())
        truth[(said["netns"], said["rport"])] = said
    time.sleep(1.0)
    tracer = Tracer(["--threshold", "1", "-p", str(port)]).start()
    procs.append(tracer)
    lines = tracer.wait_for(lambda r: r["type"] == "linger", count=20, timeout=40)
    tracer.stop()
    assert len(lines) == 20
    wrong = []
    for r in lines:
        said = truth[(r["netns"], r["rport"])]
        at_least, at_most = r["ts"] - said["after"], r["ts"] - said["before"]
        assert r["pre_existing"] is True, r
        # 1 ms for the two clocks read at slightly different moments.
        if r["age_s"] > at_most + 0.001 or (r["age_max_s"] is not None
                                            and r["age_max_s"] < at_least - 0.001):
            wrong.append((r["age_s"], r["age_max_s"], round(at_least, 4), round(at_most, 4)))
    assert not wrong, f"{len(wrong)} ages past their bounds (said, truth): {wrong[:5]}"
