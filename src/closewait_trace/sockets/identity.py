"""Where a process lives: its user, cgroup, and the container, Kubernetes pod
or systemd unit that cgroup path reveals (pure parsing plus small reads)."""

from __future__ import annotations

import os
import pwd
import re
from typing import Iterator, Optional

from closewait_trace.sockets import procfs

_HEX64 = r"([0-9a-f]{64})"
_RUNTIMES = [
    ("docker", re.compile(r"docker-" + _HEX64 + r"\.scope")),
    ("docker", re.compile(r"/docker/" + _HEX64)),
    ("containerd", re.compile(r"cri-containerd-" + _HEX64 + r"\.scope")),
    ("cri-o", re.compile(r"crio-" + _HEX64 + r"\.scope")),
    ("podman", re.compile(r"libpod-" + _HEX64 + r"\.scope")),
    ("containerd", re.compile(r"/kubepods[^\s]*/" + _HEX64 + r"$")),
    ("lxc", re.compile(r"/lxc(?:\.payload)?[./]([^/]+)")),
]
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_UNIT = re.compile(r"/([^/]+\.service)(?:/|$)")


def parse_cgroup(text: str) -> dict:
    """/proc/PID/cgroup -> {cgroup, container: {runtime, id}, pod_uid, unit}."""
    paths = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.append(parts[2])
    # cgroup v2's unified line ("0::") is the one to show; v1 lines still
    # carry the same container path, so any of them will do for matching.
    unified = next((l.split(":", 2)[2] for l in text.splitlines() if l.startswith("0::")), None)
    shown = unified or (paths[0] if paths else "")
    out: dict = {"cgroup": shown or None, "container": None, "pod_uid": None, "unit": None}
    for path in [shown] + paths:
        if out["container"] is None:
            for runtime, pattern in _RUNTIMES:
                m = pattern.search(path)
                if m:
                    out["container"] = {"runtime": runtime, "id": m.group(1)}
                    break
        if out["pod_uid"] is None:
            m = _POD.search(path)
            if m:
                out["pod_uid"] = m.group(1).replace("_", "-")
        if out["unit"] is None:
            m = _UNIT.search(path)
            if m:
                out["unit"] = m.group(1)
    return out


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
