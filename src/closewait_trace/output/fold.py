"""Which holder processes read as one line: the children of one server
(pure). `snapshot`'s footer, `top`'s rows by process and `report`'s table
by program all fold by this one definition, so that the three views agree
(10,000 PostgreSQL backends, socat fork, an inetd's children, a server's
children that inherited its fds: one line each, not one per process).

Processes fold together when the kernel says they are forks of one server:
the same server process (their parent pid; a holder whose parent is itself
known, running the same executable as the same user, belongs to that
parent's server: a server that keeps copies of what its children hold is
in its children's line), the same user (real uid) and the same executable
(the /proc/PID/exe link as the kernel gives it). The server is a pid,
which nobody chooses; two folded lines whose name and program read alike
say their server's pid ("(5 processes of 1234)"), whatever their counts:
a user whose processes run the same binary under the same name, or a
binary that a mount namespace of their own shows at root's server's path,
get a line of their own that says whose they are. Never by comm, argv or anything else a
process sets for itself. The children of pid 1 never fold: under an init
(systemd) every service is one, and two services that run one program are
not forks of one server. A process whose parent, user or executable is
not known folds with nothing: it is shown as one process, as before. Where the
executable alone is not known (a recording whose process record was not
written: more than 256 holders in one batch; not root, another user's
exe link), the comm stands in for it, marked, only among the processes of
one parent and one user: a server's own children, never a stranger's
process (its parent or uid differs); the label says "program unknown".

The names in a label (comm, the exe path) are the processes' own words or
paths a user chose: escaped, and the path cut in the middle so the label
stays well within the 80 columns of a line.
"""

from __future__ import annotations

from typing import Callable

from closewait_trace.output import textsafe

UNKNOWN = "\0comm:"       # a stand-in exe: no path has a NUL in it
MAX_CLIMB = 16          # parents followed per process (each key is memoized)
MAX_EXE = 40            # columns of an exe path in a folded line's label
MIN_EXE = 12            # columns of it at least, in a narrow view (top)
MAX_COMM = 16           # columns of a comm (15 bytes, escaped: up to 60)


class Fold:
    """The fold key of each holder process, from what the kernel says of it:
    add() every holder first (pid, parent pid, uid, exe link), then key().
    Work is bounded per holder (MAX_CLIMB steps, once: memoized)."""

    __slots__ = ("_facts", "_keys", "_parents", "_parent_keys", "limit")

    def __init__(self, limit: int = 0) -> None:
        self._facts: dict = {}          # pid -> (ppid, uid, exe)
        self._keys: dict = {}           # pid -> key, memoized
        self._parents: set = set()      # every ppid of _facts (and some forgotten)
        # (ppid, uid, exe) of every process of _facts (and some forgotten):
        # a process is a server of its own when it is a parent of one that
        # runs its exe as its user.
        self._parent_keys: set = set()
        # A long-lived fold (top's) remembers this many processes, the
        # oldest forgotten; 0: all it is given (one batch's holders).
        self.limit = limit

    def add(self, pid, ppid, uid, exe, comm=None) -> None:
        """exe: the kernel's exe link (or its label); when that is not
        known, comm stands in, marked (see above)."""
        if not isinstance(exe, str) or not exe:
            exe = UNKNOWN + comm if isinstance(comm, str) else ""
        # Numbers from a recording are anyone's: only ints are pids and uids.
        ppid, uid = _number(ppid), _number(uid)
        facts = (ppid, uid, exe)
        old = self._facts.get(pid)
        if old == facts:
            return
        if old is not None or pid in self._parents or ppid in self._facts:
            # A pid reused, a new holder that is another's parent, or the
            # child of a known one (its parent becomes a server): keys
            # worked out before may change.
            self._keys.clear()
        else:
            self._keys.pop(pid, None)
        self._facts[pid] = facts
        self._parents.add(ppid)
        self._parent_keys.add(facts)
        if self.limit and len(self._facts) > self.limit:
            del self._facts[next(iter(self._facts))]
            self._keys.clear()
            if len(self._parents) > 2 * self.limit:
                self._parents = {f[0] for f in self._facts.values()}
                self._parent_keys = set(self._facts.values())

    def add_holder(self, h) -> None:
        """An owners.Holder (the live tracer's and snapshot's holders: ppid
        and uid from /proc/PID/stat and status, the exe link from the owner
        lookup's read, procfs.ProcBatch)."""
        process = getattr(h, "process", None)
        self.add(h.pid, getattr(h, "ppid", None), getattr(h, "uid", None),
                 getattr(process, "exe", ""), getattr(h, "comm", None))

    def __contains__(self, pid) -> bool:
        return pid in self._facts

    def __len__(self) -> int:
        return len(self._facts)

    def key(self, pid) -> tuple:
        """("server", server pid, uid, exe) for a process that folds with
        the other forks of its server: the server is the topmost of its
        known ancestors that run the same exe as the same user when that
        one is itself a parent of such a process (a server holding sockets
        too), else the process's parent (one not known: not a holder, in a
        snapshot). ("pid", pid) for one whose parent, uid or exe is not
        known, or whose server would be pid 1 (or 0)."""
        k = self._keys.get(pid)
        if k is None:
            k = self._keys[pid] = self._key(pid)
        return k

    def _key(self, pid) -> tuple:
        facts = self._facts.get(pid)
        if facts is None:
            return ("pid", pid)
        ppid, uid, exe = facts
        if ppid is None or uid is None or not exe:      # add() kept ints or None
            return ("pid", pid)
        # The process itself, when it has a known child of its exe and user
        # (a server that holds sockets too); else its parent (in a snapshot
        # not known: the listening server holds no socket in CLOSE_WAIT).
        # Then up through known ancestors of the same exe and user: the
        # topmost is the server.
        server = pid if (pid, uid, exe) in self._parent_keys else ppid
        seen = {pid}
        for _ in range(MAX_CLIMB):
            up = self._facts.get(server)
            if up is None or up[1] != uid or up[2] != exe:
                break
            seen.add(server)
            if up[0] in seen or not self._same(up[0], uid, exe):
                break           # server is the topmost of the chain
            server = up[0]
        if server <= 1:
            return ("pid", pid)
        return ("server", server, uid, exe)

    def _same(self, pid, uid, exe) -> bool:
        """pid is known and runs exe as uid."""
        facts = self._facts.get(pid)
        return facts is not None and facts[1] == uid and facts[2] == exe


def _number(value):
    """value when it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def of_holders(holders) -> Fold:
    """A Fold of owners.Holder objects (Fold.add_holder)."""
    fold = Fold()
    for h in holders:
        fold.add_holder(h)
    return fold


class Members:
    """The processes of one fold key seen so far: how many, and the comm of
    the lowest pid (the label's name: any member's would do, they run one
    executable; the lowest pid is the same in every view)."""

    __slots__ = ("pids", "comm", "_low")

    def __init__(self) -> None:
        self.pids: set = set()
        self.comm = "?"
        self._low = None

    def add(self, pid, comm) -> None:
        self.pids.add(pid)
        if self._low is None or (isinstance(pid, int) and pid < self._low):
            self._low, self.comm = pid, comm if isinstance(comm, str) else "?"

    @property
    def lowest(self):
        return self._low


def folded_label(comm, exe, processes: int, columns: int = 0, server=None) -> str:
    """'socat [/usr/bin/socat] (4 processes)', escaped; the comm cut to
    MAX_COMM columns and the path in the middle to MAX_EXE (both ends say
    the most): with up to a million processes, at most 80 columns.
    columns: the label's own room (a view's column), the path cut to fit
    it (at least MIN_EXE), so that the count is never what is cut off.
    server: the server's pid, '(4 processes of 1234)', for a line that
    would read like another's but for its count (see labels)."""
    if not exe or exe.startswith(UNKNOWN):
        exe = "program unknown"
    count = (f" ({processes} processes of {server})" if server is not None
             else f" ({processes} processes)")
    name_room, room = MAX_COMM, MAX_EXE
    if columns:
        # The count whole, then the comm and the path share what is left
        # (the path at least MIN_EXE): a hostile comm escapes to 60 columns.
        name_room = max(4, min(MAX_COMM, columns - len(count) - 3 - MIN_EXE))
    name = textsafe.cut(textsafe.escape(comm), name_room)
    if columns:
        room = max(MIN_EXE, min(MAX_EXE, columns - textsafe.width_of_escaped(name)
                                - len(count) - 3))
    return f"{name} [{textsafe.cut_middle(textsafe.escape(exe), room)}]{count}"


def labels(groups: dict, single: Callable[[object], str], exe_of: Callable[[tuple], str],
           columns: int = 0) -> dict:
    """key -> label of each group of processes (key -> Members): a single
    process as single(its pid) says (as each view showed it before), a
    fold as folded_label (within columns, if given). Folds whose name and
    program read alike (two servers of one program; a user's process that
    runs it, or that a mount namespace of its own shows at its path) say
    their server's pid, which nobody chooses, whatever their counts; one
    server's children of one program as two users say their user too."""
    out: dict = {}
    alike: dict = {}
    for key, members in groups.items():
        if len(members.pids) <= 1 or key[0] != "server":
            out[key] = single(members.lowest)
            continue
        alike.setdefault((members.comm, exe_of(key)), []).append(key)
    for (comm, exe), keys in alike.items():
        servers = {key[1] for key in keys}
        for key in keys:
            n = len(groups[key].pids)
            text = folded_label(comm, exe, n, columns,
                                server=key[1] if len(keys) > 1 else None)
            if len(keys) > len(servers):
                text = text[:-1] + f", uid {key[2]})"
            out[key] = text
    return out


def server_exe(key: tuple) -> str:
    """The exe of a ("server", ppid, uid, exe) key."""
    return key[3] if key and key[0] == "server" else ""
