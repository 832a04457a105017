"""A user cycling their own connections through CLOSE_WAIT on fixed
addresses, as anyone may: N client ports (CBASE .. CBASE + N - 1) connect
to a listener on 127.0.0.1:PORT and shut their sending side at once (the
accepted socket enters CLOSE_WAIT); each accepted socket stays there
HOLD * (0.5 .. 1.5) s, then the client resets (SO_LINGER 0: no TIME_WAIT)
and the same client port connects again 0 .. GAP s later. The tracer, whose
threshold is far above HOLD, must report none of them. With "queued", the
sockets are never accepted while in CLOSE_WAIT: they wait in the
listener's accept queue, where the kernel gives them no inode (the queue
is emptied once a second of the ones the resets closed). With
"alternate", each client port's stays alternate between long ones, 2-3 s
(past a 2 s threshold: reported), and the short ones above; the JSON line
then lists every stay: [client port, inode, seconds].
Prints "ready" once the first N are made, then after SECONDS a JSON line:
the cycles made and the longest any socket stayed in CLOSE_WAIT, measured
from before the shutdown to after the reset.

    python3 cycler.py PORT CBASE N HOLD GAP SECONDS [queued|alternate]
"""

import json
import os
import random
import socket
import struct
import sys
import time

port, cbase, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
hold, gap, seconds = float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
queued = sys.argv[7:] == ["queued"]
alternate = sys.argv[7:] == ["alternate"]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(4096)
EMPTY_EVERY_S = 1.0        # queued: how often the accept queue is emptied
pairs = {}                 # client port -> (client, accepted, when it closes, shut at)
reopen = {}                # client port -> when it connects again
longest = 0.0
stays = []                 # alternate: [client port, inode, seconds]
made = {}                  # alternate: client port -> stays made on it


def open_pair(cport: int) -> None:
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    client.bind(("127.0.0.1", cport))
    client.connect(("127.0.0.1", port))
    accepted = None
    if not queued:
        accepted, peer = listener.accept()
        assert peer[1] == cport, peer
    shut = time.monotonic()
    client.shutdown(socket.SHUT_WR)
    stay = hold * (0.5 + random.random())
    if alternate:
        made[cport] = made.get(cport, 0) + 1
        if made[cport] % 2:
            stay = 2.0 + random.random()
    pairs[cport] = (client, accepted, shut + stay, shut)


def close_pair(cport: int) -> None:
    global longest
    client, accepted, _until, shut = pairs.pop(cport)
    inode = os.fstat(accepted.fileno()).st_ino if accepted is not None else 0
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()              # the reset: the accepted socket leaves CLOSE_WAIT
    took = time.monotonic() - shut
    longest = max(longest, took)
    if alternate:
        stays.append([cport, inode, round(took, 4)])
    if accepted is not None:
        accepted.close()


def empty_the_queue() -> None:
    """Accepts and closes what waits in the accept queue (queued: the
    sockets the resets closed there)."""
    listener.setblocking(False)
    try:
        while True:
            listener.accept()[0].close()
    except BlockingIOError:
        pass
    finally:
        listener.setblocking(True)


for i in range(n):
    open_pair(cbase + i)
print("ready", flush=True)
cycles = 0
end = time.monotonic() + seconds
next_empty = time.monotonic() + EMPTY_EVERY_S
while time.monotonic() < end:
    now = time.monotonic()
    if queued and now >= next_empty:
        empty_the_queue()
        next_empty = now + EMPTY_EVERY_S
    for cport, (_c, _a, until, _shut) in list(pairs.items()):
        if now >= until:
            close_pair(cport)
            cycles += 1
            reopen[cport] = now + gap * random.random()
    for cport, when in list(reopen.items()):
        if now >= when:
            try:
                open_pair(cport)
                del reopen[cport]
            except OSError:
                reopen[cport] = now + 0.01
    time.sleep(0.002)
for cport in list(pairs):
    close_pair(cport)
if queued:
    empty_the_queue()
said = {"cycles": cycles, "longest_s": round(longest, 3)}
if alternate:
    said["stays"] = stays
print(json.dumps(said), flush=True)
