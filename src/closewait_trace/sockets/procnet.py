"""The kernel's TCP socket tables, /proc/PID/net/tcp and tcp6, per network
namespace: the bridge from a connection's addresses to its socket inode.

The tracepoint gives the socket's kernel address and its addresses, not its
inode; /proc/net/tcp gives addresses and inode (its pointer column is hashed
unless kptr_restrict allows, so addresses are what we match on).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import socket
import sys
from typing import Iterable, Iterator, Optional

from closewait_trace.sockets import procfs, sockdiag
from closewait_trace.kernel.events import Endpoints, format_address
from closewait_trace.sockets.tcprow import TcpRow

__all__ = ["TcpRow", "parse_tcp_table", "network_namespaces", "tcp_rows", "is_procfs",
           "one_read_per_namespace", "remember_rows"]

PROC_SUPER_MAGIC = 0x9FA0


def _decode_hex_address(text: str) -> bytes:
    # The kernel prints each 32-bit word of the address as a native integer.
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return raw


def parse_tcp_table(text: str, family: int, netns: int = 0) -> list[TcpRow]:
    rows = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        try:
            laddr, lport = parts[1].split(":")
            raddr, rport = parts[2].split(":")
            tx, rx = parts[4].split(":")
            rows.append(TcpRow(
                endpoints=Endpoints(
                    family=family,
                    laddr=format_address(family, _decode_hex_address(laddr)),
                    lport=int(lport, 16),
                    raddr=format_address(family, _decode_hex_address(raddr)),
                    rport=int(rport, 16),
                    netns=netns),
                state=int(parts[3], 16),
                tx_queue=int(tx, 16),
                rx_queue=int(rx, 16),
                uid=int(parts[7]),
                inode=int(parts[9]),
            ))
        except (ValueError, IndexError):
            continue
    return rows


def network_namespaces(proc: str = procfs.PROC) -> dict[int, int]:
    """Every network namespace that has a process in it: inode -> one pid."""
    return scan_network_namespaces(proc)[0]


def scan_network_namespaces(proc: str = procfs.PROC) -> tuple[dict[int, int], set[int]]:
    """(inode -> one pid, for every namespace seen; the pids whose namespace
    we were not allowed to read: a namespace only they live in is unseen)."""
    found, denied = scan_network_namespace_pids(proc, 1)
    return {inode: pids[0] for inode, pids in found.items()}, denied


def scan_network_namespace_pids(proc: str = procfs.PROC, most: int = 3
                                ) -> tuple[dict[int, list[int]], set[int]]:
    """scan_network_namespaces with up to `most` pids per namespace (the
    lowest): a read entered through one that has exited since (a
    short-lived process, after the pid counter wrapped) is tried again
    through the next, not taken as the namespace gone."""
    found: dict[int, list[int]] = {}
    denied: set[int] = set()
    for pid in procfs.pids(proc):
        try:
            inode = procfs.ns_inode(procfs.readlink(f"{proc}/{pid}/ns/net"))
        except procfs.ResourceExhausted:
            raise
        except procfs.AccessDenied:
            denied.add(pid)
            continue
        except procfs.ProcError:
            continue
        if inode is None:
            continue
        pids = found.setdefault(inode, [])
        if len(pids) < most:
            pids.append(pid)
    return found, denied


def own_netns() -> Optional[int]:
    """The inode of the network namespace this thread is in."""
    return procfs.ns_inode(procfs.read_link("/proc/thread-self/ns/net"))


@functools.lru_cache(maxsize=8)
def is_procfs(path: str) -> bool:
    """Whether path is a mounted procfs (statfs says so), wherever it is
    mounted (/proc, a container's /host/proc): only then do its pids and
    namespace links name this kernel's processes, so that sock_diag, which
    asks the kernel directly, answers about the same sockets. Anything else
    (a copied or crafted tree) is read as files."""
    buf = ctypes.create_string_buffer(256)      # struct statfs is 120 bytes
    if procfs.libc().statfs(os.fsencode(path), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value == PROC_SUPER_MAGIC   # f_type comes first


# (proc, netns inode) -> (states read, rows), inside one_read_per_namespace()
_reused: Optional[dict] = None


@contextlib.contextmanager
def one_read_per_namespace() -> Iterator[None]:
    """Within this block, a namespace's table read once answers every later
    request for the same states or fewer, whichever module asks: a
    snapshot reads each namespace once (rows as of that read)."""
    global _reused
    outer, _reused = _reused, {} if _reused is None else _reused
    try:
        yield
    finally:
        _reused = outer


def tcp_rows(pid: int, proc: str = procfs.PROC,
             states: Optional[Iterable[int]] = None, times: bool = True) -> list[TcpRow]:
    """The TCP sockets of the network namespace that pid lives in: from
    sock_diag when proc is a real procfs (filtered by state in the kernel,
    listeners with their backlog, tcp_info times unless times is False),
    else parsed from /proc/PID/net/tcp*. times=False is a hint for a caller
    that does not use the times: inside one_read_per_namespace, where the
    rows answer later callers too, they are read with them."""
    if _reused is None or states is None:
        return _read_rows(pid, proc, states, times)
    wanted = frozenset(states)
    key = (proc, procfs.ns_inode(procfs.read_link(f"{proc}/{pid}/ns/net")) or ("pid", pid))
    known = _reused.get(key)
    if known is not None and wanted <= known[0]:
        return [row for row in known[1] if row.state in wanted]
    rows = _read_rows(pid, proc, wanted)
    _reused[key] = (wanted, rows)
    return rows


def namespace_rows(netns: int, pids: list[int], proc: str = procfs.PROC,
                   states: Optional[Iterable[int]] = None, times: bool = True,
                   deadline: Optional[float] = None,
                   ports: Optional[frozenset] = None) -> list[TcpRow]:
    """tcp_rows of namespace netns (an inode scan_network_namespace_pids
    listed with pids), entered through each of its pids in turn until one
    answers from inside it: the first may have exited since the listing
    (a short-lived process, after the pid counter wrapped), or its pid been
    reused in another namespace. Taking its failure for an empty namespace
    made the owner lookup say its sockets had left CLOSE_WAIT. [] when none
    answers (most likely gone with them). deadline (monotonic): raises
    sockdiag.DumpCut when it passes before a dump is whole. ports
    (sockdiag.port_pairs): of the sockets other than listeners, rows are
    made at least for those with these port pairs, maybe for more (a
    table read whole, or from /proc, is given whole)."""
    if states is None or not is_procfs(proc):
        return tcp_rows(pids[0], proc, states, times)
    wanted = frozenset(states)
    if _reused is not None:
        known = _reused.get((proc, netns))
        if known is not None and wanted <= known[0]:
            return [row for row in known[1] if row.state in wanted]
    own = own_netns()
    for pid in pids:
        ns_link = f"{proc}/{pid}/ns/net"
        try:
            inode, rows = sockdiag.tcp_sockets_in(wanted, None if netns == own else ns_link,
                                                  times, deadline=deadline, ports=ports)
        except OSError as e:
            if e.errno in procfs.EXHAUSTED_ERRNOS:
                raise procfs.ResourceExhausted(f"sock_diag ({ns_link})", e.errno) from None
            if e.errno in (errno.ENOENT, errno.ESRCH):
                continue    # gone since the listing: the next one
            # Not allowed to enter it (no CAP_SYS_ADMIN), or no sock_diag:
            # its /proc/PID/net, as tcp_rows reads it, if the pid is still
            # in that namespace.
            if procfs.ns_inode(procfs.read_link(ns_link)) != netns:
                continue
            rows = _read_rows(pid, proc, wanted, times)
            if not rows and procfs.ns_inode(procfs.read_link(ns_link)) != netns:
                continue    # gone while read
            inode = netns
        if inode != netns:
            continue        # the pid now lives in another namespace
        if _reused is not None and ports is None:
            # Only a whole table answers later reads (not one filtered).
            _reused[(proc, netns)] = (wanted, rows)
        return rows
    return []


def remember_rows(proc: str, netns: int, states: Iterable[int], rows: list[TcpRow]) -> None:
    """Inside one_read_per_namespace: rows read elsewhere (a whole dump of
    namespace netns in these states) answer later tcp_rows calls for it."""
    if _reused is not None:
        _reused[(proc, netns)] = (frozenset(states), rows)


def _read_rows(pid: int, proc: str, states: Optional[Iterable[int]],
               times: bool = True) -> list[TcpRow]:
    """Rows whose endpoints carry the inode of the namespace they were read
    in (0 when it could not be known)."""
    if states is not None and is_procfs(proc):
        ns_link = f"{proc}/{pid}/ns/net"
        same = procfs.ns_inode(procfs.read_link(ns_link)) == own_netns()
        try:
            return sockdiag.tcp_sockets(states, None if same else ns_link, times)
        except OSError as e:
            # Out of descriptors, /proc/PID/net/tcp cannot be opened either,
            # and an empty table would say every socket left CLOSE_WAIT.
            if e.errno in procfs.EXHAUSTED_ERRNOS:
                raise procfs.ResourceExhausted(f"sock_diag ({ns_link})", e.errno) from None
            # no sock_diag (module missing, or the process went away)
    rows: list[TcpRow] = []
    # /proc/PID/net is the namespace of whatever process has the pid when
    # read: the same namespace before and after the reads names the rows'
    # (a pid reused in another namespace in between gives no rows).
    ns_link = f"{proc}/{pid}/ns/net"
    netns = procfs.ns_inode(procfs.read_link(ns_link)) or 0
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        text = procfs.read_text(f"{proc}/{pid}/net/{name}")
        if text:
            rows.extend(parse_tcp_table(text, family, netns))
    if (procfs.ns_inode(procfs.read_link(ns_link)) or 0) != netns:
        return []
    if states is not None:
        wanted = set(states)
        rows = [row for row in rows if row.state in wanted]
    return rows
