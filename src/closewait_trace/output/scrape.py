"""The HTTP server behind `--metrics`: small, bounded, one thread.

Anyone who can reach the port is a client, and every local user can reach
127.0.0.1. prometheus-client's own server (http.server with one thread per
connection and no read timeout) let 1,040 idle connections from `nobody`
use up the tracer's 1,024 file descriptors; the tracer then could not read
/proc and served empty scrapes. This server cannot be made to do that:

- one thread and one epoll set, whatever the number of clients;
- at most `max_connections` connections open at once, so the server never
  holds more than max_connections + 4 file descriptors (the listener, the
  epoll set, the sock_diag socket, the one being let in or refused). When
  they are all open, a new one is not simply refused: one user holding
  every place (16 idle connections, reconnecting when dropped, 0.06 s of
  CPU) then failed 37 of 40 scrapes of everyone else. Connections are
  counted by who opened them (the peer's uid: SO_PEERCRED on a Unix
  socket, the uid of the client's own socket from sock_diag on a local TCP
  connection; a remote peer by its address, an IPv6 one by its /64), and
  the place freed is one of the user holding the most: of theirs, the one
  that has gone longest without completing a request (an answered one
  first, then the oldest still without a request; one being answered
  last), the newcomer itself if it ranks first. A scraper holding one
  place is therefore never closed for anyone holding more, and any user
  who holds more than one loses one to a newcomer of another user;
- a request must arrive whole within `read_timeout` of the accept (a client
  that trickles bytes, slowloris, is dropped then), be at most
  `max_request` bytes, and be `GET /metrics` (or HEAD); the answer must be
  taken within `write_timeout`; one request per connection;
- accept() failing for lack of descriptors pauses accepting briefly
  instead of spinning.

A connection whose request has arrived by the time it is accepted is answered
at once, and in each turn of the loop the open connections are served
before new ones are let in: a scraper's request is read before a flood of
newcomers can make its connection the oldest of its user's.

The body comes from a `render(accept_header) -> (bytes, content_type)`
callable (the sink's, which caches prometheus-client's exposition): the
server knows nothing of metrics, and the tests drive it with any body.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

from closewait_trace.kernel.events import Endpoints
from closewait_trace.sockets import sockdiag, subids

MAX_CONNECTIONS = 16       # a scraper needs one; a few Prometheus servers a few
READ_TIMEOUT_S = 5.0       # from accept to the end of the request's headers
WRITE_TIMEOUT_S = 10.0     # to send the whole answer (tens of KiB)
MAX_REQUEST = 8192         # bytes of request line and headers
BACKLOG = 64               # waiting in the kernel: no descriptor of ours
ACCEPT_PAUSE_S = 0.1       # after EMFILE/ENFILE from accept()
ACCEPTS_PER_WAKEUP = 64    # a flood of connects cannot keep the thread in accept()
# After the answer: our side is shut (the client sees the end), and what the
# client still sends is read and thrown away for at most this long (and this
# much), so that closing does not reset the connection, which would discard
# an answer the client has not read yet (a 431 after an oversized request).
DRAIN_S = 1.0
DRAIN_BYTES = 65536

# The counters the server keeps (served as closewait_metrics_* by the sink).
# evicted: closed, still without an answer, for a newcomer of another user
# (or its own user's newer one) while every place was taken.
DROP_REASONS = ("read_timeout", "write_timeout", "too_large", "bad_request",
                "closed_early", "error", "evicted")


@dataclass
class ServerStats:
    served: int = 0
    refused: int = 0                           # a newcomer closed at once, every place taken
    dropped: dict = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    accept_failures: int = 0                   # accept() failed (EMFILE...)


# ------------------------------------------------------------ pure parsing

def parse_request(head: bytes) -> tuple[int, str, bool]:
    """(status, Accept header, is HEAD) of a request's line and headers.
    200 for GET or HEAD of /metrics (a query string is allowed), 404 for
    another path, 405 for another method, 400 for anything malformed."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return 400, "", False
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return 400, "", False
    method, target, _version = parts
    accept = ""
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() == "accept":
            accept = value.strip()
    if method not in ("GET", "HEAD"):
        return 405, accept, False
    if target.split("?", 1)[0] != "/metrics":
        return 404, accept, method == "HEAD"
    return 200, accept, method == "HEAD"


def end_of_head(buf: bytes) -> int:
    """Where the request's headers end (after the blank line), -1 if not yet."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = buf.find(sep)
        if at >= 0:
            return at + len(sep)
    return -1


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
             head_only: bool = False) -> bytes:
    if status != 200 and not body:
        body = f"{REASONS[status]}: closewait-trace serves GET /metrics\n".encode()
    extra = "Allow: GET, HEAD\r\n" if status == 405 else ""
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode("ascii")
    return head if head_only else head + body


# ------------------------------------------------------------ the server

class _Conn:
    __slots__ = ("sock", "buf", "out", "sent", "deadline", "writing", "draining",
                 "peer", "order")

    def __init__(self, sock: socket.socket, deadline: float, peer: Hashable = None,
                 order: int = 0):
        self.sock = sock
        self.buf = bytearray()
        self.out = b""
        self.sent = 0
        self.deadline = deadline
        self.writing = False
        self.draining = 0           # > 0: answered; bytes of the client's left to drop
        self.peer = peer            # who opened it (_Peers.key)
        self.order = order          # accept order: lower is older

    def eviction_rank(self) -> tuple:
        """Lower goes first when a place must be freed: an answered one
        (draining: nothing is lost), then one still without a whole request,
        oldest first (an idle or trickling client; a real scraper sends its
        request as it connects), then one whose answer is being sent."""
        return (0 if self.draining else 2 if self.writing else 1, self.order)


class _Peers:
    """Who is at the other end of an accepted connection, as a key that one
    local user cannot multiply: ("uid", N) for a Unix socket (SO_PEERCRED)
    and for a TCP client on this host (the uid of the client's own socket,
    looked up by its addresses through sock_diag: one request answered
    within the send, about 35 us with the parsing, no scan of the socket
    table), N the user a subordinate uid is lent to (sockets/subids.py: a
    user with thousands for rootless containers is one user here);
    ("address", A) for a client elsewhere (an IPv6 one by its /64, which
    one host is commonly given whole); ("unknown",) when even that is not
    known. Creating the sock_diag socket can fail (no descriptor, a
    sandbox without AF_NETLINK): local clients are then told apart by
    address only, that is not at all (all 127.0.0.1), and the server falls
    back to freeing the oldest idle connection."""

    _UCRED = struct.Struct("=iII")      # pid, uid, gid

    def __init__(self, family: int):
        self._nl: Optional[socket.socket] = None
        self._seq = 0
        if family in (socket.AF_INET, socket.AF_INET6):
            try:
                self._nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                         | socket.SOCK_CLOEXEC, sockdiag.NETLINK_SOCK_DIAG)
            except OSError:
                self._nl = None

    def key(self, sock: socket.socket) -> Hashable:
        if sock.family == socket.AF_UNIX:
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, self._UCRED.size)
                return ("uid", subids.shares().user_of(self._UCRED.unpack(creds)[1]))
            except (OSError, struct.error):
                return ("unknown",)
        try:
            peer, local = sock.getpeername(), sock.getsockname()
        except OSError:             # reset before it was looked at
            return ("unknown",)
        family = sock.family
        paddr, laddr = peer[0].partition("%")[0], local[0].partition("%")[0]
        if family == socket.AF_INET6 and paddr.startswith("::ffff:") and "." in paddr:
            # An IPv4 client of a dual-stack listener: its socket is IPv4.
            family, paddr = socket.AF_INET, paddr[len("::ffff:"):]
            laddr = laddr[len("::ffff:"):] if laddr.startswith("::ffff:") else laddr
        if self._nl is not None:
            self._seq = self._seq % 0xFFFFFFFF + 1
            try:
                uid = sockdiag.socket_uid(self._nl, Endpoints(family, paddr, peer[1], laddr,
                                                               local[1]), self._seq)
            except (OSError, ValueError):
                uid = None
            if uid is not None:
                return ("uid", subids.shares().user_of(uid))
        if family == socket.AF_INET6:
            try:
                return ("address", socket.inet_pton(socket.AF_INET6, paddr)[:8])
            except OSError:
                pass
        return ("address", paddr)

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None


class ScrapeServer:
    """Serves render() on a listening socket it is given (TCP or Unix)."""

    def __init__(self, listener: socket.socket, render: Callable[[str], tuple[bytes, str]],
                 max_connections: int = MAX_CONNECTIONS, read_timeout: float = READ_TIMEOUT_S,
                 write_timeout: float = WRITE_TIMEOUT_S, max_request: int = MAX_REQUEST,
                 clock: Callable[[], float] = time.monotonic,
                 peer_key: Optional[Callable[[socket.socket], Hashable]] = None):
        """peer_key: who opened a connection (default _Peers.key); the
        tests give their own to play two users from one process."""
        self.listener = listener
        self.render = render
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_request = max_request
        self.clock = clock
        self.stats = ServerStats()
        self._conns: dict[int, _Conn] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._accept_paused_until = 0.0
        self._accepted = 0
        self._peers = _Peers(listener.family)
        self._peer_key = peer_key or self._peers.key
        listener.setblocking(False)
        self._sel = selectors.EpollSelector()
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._listening = True

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def peer_counts(self) -> dict:
        """How many of the open connections each peer (user) holds."""
        return dict(Counter(c.peer for c in list(self._conns.values())))

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="metrics-server",
                                        daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_once(0.5)
        finally:
            self._close_all()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._close_all()

    # One turn of the loop: wait for sockets (at most max_wait seconds or
    # until the next deadline), serve what is ready, drop what is late.
    def run_once(self, max_wait: float) -> None:
        now = self.clock()
        if not self._listening and now >= self._accept_paused_until:
            self._sel.register(self.listener, selectors.EVENT_READ, None)
            self._listening = True
        wait = max_wait
        for c in self._conns.values():
            wait = min(wait, c.deadline - now)
        if not self._listening:
            wait = min(wait, self._accept_paused_until - now)
        # The open connections first, the newcomers after: a request that
        # has arrived is read before a newcomer could take its place.
        ready = self._sel.select(max(0.0, wait))
        for key, _events in ready:
            if key.data is not None:
                conn = self._conns.get(key.fd)
                if conn is not None:
                    self._service(conn)
        if any(key.data is None for key, _events in ready):
            self._accept()
        now = self.clock()
        for conn in [c for c in self._conns.values() if now >= c.deadline]:
            if conn.draining:
                self._close(conn)   # answered already: nothing was lost
            else:
                self._drop(conn, "write_timeout" if conn.writing else "read_timeout")

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The listener stays readable: without a pause this
                    # thread would spin. The waiting clients stay queued.
                    self.stats.accept_failures += 1
                    self._sel.unregister(self.listener)
                    self._listening = False
                    self._accept_paused_until = self.clock() + ACCEPT_PAUSE_S
                    return
                continue        # ECONNABORTED and the like: that client left
            sock.setblocking(False)
            self._accepted += 1
            conn = _Conn(sock, self.clock() + self.read_timeout, self._peer_key(sock),
                         self._accepted)
            if len(self._conns) >= self.max_connections:
                victim = self._victim(conn)
                if victim is conn:
                    self.stats.refused += 1
                    sock.close()
                    continue
                self._drop(victim, "evicted")
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            # A scraper sends its request as it connects: answered now, it
            # needs no place past this turn (an idle one just gets EAGAIN).
            self._service(conn)

    def _victim(self, newcomer: _Conn) -> _Conn:
        """The connection to close, every place being taken, for newcomer:
        of the peers holding the most (the newcomer counted with its own),
        the connection with the lowest eviction_rank (the newcomer is the
        newest, so the last of those still without a request). O(cap)."""
        held = Counter(c.peer for c in self._conns.values())
        held[newcomer.peer] += 1
        most = max(held.values())
        candidates = [c for c in self._conns.values() if held[c.peer] == most]
        if held[newcomer.peer] == most:
            candidates.append(newcomer)
        return min(candidates, key=_Conn.eviction_rank)

    def _service(self, conn: _Conn) -> None:
        if conn.draining:
            self._drain(conn)
            return
        try:
            if conn.writing:
                self._send(conn)
                return
            chunk = conn.sock.recv(self.max_request + 1 - len(conn.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn, "error")
            return
        if not chunk:
            self._drop(conn, "closed_early")
            return
        conn.buf += chunk
        end = end_of_head(bytes(conn.buf))
        if end < 0:
            if len(conn.buf) > self.max_request:
                self._answer(conn, response(431), "too_large")
            return
        status, accept, head_only = parse_request(bytes(conn.buf[:end]))
        if status != 200:
            self._answer(conn, response(status), "bad_request")
            return
        try:
            body, content_type = self.render(accept)
        except Exception:           # a bug in rendering: the server goes on
            self._answer(conn, response(500), "error")
            return
        self._answer(conn, response(200, body, content_type, head_only), None)

    def _answer(self, conn: _Conn, data: bytes, problem: Optional[str]) -> None:
        conn.out, conn.sent, conn.writing = data, 0, True
        conn.deadline = self.clock() + self.write_timeout
        conn.buf = bytearray()
        if problem is None:
            self.stats.served += 1
        else:
            self.stats.dropped[problem] += 1
        self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._send(conn)

    def _send(self, conn: _Conn) -> None:
        try:
            while conn.sent < len(conn.out):
                n = conn.sock.send(memoryview(conn.out)[conn.sent:conn.sent + 65536])
                if n <= 0:
                    break
                conn.sent += n
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)       # the client went away: nothing to count
            return
        if conn.sent >= len(conn.out):
            self._finish(conn)

    def _finish(self, conn: _Conn) -> None:
        """The whole answer is sent: shut our side, drop what still comes."""
        conn.out, conn.writing, conn.draining = b"", False, DRAIN_BYTES
        conn.deadline = min(conn.deadline, self.clock() + DRAIN_S)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        except OSError:
            self._close(conn)

    def _drain(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(min(conn.draining, 65536))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        conn.draining -= len(chunk)
        if not chunk or conn.draining <= 0:
            self._close(conn)

    def _drop(self, conn: _Conn, reason: str) -> None:
        self.stats.dropped[reason] += 1
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        self._peers.close()
        try:
            self._sel.close()
        finally:
            self.listener.close()


# ------------------------------------------------------------ listeners

def listen_tcp(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.create_server((addr, port), family=family, backlog=BACKLOG)


class UnsafePath(Exception):
    """The Unix socket's place is not one only we control."""


def listen_unix(path: str, mode: int = 0o600) -> socket.socket:
    """A Unix socket at path, mode 0600 (only root may connect: connecting
    needs write permission on it). Its directory is created 0700 if it is
    missing; an existing one must be a real directory (not a link) owned
    by us and writable by nobody else, or a user could swap the socket for
    their own. An existing socket there that is ours (a previous run's) is
    replaced; anything else (a file, a link, someone else's socket) is
    refused. Raises UnsafePath or OSError."""
    parent, name = os.path.split(path)
    if not os.path.isabs(path) or not name:
        raise UnsafePath(f"{path!r}: give an absolute path to the socket")
    try:
        os.mkdir(parent, 0o700)
    except FileExistsError:
        pass
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(dfd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UnsafePath(f"{parent}: owned by uid {st.st_uid} or writable by others")
        try:
            old = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            old = None
        if old is not None:
            if not stat.S_ISSOCK(old.st_mode) or old.st_uid != os.geteuid():
                raise UnsafePath(f"{path}: exists and is not a socket of ours")
            os.unlink(name, dir_fd=dfd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The directory is ours alone, and bind() goes through our handle on
        # it: nobody can rename a link into the path meanwhile. The umask
        # gives the socket its mode from the start (no window at 0777).
        before = os.umask(0o777 & ~mode)
        try:
            sock.bind(f"/proc/self/fd/{dfd}/{name}")
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(before)
        sock.listen(BACKLOG)
        return sock
    finally:
        os.close(dfd)


def remove_unix(path: str, sock_inode: Optional[int]) -> None:
    """Unlink our socket at close, only if it is still ours (same inode)."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid() and \
                (sock_inode is None or st.st_ino == sock_inode):
            os.unlink(path)
    except OSError:
        pass
