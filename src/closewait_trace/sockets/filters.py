"""The user's filters (pure).

Two kinds, and they cost differently:
- SocketFilter (ports, family) is applied in the kernel for live tracing, so
  a socket it excludes costs nothing; here it is applied to the start-up
  snapshot and to recorded records.
- HolderFilter (pid, comm, cgroup, container, unit) is about the processes
  holding a socket, which only user space can see: it is decided when a
  socket is resolved (after the threshold), so every socket that crosses the
  threshold still costs one resolution, and the kernel's counters still
  count every socket.
"""

from __future__ import annotations

import fnmatch

import socket
from dataclasses import dataclass
from typing import Iterable, Optional

from closewait_trace.kernel.events import Endpoints
from closewait_trace.sockets import identity


_FAMILY_NAMES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


@dataclass(frozen=True)
class SocketFilter:
    lports: tuple[int, ...] = ()
    rports: tuple[int, ...] = ()
    family: Optional[int] = None

    def matches(self, ep: Endpoints) -> bool:
        return self.matches_fields(ep.family_name, ep.lport, ep.rport)

    def matches_record(self, rec: dict) -> bool:
        """The same test over a record's fields (replay, snapshots)."""
        return self.matches_fields(rec.get("family"), rec.get("lport"), rec.get("rport"))

    def matches_fields(self, family_name, lport, rport) -> bool:
        if self.family is not None and family_name != _FAMILY_NAMES[self.family]:
            return False
        if self.lports and lport not in self.lports:
            return False
        if self.rports and rport not in self.rports:
            return False
        return True

    def as_dict(self) -> dict:
        family = _FAMILY_NAMES.get(self.family)
        return {"lports": list(self.lports), "rports": list(self.rports), "family": family}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SocketFilter":
        d = d or {}
        family = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(d.get("family"))
        return cls(lports=tuple(d.get("lports") or ()), rports=tuple(d.get("rports") or ()),
                   family=family)

    def describe(self) -> str:
        parts = []
        if self.lports:
            parts.append("local port " + ",".join(map(str, self.lports)))
        if self.rports:
            parts.append("remote port " + ",".join(map(str, self.rports)))
        if self.family:
            parts.append(self.as_dict()["family"] + " only")
        return "; ".join(parts)


MAX_PORTS = 64          # the kernel program's port maps hold 64


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{whole!r} is not a port number (1-65535) or a range (8080-8090)")
    return int(text)


def parse_ports(values) -> tuple[int, ...]:
    """('80,443', '8080-8082') -> (80, 443, 8080, 8081, 8082); raises
    ValueError on junk, on a backwards range, and past MAX_PORTS ports."""
    ports: set[int] = set()
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            low, dash, high = part.partition("-")
            if dash:
                a, b = _port(low.strip(), part), _port(high.strip(), part)
                if a > b:
                    raise ValueError(f"{part!r}: a range goes from low to high (e.g. {b}-{a})")
                if b - a + 1 > MAX_PORTS:
                    raise ValueError(f"{part!r} is {b - a + 1} ports: at most {MAX_PORTS} "
                                     f"per filter")
                ports.update(range(a, b + 1))
            else:
                ports.add(_port(part, part))
            if len(ports) > MAX_PORTS:
                raise ValueError(f"at most {MAX_PORTS} ports per filter")
    return tuple(sorted(ports))


COMM_LEN = 15           # bytes the kernel keeps of a process name


def comm_matches(pattern: str, comm) -> bool:
    """--comm: a shell glob (python*, *worker?) when it has *, ? or [;
    otherwise a prefix of the name (python matches python3), or the name a
    longer one becomes in the kernel (its first 15 bytes)."""
    if not isinstance(comm, str):
        return False
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(comm, pattern)
    if comm.startswith(pattern):
        return True
    raw = pattern.encode("utf-8", "surrogateescape")
    return len(raw) > COMM_LEN and comm.encode("utf-8", "surrogateescape") == raw[:COMM_LEN]


@dataclass(frozen=True)
class HolderFilter:
    """Only sockets held (or closed) by a matching process. Each option may
    be given several times (any value matches); different options must all
    match the same process.

    A person is a dict with "pid" and "comm", and optionally "identity" (what
    identity.of_process gives: cgroup, container {runtime, id}, unit) needed
    only by the cgroup, container and unit filters."""

    pids: tuple[int, ...] = ()
    comms: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()       # cgroup path, or a parent of it
    containers: tuple[str, ...] = ()    # container id, or a prefix of it (>= 4 chars)
    units: tuple[str, ...] = ()         # systemd unit (".service" may be left out)

    @property
    def active(self) -> bool:
        return bool(self.pids or self.comms or self.needs_identity)

    @property
    def needs_identity(self) -> bool:
        """Whether matching needs each holder's cgroup (one more /proc read)."""
        return bool(self.cgroups or self.containers or self.units)

    def matches_person(self, person: dict) -> bool:
        if self.pids and person.get("pid") not in self.pids:
            return False
        if self.comms and not any(comm_matches(c, person.get("comm")) for c in self.comms):
            return False
        if not self.needs_identity:
            return True
        ident = person.get("identity")
        ident = ident if isinstance(ident, dict) else {}
        if self.cgroups and not any(_under(ident.get("cgroup"), c) for c in self.cgroups):
            return False
        # Decided again from the cgroup path, whoever wrote the identity (a
        # recording of another host, an older version that believed a
        # user's cgroup names): only where root's tools put it.
        found = identity.attribution(ident) if (self.containers or self.units) else {}
        container = found.get("container")
        container = container.get("id") if isinstance(container, dict) else None
        container = container if isinstance(container, str) else ""
        if self.containers and not any(container.startswith(c.lower())
                                       for c in self.containers):
            return False
        unit = found.get("unit") or ""
        if self.units and not any(unit in (u, u + ".service") for u in self.units):
            return False
        return True

    def matches_ownership(self, own, identity_of, identities: dict) -> bool:
        """Whether a resolved socket (owners.Ownership, or None) is one the
        user asked for: any of its holders, or its listener's, matches.
        identity_of(pid, uid) reads a holder's cgroup identity, only when a
        filter needs it, once per pid through identities (a batch's cache)."""
        if not self.active:
            return True
        if own is None:
            return False
        people = []
        for h in own.every_holder:
            person = {"pid": h.pid, "comm": h.comm}
            if self.needs_identity:
                if h.pid not in identities:
                    identities[h.pid] = identity_of(h.pid, h.uid)
                person["identity"] = identities[h.pid]
            people.append(person)
        return self.matches(people)

    def matches(self, people: Iterable[dict]) -> bool:
        """True when no filter is set, or any of these people matches."""
        if not self.active:
            return True
        return any(self.matches_person(p) for p in people)

    def unmatched(self, people: Iterable[dict]) -> list[str]:
        """The values given (as "--unit nginx") that none of these people
        match on their own: a typo, or a service not running, would
        otherwise show an empty trace that looks like good news. Stops
        reading people once every value has matched."""
        left = [(f"{option} {value}", HolderFilter(**{name: (value,)}))
                for option, name, values in (
                    ("--pid", "pids", self.pids), ("--comm", "comms", self.comms),
                    ("--cgroup", "cgroups", self.cgroups),
                    ("--container", "containers", self.containers),
                    ("--unit", "units", self.units))
                for value in values]
        if not left:
            return []
        for person in people:
            left = [(said, f) for said, f in left if not f.matches_person(person)]
            if not left:
                break
        return [said for said, _ in left]

    def names_matched(self, people: Iterable[dict], limit: int = 8) -> dict[str, list[str]]:
        """For each --comm value that is not a whole name: the names it
        matches among these people (at most limit), to say what a prefix
        or a glob caught."""
        out = {}
        for pattern in self.comms:
            names = sorted({p.get("comm") for p in people
                            if comm_matches(pattern, p.get("comm"))} - {pattern})
            if names:
                out[pattern] = names[:limit] + (["..."] if len(names) > limit else [])
        return out

    def as_dict(self) -> dict:
        return {k: list(v) for k, v in (("pids", self.pids), ("comms", self.comms),
                                        ("cgroups", self.cgroups),
                                        ("containers", self.containers),
                                        ("units", self.units)) if v}

    @classmethod
    def from_dict(cls, d) -> "HolderFilter":
        """From a start record's or a header's "filters" (from anywhere:
        anything of the wrong type is left out)."""
        d = d if isinstance(d, dict) else {}

        def values(key, kind):
            v = d.get(key)
            return tuple(x for x in v if type(x) is kind) if isinstance(v, list) else ()
        return cls(pids=values("pids", int), comms=values("comms", str),
                   cgroups=values("cgroups", str), containers=values("containers", str),
                   units=values("units", str))

    def describe(self) -> str:
        parts = []
        for label, values in (("pid", self.pids), ("comm", self.comms),
                              ("cgroup", self.cgroups), ("container", self.containers),
                              ("unit", self.units)):
            if values:
                parts.append(f"{label} " + ",".join(map(str, values)))
        return "; ".join(parts)


def _under(path, wanted: str) -> bool:
    if not isinstance(path, str) or not path:
        return False
    wanted = wanted.rstrip("/") or "/"
    return path == wanted or path.startswith(wanted if wanted == "/" else wanted + "/")


def record_people(rec: dict, identities: Optional[dict] = None) -> list[dict]:
    """The processes a linger/closed/transition record (or a snapshot or
    summary entry) names: its holders, the listener's holders, the closer or
    the task. identities: pid -> identity, e.g. from the `process` records
    read so far, for the cgroup/container/unit filters."""
    people = _dicts(rec.get("owners"))
    listener = rec.get("listener")
    if isinstance(listener, dict):
        people += _dicts(listener.get("owners"))
    for key in ("closed_by", "task"):
        if isinstance(rec.get(key), dict):
            people.append(rec[key])
    if identities:
        people = [dict(p, identity=identities.get(p.get("pid"))) for p in people]
    return people


def _dicts(value) -> list[dict]:
    # Recordings come from anywhere: anything but a list of objects is nobody.
    return [p for p in value if isinstance(p, dict)] if isinstance(value, list) else []


def validate_container(value: str) -> str:
    """A container id or prefix: hex, at least 4 characters."""
    v = value.strip().lower()
    if len(v) < 4 or any(c not in "0123456789abcdef" for c in v):
        raise ValueError(f"{value!r} is not a container id (at least 4 hex digits)")
    return v


def describe_filters(d) -> str:
    """What a "filters" dict (start record, recording header) keeps, in
    words: "local port 80; comm java"."""
    sockets = SocketFilter.from_dict(d if isinstance(d, dict) else {})
    return "; ".join(t for t in (sockets.describe(), HolderFilter.from_dict(d).describe()) if t)
