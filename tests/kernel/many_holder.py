"""One process holding N sockets in CLOSE_WAIT (issue 19 §3's pile-up):
it raises its RLIMIT_NOFILE to fit them (past the hard limit only with
CAP_SYS_RESOURCE), listens on 127.0.0.1:PORT, and N times connects to
itself, accepts, shuts the client's end for writing (its FIN puts the
accepted one in CLOSE_WAIT) and keeps both, never reading or closing them.
Prints "ready" when all N are made. Used by tests/kernel/test_top_live.py,
test_burst_live.py, test_scale_counts_live.py, test_rescan_live.py and
bench/top_scale.py.

The client ends are kept open, not closed: a closed one is an orphan in
FIN_WAIT2, which the kernel keeps as a time-wait entry that a later
connect() may reuse after a second (tcp_tw_reuse, on for loopback) or
drops when the machine's time-wait table is full. Its port then goes to a
new connection to the same listener, whose SYN meets the old accepted
socket still in CLOSE_WAIT: challenge ACK, reset, and that socket leaves
CLOSE_WAIT (as `abort`) while this process builds the rest. A test that
expects N sockets in CLOSE_WAIT then found fewer, depending on what else
the machine had done (18,999 of 19,000 in one CI run; 3,962 of 19,000 left
while a helper's churn filled the table). An open client's port is never
handed out again while it lives.

    python3 many_holder.py N PORT
"""

import resource
import socket
import sys
import time

n, port = int(sys.argv[1]), int(sys.argv[2])
need = 2 * n + 64          # the accepted sockets and their clients
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
    c.shutdown(socket.SHUT_WR)
    held.append(s)
    held.append(c)
print("ready", flush=True)
time.sleep(3600)
