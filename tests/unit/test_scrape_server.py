"""The bounded scrape server (output/scrape.py) without a kernel and without
root: the connection cap, the read and write timeouts, the request cap, the
methods and paths it answers, the Unix socket's safety checks, and the
descriptors a whole MetricsSink keeps under 300 idle connections (in a
child process, counted in /proc/PID/fd: prometheus-client's own server,
the one this replaced, kept one descriptor and one thread per connection).

Timing: every wait is "until it happens, within a generous bound"; the only
lower bound is that a timeout never fires before it is due (a monotonic
clock cannot make that early), never a speed."""

import os
import selectors
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from closewait_trace.output import metrics, scrape

BODY = b"closewait_threshold_seconds 1.0\n"
GENEROUS_S = 30.0


def wait_for(predicate, what, timeout=GENEROUS_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def serve():
    started = []

    def start(render=lambda accept: (BODY, "text/plain; version=0.0.4"), **options):
        listener = scrape.listen_tcp("127.0.0.1", 0)
        server = scrape.ScrapeServer(listener, render, **options)
        server.start()
        started.append(server)
        return server, listener.getsockname()[1]
    yield start
    for server in started:
        server.stop()


def connect(port) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=GENEROUS_S)
    return s


def closed_by_server(s: socket.socket) -> bool:
    """Blocks until the server closes s (EOF or reset): True; False when
    the generous timeout passes first."""
    s.settimeout(GENEROUS_S)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def request(port, raw=b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") -> bytes:
    with connect(port) as s:
        s.sendall(raw)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:     # refused over the cap, with data unread
            pass
        return b"".join(chunks)


def test_get_metrics_is_served_and_the_connection_closed(serve):
    server, port = serve()
    reply = request(port)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Length: %d" % len(BODY) in head and b"Connection: close" in head
    assert body == BODY
    assert request(port, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\n")
    assert server.stats.served == 2


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /metricsX HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
    (b"GET /metrics\r\n\r\n", b"400"),
    (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", b"400"),
])
def test_only_get_metrics(serve, raw, status):
    server, port = serve()
    assert request(port, raw).startswith(b"HTTP/1.1 " + status)
    assert server.stats.dropped["bad_request"] == 1 and server.stats.served == 0


def test_request_over_the_cap_is_refused(serve):
    server, port = serve(max_request=1024)
    reply = request(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 5000)
    assert reply.startswith(b"HTTP/1.1 431")
    assert server.stats.dropped["too_large"] == 1


def test_connection_cap_holds_and_a_new_client_takes_the_oldest_idle_place(serve):
    server, port = serve(max_connections=4, read_timeout=600)
    idle = [connect(port) for _ in range(4)]
    wait_for(lambda: server.open_connections == 4, "4 connections held")
    # One user (this process) holds every place: the one that has gone
    # longest without a request is closed for the newcomer, never more
    # than 4 open.
    extra = connect(port)
    assert closed_by_server(idle[0])
    wait_for(lambda: server.open_connections == 4, "the newcomer in its place")
    assert server.stats.dropped["evicted"] == 1 and server.stats.refused == 0
    for s in idle + [extra]:
        s.close()


def test_a_client_holding_every_place_cannot_keep_a_scraper_out(serve):
    """The reviewer's F3: idle connections that fill the cap and never time
    out here (read_timeout 600 s) made every other scrape fail (refused, the
    newest closed at once). The scraper now gets its answer, and the place
    it took was the oldest idle one's."""
    server, port = serve(max_connections=4, read_timeout=600)
    idle = [connect(port) for _ in range(4)]
    wait_for(lambda: server.open_connections == 4, "4 connections held")
    for _ in range(3):
        assert request(port).endswith(BODY)
    assert server.stats.served == 3 and server.open_connections <= 4
    assert closed_by_server(idle[0])
    for s in idle:
        s.close()


class Churner:
    """A client that keeps `count` connections open to the port, each bound
    first so that its port is known (listed in `ports`) before the server
    can accept it, and opens a new one at once whenever the server closes
    one: the attacker that holds and churns places."""

    def __init__(self, port: int, count: int):
        self.port, self.ports, self.reconnects = port, set(), 0
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        for _ in range(count):
            self.open()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def open(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.ports.add(s.getsockname()[1])
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", self.port))
        except BlockingIOError:
            pass
        self.sel.register(s, selectors.EVENT_READ)

    def run(self):
        while not self.stop.is_set():
            for key, _events in self.sel.select(0.05):
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(key.fileobj)
                    key.fileobj.close()
                    self.open()
                    self.reconnects += 1

    def close(self):
        self.stop.set()
        self.thread.join(GENEROUS_S)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def test_a_user_churning_connections_cannot_keep_another_user_out(serve):
    """Two users, told apart by the peer_key the server is given (here the
    client's port: one process cannot be two users; tests/root/
    test_scrape_fairness.py does it with real uids). The attacker holds
    twice the cap and reconnects at once when dropped; each of its new
    connections costs it one of its own places, never the scraper's, so
    every scrape is answered however the two interleave."""
    churner = []

    def peer_key(sock):
        return ("attacker" if churner and sock.getpeername()[1] in churner[0].ports
                else "scraper")
    server, port = serve(max_connections=4, read_timeout=600, peer_key=peer_key)
    churner.append(Churner(port, 8))
    try:
        wait_for(lambda: churner[0].reconnects >= 20, "the attacker churning")
        for _ in range(20):
            assert request(port).endswith(BODY)
        assert server.stats.served == 20 and server.open_connections <= 4
        assert server.stats.dropped["evicted"] >= 20
    finally:
        churner[0].close()


def test_the_peer_of_a_loopback_or_unix_connection_is_known_by_its_uid(serve, tmp_path):
    """The uid of the client's own socket (sock_diag) on TCP, SO_PEERCRED on
    a Unix socket: what the places are shared by."""
    server, port = serve(read_timeout=600)
    s = connect(port)
    wait_for(lambda: server.open_connections == 1, "the connection accepted")
    assert server.peer_counts() == {("uid", os.geteuid()): 1}
    s.close()
    path = str(tmp_path / "m" / "metrics.sock")
    unix = scrape.ScrapeServer(scrape.listen_unix(path), lambda a: (BODY, "text/plain"),
                               read_timeout=600)
    unix.start()
    try:
        with socket.socket(socket.AF_UNIX) as u:
            u.connect(path)
            wait_for(lambda: unix.open_connections == 1, "the Unix connection accepted")
            assert unix.peer_counts() == {("uid", os.geteuid()): 1}
    finally:
        unix.stop()


def test_idle_and_trickling_clients_are_dropped_after_the_read_timeout(serve):
    server, port = serve(read_timeout=1.0)
    idle = connect(port)
    trickle = connect(port)
    opened = time.monotonic()
    # Slowloris: a byte every 0.1 s, never the blank line that ends a request.
    for b in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 5:
        try:
            trickle.send(bytes([b]))
        except OSError:
            break
        time.sleep(0.1)
    assert closed_by_server(trickle)
    assert closed_by_server(idle)
    assert time.monotonic() - opened >= 1.0         # never before it is due
    assert server.stats.dropped["read_timeout"] == 2 and server.stats.served == 0
    assert server.open_connections == 0
    assert request(port).endswith(BODY)             # and the server serves on


def test_a_client_that_does_not_read_is_dropped_after_the_write_timeout(serve):
    big = b"x" * (64 << 20)        # far more than the socket buffers hold
    server, port = serve(render=lambda accept: (big, "text/plain"), write_timeout=1.0)
    s = connect(port)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
    wait_for(lambda: server.stats.dropped["write_timeout"] == 1, "write timeout")
    assert server.open_connections == 0 and server.stats.served == 1
    s.close()


def test_render_failure_is_a_500_and_the_server_goes_on(serve):
    calls = []

    def render(accept):
        calls.append(accept)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return BODY, "text/plain"
    server, port = serve(render=render)
    assert request(port).startswith(b"HTTP/1.1 500")
    assert request(port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n"
                         b"\r\n").endswith(BODY)
    assert calls[1] == "application/openmetrics-text"


def test_parse_request_and_end_of_head():
    assert scrape.parse_request(b"GET /metrics HTTP/1.1\r\nAccept: a/b\r\n\r\n") == \
        (200, "a/b", False)
    assert scrape.parse_request(b"HEAD /metrics HTTP/1.0\n\n") == (200, "", True)
    assert scrape.end_of_head(b"GET / HTTP/1.1\r\n") == -1
    assert scrape.end_of_head(b"GET / HTTP/1.1\r\n\r\nbody") == 18


# ------------------------------------------------- the whole sink, as a process

SINK_CHILD = r"""
import sys, time
from closewait_trace.output import metrics
sink = metrics.MetricsSink("127.0.0.1", int(sys.argv[1]))
sink.serve()
print("ready", flush=True)
time.sleep(3600)
"""


def scrape_once(port) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=GENEROUS_S) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        reply = b""
        try:
            while chunk := c.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
        return reply


def fds_of(pid) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_300_idle_connections_cost_the_sink_no_more_descriptors_than_its_cap(tmp_path):
    """The class of the attack on prometheus-client's server: idle
    connections, each of which it kept open with a thread and a descriptor.
    Here the sink's process keeps at most MAX_CONNECTIONS of them, and a new
    client still gets a correct scrape."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", SINK_CHILD, str(port)],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "ready"
        before = fds_of(child.pid)
        idle = []
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=GENEROUS_S))
        # Connections are accepted in the order they came: once this one
        # is answered (or refused), the server has taken all 300.
        reply = scrape_once(port)
        during = fds_of(child.pid)
        # listener and epoll are in "before"; the rest: at most the cap, one
        # being refused, one the encoder reads /proc/self with.
        assert during - before <= scrape.MAX_CONNECTIONS + 2, (before, during)
        # The cap may be full of idle ones until their read timeout: a fresh
        # client gets in after at most that (retried up to a generous bound).
        deadline = time.monotonic() + GENEROUS_S
        while not reply.startswith(b"HTTP/1.1 200") and time.monotonic() < deadline:
            time.sleep(0.2)
            reply = scrape_once(port)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert b"closewait_metrics_connections_refused_total" in reply
        assert b"process_open_fds" in reply
        assert fds_of(child.pid) - before <= scrape.MAX_CONNECTIONS + 2
        for s in idle:
            s.close()
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------ Unix socket

def test_unix_socket_is_private_and_replaces_only_its_own(tmp_path):
    base = tmp_path / "run"
    base.mkdir(mode=0o755)
    path = str(base / "cw" / "metrics.sock")
    sock = scrape.listen_unix(path)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(base / "cw").st_mode) == 0o700
    sock.close()
    again = scrape.listen_unix(path)       # a stale socket of ours: replaced
    inode = os.lstat(path).st_ino
    again.close()
    scrape.remove_unix(path, inode)
    assert not os.path.exists(path)


def test_unix_socket_refuses_planted_links_files_and_open_directories(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    target = tmp_path / "victim"
    target.write_text("keep")
    (d / "link.sock").symlink_to(target)
    with pytest.raises(scrape.UnsafePath):
        scrape.listen_unix(str(d / "link.sock"))
    assert target.read_text() == "keep" and os.path.islink(d / "link.sock")
    (d / "file.sock").write_text("x")
    with pytest.raises(scrape.UnsafePath):
        scrape.listen_unix(str(d / "file.sock"))
    # A directory others may write in (they could swap the socket).
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(scrape.UnsafePath):
        scrape.listen_unix(str(shared / "m.sock"))
    # The directory itself a planted link.
    (tmp_path / "linkdir").symlink_to(d)
    with pytest.raises(OSError):
        scrape.listen_unix(str(tmp_path / "linkdir" / "m.sock"))


def test_sink_on_a_unix_socket_serves_and_removes_it(tmp_path):
    path = str(tmp_path / "m" / "metrics.sock")
    sink = metrics.MetricsSink(*metrics.parse_listen("unix:" + path))
    sink.serve()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(GENEROUS_S)
            s.connect(path)
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b"closewait_metrics" in reply
    finally:
        sink.close()
    assert not os.path.exists(path)


def test_unix_listen_errors_are_one_line(tmp_path):
    (tmp_path / "file.sock").write_text("x")
    sink = metrics.MetricsSink(*metrics.parse_listen(f"unix:{tmp_path}/file.sock"))
    with pytest.raises(metrics.UserError) as err:
        sink.serve()
    assert err.value.exit_code == 2 and "not a socket of ours" in err.value.one_line()
    for bad in ("unix:relative.sock", "unix:/", "unix:"):
        with pytest.raises(ValueError):
            metrics.parse_listen(bad)
