"""Who holds a socket: from its addresses to every process with an fd on it.

Runs in user space only for sockets that crossed the threshold, in one batch
per tick: one pass over the TCP tables of each network namespace and one pass
over /proc/*/fd, whatever the number of sockets in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from closewait_trace import procfs, procnet, tcpstates
from closewait_trace.events import Endpoints
from closewait_trace.procnet import TcpRow

OWNER_FD = "fd"                    # processes hold file descriptors on it
OWNER_ACCEPT_QUEUE = "accept_queue"  # never accepted: no fd exists yet
OWNER_NONE = "none"                # in the table, but no process holds it
OWNER_GONE = "gone"                # no longer in CLOSE_WAIT when we looked


@dataclass(slots=True)
class Holder:
    pid: int
    comm: str
    fd: int
    state: str
    ppid: int
    uid: Optional[int]
    cmdline: str
    tracer_pid: int = 0

    def as_dict(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "fd": self.fd,
                "state": self.state, "ppid": self.ppid, "uid": self.uid,
                "cmdline": self.cmdline, "tracer_pid": self.tracer_pid}


@dataclass(slots=True)
class Ownership:
    kind: str
    holders: list[Holder] = field(default_factory=list)
    netns: Optional[int] = None
    inode: int = 0
    rx_queue: int = 0                 # /proc/net/tcp rx_queue: data + unread FIN
    # The LISTEN socket on the same local port: for OWNER_ACCEPT_QUEUE the
    # one it waits on; for OWNER_FD the one it was most likely accepted from.
    listener: Optional[TcpRow] = None
    listener_holders: list[Holder] = field(default_factory=list)
    other_netns: list[int] = field(default_factory=list)  # same addresses elsewhere

    @property
    def unread_bytes(self) -> int:
        # The FIN takes one sequence number, counted until the app reads EOF;
        # data cannot be left behind it, so rx_queue > 0 means EOF is unread.
        return max(0, self.rx_queue - 1)

    @property
    def eof_read(self) -> bool:
        return self.kind in (OWNER_FD, OWNER_NONE) and self.rx_queue == 0

    @property
    def pids(self) -> set[int]:
        return {h.pid for h in self.holders}


def _listener_for(row: TcpRow, listeners: dict[tuple, list[TcpRow]]) -> Optional[TcpRow]:
    """The LISTEN socket a not-yet-accepted connection is queued on."""
    ep = row.endpoints
    candidates = listeners.get((ep.family, ep.lport), [])
    wildcard = {"0.0.0.0", "::"}
    exact = [r for r in candidates if r.endpoints.laddr == ep.laddr]
    if exact:
        return exact[0]
    wild = [r for r in candidates if r.endpoints.laddr in wildcard]
    return wild[0] if wild else None


def find_holders(inodes: Iterable[int], proc: str = procfs.PROC) -> dict[int, list[Holder]]:
    """One pass over /proc/*/fd: socket inode -> every (process, fd) on it."""
    wanted = set(inodes)
    found: dict[int, list[Holder]] = {}
    if not wanted:
        return found
    info_cache: dict[int, Optional[procfs.ProcessInfo]] = {}
    for pid in procfs.pids(proc):
        fd_dir = f"{proc}/{pid}/fd"
        names = procfs.list_dir(fd_dir)
        if not names:
            # A main thread that exited (pthread_exit) leaves a zombie leader
            # whose fd table is gone, while its other threads still hold the
            # sockets: read the table through one of them.
            for tid in procfs.list_dir(f"{proc}/{pid}/task"):
                if tid != str(pid):
                    fd_dir = f"{proc}/{pid}/task/{tid}/fd"
                    names = procfs.list_dir(fd_dir)
                    if names:
                        break
        for name in names:
            inode = procfs.socket_inode(procfs.read_link(f"{fd_dir}/{name}"))
            if inode is None or inode not in wanted:
                continue
            if pid not in info_cache:
                info_cache[pid] = procfs.process_info(pid, proc)
            info = info_cache[pid]
            if info is None:        # exited while we looked: a missing row
                continue
            found.setdefault(inode, []).append(Holder(
                pid=pid, comm=info.comm, fd=int(name), state=info.state,
                ppid=info.ppid, uid=info.uid, cmdline=info.cmdline,
                tracer_pid=info.tracer_pid))
    for holders in found.values():
        holders.sort(key=lambda h: (h.pid, h.fd))
    return found


def snapshot_close_wait(proc: str = procfs.PROC) -> list[tuple[int, TcpRow]]:
    """Every socket in CLOSE_WAIT right now, in every network namespace."""
    rows = []
    for netns, pid in procnet.network_namespaces(proc).items():
        for row in procnet.tcp_rows(pid, proc, states=[tcpstates.CLOSE_WAIT]):
            rows.append((netns, row))
    return rows


def resolve(wanted: Iterable[Endpoints], proc: str = procfs.PROC) -> dict[Endpoints, Ownership]:
    """Ownership of each socket in CLOSE_WAIT with these addresses."""
    wanted = set(wanted)
    if not wanted:
        return {}
    matches: dict[Endpoints, list[tuple[int, TcpRow]]] = {}
    listeners_by_ns: dict[int, dict[tuple, list[TcpRow]]] = {}
    for netns, pid in procnet.network_namespaces(proc).items():
        rows = procnet.tcp_rows(pid, proc, states=[tcpstates.CLOSE_WAIT, tcpstates.LISTEN])
        listeners: dict[tuple, list[TcpRow]] = {}
        for row in rows:
            if row.state == tcpstates.LISTEN:
                listeners.setdefault((row.endpoints.family, row.endpoints.lport), []).append(row)
            elif row.endpoints in wanted:
                matches.setdefault(row.endpoints, []).append((netns, row))
        listeners_by_ns[netns] = listeners

    result: dict[Endpoints, Ownership] = {}
    needed_inodes: set[int] = set()
    for endpoints in wanted:
        found = matches.get(endpoints)
        if not found:
            result[endpoints] = Ownership(kind=OWNER_GONE)
            continue
        # The same addresses in CLOSE_WAIT in two namespaces at once is
        # possible (containers reuse 127.0.0.1); we keep the first and say so.
        netns, row = found[0]
        own = Ownership(kind=OWNER_FD, netns=netns, inode=row.inode,
                        rx_queue=row.rx_queue,
                        other_netns=[ns for ns, _ in found[1:]])
        own.listener = _listener_for(row, listeners_by_ns.get(netns, {}))
        if own.listener is not None and own.listener.inode:
            needed_inodes.add(own.listener.inode)
        if row.inode == 0:
            own.kind = OWNER_ACCEPT_QUEUE
        else:
            needed_inodes.add(row.inode)
        result[endpoints] = own

    holders = find_holders(needed_inodes, proc)
    for own in result.values():
        if own.kind == OWNER_FD:
            own.holders = holders.get(own.inode, [])
            if not own.holders:
                own.kind = OWNER_NONE
        if own.listener is not None:
            own.listener_holders = holders.get(own.listener.inode, [])
    return result
