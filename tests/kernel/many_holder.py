"""One process holding N sockets in CLOSE_WAIT (issue 19 §3's pile-up):
it raises its RLIMIT_NOFILE to fit them (past the hard limit only with
CAP_SYS_RESOURCE),
listens on 127.0.0.1:PORT, and N times connects to itself, accepts, closes
the client's end and keeps the accepted one, never reading or closing it.
Prints "ready" when all N are made. Used by tests/kernel/test_top_live.py
and bench/top_scale.py.

    python3 many_holder.py N PORT
"""

import resource
import socket
import sys
import time

n, port = int(sys.argv[1]), int(sys.argv[2])
need = n + 64
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < need:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError):      # no CAP_SYS_RESOURCE: the hard limit binds
        sys.exit(f"many_holder: {n} sockets need {need} open files; the hard limit "
                 f"is {hard} and cannot be raised here")
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(128)
held = []
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port))
    s, _ = srv.accept()
    c.close()
    held.append(s)
print("ready", flush=True)
time.sleep(3600)
