"""The same connection (addresses and ports) in CLOSE_WAIT in several network
namespaces at once: each socket is its own namespace's holder's.

Real namespaces (`ip netns add`, each with its own loopback), a holding
server in each on the same port (one of them run as nobody), and a client
from the same source port: four sockets with one 4-tuple, four holders.
Every answer is checked against `ss` run inside each namespace.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.kernel.harness import HOLDING_SERVER, TRACER, Tracer, free_port, stretch, wait_until

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
NOBODY_UID = 65534

CLIENT = r"""
import socket, sys
c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(("127.0.0.1", int(sys.argv[2])))
c.connect(("127.0.0.1", int(sys.argv[1])))
c.close()
"""


def _in(ns):
    return ["ip", "netns", "exec", ns] if ns else []


def _ss_holder(ns, port: int) -> set:
    """(pid, peer port) of each CLOSE_WAIT socket on port, as ss sees it
    inside namespace ns (None: the host's)."""
    out = subprocess.run(_in(ns) + ["ss", "-Htanp", "state", "close-wait",
                                    f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        peer = int(line.split()[3].rsplit(":", 1)[1])
        for pid in re.findall(r"pid=(\d+)", line):
            found.add((int(pid), peer))
    return found


@pytest.fixture
def namespaces():
    """Three fresh network namespaces with loopback up; deleted afterwards."""
    names = [f"cwt-dup{i}-{os.getpid()}" for i in range(3)]
    made = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name])


def same_tuple_everywhere(namespaces, procs, port: int, cport: int) -> dict:
    """In the host's namespace and each of namespaces: a holding server on
    port (the second namespace's as nobody), and one connection to it from
    cport, closed by the client. Returns {netns inode: holder pid}, checked
    against ss in each namespace."""
    holders = {}
    for i, ns in enumerate([None] + list(namespaces)):
        user = NOBODY if i == 2 else []
        server = subprocess.Popen(_in(ns) + user + [sys.executable, "-c", HOLDING_SERVER,
                                                    "4", str(port)],
                                  stdout=subprocess.PIPE, text=True)
        procs.append(server)
        assert server.stdout.readline().strip() == "ready"
        subprocess.run(_in(ns) + [sys.executable, "-c", CLIENT, str(port), str(cport)],
                       check=True, timeout=stretch(10))
        inode = os.stat(f"/run/netns/{ns}" if ns else "/proc/self/ns/net").st_ino
        wait_until(lambda: _ss_holder(ns, port) == {(server.pid, cport)},
                   what=f"ss in {ns or 'the host'} to show the CLOSE_WAIT socket held by {server.pid}")
        holders[inode] = server.pid
    assert len(holders) == 4
    return holders


def _ports():
    # Distinct from each other; free in the host (fresh namespaces have all).
    port = free_port()
    cport = free_port()
    while cport == port:
        cport = free_port()
    return port, cport


def _linger_by_netns(lingers, port, cport) -> dict:
    out = {}
    for rec in lingers:
        assert (rec["laddr"], rec["lport"], rec["raddr"], rec["rport"]) == \
            ("127.0.0.1", port, "127.0.0.1", cport)
        assert rec["netns"] not in out, f"two records for one namespace: {lingers}"
        out[rec["netns"]] = rec
    return out


@pytest.mark.parametrize("when", ["traced", "pre_existing"])
def test_live_tracer_names_each_namespaces_own_holder(namespaces, procs, when):
    """Four sockets, one 4-tuple: four linger records, each with the holder
    ss shows in that socket's namespace (the old tracer named the first
    namespace's holder four times)."""
    port, cport = _ports()
    tracer = Tracer(["-p", str(port), "-t", "300ms"])
    if when == "pre_existing":
        holders = same_tuple_everywhere(namespaces, procs, port, cport)
        tracer.start()
        procs.append(tracer)
    else:
        tracer.start()
        procs.append(tracer)
        holders = same_tuple_everywhere(namespaces, procs, port, cport)
    tracer.wait_for(lambda r: r["type"] == "linger", count=4)
    tracer.settle(1.0)      # and no fifth
    by_ns = _linger_by_netns(tracer.of("linger"), port, cport)
    assert set(by_ns) == set(holders)
    for netns, rec in by_ns.items():
        assert rec["owner_kind"] == "fd", rec
        assert [o["pid"] for o in rec["owners"]] == [holders[netns]], rec
        assert rec["pre_existing"] == (when == "pre_existing")
    uids = {rec["owners"][0]["uid"] for rec in by_ns.values()}
    assert uids == {0, NOBODY_UID}
    summary = tracer.stop()
    still = [s for s in summary["still_lingering"] if s["lport"] == port]
    assert sorted(s["owners"][0]["pid"] for s in still) == sorted(holders.values())


def test_without_btf_the_duplicates_are_said_ambiguous(namespaces, procs, monkeypatch):
    """Forced off BTF (as on a kernel without it), a traced socket's
    namespace is unknown: while several namespaces have its addresses in
    CLOSE_WAIT no holder is named and the record says which namespaces.
    Never another socket's holder."""
    monkeypatch.setenv("CLOSEWAIT_TRACE_FORCE", "nobtf")
    port, cport = _ports()
    tracer = Tracer(["-p", str(port), "-t", "300ms"]).start()
    procs.append(tracer)
    holders = same_tuple_everywhere(namespaces, procs, port, cport)
    lingers = tracer.wait_for(lambda r: r["type"] == "linger", count=4)
    for rec in lingers:
        # The sockets appear one namespace after another: one resolved while
        # its addresses were in one namespace only is rightly that one's.
        if rec["owner_kind"] == "fd":
            assert [o["pid"] for o in rec["owners"]] == [holders[rec["netns"]]], rec
            continue
        assert rec["owner_kind"] == "ambiguous", rec
        assert rec["owners"] == [] and rec["netns"] is None
        seen = rec["also_in_netns"]
        assert len(seen) >= 2 and set(seen) <= set(holders), rec
        assert rec["diagnosis"]["summary"].startswith(f"ambiguous: {len(seen)} network namespaces")
    # The last socket was resolved when all four existed: said as such.
    last = lingers[-1]
    assert last["owner_kind"] == "ambiguous" and sorted(last["also_in_netns"]) == sorted(holders)
    tracer.stop()


def test_btf_offsets_read_the_namespace_ss_reports(namespaces, procs):
    """One socket, in a namespace of its own, and the host: the namespace
    the kernel program read is the one ss and /run/netns name."""
    port, cport = _ports()
    tracer = Tracer(["-p", str(port), "-t", "300ms", "-v"]).start()
    procs.append(tracer)
    ns = namespaces[0]
    server = subprocess.Popen(_in(ns) + [sys.executable, "-c", HOLDING_SERVER, "4", str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(server)
    assert server.stdout.readline().strip() == "ready"
    subprocess.run(_in(ns) + [sys.executable, "-c", CLIENT, str(port), str(cport)], check=True)
    (rec,) = tracer.wait_for(lambda r: r["type"] == "linger")
    assert rec["netns"] == os.stat(f"/run/netns/{ns}").st_ino
    assert [o["pid"] for o in rec["owners"]] == [server.pid]
    assert _ss_holder(ns, port) == {(server.pid, cport)}
    tracer.stop()


def _snapshot(*args):
    return subprocess.run(TRACER + ["snapshot"] + list(args), capture_output=True, text=True,
                          timeout=stretch(60), check=True)


def test_snapshot_counts_every_namespaces_socket(namespaces, procs):
    """`snapshot` shows the four sockets ss shows, each with its own holder
    (the old one printed "1 socket" and the first namespace's holder)."""
    port, cport = _ports()
    holders = same_tuple_everywhere(namespaces, procs, port, cport)
    out = _snapshot("--json", "-p", str(port))
    import json
    lingers = [r for r in map(json.loads, out.stdout.splitlines()) if r["type"] == "linger"]
    by_ns = _linger_by_netns(lingers, port, cport)
    assert {ns: [o["pid"] for o in rec["owners"]] for ns, rec in by_ns.items()} == \
        {ns: [pid] for ns, pid in holders.items()}
    text = _snapshot("-p", str(port)).stdout
    assert "4 sockets in CLOSE_WAIT" in text, text
    for pid in holders.values():
        assert f"{pid}/" in text
