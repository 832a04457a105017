"""The output records, defined once.

Every record the tool writes (--json, recordings, snapshot) is a plain dict
of one of the TypedDicts below, told apart by its `type`. These definitions
are the schema: the builders in records.py are typed against them, readers
of recordings check every record against them before use (`problem`), the
schema tables in docs/schema.md are tested against them, and old recordings are brought
to the current shape by `upgrade` so that the renderer and the report know
one shape only.

Extra keys are tolerated on reading (a newer writer may add fields); missing
ones, wrong types and non-finite numbers are not. The check is written here
against the TypedDicts (a few dozen lines) rather than taken from a library:
the tool's runtime comes from the distribution's packages alone, and none of
Debian's validators checks TypedDicts strictly (no "5" for 5, no 1 for true).
"""

# No `from __future__ import annotations`: TypedDict must see NotRequired.
from typing import Annotated, Any, Literal, NotRequired, Optional, TypedDict, Union

import math
import re
import typing
from dataclasses import dataclass

# Version 2: each fact once. A linger record's holders are in `owners` only
# (with close-on-exec, exiting and tracer, which version 1 kept in a second
# copy under diagnosis.evidence.holders), the listener in `listener` only, and
# unread_bytes/eof_read at the top only; the evidence refers to holders by
# pid and fd.
#
# Version 3: a linger record's `code`, where in the holder's code its
# socket was read to its end (older records get it with the reason it is
# not known).
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# What `code` says of a record written before it existed.
CODE_NOT_RECORDED = "not recorded (written by an older version)"


@dataclass(frozen=True)
class Range:
    """Bounds of a number field (Annotated metadata)."""
    ge: float
    le: float = float("inf")


# Numbers a hostile file could make absurd: bounded so that a reader can do
# arithmetic on them (NaN and infinities fail these bounds).
Seconds = Annotated[float, Range(0, 1e12)]
Epoch = Annotated[float, Range(0, 1e11)]
Pid = Annotated[int, Range(0, 1 << 32)]
Port = Annotated[int, Range(0, 65535)]
Fd = Annotated[int, Range(-1, (1 << 31) - 1)]     # an int in the kernel
# Counts, each bounded by what it counts: a count no machine can have (2**80
# more fds on a socket, a 4,000-digit number) is a lie of a crafted file,
# refused like any invalid record (counted as damaged), never stated as a
# fact ("and 1208925819614629174706176 more fds on it"; the report's
# "N holder(s) past the first 4"). Each bound is far above the writer's.
Count = Annotated[int, Range(0, (1 << 63) - 1)]   # anything counted: an int64
# fds on one socket that a record does not list: below 2^31 (one process
# has at most nr_open fds, whose ceiling is under 2^31; 2^31 fds would be
# 16 GB of fd tables; the owner walk reads some 500,000 links in its 2 s).
FdCount = Annotated[int, Range(0, (1 << 31) - 1)]
# Processes or threads: each takes a pid, of which there are at most
# PID_MAX_LIMIT (4,194,304) at once.
Tasks = Annotated[int, Range(0, 1 << 22)]
# The kernel's queue lengths (accept queue, backlog, bytes not read): u32.
Queue = Annotated[int, Range(0, (1 << 32) - 1)]
# A log2 histogram bucket's bounds in microseconds: 64 slots, the last
# ending at 2^63 (records.py).
Micros = Annotated[int, Range(0, 1 << 63)]

AgeSource = Literal["traced", "estimated", "lower_bound", "range"]


@dataclass(frozen=True)
class MaxLen:
    """A string field's bound (Annotated metadata). truncate=False: a longer
    value is not one the field can have (a lie of a crafted file), and the
    record is refused; otherwise it is cut, and the cut marked."""
    chars: int
    truncate: bool = True


# Every string a record carries is at most MAX_TEXT characters followed by
# TRUNCATED: a longer one is cut there on reading (cap()), so that no name,
# path or text in a recording costs a reader more than this, however long
# the line. A command line is written so already (procfs.MAX_CMDLINE, the
# first 4096 bytes and " [...]"); paths, symbols and texts get the same cap.
MAX_TEXT = 4096
TRUNCATED = " [...]"
# A process name is at most 15 bytes in the kernel (TASK_COMM_LEN 16 with
# its NUL), each byte decoded to one character at most: a longer one did not
# come from the kernel, and the record that carries it is refused.
MAX_COMM = 15
Comm = Annotated[str, MaxLen(MAX_COMM, truncate=False)]


@dataclass(frozen=True)
class MaxItems:
    """A list field's bound (Annotated metadata): the writer never writes
    more, so a longer list is a lie of a crafted file, and the record is
    refused. Each list of a record whose length the writer bounds has one:
    a reader that keeps part of a record (-v's process records) is then
    bounded by them, not by the 8 MiB line (one thread of 200,000 Python
    frames in a record that passed)."""
    items: int


@dataclass(frozen=True)
class Pattern:
    """A string field's form (Annotated metadata): a value the regex does
    not match is not one the field can have, and the record is refused.
    Written for both engines (Python's re, the JSON Schema's ECMA 262)."""
    regex: str


_OCTET = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = f"{_OCTET}(\\.{_OCTET}){{3}}"
_H = "[0-9a-fA-F]{1,4}"
_IPV6 = "|".join((
    f"({_H}:){{7}}{_H}", f"({_H}:){{1,7}}:", f"({_H}:){{1,6}}:{_H}",
    f"({_H}:){{1,5}}(:{_H}){{1,2}}", f"({_H}:){{1,4}}(:{_H}){{1,3}}",
    f"({_H}:){{1,3}}(:{_H}){{1,4}}", f"({_H}:){{1,2}}(:{_H}){{1,5}}",
    f"{_H}:(:{_H}){{1,6}}", f":((:{_H}){{1,7}}|:)",
    f"({_H}:){{6}}{_IPV4}", f"::(ffff:)?{_IPV4}"))
# A socket's addresses, as the writer writes them (events.format_address:
# an IPv4 or IPv6 literal, an IPv4 client of a dual-stack listener as
# ::ffff:a.b.c.d): at most 45 characters. Any string was taken (cut at 4 KiB),
# and readers key sockets by their addresses: 60,000 sockets of 4 KiB
# "addresses" took `report --since` to 525 MB and `-r --comm` to 528 MB.
# No newline anywhere (the lookahead): Python's `$` also matches before a
# final one, ECMA's does not, and both engines must agree.
IP_LITERAL = f"^(?![\\s\\S]*\\n)({_IPV4}|{_IPV6})$"
Address = Annotated[str, Pattern(IP_LITERAL)]


class Endpoint(TypedDict):
    family: Literal["ipv4", "ipv6"]
    laddr: Address
    lport: Port
    raddr: Address
    rport: Port


class Task(TypedDict):
    pid: Pid
    comm: Comm


class Holder(TypedDict):
    """A process with a file descriptor on the socket."""
    pid: Pid
    comm: Comm
    fd: Fd
    state: str
    ppid: Pid
    uid: Optional[int]
    cmdline: str
    tracer_pid: Pid
    cloexec: NotRequired[Optional[bool]]    # close-on-exec on this fd
    exiting: NotRequired[bool]
    tracer: NotRequired[Task]


class Listener(TypedDict):
    local: str
    accept_queue: Queue
    backlog: Queue
    owners: list[Holder]
    # fds on the listener not in owners (4 of one process are listed)
    owners_not_listed: NotRequired[FdCount]


class Filters(TypedDict):
    """What the trace was limited to: in the kernel (ports, family) and, when
    given, at resolution (the holder filters)."""
    lports: list[Port]
    rports: list[Port]
    family: Optional[Literal["ipv4", "ipv6"]]
    pids: NotRequired[list[Pid]]
    comms: NotRequired[list[str]]
    cgroups: NotRequired[list[str]]
    containers: NotRequired[list[str]]
    units: NotRequired[list[str]]


class Container(TypedDict):
    runtime: str
    id: str


class Claim(TypedDict, total=False):
    """What a cgroup path names below the last place root's tools made
    (a user's delegated subtree, inside a container): a name anyone there
    could choose, never taken as the container, pod or unit."""
    container: Container
    pod_uid: str
    unit: str
    under: str          # the trusted cgroup it was named under ("/": none)


class Exe(TypedDict):
    """The program, from /proc/PID/exe (never argv[0])."""
    path: str
    deleted: Optional[bool]     # its file has no name on disk any more
    replaced: Optional[bool]    # another file has its name now


class Identity(TypedDict, total=False):
    """Where a process lives; each key only where known."""
    user: Optional[str]
    uid: Optional[int]
    cgroup: Optional[str]
    container: Optional[Container]
    pod_uid: Optional[str]
    unit: Optional[str]
    claimed: Optional[Claim]
    netns: Optional[int]
    exe: Optional[Exe]


class HolderRef(TypedDict):
    pid: Pid
    fd: NotRequired[Fd]


class Evidence(TypedDict, total=False):
    """What the cause rests on, by reference to the record's own facts."""
    holders: list[HolderRef]            # in `owners`
    listener_holders: list[HolderRef]   # in `listener.owners` (never accepted)
    accepting_process: list[HolderRef]  # in `listener.owners` (inherited socket)
    denied_processes: Tasks             # fd tables we were not allowed to read
    denied_netns_processes: Tasks       # processes whose network namespace we could not enter
    fds_not_read_processes: Tasks       # fd tables left unread when the walk's time was up


class Diagnosis(TypedDict):
    cause: str
    summary: str
    evidence: Evidence


class BriefDiagnosis(TypedDict):
    cause: str
    summary: str


class _Base(TypedDict):
    type: str
    ts: Epoch
    time: str


class StartRecord(_Base):
    schema: int
    threshold_s: Seconds
    filters: Filters
    pre_existing: Count
    headers: str
    transport: str
    all_transitions: bool


class Frame(TypedDict):
    pc: str
    function: Optional[str]
    offset: Optional[int]
    module: Optional[str]
    build_id: Optional[str]
    method: str
    symbols: Optional[str]
    note: NotRequired[str]
    file: NotRequired[str]
    line: NotRequired[Count]


class PyFrame(TypedDict):
    """A Python frame of a CPython holder's thread, read from its memory."""
    function: str               # the code object's qualified name
    file: str
    line: Optional[Count]       # None: the line table has none for the instruction


# The writer's own bounds of its lists of frames: a thread's stack
# (symbolize.user_stack, 16 frames) and Python frames (pyframes.MAX_FRAMES,
# 32); a capture's stack (symbolize.captured_stack, 32) and Python frames
# (the kernel program's PY_MAX_FRAMES, 16).
ThreadStack = Annotated[list[Frame], MaxItems(16)]
ThreadPython = Annotated[list[PyFrame], MaxItems(32)]
CapturedStack = Annotated[list[Frame], MaxItems(32)]
CapturedPython = Annotated[list[PyFrame], MaxItems(16)]


class EofRead(TypedDict):
    """Where the socket was read to its end: the kernel program copied the
    reading thread's registers and the top of its stack at that read."""
    ts: Epoch
    after_s: Seconds            # after the socket entered CLOSE_WAIT
    pid: Pid
    tid: Pid
    comm: Comm
    place: Optional[Frame]      # the frame named: the program's own code
    stack: CapturedStack
    stack_bytes: Count          # of stack copied by the kernel
    unwound: bool               # false: not unwound (stack empty)
    not_unwound: NotRequired[str]   # why, when not for lack of time
    python: NotRequired[CapturedPython]  # a CPython reader's frames at the read
    python_not_read: NotRequired[str]    # a CPython reader's frames not copied or read: why


class Opened(TypedDict):
    """Where the socket was connect()ed: the kernel program copied the
    connecting thread's registers and the top of its stack."""
    ts: Epoch
    pid: Pid
    tid: Pid
    comm: Comm
    place: Optional[Frame]
    stack: CapturedStack
    stack_bytes: Count
    unwound: bool
    not_unwound: NotRequired[str]
    python: NotRequired[CapturedPython]
    python_not_read: NotRequired[str]


class Code(TypedDict):
    """Where in the holder's code the socket's story happened."""
    eof_read: Optional[EofRead]
    eof_read_unknown: Optional[str]   # why not known; both null: none was seen
    opened: NotRequired[Optional[Opened]]
    opened_unknown: NotRequired[Optional[str]]


class LingerRecord(_Base, Endpoint):
    age_s: Seconds
    age_source: AgeSource
    age_max_s: Optional[Seconds]
    age_is_lower_bound: bool
    pre_existing: bool
    update: bool
    owner_kind: Optional[str]
    owners: list[Holder]
    # fds on the socket not in owners (4 of one process are listed)
    owners_not_listed: NotRequired[FdCount]
    netns: Optional[int]
    inode: Optional[int]
    unread_bytes: Optional[Queue]
    eof_read: Optional[bool]
    listener: Optional[Listener]
    also_in_netns: list[int]
    diagnosis: Optional[Diagnosis]
    # Written by every version-3 writer; filled in by `upgrade` for older
    # recordings; a reader takes its absence as "not known".
    code: NotRequired[Code]
    # When it entered CLOSE_WAIT (epoch seconds): ts - age_s, as sure as
    # the age is (age_source); absent in recordings made before it.
    entered_at: NotRequired[Epoch]


class BriefHolder(TypedDict):
    pid: Pid
    comm: Comm
    fd: Fd
    state: str


class LingeringEntry(Endpoint):
    """A socket still lingering, in snapshots and the summary."""
    age_s: Seconds
    age_source: AgeSource
    age_max_s: Optional[Seconds]
    age_is_lower_bound: bool
    owner_kind: Optional[str]
    owners: list[BriefHolder]
    # fds on it not in owners (4 of one process are listed)
    owners_not_listed: NotRequired[FdCount]
    diagnosis: Optional[BriefDiagnosis]


class ClosedRecord(_Base, Endpoint):
    duration_s: Seconds
    duration_source: AgeSource
    duration_max_s: Optional[Seconds]
    duration_is_lower_bound: bool
    how: Literal["close", "abort", "reset", "unknown"]
    newstate: str
    closed_by: Optional[Task]
    cpu_task: Task
    pre_existing: bool
    reported: bool


class TransitionRecord(_Base, Endpoint):
    oldstate: str
    newstate: str
    prev_state_s: Optional[Seconds]
    task: Optional[Task]
    peer_known: NotRequired[bool]


class LostRecord(_Base):
    counter: str
    count: Count
    total: Count


class Thread(TypedDict):
    tid: Pid
    state: str
    wchan: str
    syscall: Optional[str]
    syscall_fd: Optional[int]
    syscall_fd_target: Optional[str]
    stack: ThreadStack
    python: NotRequired[ThreadPython]     # innermost first; CPython holders only


class ProcessRecord(_Base):
    pid: Pid
    comm: Comm
    state: str
    ppid: Pid
    cmdline: str
    exiting: bool
    threads: Annotated[list[Thread], MaxItems(16)]  # diagnosis.MAX_THREADS
    threads_total: Tasks
    identity: Identity
    tracer: NotRequired[Task]
    unreadable: NotRequired[str]
    stacks_not_read: NotRequired[str]
    python_not_read: NotRequired[str]     # a CPython holder's frames not read: why


class HistogramBucket(TypedDict):
    from_us: Micros
    to_us: Micros
    count: Count


# The kernel's log2 histogram has 64 slots (cw_hist), a bucket each at most.
Histogram = Annotated[list[HistogramBucket], MaxItems(64)]


class SnapshotRecord(_Base):
    lingering: list[LingeringEntry]
    counters: dict[str, Count]
    histogram_us: Histogram


class SummaryRecord(_Base):
    traced_s: Seconds
    counters: dict[str, Count]
    histogram_us: Histogram
    linger_reported: Count
    closed_reported: Count
    still_lingering: list[LingeringEntry]
    changes_reported: NotRequired[Count]
    tracer_cost: NotRequired[dict[str, Union[int, float]]]
    write_errors: NotRequired[Count]
    symbolizer_problems: NotRequired[dict[str, Count]]


class HeaderRecord(TypedDict):
    """First line of every part of a recording (no ts/time of its own)."""
    type: str
    format: Literal["closewait-trace-recording"]
    format_version: int
    tool_version: str
    hostname: str
    kernel_release: str
    boot_id: str
    clock_offset_ns: int
    start_ts: Epoch
    threshold_s: Seconds
    filters: Filters
    mode: str
    capture_id: str
    part: Count


RECORD_TYPES: dict[str, type] = {
    "header": HeaderRecord,
    "start": StartRecord,
    "process": ProcessRecord,
    "linger": LingerRecord,
    "closed": ClosedRecord,
    "lost": LostRecord,
    "transition": TransitionRecord,
    "snapshot": SnapshotRecord,
    "summary": SummaryRecord,
}


def problem(rec: Any) -> Optional[str]:
    """None when rec is a valid record of a known type; otherwise what is
    wrong with it, in a few words (for the count of skipped records)."""
    if not isinstance(rec, dict):
        return f"not an object ({type(rec).__name__})"
    kind = rec.get("type")
    spec = RECORD_TYPES.get(kind) if isinstance(kind, str) else None
    if spec is None:
        return f"unknown record type {str(kind)[:40]!r}"
    wrong = _checker(spec)(rec, "$")
    return f"{kind}: {wrong}" if wrong else None


_CHECKERS: dict = {}


def _checker(tp: Any):
    """A function (value, path) -> what is wrong, or None, for the type tp,
    built once per type from the definitions above (reading typing's
    introspection per value would cost ten times more). The types form a
    finite tree with no Any, so a check is bounded by them, whatever the
    value (a deeply nested hostile value fails at the first wrong level)."""
    key = repr(tp)
    check = _CHECKERS.get(key)
    if check is None:
        check = _CHECKERS[key] = _build(tp)
    return check


def _build(tp: Any):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    name = type_name(tp)
    if origin is Annotated:
        base = _checker(args[0])
        ranges = [m for m in args[1:] if isinstance(m, Range)]
        lengths = [m.chars for m in args[1:] if isinstance(m, MaxLen) and not m.truncate]
        patterns = [re.compile(m.regex) for m in args[1:] if isinstance(m, Pattern)]
        items = [m.items for m in args[1:] if isinstance(m, MaxItems)]

        if items:
            def a_bounded_list(value, path):
                # The length first: a list too long is refused before its
                # items are checked.
                if isinstance(value, list) and len(value) > items[0]:
                    return f"{path}: more than {items[0]} items"
                return base(value, path)
            return a_bounded_list

        def annotated(value, path):
            wrong = base(value, path)
            if wrong:
                return wrong
            for r in ranges:
                if not r.ge <= value <= r.le:
                    return f"{path}: {value!r} is out of range"
            for n in lengths:
                if len(value) > n:
                    return f"{path}: longer than {n} characters"
            for pattern in patterns:
                if not pattern.search(value):
                    return f"{path}: not of its form ({value[:40]!r})"
            return None
        return annotated
    if origin is NotRequired:
        return _checker(args[0])
    if origin is Union:
        options = [_checker(a) for a in args]

        def union(value, path):
            if any(opt(value, path) is None for opt in options):
                return None
            return f"{path}: expected {name}"
        return union
    if origin is Literal:
        allowed = {(type(a), a) for a in args}
        return lambda value, path: (None if type(value) in (str, int, bool)
                                    and (type(value), value) in allowed
                                    else f"{path}: expected {name}")
    if origin is list:
        item = _checker(args[0])

        def a_list(value, path):
            if not isinstance(value, list):
                return f"{path}: expected a list"
            for i, v in enumerate(value):
                wrong = item(v, path)
                if wrong:
                    return wrong.replace(path, f"{path}[{i}]", 1)
            return None
        return a_list
    if origin is dict:
        item = _checker(args[1])

        def a_dict(value, path):
            if not isinstance(value, dict):
                return f"{path}: expected an object"
            for v in value.values():
                wrong = item(v, path)
                if wrong:
                    return wrong
            return None
        return a_dict
    if typing.is_typeddict(tp):
        required = tuple(tp.__required_keys__)
        _CHECKERS[repr(tp)] = lambda value, path: typed(value, path)   # for recursion

        def typed(value, path):
            if not isinstance(value, dict):
                return f"{path}: expected {name}"
            for k in required:
                if k not in value:
                    return f"{path}: missing {k}"
            for k, check in checks:
                if k in value:
                    wrong = check(value[k], f"{path}.{k}")
                    if wrong:
                        return wrong
            return None
        checks = [(k, _checker(h)) for k, h in
                  typing.get_type_hints(tp, include_extras=True).items()]
        return typed
    if tp is type(None):
        return lambda value, path: None if value is None else f"{path}: expected null"
    if tp in (bool, str, int):
        return lambda value, path: None if type(value) is tp else f"{path}: expected {name}"
    if tp is float:
        return lambda value, path: (
            None if type(value) is int or (type(value) is float and math.isfinite(value))
            else f"{path}: expected a finite number")
    raise TypeError(f"schema.py uses a type the check does not know: {tp!r}")


# --- string caps ----------------------------------------------------------------

def cap(rec: Any) -> Any:
    """Cut, in place, every string of a record longer than MAX_TEXT +
    TRUNCATED to MAX_TEXT characters and the mark; fields whose bound is a
    fact (MaxLen(truncate=False), the process name) are left for problem()
    to refuse. Work linear in the record. Anything that is not a record of
    a known type is returned as it is."""
    if isinstance(rec, dict):
        spec = RECORD_TYPES.get(rec.get("type")) if isinstance(rec.get("type"), str) else None
        if spec is not None:
            _capper(spec)(rec)
    return rec


_LONGEST = MAX_TEXT + len(TRUNCATED)
_CAPPERS: dict = {}


def _cut(value):
    if type(value) is str and len(value) > _LONGEST:
        return value[:MAX_TEXT] + TRUNCATED
    return value


def _keep(value):
    return value


def _capper(tp: Any):
    """value -> the value with its strings capped (dicts and lists in place)."""
    key = repr(tp)
    f = _CAPPERS.get(key)
    if f is None:
        _CAPPERS[key] = lambda value: f(value)       # for recursion
        f = _CAPPERS[key] = _build_capper(tp)
    return f


def _build_capper(tp: Any):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        if any(isinstance(m, (Pattern, MaxLen)) and not getattr(m, "truncate", False)
               for m in args[1:]):
            return _keep        # refused by problem() if wrong, never cut
        return _capper(args[0])
    if origin is NotRequired:
        return _capper(args[0])
    if origin is Union:
        subs = [f for f in (_capper(a) for a in args) if f is not _keep]
        if not subs:
            return _keep

        def union(value):
            for f in subs:
                value = f(value)
            return value
        return union
    if origin is list:
        item = _capper(args[0])
        if item is _keep:
            return _keep

        def a_list(value):
            if isinstance(value, list):
                for i, v in enumerate(value):
                    new = item(v)
                    if new is not v:
                        value[i] = new
            return value
        return a_list
    if typing.is_typeddict(tp):
        subs = []

        def typed(value):
            if isinstance(value, dict):
                for k, f in subs:
                    if k in value:
                        v = value[k]
                        new = f(v)
                        if new is not v:
                            value[k] = new
            return value
        _CAPPERS[repr(tp)] = typed                        # for recursion
        for k, h in typing.get_type_hints(tp, include_extras=True).items():
            f = _capper(h)
            if f is not _keep:
                subs.append((k, f))
        return typed
    if tp is str:
        return _cut
    return _keep          # numbers, bools, null, literals, dict[str, number]


# --- older versions -----------------------------------------------------------

def _age_source(lower_bound: Any) -> str:
    return "lower_bound" if lower_bound else "traced"


def _upgrade_entry(entry: Any, prefix: str = "age") -> None:
    if isinstance(entry, dict):
        entry.setdefault(f"{prefix}_source", _age_source(entry.get(f"{prefix}_is_lower_bound")))
        entry.setdefault(f"{prefix}_max_s", None)


def _refs(holders: Any) -> list:
    return [{"pid": h.get("pid"), "fd": h.get("fd")} for h in holders
            if isinstance(h, dict)] if isinstance(holders, list) else []


def _upgrade_linger(rec: dict, version: int) -> None:
    _upgrade_entry(rec)
    rec.setdefault("code", {"eof_read": None, "eof_read_unknown": CODE_NOT_RECORDED})
    if version >= 2:
        return
    diag = rec.get("diagnosis")
    evidence = diag.get("evidence") if isinstance(diag, dict) else None
    if not isinstance(evidence, dict):
        return
    # Version 1 repeated each holder under the evidence with three facts the
    # owners list lacked: move those to the owner, keep a reference.
    extra = {}
    for h in evidence.get("holders") or []:
        if isinstance(h, dict):
            extra[(h.get("pid"), h.get("fd"))] = h
    for owner in rec.get("owners") or []:
        if not isinstance(owner, dict):
            continue
        more = extra.get((owner.get("pid"), owner.get("fd")))
        if more is None:
            continue
        for key in ("cloexec", "exiting", "tracer"):
            if key in more:
                owner.setdefault(key, more[key])
    refs = {"holders": _refs(evidence.get("holders"))}
    listener = evidence.get("listener")
    if isinstance(listener, dict):
        refs["listener_holders"] = _refs(listener.get("holders"))
    if "accepting_process" in evidence:
        refs["accepting_process"] = _refs(evidence.get("accepting_process"))
    diag["evidence"] = refs


def upgrade(rec: Any, version: int) -> Any:
    """A record written by format `version`, in the current shape (in place).
    Anything that is not a dict is returned as it is, for `problem` to name."""
    if version >= SCHEMA_VERSION or not isinstance(rec, dict):
        return rec
    kind = rec.get("type")
    if kind == "linger":
        _upgrade_linger(rec, version)
    elif kind == "closed":
        _upgrade_entry(rec, "duration")
    elif kind in ("snapshot", "summary"):
        for entry in rec.get("lingering" if kind == "snapshot" else "still_lingering") or []:
            _upgrade_entry(entry)
    return rec


# --- documentation ------------------------------------------------------------

def type_name(annotation: Any) -> str:
    """A field's type as docs/schema.md's tables write it."""
    import typing
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.NotRequired:
        return type_name(args[0])
    if origin is Union:
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return " or ".join(f'"{a}"' for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return "object"
    if isinstance(annotation, type) and issubclass(annotation, dict) and annotation is not dict:
        return annotation.__name__
    return {int: "int", float: "number", str: "string", bool: "bool"}.get(annotation, str(annotation))


def fields(spec: type) -> list[tuple[str, str, bool]]:
    """(name, type, required) of every field of a record type, in order."""
    import typing
    hints = typing.get_type_hints(spec, include_extras=True)
    required = spec.__required_keys__
    return [(name, type_name(hint), name in required) for name, hint in hints.items()]


# docs/schema.md documents these, one table each, under headings `### Name`.
DOCUMENTED: dict[str, type] = {
    **{f"{kind} record": spec for kind, spec in RECORD_TYPES.items()},
    "Holder": Holder, "Listener": Listener, "Diagnosis": Diagnosis, "Evidence": Evidence,
    "HolderRef": HolderRef, "Task": Task, "LingeringEntry": LingeringEntry,
    "BriefHolder": BriefHolder, "BriefDiagnosis": BriefDiagnosis, "Thread": Thread,
    "Frame": Frame, "PyFrame": PyFrame, "Code": Code, "EofRead": EofRead, "Opened": Opened, "HistogramBucket": HistogramBucket, "Filters": Filters,
    "Identity": Identity, "Container": Container, "Claim": Claim, "Exe": Exe,
}


# --- JSON Schema ------------------------------------------------------------------

JSON_SCHEMA_ID = "https://closewait-trace.invalid/schema/records.json"


def json_schema() -> dict:
    """The records as a JSON Schema (draft 2020-12), derived from the same
    TypedDicts the reader checks against, for other tools (jq users, a log
    pipeline's validator). Written to docs/closewait-trace.schema.json;
    tests/repo/test_json_schema.py checks the file is this, and that a JSON
    Schema validator agrees with problem() on real and crafted records.
    What it cannot say: MaxLen(truncate=True) fields are cut by the reader,
    not refused, so they carry no maxLength."""
    defs: dict = {}

    def ref(tp) -> dict:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            out = dict(ref(args[0]))
            for m in args[1:]:
                if isinstance(m, Range):
                    out["minimum"] = m.ge
                    if m.le != float("inf"):
                        out["maximum"] = m.le
                if isinstance(m, MaxLen) and not m.truncate:
                    out["maxLength"] = m.chars
                if isinstance(m, Pattern):
                    out["pattern"] = m.regex
                if isinstance(m, MaxItems):
                    out["maxItems"] = m.items
            return out
        if origin is NotRequired:
            return ref(args[0])
        if origin is Union:
            return {"anyOf": [ref(a) for a in args]}
        if origin is Literal:
            return {"enum": list(args)}
        if origin is list:
            return {"type": "array", "items": ref(args[0])}
        if origin is dict:
            return {"type": "object", "additionalProperties": ref(args[1])}
        if typing.is_typeddict(tp):
            name = tp.__name__
            if name not in defs:
                defs[name] = {}             # recursion: filled below
                hints = typing.get_type_hints(tp, include_extras=True)
                defs[name] = {"type": "object",
                              "properties": {k: ref(h) for k, h in hints.items()},
                              "required": sorted(tp.__required_keys__)}
            return {"$ref": f"#/$defs/{name}"}
        if tp is type(None):
            return {"type": "null"}
        simple = {bool: "boolean", str: "string", int: "integer", float: "number"}
        if tp in simple:
            return {"type": simple[tp]}
        raise TypeError(f"no JSON Schema for {tp!r}")

    kinds = []
    for kind, spec in RECORD_TYPES.items():
        kinds.append({"if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
                      "then": ref(spec)})
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": JSON_SCHEMA_ID,
            "title": "closewait-trace records (--json lines and recordings)",
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": list(RECORD_TYPES)}},
            "allOf": kinds,
            "$defs": defs}


if __name__ == "__main__":       # python -m closewait_trace.output.schema > docs/...json
    import json
    import sys
    json.dump(json_schema(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
