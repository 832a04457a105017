"""Who holds a socket: from its addresses to every process with an fd on it.

Runs in user space only for sockets that crossed the threshold, in one batch
per tick: one pass over the TCP tables of each network namespace and one pass
over /proc/*/fd, whatever the number of sockets in the batch.

The same addresses and ports can be in CLOSE_WAIT in several network
namespaces at once (two containers, or a user's own namespace copying
another's connection). A socket is looked up in its own namespace when its
Endpoints carry it (netns != 0: the kernel program read it, or the socket
was found in a namespace's table); otherwise a match in more than one
namespace is said as ambiguous, and no holder is named.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping, NamedTuple, Optional, Sequence

from closewait_trace import knobs
from closewait_trace.sockets import procfs, procnet, sockdiag, subids
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints
from closewait_trace.sockets.procnet import TcpRow
from closewait_trace.sockets.tcprow import CENSUS_ARRAY, census_key, same_socket

OWNER_FD = "fd"                    # processes hold file descriptors on it
OWNER_ACCEPT_QUEUE = "accept_queue"  # never accepted: no fd exists yet
OWNER_NONE = "none"                # in the table, but no process holds it
OWNER_GONE = "gone"                # no longer in CLOSE_WAIT when we looked
# Unknown: no holder found, but the fd tables of some processes could not be
# read (permission denied): "nobody holds it" would be a guess, not a fact.
OWNER_DENIED = "denied"
# The socket's namespace is not known (no BTF offsets) and these addresses
# are in CLOSE_WAIT in several namespaces: which one is this socket cannot
# be told, so no holder is named (other_netns lists the namespaces).
OWNER_AMBIGUOUS = "ambiguous"

# Unknown: /proc or sock_diag could not be read at all because the tracer (or
# the system) was out of file descriptors (procfs.ResourceExhausted): neither
# "gone" nor "nobody holds it"; `error` says what failed.
OWNER_UNREADABLE = "unreadable"

# Unknown: no holder found, but the fd tables of the processes with the most
# fds were not read within the lookup's time (FD_WALK_BUDGET_S): a user can
# hold hundreds of thousands; "nobody holds it" would be a guess.
OWNER_FDS_NOT_READ = "fds_not_read"

# Not looked for yet: its namespace was not read in the time one owner
# lookup gives the other namespaces (resolve's others_budget_s). Says
# nothing about the socket: the caller asks again later, and never writes
# it (a user's namespace can take 140 ms to dump even empty, and a user may
# make many: the report of everybody else's sockets would wait for them).
OWNER_NOT_READ = "not_read"


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
    # Everything read about the process in this batch (flags, start time):
    # the diagnosis takes it from here instead of reading stat again.
    process: Optional[procfs.ProcessSnapshot] = None
    cloexec: Optional[bool] = None      # O_CLOEXEC on this fd (None: unknown)

    @classmethod
    def of(cls, snap: procfs.ProcessSnapshot, fd: int, cloexec: Optional[bool]) -> "Holder":
        # Positional, in the fields' order: one per socket held (10,000 of
        # one process), and keywords cost a third more.
        return cls(snap.pid, snap.comm, fd, snap.state, snap.ppid, snap.uid, snap.cmdline,
                   snap.tracer_pid, snap, cloexec)

    def process_part(self) -> tuple:
        """The fields that every fd of one process shares, in the order
        holder_of_process takes them."""
        return (self.pid, self.comm, self.state, self.ppid, self.uid, self.cmdline,
                self.tracer_pid, self.process)

    def as_dict(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "fd": self.fd,
                "state": self.state, "ppid": self.ppid, "uid": self.uid,
                "cmdline": self.cmdline, "tracer_pid": self.tracer_pid}


def holder_of_process(part: tuple, fd: int, cloexec: Optional[bool]) -> Holder:
    """A Holder from its process's shared part (Holder.process_part) and
    its fd's own fields: how the gathering worker pickles holders, so that
    the holders of one process unpickle sharing one part (its ints are not
    copied per socket)."""
    pid, comm, state, ppid, uid, cmdline, tracer_pid, process = part
    return Holder(pid, comm, fd, state, ppid, uid, cmdline, tracer_pid, process, cloexec)


@dataclass(slots=True)
class Ownership:
    kind: str
    # Sequences, empty as the shared () (three empty lists were 168 bytes
    # of every socket's state, and of every pickled answer): never changed
    # in place, only replaced.
    holders: Sequence[Holder] = ()
    netns: Optional[int] = None
    inode: int = 0
    cookie: int = 0                   # sock_diag's (tcprow.TcpRow.cookie)
    rx_queue: int = 0                 # /proc/net/tcp rx_queue: data + unread FIN
    # The LISTEN socket on the same local port: for OWNER_ACCEPT_QUEUE the
    # one it waits on; for OWNER_FD the one it was most likely accepted from.
    listener: Optional[TcpRow] = None
    listener_holders: Sequence[Holder] = ()
    # OWNER_AMBIGUOUS: every namespace with these addresses in CLOSE_WAIT.
    other_netns: Sequence[int] = ()
    # Processes whose fd table we were not allowed to read in this batch: any
    # of them may hold the socket too (0 when running with full privileges).
    denied_processes: int = 0
    denied_named: Sequence[str] = ()   # the first few, "pid/comm"
    # Not found in the namespaces we could read, while this many processes
    # would not show theirs (OWNER_DENIED with no inode).
    netns_denied: int = 0
    # Processes whose fd table the walk left when its time was up
    # (FD_WALK_BUDGET_S), and the first few "pid/comm": any may hold it
    # too. None: every table was read (one field for nearly every socket).
    fds_not_read: Optional[tuple[int, Sequence[str]]] = None
    error: str = ""                   # OWNER_UNREADABLE: what could not be read
    # In a budgeted lookup, the real uid of the first process of the
    # socket's namespace (other than the tracer's), or the user a
    # subordinate uid is lent to: the user whose turn it was or will be
    # (other_turns); None otherwise.
    netns_uid: Optional[int] = None
    # ...and how long reading that namespace took in this lookup (the whole
    # budget if its dump was cut), for the next lookups' estimate; None:
    # not read in it.
    netns_read_s: Optional[float] = None
    # fds of holder processes not listed (FDS_LISTED_PER_PROCESS): (on the
    # socket, on its listener). None: all listed. One field, None for nearly
    # every socket: 100,000 are kept at once.
    holders_cut: Optional[tuple[int, int]] = None

    @property
    def unread_bytes(self) -> int:
        # The FIN takes one sequence number, counted until the app reads EOF;
        # data cannot be left behind it, so rx_queue > 0 means EOF is unread.
        return max(0, self.rx_queue - 1)

    @property
    def eof_read(self) -> bool:
        # Only for a socket found in a table (inode known): otherwise its
        # queue is not known either.
        return (self.kind in (OWNER_FD, OWNER_NONE, OWNER_DENIED, OWNER_FDS_NOT_READ)
                and self.inode != 0 and self.rx_queue == 0)

    def is_another_than(self, cookie: int, inode: int) -> bool:
        """Whether the socket found on the endpoints is known not to be the
        one with this cookie and inode (tcprow.same_socket): the addresses
        were reused since."""
        found = (self.kind in (OWNER_FD, OWNER_NONE, OWNER_ACCEPT_QUEUE)
                 or (self.kind in (OWNER_DENIED, OWNER_FDS_NOT_READ)
                     and (self.inode or self.cookie)))
        return bool(found) and same_socket(cookie, inode, self.cookie, self.inode) is False

    @property
    def pids(self) -> set[int]:
        return {h.pid for h in self.holders}

    @property
    def every_holder(self) -> list[Holder]:
        """The socket's holders, then its listener's."""
        return list(self.holders) + list(self.listener_holders)


def _listener_for(row: TcpRow, listeners: dict[tuple, list[TcpRow]]) -> Optional[TcpRow]:
    """The LISTEN socket a connection is queued on, or was accepted from:
    one on its local port and address (or the wildcard) whose owner is
    the connection's. The kernel gives an accepted socket its listener's
    uid (sk_uid, cloned with it; no unprivileged user can change it), and
    any user may listen on another's port where the kernel allows it (the
    IPv6 wildcard with IPV6_V6ONLY beside a v4-mapped connection, or after
    its server closed its listener): such a listener is not this socket's,
    and its holder was said to be where root's socket was inherited from."""
    ep = row.endpoints
    candidates = [r for r in listeners.get((ep.family, ep.lport), []) if r.uid == row.uid]
    wildcard = {"0.0.0.0", "::"}
    exact = [r for r in candidates if r.endpoints.laddr == ep.laddr]
    if exact:
        return exact[0]
    wild = [r for r in candidates if r.endpoints.laddr in wildcard]
    return wild[0] if wild else None


MAX_DENIED_NAMED = 3


# The fds listed of one process on one socket: a process can dup() a
# socket (its listener, say) tens of thousands of times, and every fd was a
# holder in the loop's memory, an fdinfo read in the lookup, and an entry
# in every record of every socket accepted from it (950 KB a line for
# 8,192, re-made for each). Its lowest fds; the rest are counted
# (holders_cut). Every process is listed: which processes hold a socket
# decides its diagnosis, its watch and who closed it.
FDS_LISTED_PER_PROCESS = 4


@dataclass(slots=True)
class HolderScan:
    """One pass over /proc/*/fd: who holds which wanted socket, and how many
    processes could not be looked at (permission denied)."""
    holders: dict[int, Sequence[Holder]] = field(default_factory=dict)
    # inode -> fds on it not in holders (FDS_LISTED_PER_PROCESS).
    cut: dict[int, int] = field(default_factory=dict)
    denied_pids: set[int] = field(default_factory=set)
    # pid -> the fd directory its holders were found in (/proc/PID/fd, or
    # a thread's), when the fd flags were not read in the scan.
    fd_dirs: dict[int, str] = field(default_factory=dict)
    # The processes whose fd tables were not read in time (FD_WALK_BUDGET_S).
    not_read_pids: list[int] = field(default_factory=list)


# How long one walk may spend reading the processes' fd links
# (scan_holders). A user may hold as many fds as RLIMIT_NOFILE allows in
# each of their processes (a million dup()s of /dev/null as uid 54321 made
# every owner lookup 3.9-9.8 s long here: about 4 us a link), and every
# lookup waited for them all. Past FDS_IN_ANY_ORDER fds in all, the tables
# of the users with the fewest fds are walked first: a user's own fds then
# delay the others' by at most this, and what is left when it is up is
# counted (Ownership.fds_not_read), never taken for "no holder". Times the
# testing knob's scale (knobs.time_scale: the kernel matrix's emulator).
FD_WALK_BUDGET_S = 2.0
FDS_IN_ANY_ORDER = 100_000
_LINKS_PER_CLOCK = 1024         # links read between two looks at the clock
# A table that has grown past twice its count and this many since it was
# counted is left, and counted as not read: the order rests on the counts,
# and a process that dup()s after them would spend the budget out of turn.
_GROWTH_SLACK = 1024
_clock = time.monotonic         # the walk's (tests count links read instead)


class _OutOfTime(Exception):
    """The walk's budget is spent (not a ProcError: no process's fault)."""


class _Outgrown(Exception):
    """A table far larger than it was counted (_GROWTH_SLACK)."""


def _fd_count(pid: int, proc: str, sized: bool) -> int:
    """What walking pid's tables costs, in fds (0 if it cannot be told):
    the fds of the table _fd_table reads (its directory's size where the
    kernel gives it, 6.2 on; else its entries), and one for each thread
    but the first (a kcmp each, to find those with a table of their own:
    _own_tables). A zombie leader's directory is empty, size 0, while a
    live thread's table holds any number (a review: such a user counted 0
    was walked first, and spent the budget); a thread's own table is not
    counted here (its fds past twice the count and _GROWTH_SLACK leave the
    process unread)."""
    try:
        count = os.stat(f"{proc}/{pid}/fd").st_size if sized else 0
        if not count:
            count = len(_fd_table(pid, proc)[1])
        threads = _thread_count(pid, proc)
        return count + max(0, threads - 1)
    except (OSError, procfs.ProcError):
        return 0


def _thread_count(pid: int, proc: str) -> int:
    """How many threads pid has (its task directory's links: "." and ".."
    and one a thread), 1 where that cannot be told (a file system not
    counting links, as a fake tree's may be: 1 link)."""
    try:
        links = os.stat(f"{proc}/{pid}/task").st_nlink
    except OSError:
        return 1
    return links - 2 if links > 2 else 1


def _fd_dirs_sized(proc: str) -> bool:
    """Whether this /proc's fd directories give their fd count as their
    size (Linux 6.2 on; this process always has some fds)."""
    try:
        return os.stat(f"{proc}/self/fd").st_size > 0
    except OSError:
        return False


def walk_order(proc: str) -> tuple[list[int], dict[int, int]]:
    """The pids whose fd tables a walk reads, in order, and how many fds
    each has: pid order when all hold at most FDS_IN_ANY_ORDER fds, else
    their users' (real uid; a subordinate uid counts as its user's:
    sockets/subids.py) by how many fds each holds in all, fewest first,
    and each user's the same way."""
    pids = list(procfs.pids(proc))
    sized = _fd_dirs_sized(proc)
    counts = {pid: _fd_count(pid, proc, sized) for pid in pids}
    if sum(counts.values()) <= FDS_IN_ANY_ORDER:
        return pids, counts
    share = subids.shares().user_of
    uid_of = {pid: share(procfs.real_uid(pid, proc)) for pid in pids}
    per_user: dict = {}
    for pid, n in counts.items():
        per_user[uid_of[pid]] = per_user.get(uid_of[pid], 0) + n
    return sorted(pids, key=lambda pid: (per_user[uid_of[pid]],
                                         -1 if uid_of[pid] is None else uid_of[pid],
                                         counts[pid], pid)), counts


O_CLOEXEC = 0o2000000


_FDINFO_OPEN = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
FDINFO_LIMIT = 4096


def _fd_cloexec(path: str, dir_fd: Optional[int] = None) -> Optional[bool]:
    """O_CLOEXEC from /proc/PID/fdinfo/FD (None when it cannot be read);
    path relative to dir_fd when given (an open /proc/PID/fdinfo: one path
    step per read instead of four). One read, when it holds the whole
    "flags:" line (the kernel writes it second: "pos:\t0\nflags:\t02000002\n
    ..."); else the file's first FDINFO_LIMIT bytes read to their end, as
    procfs.read_bytes does."""
    try:
        fd = os.open(path, _FDINFO_OPEN, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        first = os.read(fd, FDINFO_LIMIT + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    procfs.note_progress()
    # The first "flags:" starts a line and the line ends in what was read:
    # that line is the one the whole file's first lines give.
    at = first.find(b"flags:")
    if (at == 0 or (at > 0 and first[at - 1] == 0x0a)) and first.find(b"\n", at) > 0:
        return _cloexec_of(first)
    try:
        return _cloexec_of(procfs.read_bytes(path, FDINFO_LIMIT, dir_fd=dir_fd))
    except procfs.ProcError:
        return None


def _cloexec_flags(fd_dir: str, fds: list[int]) -> list[Optional[bool]]:
    """O_CLOEXEC of each fd of fd_dir (/proc/PID/fd or a thread's), from its
    fdinfo directory opened once; all None when that cannot be opened."""
    try:
        with procfs.opened_dir(fd_dir[:-2] + "fdinfo") as info_fd:
            return [_fd_cloexec(str(fd), info_fd) for fd in fds]
    except procfs.ResourceExhausted:
        raise
    except procfs.ProcError:
        return [None] * len(fds)     # as each read failing would say


def cloexec_where_decisive(owns: Iterable[Ownership], fd_dirs: dict[int, str]) -> None:
    """Reads close-on-exec for the holders whose flag can decide the
    diagnosis, after a scan that read none (scan_holders without fd_flags):
    a socket held by one process while another holds its listener is
    "inherited" when that holder's fd lacks it (diagnosis._decide); every
    other holder's flag is only shown (JSON, -v), and stays None. Read once
    per process, then its first fd's link checked as the scan checks it (a
    pid reused meanwhile leaves the flags unknown)."""
    wanted: dict[int, list[tuple[Holder, int]]] = {}
    for own in owns:
        if own.kind != OWNER_FD or not own.holders or not own.listener_holders:
            continue
        pids = {h.pid for h in own.holders}
        if all(h.pid in pids for h in own.listener_holders):
            continue
        for h in own.holders:
            wanted.setdefault(h.pid, []).append((h, own.inode))
    for pid, held in wanted.items():
        fd_dir = fd_dirs.get(pid)
        if fd_dir is None:
            continue
        try:
            flags = _cloexec_flags(fd_dir, [h.fd for h, _inode in held])
            first, inode = held[0]
            if procfs.readlink(f"{fd_dir}/{first.fd}") != f"socket:[{inode}]":
                continue
        except procfs.ResourceExhausted:
            raise
        except procfs.ProcError:
            continue
        for (h, _inode), flag in zip(held, flags):
            h.cloexec = flag


def _cloexec_of(raw: bytes) -> Optional[bool]:
    # The bytes as they are, without decoding the rest.
    for line in raw.splitlines():
        if line.startswith(b"flags:"):
            try:
                return bool(int(line.split()[1], 8) & O_CLOEXEC)
            except (IndexError, ValueError):
                return None
    return None


def _fd_table(pid: int, proc: str) -> tuple[str, list[str]]:
    """(the fd directory, its entries). Raises AccessDenied, NoSuchProcess."""
    fd_dir = f"{proc}/{pid}/fd"
    try:
        names = procfs.listdir(fd_dir)
    except procfs.NoSuchProcess:
        names = []
    if names:
        return fd_dir, names
    # A main thread that exited (pthread_exit) leaves a zombie leader whose
    # fd table is gone, while its other threads still hold the sockets:
    # read the table through one of them.
    for tid in procfs.list_dir(f"{proc}/{pid}/task"):
        if tid != str(pid):
            task_fd_dir = f"{proc}/{pid}/task/{tid}/fd"
            try:
                task_names = procfs.listdir(task_fd_dir)
            except procfs.NoSuchProcess:
                continue
            if task_names:
                return task_fd_dir, task_names
    return fd_dir, names


def _threads(pid: int, proc: str) -> Optional[frozenset]:
    """pid's thread ids, None when it has one thread (a stat: its task
    directory's links; a file system that does not count them, 1, is
    listed)."""
    try:
        links = os.stat(f"{proc}/{pid}/task").st_nlink
    except OSError:
        return None
    if links in (2, 3):
        return None
    return frozenset(int(n) for n in procfs.list_dir(f"{proc}/{pid}/task") if n.isdigit())


def _own_tables(pid: int, proc: str, read_tid: int, tids: frozenset,
                tick: Callable[[], None]) -> list[str]:
    """The fd directories of pid's threads (of tids) with a table of their
    own (unshare(CLONE_FILES)), other than read_tid's, the one _fd_table
    read: /proc/PID/fd shows only the leader's, and a socket kept only in
    such a table was "held by no process". Told apart from read_tid's
    table by kcmp, and from the thread before them (threads a thread
    starts after its unshare share its table): a table read twice is
    bounded by the walk's budget, and its sockets named once. Where kcmp
    cannot tell (a /proc not this process's own, as in tests; a kernel
    without it; a thread gone), the thread's. tick() every
    _LINKS_PER_CLOCK threads (the budget: a user's 28,000 threads cost
    0.4 s of kcmp and stat)."""
    same = _same_table(pid, proc)
    before = read_tid
    own = []
    for n, tid in enumerate(sorted(tids)):
        if n and not n % _LINKS_PER_CLOCK:
            tick()
        if tid == read_tid:
            continue
        if same(read_tid, tid) or (before != read_tid and same(before, tid)):
            continue
        before = tid
        own.append(f"{proc}/{pid}/task/{tid}/fd")
    return own


def _same_table(pid: int, proc: str) -> Callable[[int, int], bool]:
    """Whether two of pid's threads share one fd table: kcmp on this
    process's own /proc; in another tree (a test's), whether their fd
    directories are one (a thread's linked to its process's); a thread
    gone or a kernel without kcmp: not known to (its table is read)."""
    if proc == procfs.PROC:
        return lambda a, b: procfs.same_fd_table(a, b) is True
    return lambda a, b: (os.path.realpath(f"{proc}/{pid}/task/{a}/fd")
                         == os.path.realpath(f"{proc}/{pid}/task/{b}/fd"))


def _tables_moved(pid: int, proc: str, read_tid: int, tids: Optional[frozenset]) -> bool:
    """Whether pid, which had one fd table when it was read (its threads
    then: tids; None: one), has a thread with a table of its own now,
    where a socket it held may have gone (scan_holders)."""
    now = _threads(pid, proc)
    if now is None:
        return False
    same = _same_table(pid, proc)
    return any(not same(read_tid, tid) for tid in now - (tids or frozenset((pid,))))


def scan_holders(inodes: Iterable[int], batch: procfs.ProcBatch,
                 fd_flags: bool = True, budget_s: Optional[float] = None) -> HolderScan:
    """Every (process, fd) on each wanted socket inode. A process that exits
    while we look is a missing row; one we may not read is counted, and so
    are those left unread when budget_s (FD_WALK_BUDGET_S) is up
    (walk_order: the users with the most fds last).
    fd_flags: each holder's close-on-exec is read (one fdinfo read per fd);
    else left None (unknown) and the fd directories kept in fd_dirs, for
    cloexec_where_decisive."""
    wanted = set(inodes)
    scan = HolderScan()
    if not wanted:
        return scan
    proc = batch.proc
    readlink, socket_inode = procfs.readlink, procfs.socket_inode
    clock = _clock
    budget = FD_WALK_BUDGET_S * knobs.time_scale() if budget_s is None else budget_s
    # Time spent listing and reading links, the budget's measure: not the
    # fdinfo reads and holders of the sockets found, which a flood of
    # wanted sockets costs (1-2 s for 100,000 here), and whose holders must
    # all be named.
    spent = 0.0
    out_of_time = False
    order, counts = walk_order(proc)
    # pid -> (the thread whose table was read first, its threads then, None
    # for one), for the processes with one table: looked at again when a
    # wanted socket is not found. Those with threads with tables of their
    # own, whose sockets can move between them as they are read.
    threads_read: dict[int, tuple[int, Optional[frozenset]]] = {}
    several_tables: list[int] = []

    def tick() -> None:
        if spent + clock() - started >= budget:
            raise _OutOfTime

    def links_of(fd_dir: str, names: list[str], read_before: int, limit: int
                 ) -> list[tuple[int, int, str]]:
        """The (inode, fd, link) of one table's wanted sockets. Raises
        _OutOfTime when the budget is up, _Outgrown past limit links of the
        process (read_before of them in its tables before this one)."""
        matched: list[tuple[int, int, str]] = []
        # Each link read relative to the open fd directory: one path step
        # instead of four (/proc, the pid, fd, the fd), about a third of
        # each read's cost with 100,000 fds.
        with procfs.opened_dir(fd_dir) as dir_fd:
            for n, name in enumerate(names, read_before):
                if not n % _LINKS_PER_CLOCK and n:
                    tick()
                    if n > limit:
                        raise _Outgrown
                try:
                    link = readlink(name, dir_fd)
                except procfs.NoSuchProcess:
                    continue                # that fd was closed meanwhile
                except procfs.ProcError as e:
                    # A path longer than a page (ENAMETOOLONG): a file's,
                    # never a socket's ("socket:[N]"). Any user can open
                    # one; taken for the whole process's failure, it hid
                    # every socket that process holds ("no process holds
                    # it").
                    if e.errno != errno.ENAMETOOLONG:
                        raise
                    continue
                if not link.startswith("socket:["):
                    continue                # a file, a pipe...: never wanted
                inode = socket_inode(link)
                if inode is not None and inode in wanted and name.isdigit():
                    matched.append((inode, int(name), link))
        return matched

    for at, pid in enumerate(order):
        try:
            if spent >= budget:
                raise _OutOfTime
            started = clock()
            fd_dir, names = _fd_table(pid, proc)
            limit = 2 * counts.get(pid, 0) + _GROWTH_SLACK
            # The table /proc/PID/fd shows, then the tables of its threads
            # that have their own (_own_tables): one limit for them all.
            tables: list[tuple[str, list]] = []
            read = 0
            if names:
                tables.append((fd_dir, links_of(fd_dir, names, 0, limit)))
                read = len(names)
            read_tid = int(fd_dir.rsplit("/", 2)[-2]) if "/task/" in fd_dir else pid
            tids = _threads(pid, proc)
            own = _own_tables(pid, proc, read_tid, tids, tick) if tids else []
            if own:
                several_tables.append(pid)
            else:
                threads_read[pid] = (read_tid, tids)
            for own_dir in own:
                tick()                  # each table, however few its fds
                try:
                    own_names = procfs.listdir(own_dir)
                    tables.append((own_dir, links_of(own_dir, own_names, read, limit)))
                except procfs.NoSuchProcess:
                    # That thread ended (see several_tables); not its
                    # process, whose other tables were read.
                    continue
                read += len(own_names)
            spent += clock() - started
            if not any(matched for _dir, matched in tables):
                continue
            snap = batch.process(pid)
            # Flags read here unless the caller reads them where they decide
            # (cloexec_where_decisive, through fd_dirs: one directory a
            # process); here too when a thread's own table holds one (rare).
            read_flags = fd_flags or any(matched for table_dir, matched in tables
                                         if table_dir != fd_dir)
            found: list[tuple[int, int, Optional[bool]]] = []
            cut: dict[int, int] = {}
            held: set[int] = set()
            for table_dir, matched in tables:
                # A thread's own table is a copy of the leader's when made:
                # a socket in both is one holder, named by the first's fd.
                matched = [m for m in matched if m[0] not in held]
                if not matched:
                    continue
                # Every link found, for the check below: a holder that
                # closes its lowest fds meanwhile still holds the socket
                # through the others.
                walked = matched
                matched, unlisted = _fds_listed(matched)
                flags = (_cloexec_flags(table_dir, [fd for _inode, fd, _link in matched])
                         if read_flags else [None] * len(matched))
                # The pid could have been reused between the fd scan and
                # the reads above: an inode is unique while its socket
                # lives, so a link still there after them proves this
                # process holds it. Any one of them: a holder closing the
                # first (it is leaving CLOSE_WAIT) made every other socket
                # it holds "held by no process" in this lookup.
                if not _still_linked(table_dir, walked):
                    continue
                found.extend((inode, fd, flag)
                             for (inode, fd, _link), flag in zip(matched, flags))
                held.update(inode for inode, _fd, _link in walked)
                for inode, n in unlisted.items():
                    cut[inode] = cut.get(inode, 0) + n
            if found and not read_flags:
                scan.fd_dirs[pid] = fd_dir
        except _OutOfTime:
            # This one (what it showed so far not kept) and every one after
            # that has fds (not a kernel thread's empty table).
            scan.not_read_pids.extend(p for p in order[at:] if counts.get(p) or p == pid)
            out_of_time = True
            break
        except _Outgrown:
            spent += clock() - started
            scan.not_read_pids.append(pid)
            continue
        except procfs.ResourceExhausted:
            raise                           # nothing known: resolve() says so
        except procfs.AccessDenied:
            scan.denied_pids.add(pid)
            continue
        except procfs.ProcError:
            continue                        # gone, or dying: a missing row
        for inode, fd, flag in found:
            scan.holders.setdefault(inode, []).append(Holder.of(snap, fd, flag))
        for inode, n in cut.items():
            scan.cut[inode] = scan.cut.get(inode, 0) + n
    if not out_of_time and not wanted.issubset(scan.holders):
        # A wanted socket no table held. A process with threads with tables
        # of their own can move a socket from one to the next faster than
        # they are read (a thread's successor unshares, then it closes its
        # copy or ends: a review's found it "held by no process" 33 times
        # in 200 lookups, and a check of the threads after the read still
        # 2): such a process is not read whole, and the socket "unknown",
        # not "none"; so is one that had a single table when read and has
        # a thread with one of its own now.
        started = clock()
        unsure = set(scan.not_read_pids)
        scan.not_read_pids.extend(pid for pid in several_tables if pid not in unsure)
        left = [(pid, how) for pid, how in threads_read.items() if pid not in unsure]
        for at, (pid, (read_tid, tids)) in enumerate(left):
            if not at % _LINKS_PER_CLOCK and spent + clock() - started >= budget:
                scan.not_read_pids.extend(p for p, _how in left[at:])
                break
            try:
                if _tables_moved(pid, proc, read_tid, tids):
                    scan.not_read_pids.append(pid)
            except procfs.ResourceExhausted:
                raise
            except procfs.ProcError:
                continue                    # gone: its fds with it
        spent += clock() - started
    # Tuples: every lingering socket keeps its holders for as long as it
    # lingers (a list of one is 84 bytes in the loop, a tuple 48).
    scan.holders = {inode: tuple(sorted(holders, key=lambda h: (h.pid, h.fd)))
                    for inode, holders in scan.holders.items()}
    return scan


def _fds_listed(matched: list[tuple[int, int, str]]) -> tuple[list, dict[int, int]]:
    """One process's (inode, fd, link) matches, at most
    FDS_LISTED_PER_PROCESS of each inode (its lowest fds), and how many of
    each inode were left out: before any fdinfo read or Holder is made."""
    per_inode: dict[int, int] = {}
    for inode, _fd, _link in matched:
        per_inode[inode] = per_inode.get(inode, 0) + 1
    if max(per_inode.values()) <= FDS_LISTED_PER_PROCESS:
        return matched, {}
    kept, seen = [], {}
    for m in sorted(matched, key=lambda m: m[1]):
        n = seen.get(m[0], 0)
        if n < FDS_LISTED_PER_PROCESS:
            kept.append(m)
            seen[m[0]] = n + 1
    return kept, {inode: n - FDS_LISTED_PER_PROCESS for inode, n in per_inode.items()
                  if n > FDS_LISTED_PER_PROCESS}


def _still_linked(fd_dir: str, matched: list[tuple[int, int, str]]) -> bool:
    """Whether one of the (inode, fd, link) the scan matched still links to
    its socket. Raises ResourceExhausted or AccessDenied."""
    for _inode, fd, link in matched:
        try:
            if procfs.readlink(f"{fd_dir}/{fd}") == link:
                return True
        except (procfs.ResourceExhausted, procfs.AccessDenied):
            raise
        except procfs.ProcError:
            continue                    # closed meanwhile, or the process is gone
    return False


def find_holders(inodes: Iterable[int], proc: str = procfs.PROC) -> dict[int, Sequence[Holder]]:
    """One pass over /proc/*/fd: socket inode -> every (process, fd) on it."""
    return scan_holders(inodes, procfs.ProcBatch(proc)).holders


def held_now(inodes: list[int], proc: str = procfs.PROC) -> list[Optional[bool]]:
    """For each socket inode: whether some process has a descriptor on it
    now (one pass over /proc/*/fd). False only where none has and every
    process could be looked at; None where some could not (any of them
    may). A socket in CLOSE_WAIT that no process holds is in none of the
    kernel's tables for long: its last close() moves it to LAST_ACK (one
    passed in a unix socket's message, unreceived, is the exception)."""
    scan = scan_holders(inodes, procfs.ProcBatch(proc), fd_flags=False)
    unsure = bool(scan.denied_pids or scan.not_read_pids)
    return [True if scan.holders.get(inode) else (None if unsure else False)
            for inode in inodes]


def snapshot_close_wait(proc: str = procfs.PROC) -> list[tuple[int, TcpRow]]:
    """Every socket in CLOSE_WAIT right now, in every network namespace; each
    row's endpoints carry the namespace it was read in."""
    rows = []
    seen: set[tuple] = set()
    for netns, pid in procnet.network_namespaces(proc).items():
        for row in procnet.tcp_rows(pid, proc, states=[tcpstates.CLOSE_WAIT]):
            row = _in_namespace(row, netns)
            # Two pids may show one namespace (one moved meanwhile).
            key = (row.endpoints, row.inode)
            if key not in seen:
                seen.add(key)
                rows.append((row.endpoints.netns, row))
    return rows


class RescanRead(NamedTuple):
    """What one bounded read of every namespace's sockets saw
    (read_by_turns: a rescan, the start-up's read, a snapshot)."""
    rows: list[TcpRow]          # every socket in the states asked for that it saw
    dumped: set[int]            # the namespaces read whole
    tried: list[int]            # the other namespaces it had a turn for
    unread: list[int]           # those left for the next one (its budget spent)
    # The real uid of each other namespace's process (-1: not read): who
    # owns the unread ones, for the notice that says what was not read.
    uid_of: dict = {}
    cut: int = 0                # the namespace whose dump the budget cut short (0: none)
    # namespace -> (CLOCK_MONOTONIC ns) when its dump began and ended: each
    # row's tcp_info times were taken by the kernel in between (a read of
    # many namespaces takes its whole budget, 0.2 s; ages counted from one
    # time for all were off by that much, past their stated bounds).
    read_at: dict = {}

    @property
    def not_read(self) -> list[int]:
        """The namespaces known to be there and not read whole: those left
        for the next read, and the one the budget cut short. What a notice
        counts as not read."""
        return self.unread + ([self.cut] if self.cut else [])

    @property
    def left(self) -> list[int]:
        """Every other namespace not read whole: not_read, and those whose
        read failed through each of their processes (most likely gone with
        them; a later read lists them again if not). What a later read
        must try again, and never counts as read."""
        return self.unread + [netns for netns in self.tried if netns not in self.dumped]


def fair_order(owner_of: dict[int, int], last_read: dict[int, int]) -> list[int]:
    """The order in which a rescan reads namespaces other than the tracer's:
    the users who own them (owner_of: namespace -> uid) take turns, each
    user's least recently read first (last_read: namespace -> the number of
    the rescan that last read it; never read: first of all). A user with a
    thousand namespaces then delays another user's by one namespace a turn,
    not by a thousand."""
    return user_turns(owner_of, lambda netns: (last_read.get(netns, -1), netns),
                      lambda uid, netns: (last_read.get(netns, -1), uid, netns))


def user_turns(owner_of: dict[int, int], within: Callable[[int], tuple],
               across: Callable[[int, int], tuple]) -> list[int]:
    """Namespaces (owner_of: namespace -> uid) in turns of their users:
    each user's first (sorted by within(netns)), then each user's second,
    and so on; in one turn, sorted by across(user, netns). A subordinate
    uid takes its turns as its user's (sockets/subids.py): a user's
    containers, each under a uid of its own, are one user here, not
    thousands."""
    share = subids.shares().user_of
    by_user: dict = {}
    for netns, uid in owner_of.items():
        by_user.setdefault(share(uid), []).append(netns)
    keyed = []
    for user, spaces in by_user.items():
        spaces.sort(key=within)
        for turn, netns in enumerate(spaces):
            keyed.append((turn, across(user, netns), netns))
    keyed.sort()
    return [netns for *_key, netns in keyed]


def namespace_users(namespaces: dict[int, list[int]], own: Optional[int],
                    proc: str = procfs.PROC) -> dict[int, int]:
    """namespace -> the real uid (procfs.real_uid) of its first listed
    process, for every namespace but own; -1 where it cannot be read."""
    owner_of = {}
    for netns, pids in namespaces.items():
        if netns != own:
            uid = procfs.real_uid(pids[0], proc)
            owner_of[netns] = -1 if uid is None else uid
    return owner_of


def rescan_close_wait(proc: str = procfs.PROC, last_read: Optional[dict[int, int]] = None,
                      budget_s: float = float("inf"), with_info: bool = True,
                      only: Optional[Mapping[int, Collection[int]]] = None,
                      secret: bytes = b"") -> RescanRead:
    """Every socket in CLOSE_WAIT in the tracer's own namespace, and in the
    other namespaces with a process in them for at most budget_s more
    (read_by_turns). Only in the namespaces read whole (dumped) may a
    socket missing from the rows be taken as gone (a namespace read through
    a pid that went away meanwhile, or one not readable, says nothing).
    Only sock_diag can say so: on anything else (a procfs copy in tests)
    the rows are snapshot_close_wait's and no namespace counts as read.

    only: namespace -> census keys (tcprow.census_key with secret): the
    rows of those sockets alone, for a rescan that looks where two
    censuses found a difference (the loop's Tracker.rescan with the same
    only): at 100,000 sockets lingering, every row in the loop was 65 MB
    more at its peak, for the one that differed."""
    if not procnet.is_procfs(proc):
        read = RescanRead([row for _ns, row in snapshot_close_wait(proc)], set(), [], [])
    else:
        read = read_by_turns([tcpstates.CLOSE_WAIT], proc, last_read, budget_s, with_info)
    if only is None:
        return read
    return read._replace(rows=[row for row in read.rows
                               if census_key(row.endpoints, secret)
                               in only.get(row.endpoints.netns, ())])


class Census(NamedTuple):
    """owners.close_wait_census's answer: each namespace's sockets in
    CLOSE_WAIT as census keys (tcprow.census_key, an array of
    tcprow.CENSUS_ARRAY as bytes), and the read's turns (RescanRead's
    fields)."""
    keys: dict                  # namespace -> bytes
    dumped: set
    tried: list
    left: list
    # How long the read took in the worker (not what its answer then
    # waited for): the census's cost sets the next one's distance.
    took_s: float = 0.0


def close_wait_census(proc: str = procfs.PROC, last_read: Optional[dict[int, int]] = None,
                      budget_s: float = float("inf"),
                      socket_filter=None, secret: bytes = b"") -> Census:
    """The sockets in CLOSE_WAIT (rescan_close_wait's read, without
    tcp_info) that pass socket_filter, as census keys by namespace: what
    the loop compares with what it knows (live/tracer.py census) to tell whether
    the kernel's hook missed a socket's entry or exit without counting it.
    secret: the key of the keys' hash (the loop's own, tcprow.census_key).
    A full rescan's rows hold about 75 MB more in the loop with 100,000
    sockets lingering (docs/benchmarks.md); 100,000 keys are 800 KB."""
    started = time.monotonic()
    read = rescan_close_wait(proc, last_read, budget_s, with_info=False)
    keys: dict[int, array] = {}
    for row in read.rows:
        ep = row.endpoints
        if socket_filter is None or socket_filter.matches(ep):
            keys.setdefault(ep.netns, array(CENSUS_ARRAY)).append(census_key(ep, secret))
    return Census({netns: found.tobytes() for netns, found in keys.items()}, set(read.dumped),
                  list(read.tried), list(read.left), time.monotonic() - started)


def read_by_turns(states: list[int], proc: str = procfs.PROC,
                  last_read: Optional[dict[int, int]] = None,
                  budget_s: float = float("inf"), with_info: bool = True) -> RescanRead:
    """The TCP sockets in these states (sock_diag; proc a real procfs) in
    the tracer's own namespace, and in the other namespaces with a process
    in them for at most budget_s more, in fair_order, at least one each
    time so that every namespace has its turn: any user can make namespaces
    by the thousand (3-5 ms each to read), and whoever reads them (the
    loop's rescan, the start-up, a snapshot) waits for this. A namespace
    whose dump the budget cuts short gives the sockets read so far and is
    not read whole (not in dumped)."""
    rows: list[TcpRow] = []
    dumped: set[int] = set()
    read_at: dict[int, tuple[int, int]] = {}
    own = procnet.own_netns()
    namespaces, _denied = procnet.scan_network_namespace_pids(proc)

    def read(netns: Optional[int], deadline: Optional[float]) -> None:
        """Read whole: in dumped. Entered through each of its processes in
        turn until one answers for it: the first may have exited, or its
        pid been reused in another namespace, since the listing."""
        for pid in [None] if netns is None else namespaces[netns]:
            began = time.monotonic_ns()
            try:
                inode, found = sockdiag.tcp_sockets_in(
                    states, None if pid is None else f"{proc}/{pid}/ns/net", with_info,
                    deadline=deadline)
            except sockdiag.DumpCut:
                if netns is not None:
                    read_at[netns] = (began, time.monotonic_ns())
                raise
            except OSError as e:
                if e.errno in procfs.EXHAUSTED_ERRNOS:
                    raise procfs.ResourceExhausted("sock_diag", e.errno) from None
                continue        # the process left, or no sock_diag: not read through it
            if netns is not None and inode != netns:
                continue        # the pid was reused in another namespace
            dumped.add(inode)
            rows.extend(found)
            read_at[inode] = (began, time.monotonic_ns())
            return

    if own is not None:
        read(None, None)
    owner_of = namespace_users(namespaces, own, proc)
    order = fair_order(owner_of, last_read or {})
    deadline = time.monotonic() + budget_s
    for i, netns in enumerate(order):
        if i and time.monotonic() >= deadline:
            return RescanRead(rows, dumped, order[:i], order[i:], owner_of, read_at=read_at)
        try:
            read(netns, deadline if i else None)
        except sockdiag.DumpCut as cut:
            rows.extend(cut.rows)
            return RescanRead(rows, dumped, order[:i + 1], order[i + 1:], owner_of, netns,
                              read_at=read_at)
    return RescanRead(rows, dumped, order, [], owner_of, read_at=read_at)


def in_close_wait_now(wanted: list[Endpoints], proc: str = procfs.PROC,
                      which: Optional[Sequence[tuple[int, int]]] = None
                      ) -> list[Optional[bool]]:
    """For each socket: whether the kernel has it in CLOSE_WAIT now, asked
    of that one socket (sockdiag.lookup_each), not of a dump. A dump is read
    over many recv()s while sockets come and go, and may step over one (its
    place in a hash chain moved between two reads); a socket forgotten for
    that would never be reported again. With which, each socket's (cookie,
    inode) (tcprow.same_socket; zeros: any), only that very socket counts:
    another one on the same addresses since (the addresses reused, as
    anyone can at will) is not it.
    None where it cannot be told: its namespace not known, not entered, or
    not the one entered (a pid reused meanwhile). Not a real procfs (a copy
    in tests): read from its tables (every namespace at once)."""
    out: list[Optional[bool]] = [None] * len(wanted)
    which = list(which) if which is not None else [(0, 0)] * len(wanted)

    def is_it(i: int, row: Optional[TcpRow]) -> bool:
        return (row is not None and row.state == tcpstates.CLOSE_WAIT
                and same_socket(*which[i], row.cookie, row.inode) is not False)

    if not wanted:
        return out
    if not procnet.is_procfs(proc):
        here: dict[tuple, list[TcpRow]] = {}
        for _ns, row in snapshot_close_wait(proc):
            here.setdefault(row.endpoints.address_key, []).append(row)
        for i, ep in enumerate(wanted):
            rows = [row for row in here.get(ep.address_key, ())
                    if ep.same_socket_as(row.endpoints)]
            out[i] = any(is_it(i, row) for row in rows)
        return out
    by_netns: dict[int, list[int]] = {}
    for i, ep in enumerate(wanted):
        if ep.netns:
            by_netns.setdefault(ep.netns, []).append(i)
    own = procnet.own_netns()
    namespaces = procnet.network_namespaces(proc) if set(by_netns) - {own} else {}
    for netns, indexes in by_netns.items():
        if netns == own:
            ns_path = None
        elif netns in namespaces:
            ns_path = f"{proc}/{namespaces[netns]}/ns/net"
        else:
            continue
        try:
            inode, rows = sockdiag.lookup_each([wanted[i] for i in indexes], ns_path)
        except OSError as e:
            if e.errno in procfs.EXHAUSTED_ERRNOS:
                raise procfs.ResourceExhausted("sock_diag", e.errno) from None
            continue
        if inode != netns:
            continue
        for i, row in zip(indexes, rows):
            out[i] = is_it(i, row)
    return out


def _in_namespace(row: TcpRow, netns: int) -> TcpRow:
    """The row with its namespace: as read (exact), else the one of the pid
    it was read through."""
    if row.endpoints.netns or not netns:
        return row
    return dataclasses.replace(row, endpoints=row.endpoints.in_netns(netns))


class LookupMemory(NamedTuple):
    """What a caller keeps of its earlier owner lookups (from each answer's
    netns_uid and netns_read_s), for the next one's turns (other_turns) and
    budget: the number of the lookup that last read each namespace, and
    one of each user's, and how long each namespace's last read took."""
    last_read: dict = {}        # namespace -> lookup number
    served: dict = {}           # uid -> lookup number
    read_s: dict = {}           # namespace -> seconds (the budget, if cut)


def resolve(wanted: Iterable[Endpoints], proc: str = procfs.PROC,
            batch: Optional[procfs.ProcBatch] = None,
            fd_flags: bool = True,
            others_budget_s: float = float("inf"),
            memory: LookupMemory = LookupMemory()) -> dict[Endpoints, Ownership]:
    """Ownership of each socket in CLOSE_WAIT with these endpoints, looked up
    in the endpoints' own namespace (netns), or, when that is 0 (unknown), in
    every namespace: found in several, it is OWNER_AMBIGUOUS. Pass the
    batch's ProcBatch to share its process reads (one is made if not).
    Out of file descriptors, every socket is OWNER_UNREADABLE: never gone.
    Without fd_flags, a holder's close-on-exec is read only where it can
    decide the diagnosis (cloexec_where_decisive), None elsewhere: for an
    output that shows it nowhere (snapshot's text without -v), one fdinfo
    read per socket less.
    others_budget_s: how long the namespaces other than the tracer's own
    may take once it is read, at least one whatever it costs (other_turns);
    the sockets of those left are OWNER_NOT_READ. Not applied when a
    socket's namespace is unknown (0): every namespace must be read to
    find it. memory: the caller's earlier lookups (LookupMemory): whose
    turn it is, and which namespace would not fit in what is left of the
    budget by the time its last read took (one never read is tried, and
    its dump cut at the deadline)."""
    wanted = list(wanted)
    # The namespaces as their sockets come: the budget's order (other_turns).
    order = (list(dict.fromkeys(ep.netns for ep in wanted))
             if others_budget_s != float("inf") else [])
    wanted = set(wanted)
    if not wanted:
        return {}
    try:
        return _resolve(wanted, proc, batch, fd_flags, order, others_budget_s, memory)
    except procfs.ResourceExhausted as exc:
        return {ep: Ownership(kind=OWNER_UNREADABLE, error=str(exc)) for ep in wanted}


def _named(pids: list[int], proc: str) -> list[str]:
    """The first MAX_DENIED_NAMED of pids as "pid/comm", so that "may be
    missing" can be checked (the count says how many); comm is the kernel's
    16 bytes, whoever chose it."""
    return [f"{pid}/{(procfs.read_text(f'{proc}/{pid}/comm') or '?').strip()}"
            for pid in pids[:MAX_DENIED_NAMED]]


def other_turns(namespaces: dict[int, list[int]], own: Optional[int], order: Sequence[int],
                last_read: dict[int, int], served: dict[int, int],
                proc: str = procfs.PROC) -> tuple[list[int], dict[int, int]]:
    """The order an owner lookup reads the namespaces other than own in,
    and the user of each (namespace_users' uid; a subordinate uid as its
    user's, sockets/subids.py): the users take turns, the one
    least recently served by an earlier lookup first (served: uid -> the
    number of the lookup that last read one of theirs), each user's least
    recently read namespace first (last_read: namespace -> that number),
    then as their sockets come in order (the caller's oldest first). A
    user's many or slow namespaces then put off another user's by one a
    turn, not by all of them, and lookups with time for one namespace serve
    the users in turn."""
    rank = {netns: i for i, netns in enumerate(order)}
    # By user: the turns, and what a lookup remembers of them (served, by
    # the answer's netns_uid) and its slowest read per user.
    share = subids.shares().user_of
    uid_of = {netns: share(uid) for netns, uid in namespace_users(namespaces, own, proc).items()}
    turns = user_turns(
        uid_of, lambda netns: (last_read.get(netns, -1), rank.get(netns, len(rank))),
        lambda uid, netns: (served.get(uid, -1), rank.get(netns, len(rank)), uid))
    return turns, uid_of


def _resolve(wanted: set, proc: str, batch: Optional[procfs.ProcBatch],
             fd_flags: bool = True, order: Sequence[int] = (),
             others_budget_s: float = float("inf"),
             memory: LookupMemory = LookupMemory()) -> dict:
    addresses = {ep.address_key for ep in wanted}
    # Only these rows are made of the tables' sockets in CLOSE_WAIT (and
    # every listener): a lookup of a few among 100,000 made 100,000 rows.
    ports = sockdiag.port_pairs((ep.lport, ep.rport) for ep in wanted)
    # address key -> {(netns, inode): row}: one entry per socket, however
    # many pids showed its namespace.
    matches: dict[tuple, dict[tuple, TcpRow]] = {}
    listeners_by_ns: dict[int, dict[tuple, list[TcpRow]]] = {}
    namespaces, netns_denied = procnet.scan_network_namespace_pids(proc)
    in_namespaces = {ep.netns for ep in wanted}
    if 0 not in in_namespaces:
        # Every socket's namespace is known: only those are entered. A user
        # who makes thousands of namespaces delays nobody else's report.
        namespaces = {ns: pids for ns, pids in namespaces.items() if ns in in_namespaces}
    unread: set[int] = set()
    budgeted = 0 not in in_namespaces and others_budget_s != float("inf")
    own_ns = procnet.own_netns() if budgeted else None
    uid_of: dict[int, int] = {}
    if budgeted:
        turns, uid_of = other_turns(namespaces, own_ns, order, memory.last_read,
                                    memory.served, proc)
        namespaces = {netns: namespaces[netns]
                      for netns in ([own_ns] if own_ns in namespaces else []) + turns}
    deadline: Optional[float] = None
    others_read = 0
    took: dict[int, float] = {}     # other namespace -> seconds its read took here
    read_whole: set[int] = set()    # the namespaces whose tables were read
    slowest_of: dict = {}           # user -> the longest of their reads here
    for netns, pids in namespaces.items():
        other = budgeted and netns != own_ns
        started = time.monotonic()
        if other:
            # The budget starts with the first other namespace: the time
            # the tracer's own takes is not theirs to spend.
            if deadline is None:
                deadline = started + others_budget_s
            # After the first: not one that would not fit (a dump cut at
            # the deadline is work thrown away: a 16M-bucket one is cut
            # only after its 140 ms), by its own last read, or if never
            # read by its user's slowest in this lookup: after one user's
            # slow namespace another user's fast ones still fit, and the
            # next of the same user's slow ones is not started to be cut.
            elif started + memory.read_s.get(
                    netns, slowest_of.get(uid_of.get(netns), 0.0)) >= deadline:
                unread.add(netns)
                continue
        # Without tcp_info: only addresses, queues and inodes are used here.
        # Through its next process when the first is gone (namespace_rows).
        # After the first other namespace, a dump the deadline cuts short
        # leaves the namespace unread: a socket missing from part of a
        # table has not left CLOSE_WAIT.
        try:
            rows = procnet.namespace_rows(netns, pids, proc,
                                          states=[tcpstates.CLOSE_WAIT, tcpstates.LISTEN],
                                          times=False,
                                          deadline=deadline if other and others_read else None,
                                          ports=ports)
        except sockdiag.DumpCut:
            # It takes longer than what was left: the budget, for the next
            # lookups' estimate (then read whole only as a lookup's first).
            took[netns] = others_budget_s
            unread.add(netns)
            continue
        read_whole.add(netns)
        if other:
            others_read += 1
            took[netns] = time.monotonic() - started
            uid = uid_of.get(netns)
            slowest_of[uid] = max(slowest_of.get(uid, 0.0), took[netns])
        for row in rows:
            row = _in_namespace(row, netns)
            ep = row.endpoints
            if row.state == tcpstates.LISTEN:
                listeners_by_ns.setdefault(ep.netns, {}).setdefault(
                    (ep.family, ep.lport), []).append(row)
                continue
            key = ep.address_key
            if key in addresses:
                matches.setdefault(key, {})[(ep.netns, row.inode)] = row

    result: dict[Endpoints, Ownership] = {}
    needed_inodes: set[int] = set()
    # The listener of a socket depends on its namespace, family, port and
    # address only: looked up once for the many sockets of one server.
    listener_of: dict[tuple, Optional[TcpRow]] = {}
    for endpoints in wanted:
        if endpoints.netns in unread:
            result[endpoints] = Ownership(kind=OWNER_NOT_READ)
            continue
        found = list(matches.get(endpoints.address_key, {}).values())
        if endpoints.netns and not (len(found) == 1
                                    and found[0].endpoints.netns == endpoints.netns):
            found = [row for row in found if row.endpoints.netns == endpoints.netns]
        if not found:
            # Not in its own namespace, read: gone, whoever else hid theirs.
            # Its namespace not known or not read: if some processes hid
            # theirs from us, it may well be in one of those: unknown.
            hidden = netns_denied and endpoints.netns not in read_whole
            result[endpoints] = (Ownership(kind=OWNER_DENIED, netns_denied=len(netns_denied))
                                 if hidden else Ownership(kind=OWNER_GONE))
            continue
        if len(found) > 1:
            # Its namespace unknown, and these addresses in several: naming
            # any one's holder could name another socket's.
            result[endpoints] = Ownership(
                kind=OWNER_AMBIGUOUS,
                other_netns=sorted({row.endpoints.netns for row in found}))
            continue
        row = found[0]
        netns = row.endpoints.netns
        own = Ownership(kind=OWNER_FD, netns=netns or None, inode=row.inode,
                        cookie=row.cookie, rx_queue=row.rx_queue)
        ep = row.endpoints
        key = (netns, ep.family, ep.lport, ep.laddr, row.uid)
        if key in listener_of:
            own.listener = listener_of[key]
        else:
            own.listener = listener_of[key] = _listener_for(row, listeners_by_ns.get(netns, {}))
        if own.listener is not None and own.listener.inode:
            needed_inodes.add(own.listener.inode)
        if row.inode == 0:
            own.kind = OWNER_ACCEPT_QUEUE
        else:
            needed_inodes.add(row.inode)
        result[endpoints] = own
    if uid_of:
        for endpoints, own in result.items():
            own.netns_uid = uid_of.get(endpoints.netns)
            own.netns_read_s = took.get(endpoints.netns)

    scan = scan_holders(needed_inodes, batch if batch is not None else procfs.ProcBatch(proc),
                        fd_flags)
    denied = len(scan.denied_pids)
    named = _named(sorted(scan.denied_pids), proc)
    # The first left are those with the fewest fds (walk_order).
    not_read = ((len(scan.not_read_pids), _named(scan.not_read_pids, proc))
                if scan.not_read_pids else None)
    for own in result.values():
        own.denied_processes = denied
        own.denied_named = named
        own.fds_not_read = not_read
        if own.kind == OWNER_FD:
            own.holders = scan.holders.get(own.inode, ())
            if not own.holders:
                own.kind = (OWNER_DENIED if denied
                            else OWNER_FDS_NOT_READ if not_read else OWNER_NONE)
        if own.listener is not None:
            own.listener_holders = scan.holders.get(own.listener.inode, ())
        if scan.cut:
            cut = (scan.cut.get(own.inode, 0) if own.kind == OWNER_FD else 0,
                   scan.cut.get(own.listener.inode, 0) if own.listener is not None else 0)
            if cut != (0, 0):
                own.holders_cut = cut
    if not fd_flags:
        cloexec_where_decisive(result.values(), scan.fd_dirs)
    return result
