"""Where a process lives: its user, cgroup, and the container, Kubernetes pod
or systemd unit that cgroup path reveals, and the program it runs (pure
parsing plus small reads).

Attribution comes only from what root put in place. A cgroup's name is
chosen by whoever made it, and systemd delegates a subtree to every logged-in
user (user@UID.service) and to any service with Delegate=yes, a container
runtime hands one to each container: under those, a user may make
`kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope` as well as the
kubelet. So a container, pod or unit is read only where the runtime and
systemd put them, anchored at the top of the hierarchy (kubepods.slice or
kubepods/, system.slice, machine.slice, docker/, lxc.payload.*); the first
such place decides, and whatever looks like one below it, or anywhere in
user.slice, is only a claim, kept apart (`claimed`) with the trusted cgroup
it was found under. The program is /proc/PID/exe, never argv[0]."""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import re
from typing import Iterator, Optional

from closewait_trace.sockets import procfs

_HEX64 = re.compile(r"[0-9a-f]{64}")
# A runtime's scope for one container: runtime prefix -> name.
_SCOPE = re.compile(r"(docker|cri-containerd|crio|libpod)-([0-9a-f]{64})\.scope")
_SCOPE_RUNTIME = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o",
                  "libpod": "podman"}
_POD_UID = r"[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}"
_K8S_QOS = ("besteffort", "burstable")
_POD_DIR = re.compile(r"pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".target")
_USER_SLICE = re.compile(r"user-(\d+)\.slice")
_MACHINE_SCOPE = re.compile(r"machine-(.+)\.scope")

# What a claim looks like anywhere (the loose patterns the trusted ones are
# anchored versions of): only ever reported as a claim.
_CLAIM_CONTAINER = [
    ("docker", re.compile(r"docker-([0-9a-f]{64})\.scope")),
    ("containerd", re.compile(r"cri-containerd-([0-9a-f]{64})\.scope")),
    ("cri-o", re.compile(r"crio-([0-9a-f]{64})\.scope")),
    ("podman", re.compile(r"libpod-([0-9a-f]{64})\.scope")),
    ("cri", re.compile(r"/([0-9a-f]{64})(?:/|$)")),
]
_CLAIM_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}"
                        r"[-_][0-9a-f]{12})")
_CLAIM_UNIT = re.compile(r"/([^/]+\.service)(?:/|$)")


def _trusted_prefix(comps: list[str]) -> tuple[int, dict]:
    """How many leading components of a cgroup path root and the runtimes
    made, and what they say. Pure."""
    found: dict = {"container": None, "pod_uid": None, "unit": None}
    n = len(comps)
    top = comps[0]
    i = 0
    if top == "kubepods.slice":                 # kubelet, systemd cgroup driver
        i, prefix = 1, "kubepods"
        if i < n and comps[i] in (f"kubepods-{q}.slice" for q in _K8S_QOS):
            prefix, i = comps[i][:-len(".slice")], i + 1
        m = re.fullmatch(re.escape(prefix) + r"-pod(" + _POD_UID + r")\.slice", comps[i]) \
            if i < n else None
        if m:
            found["pod_uid"], i = m.group(1).replace("_", "-"), i + 1
            s = _SCOPE.fullmatch(comps[i]) if i < n else None
            if s and s.group(1) != "libpod":
                found["container"] = {"runtime": _SCOPE_RUNTIME[s.group(1)], "id": s.group(2)}
                i += 1
    elif top == "kubepods":                     # kubelet, cgroupfs driver
        i = 1
        if i < n and comps[i] in _K8S_QOS:
            i += 1
        m = _POD_DIR.fullmatch(comps[i]) if i < n else None
        if m:
            found["pod_uid"], i = m.group(1), i + 1
            c = re.fullmatch(r"(crio-)?([0-9a-f]{64})", comps[i]) if i < n else None
            if c:
                # The path does not name the runtime, except cri-o's.
                found["container"] = {"runtime": "cri-o" if c.group(1) else "cri",
                                      "id": c.group(2)}
                i += 1
    elif top in ("system.slice", "machine.slice"):
        i, nested = 1, top.split(".")[0] + "-"
        while i < n and comps[i].startswith(nested) and comps[i].endswith(".slice"):
            i += 1                              # system-getty.slice/getty@tty1.service
        if i < n and comps[i].endswith(_UNIT_SUFFIXES):
            found["unit"] = _service(comps[i])
            s = _SCOPE.fullmatch(comps[i])
            m = _MACHINE_SCOPE.fullmatch(comps[i]) if top == "machine.slice" else None
            if s:
                found["container"] = {"runtime": _SCOPE_RUNTIME[s.group(1)], "id": s.group(2)}
            elif m:
                found["container"] = {"runtime": "machined", "id": m.group(1)}
            i += 1
    elif top == "docker" and n > 1 and _HEX64.fullmatch(comps[1]):   # cgroupfs driver
        found["container"], i = {"runtime": "docker", "id": comps[1]}, 2
    elif top.startswith("lxc.payload.") and len(top) > len("lxc.payload."):
        found["container"], i = {"runtime": "lxc", "id": top[len("lxc.payload."):]}, 1
    elif top == "user.slice":
        # systemd makes user-UID.slice and the units in it (user@UID.service,
        # session-N.scope); what is below a unit is the user's to name.
        i = 1
        if i < n and _USER_SLICE.fullmatch(comps[i]):
            i += 1
            if i < n and comps[i].endswith(_UNIT_SUFFIXES):
                found["unit"], i = _service(comps[i]), i + 1
    elif top == "init.scope":
        i = 1
    return i, found


def _service(unit: str) -> Optional[str]:
    # The unit named is a service (what --unit and the report's units are
    # about); a scope (a session, a container) is trusted as a place, but
    # not named as a unit.
    return unit if unit.endswith(".service") else None


def attribute(path) -> dict:
    """One cgroup path (as /proc/PID/cgroup gives it) -> container
    {runtime, id}, pod_uid and unit, each only where root's tools put it,
    and `claimed`: what the rest of the path looks like, with `under`, the
    trusted cgroup under which someone else named it (None: no claim)."""
    out: dict = {"container": None, "pod_uid": None, "unit": None, "claimed": None}
    if not isinstance(path, str) or not path.startswith("/") or path == "/":
        return out
    comps = path[1:].split("/")
    if any(c in ("", ".", "..") for c in comps):
        # Relative to a cgroup namespace ("/../.."), or not a path the
        # kernel writes: nothing in it is trusted.
        i = 0
    else:
        i, found = _trusted_prefix(comps)
        out.update(found)
    rest = "/" + "/".join(comps[i:])
    if i < len(comps):
        claim = _claims(rest)
        if claim:
            claim["under"] = "/" + "/".join(comps[:i])
            out["claimed"] = claim
    return out


def _claims(rest: str) -> Optional[dict]:
    claim: dict = {}
    for runtime, pattern in _CLAIM_CONTAINER:
        m = pattern.search(rest)
        if m:
            claim["container"] = {"runtime": runtime, "id": m.group(1)}
            break
    m = _CLAIM_POD.search(rest)
    if m:
        claim["pod_uid"] = m.group(1).replace("_", "-")
    m = _CLAIM_UNIT.search(rest)
    if m:
        claim["unit"] = m.group(1)
    return claim or None


def parse_cgroup(text: str) -> dict:
    """/proc/PID/cgroup -> {cgroup, container: {runtime, id}, pod_uid, unit,
    claimed}."""
    lines = text.splitlines()
    paths = [parts[2] for parts in (line.split(":", 2) for line in lines) if len(parts) == 3]
    # cgroup v2's unified line ("0::") is the one to show; v1 lines carry
    # the same container path where a runtime uses them, and each is read
    # with the same anchored rules.
    unified = next((l.split(":", 2)[2] for l in lines if l.startswith("0::")), None)
    shown = unified or (paths[0] if paths else "")
    out: dict = {"cgroup": shown or None, "container": None, "pod_uid": None, "unit": None,
                 "claimed": None}
    for path in [shown] + paths:
        found = attribute(path)
        for key in ("container", "pod_uid", "unit", "claimed"):
            if out[key] is None:
                out[key] = found[key]
    return out


def attribution(ident) -> dict:
    """container, pod_uid, unit and claimed of an identity from anywhere (a
    recording of another host or an older version, whose own container,
    pod and unit fields may have come from a name a user chose): decided
    again from its cgroup path alone; no path, nothing known."""
    ident = ident if isinstance(ident, dict) else {}
    found = attribute(ident.get("cgroup"))
    return found


# ---------------------------------------------------------------- program

DELETED = " (deleted)"      # what the kernel appends to a link to an unlinked file
_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000
_STATX_BASIC = 0x7ff
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_CACHED = 0x02, 0x04, 0x20
_SYS_OPENAT2 = 437          # the same number on every architecture


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _statx(dir_fd: int, path: bytes, flags: int = 0) -> Optional[tuple]:
    """(dev major, dev minor, inode, nlink) from the attributes the kernel
    has cached (AT_STATX_DONT_SYNC): a FUSE or network filesystem is not
    asked, so a server that never answers cannot hold the caller. None when
    it fails."""
    buf = ctypes.create_string_buffer(256)
    try:
        rc = procfs.libc().statx(dir_fd, path, flags | _AT_STATX_DONT_SYNC, _STATX_BASIC, buf)
    except (AttributeError, OSError):       # a libc without statx
        return None
    if rc != 0:
        return None
    raw = buf.raw
    nlink = int.from_bytes(raw[16:20], "little")
    ino = int.from_bytes(raw[32:40], "little")
    major = int.from_bytes(raw[136:140], "little")
    minor = int.from_bytes(raw[140:144], "little")
    return (major, minor, ino, nlink)


def _lookup(path: str, block_device: bool) -> Optional[tuple]:
    """What is at path now (in the tracer's root): statx tuple, "absent",
    or None when that cannot be told without waiting on a filesystem. The
    lookup is made from the kernel's dentry cache alone (openat2's
    RESOLVE_CACHED: no FUSE or NFS server is asked); a miss is looked up
    for real only on a block-device filesystem (ext4, xfs), which no user
    can make answer slowly."""
    raw = os.fsencode(path)
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW, 0,
                   _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_SYMLINKS | _RESOLVE_CACHED)
    libc = procfs.libc()
    fd = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(-100), ctypes.c_char_p(raw),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    err = ctypes.get_errno() if fd < 0 else 0
    if fd < 0 and err in (errno.EAGAIN, errno.ENOSYS, errno.EINVAL, errno.E2BIG) \
            and block_device:
        try:
            fd = os.open(raw, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
            err = 0
        except OSError as e:
            fd, err = -1, e.errno
    if fd < 0:
        return "absent" if err in (errno.ENOENT, errno.ENOTDIR) else None
    try:
        return _statx(fd, b"", _AT_EMPTY_PATH)
    finally:
        os.close(fd)


def _same_root(dir_fd: int) -> bool:
    """Whether the process sees files as the tracer does (same mount
    namespace and root): only then does its exe path name a file here."""
    try:
        if os.readlink("ns/mnt", dir_fd=dir_fd) != os.readlink("/proc/self/ns/mnt"):
            return False
    except OSError:
        return False
    theirs, ours = _statx(dir_fd, b"root"), _statx(-100, b"/")
    return theirs is not None and ours is not None and theirs[:3] == ours[:3]


def program_of(dir_fd: int) -> Optional[dict]:
    """The program a process runs, from /proc/PID/exe (read through dir_fd,
    a handle on /proc/PID), never from argv[0], which it may set to
    anything: {path, deleted, replaced}. deleted: the file it was started
    from has no name on disk any more (the kernel's " (deleted)", taken off
    the path); replaced: another file now has its name (a package upgraded
    under a running server); each None where it cannot be told. None: no
    exe (a kernel thread, a process gone, access refused)."""
    try:
        link = procfs.decode(os.readlink(b"exe", dir_fd=dir_fd))
    except OSError:
        return None
    exe = _statx(dir_fd, b"exe")            # the running file itself, through the magic link
    here = _same_root(dir_fd) if exe is not None else False
    path, deleted, replaced = link, False, None
    if link.endswith(DELETED):
        # A file may really be named "nginx (deleted)": the kernel's mark
        # is believed once no file of that name is the one running.
        literal = _lookup(link, exe[0] != 0) if here else None
        if exe is not None and exe[3] == 0:
            deleted = True
        elif literal is not None and literal != "absent" and literal[:3] == exe[:3]:
            deleted = False
        elif literal is not None:
            deleted = True
        else:
            deleted = None
        if deleted:
            path = link[:-len(DELETED)]
    if here and deleted is not None:
        now = _lookup(path, exe[0] != 0)
        if now == "absent":
            replaced = False
        elif now is not None:
            replaced = now[:3] != exe[:3]
    return {"path": path, "deleted": deleted, "replaced": replaced}

def program_label(exe) -> Optional[str]:
    """An identity's `exe` (from anywhere) as one string: the path, with
    "(deleted)" / "(replaced on disk)" as marks of ours. Pure."""
    if not isinstance(exe, dict) or not isinstance(exe.get("path"), str) or not exe["path"]:
        return None
    label = exe["path"]
    if exe.get("deleted") is True:
        label += " (deleted" + (", replaced on disk)" if exe.get("replaced") is True else ")")
    elif exe.get("replaced") is True:
        label += " (replaced on disk)"
    return label


# Interpreters whose program is the script they run: every Python service
# is /usr/bin/python3.11, and one row for all of them says nothing.
_INTERPRETERS = re.compile(r"(python|pypy|perl|ruby|node|nodejs|php|bash|sh|dash|java)"
                           r"[0-9.]*$")
# Options that take the next argument as their value (so it is no script).
_VALUE_OPTIONS = {"-W", "-X", "-Q", "-cp", "-classpath", "--class-path", "-I", "-M", "-e",
                  "-r", "--require", "-o", "--module-path", "-p", "--add-modules"}
MAX_SCRIPT = 200


def script_of(exe_path, cmdline) -> Optional[str]:
    """What an interpreter runs, from its command line (which the process
    may set to anything: a label, said as such, never its identity):
    'python3 /srv/app.py' -> '/srv/app.py', '-m app', '-jar x.jar', a Java
    main class; None for other programs or when nothing is found. Pure."""
    if not isinstance(exe_path, str) or not isinstance(cmdline, str):
        return None
    if not _INTERPRETERS.fullmatch(exe_path.rsplit("/", 1)[-1]):
        return None
    args = cmdline.split(" ")[1:64]
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-m", "-jar") and i + 1 < len(args):
            return f"{a} {args[i + 1]}"[:MAX_SCRIPT]
        if a == "-c":
            return "-c"
        if a in _VALUE_OPTIONS:
            i += 2
            continue
        if a.startswith("-") or not a:
            i += 1
            continue
        return a[:MAX_SCRIPT]
    return None


def user_name(uid: Optional[int]) -> Optional[str]:
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def of_process(pid: int, uid: Optional[int], proc: str = procfs.PROC,
               dir_fd: Optional[int] = None) -> dict:
    """Where a process lives: user, cgroup (container, pod, unit), network
    namespace. Read through dir_fd, a handle on /proc/PID, when the caller
    holds one checked against the pid's start time; a read refused or gone
    leaves its part unknown."""
    if dir_fd is None:
        try:
            fd = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            fd = None
        if fd is not None:
            try:
                return of_process(pid, uid, proc, fd)
            finally:
                os.close(fd)
    cgroup, netns = "", None
    if dir_fd is not None:
        try:
            cgroup = procfs.decode(procfs.read_bytes("cgroup", dir_fd=dir_fd))
        except procfs.ProcError:
            pass
        try:
            netns = procfs.ns_inode(procfs.readlink("ns/net", dir_fd=dir_fd))
        except procfs.ProcError:
            pass
    ident = parse_cgroup(cgroup)
    ident["exe"] = program_of(dir_fd) if dir_fd is not None else None
    ident["user"] = user_name(uid)
    ident["uid"] = uid
    ident["netns"] = netns
    return ident


def people_now(with_identity: bool, proc: str = procfs.PROC) -> Iterator[dict]:
    """Every process now, as the holder filters see a person: pid and comm
    (from stat, where the owners' names come from), and with_identity its
    cgroup identity. Lazy: a caller that has seen enough stops the scan. A
    process that goes away is left out (a race is a missing row)."""
    for pid in procfs.pids(proc):
        try:
            stat = procfs.parse_stat(procfs.decode(procfs.read_bytes(f"{proc}/{pid}/stat")))
        except procfs.ProcError:
            continue
        if stat is None:
            continue
        person = {"pid": pid, "comm": stat.comm}
        if with_identity:
            person["identity"] = of_process(pid, None, proc)
        yield person
