"""The user's filters, applied in the kernel for live tracing and here for
the start-up snapshot and for replay (pure)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Optional

from closewait_trace.events import Endpoints


@dataclass(frozen=True)
class SocketFilter:
    lports: tuple[int, ...] = ()
    rports: tuple[int, ...] = ()
    family: Optional[int] = None

    def matches(self, ep: Endpoints) -> bool:
        if self.family is not None and ep.family != self.family:
            return False
        if self.lports and ep.lport not in self.lports:
            return False
        if self.rports and ep.rport not in self.rports:
            return False
        return True

    def as_dict(self) -> dict:
        family = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}.get(self.family)
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


def parse_ports(values) -> tuple[int, ...]:
    """('80,443', '8080') -> (80, 443, 8080); raises ValueError on junk."""
    ports = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or not 1 <= int(part) <= 65535:
                raise ValueError(f"{part!r} is not a port number (1-65535)")
            ports.append(int(part))
    if len(set(ports)) > 64:
        raise ValueError("at most 64 ports per filter")
    return tuple(sorted(set(ports)))
