"""One row of the kernel's TCP socket table, however it was read (sock_diag
or /proc/PID/net/tcp*): the one definition both readers build, so neither
reader has to import the other."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from closewait_trace.kernel.events import Endpoints

# idiag_timer values (net/ipv4/inet_diag.c): 1 retransmit, 2 keepalive (the
# socket's sk_timer), 3 TIME_WAIT, 4 zero-window probe.
KEEPALIVE_TIMER = 2


@dataclass(frozen=True, slots=True)
class TcpRow:
    endpoints: Endpoints
    state: int
    tx_queue: int       # LISTEN: the backlog limit (sock_diag only; 0 from /proc)
    rx_queue: int       # unread bytes + FIN; LISTEN: connections awaiting accept()
    uid: int
    inode: int          # 0 while still in a listener's accept queue
    # From struct tcp_info (sock_diag INET_DIAG_INFO), milliseconds before the
    # dump: None when the kernel gave no tcp_info (or /proc was read).
    last_ack_recv_ms: Optional[int] = None
    last_data_recv_ms: Optional[int] = None
    # inet_diag's idiag_timer (sock_diag only): which timer is pending;
    # KEEPALIVE_TIMER means keepalive probes, whose ACKs renew last_ack_recv.
    timer: int = 0
    # sock_diag's socket cookie: the kernel's number for this socket, unique
    # for its life and never given to another (0: not known, /proc read).
    # The inode is 0 while the socket waits in a listener's accept queue.
    cookie: int = 0


def same_socket(cookie: int, inode: int, other_cookie: int, other_inode: int) -> Optional[bool]:
    """Whether two sightings of a socket on the same addresses are the one
    socket: by cookie where both have one, else by inode where both have
    one, else None (not known). Addresses alone do not say: anyone can
    close a connection and open the next on the same addresses at once."""
    if cookie and other_cookie:
        return cookie == other_cookie
    if inode and other_inode:
        return inode == other_inode
    return None


# How census keys travel: an array of this type code (8 bytes each).
CENSUS_ARRAY = "Q"


def census_key(endpoints: Endpoints, secret: bytes = b"") -> int:
    """A socket's addresses (not its namespace) as a 64-bit number, the
    same in every process: the census (owners.close_wait_census) sends the
    keys of every socket in CLOSE_WAIT (an array of CENSUS_ARRAY), not
    their rows, and the loop compares them with the keys of the sockets it
    knows. Python's own hash of a string
    differs from one process to the next (PYTHONHASHSEED); the family is
    written as its number (socket.AF_INET's repr is not 2's). secret: the
    hash's key (at most 64 bytes), the tracer's own for its run, so that
    nobody who picks addresses picks their keys."""
    ep = endpoints
    digest = hashlib.blake2b(f"{int(ep.family)} {ep.laddr} {ep.lport} {ep.raddr} {ep.rport}"
                             .encode(), digest_size=8, key=secret).digest()
    return int.from_bytes(digest, "little")
