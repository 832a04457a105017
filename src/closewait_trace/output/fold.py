"""Which holder processes read as one line: the children of one server
(pure). `snapshot`'s footer, `top`'s rows by process and `report`'s table
by program all fold by this one definition, so that the three views agree
(10,000 PostgreSQL backends, socat fork, an inetd's children, a server's
children that inherited its fds: one line each, not one per process).

Processes fold together when the kernel says they are forks of one server:
the same executable (the /proc/PID/exe link as the kernel gives it), the
same user (real uid) and the same parent pid. A holder whose parent is
itself a holder running the same executable as the same user folds into
its parent's line (a server that keeps copies of what its children hold).
Never by comm, argv or anything else a process sets for itself: a user's
process named "postgres", even one running the same binary, has another
parent and another uid than root's postmaster's backends, so it never
lands in their line. A process whose parent, user or executable is not
known folds with nothing: it is shown as one process, as before. Where the
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

    __slots__ = ("_facts", "_keys", "_parents", "limit")

    def __init__(self, limit: int = 0) -> None:
        self._facts: dict = {}          # pid -> (ppid, uid, exe)
        self._keys: dict = {}           # pid -> key, memoized
        self._parents: set = set()      # every ppid of _facts (and some forgotten)
        # A long-lived fold (top's) remembers this many processes, the
        # oldest forgotten; 0: all it is given (one batch's holders).
        self.limit = limit

    def add(self, pid, ppid, uid, exe, comm=None) -> None:
        """exe: the kernel's exe link (or its label); when that is not
        known, comm stands in, marked (see above)."""
        if not isinstance(exe, str) or not exe:
            exe = UNKNOWN + comm if isinstance(comm, str) else ""
        facts = (ppid, uid, exe)
        old = self._facts.get(pid)
        if old == facts:
            return
        if old is not None or pid in self._parents:
            # A pid reused, or a new holder that is another's parent: keys
            # worked out before may change.
            self._keys.clear()
        else:
            self._keys.pop(pid, None)
        self._facts[pid] = facts
        self._parents.add(ppid)
        if self.limit and len(self._facts) > self.limit:
            del self._facts[next(iter(self._facts))]
            self._keys.clear()
            if len(self._parents) > 2 * self.limit:
                self._parents = {f[0] for f in self._facts.values()}

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
        """("server", parent pid, uid, exe) for a process that folds with
        the other forks of its server (the key of its topmost ancestor among
        the holders that runs the same exe as the same user); ("pid", pid)
        for one whose parent, uid or exe is not known."""
        k = self._keys.get(pid)
        if k is None:
            k = self._keys[pid] = self._key(pid)
        return k

    def _key(self, pid) -> tuple:
        facts = self._facts.get(pid)
        if facts is None:
            return ("pid", pid)
        ppid, uid, exe = facts
        if (not isinstance(ppid, int) or isinstance(ppid, bool) or not isinstance(uid, int)
                or isinstance(uid, bool) or not exe):
            return ("pid", pid)
        seen = {pid}
        for _ in range(MAX_CLIMB):
            up = self._facts.get(ppid)
            if up is None or up[1] != uid or up[2] != exe or ppid in seen:
                break
            seen.add(ppid)
            ppid = up[0]
            if not isinstance(ppid, int) or isinstance(ppid, bool):
                return ("pid", pid)
        return ("server", ppid, uid, exe)


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


def folded_label(comm, exe, processes: int, columns: int = 0) -> str:
    """'socat [/usr/bin/socat] (4 processes)', escaped; the comm cut to
    MAX_COMM columns and the path in the middle to MAX_EXE (both ends say
    the most): with up to a million processes, at most 80 columns.
    columns: the label's own room (a view's column), the path cut to fit
    it (at least MIN_EXE), so that the count is never what is cut off."""
    if not exe or exe.startswith(UNKNOWN):
        exe = "program unknown"
    count = f" ({processes} processes)"
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
    fold as folded_label (within columns, if given); two folds that would
    read the same (two servers of one program as one user) say their
    parent's pid."""
    out: dict = {}
    seen: dict = {}
    for key, members in groups.items():
        if len(members.pids) <= 1 or key[0] != "server":
            out[key] = single(members.lowest)
            continue
        text = folded_label(members.comm, exe_of(key), len(members.pids), columns)
        out[key] = text
        seen.setdefault(text, []).append(key)
    for text, keys in seen.items():
        if len(keys) > 1:
            for key in keys:
                out[key] = text[:-1] + f" of parent {key[1]})"
    return out


def server_exe(key: tuple) -> str:
    """The exe of a ("server", ppid, uid, exe) key."""
    return key[3] if key and key[0] == "server" else ""
