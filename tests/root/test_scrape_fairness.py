"""The metrics endpoint's places against another local user: a real process
run as nobody (setpriv) that holds more connections than the server's cap
and opens a new one at once whenever one is closed (the reviewer's F3: one
such process, 0.06 s of CPU, made 37 of 40 scrapes fail, reset or empty).
The server is the real ScrapeServer in this process, with its real peer
lookup (sock_diag: the uid of the client's socket); the read timeout is
600 s, so no place ever frees by itself: before the fix every scrape was
refused, whatever the timing. Needs root (setpriv), no kernel program.

Nothing here waits for a time to decide the outcome: the test waits until
the attacker holds every place and has been made to reconnect, then every
scrape must be answered."""

import os
import subprocess
import sys

import pytest

from closewait_trace.output import scrape
from tests.unit.test_scrape_server import scrape_once, wait_for  # b"": closed unanswered

pytestmark = pytest.mark.root

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
BODY = b"closewait_threshold_seconds 1.0\n"

# As nobody: keep N connections to the port, never send a byte, and open a
# new one at once when the server closes one. Prints "ready" once the N
# are connected (the server may close some at once), then runs until killed.
HOLD = r"""
import selectors, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sel = selectors.DefaultSelector()
def open_one():
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    sel.register(s, selectors.EVENT_READ)
for _ in range(n):
    open_one()
print("ready", flush=True)
while True:
    for key, _events in sel.select():
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(key.fileobj)
            key.fileobj.close()
            open_one()
"""


@pytest.fixture
def server():
    listener = scrape.listen_tcp("127.0.0.1", 0)
    srv = scrape.ScrapeServer(listener, lambda accept: (BODY, "text/plain"), read_timeout=600)
    srv.start()
    yield srv, listener.getsockname()[1]
    srv.stop()


def test_nobody_holding_and_churning_every_place_cannot_keep_roots_scrapes_out(server):
    srv, port = server
    cap = srv.max_connections
    attacker = subprocess.Popen(AS_NOBODY + [sys.executable, "-c", HOLD, str(port),
                                             str(cap + 4)], stdout=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout.readline().strip() == "ready"
        # Every place is nobody's (told by the uid of its sockets) and nobody
        # is reconnecting: 4 more than the cap, so each new one of its
        # connections has closed one of its own (4 at least so far).
        wait_for(lambda: srv.peer_counts() == {("uid", NOBODY): cap}
                 and srv.stats.refused + srv.stats.dropped.get("evicted", 0) >= 4,
                 "nobody holding every place and churning")
        for i in range(20):
            reply = scrape_once(port)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(BODY), (i, reply[:80])
        # Each scrape took one of nobody's places; the cap held.
        assert srv.stats.served == 20
        assert srv.stats.dropped["evicted"] >= 20
        assert srv.open_connections <= cap
        assert set(srv.peer_counts()) <= {("uid", NOBODY), ("uid", os.geteuid())}
    finally:
        attacker.kill()
        attacker.wait()
