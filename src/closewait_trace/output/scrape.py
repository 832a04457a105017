"""The HTTP server behind `--metrics`: small, bounded, one thread.

Anyone who can reach the port is a client, and every local user can reach
127.0.0.1. prometheus-client's own server (http.server with one thread per
connection and no read timeout) let 1,040 idle connections from `nobody`
use up the tracer's 1,024 file descriptors; the tracer then could not read
/proc and served empty scrapes. This server cannot be made to do that:

- one thread and one epoll set, whatever the number of clients;
- at most `max_connections` connections open at once: one more is accepted
  and closed at once (counted), so the server never holds more than
  max_connections + 3 file descriptors (the listener, the epoll set, the
  one being refused);
- a request must arrive whole within `read_timeout` of the accept (a client
  that trickles bytes, slowloris, is dropped then), be at most
  `max_request` bytes, and be `GET /metrics` (or HEAD); the answer must be
  taken within `write_timeout`; one request per connection;
- accept() failing for lack of descriptors pauses accepting briefly
  instead of spinning.

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
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

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
DROP_REASONS = ("read_timeout", "write_timeout", "too_large", "bad_request",
                "closed_early", "error")


@dataclass
class ServerStats:
    served: int = 0
    refused: int = 0                           # over the connection cap
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
    __slots__ = ("sock", "buf", "out", "sent", "deadline", "writing", "draining")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.buf = bytearray()
        self.out = b""
        self.sent = 0
        self.deadline = deadline
        self.writing = False
        self.draining = 0           # > 0: answered; bytes of the client's left to drop


class ScrapeServer:
    """Serves render() on a listening socket it is given (TCP or Unix)."""

    def __init__(self, listener: socket.socket, render: Callable[[str], tuple[bytes, str]],
                 max_connections: int = MAX_CONNECTIONS, read_timeout: float = READ_TIMEOUT_S,
                 write_timeout: float = WRITE_TIMEOUT_S, max_request: int = MAX_REQUEST,
                 clock: Callable[[], float] = time.monotonic):
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
        listener.setblocking(False)
        self._sel = selectors.EpollSelector()
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._listening = True

    @property
    def open_connections(self) -> int:
        return len(self._conns)

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
        for key, _events in self._sel.select(max(0.0, wait)):
            if key.data is None:
                self._accept()
            else:
                conn = self._conns.get(key.fd)
                if conn is not None:
                    self._service(conn)
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
            if len(self._conns) >= self.max_connections:
                self.stats.refused += 1
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, self.clock() + self.read_timeout)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

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
