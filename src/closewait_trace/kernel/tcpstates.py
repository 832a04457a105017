"""TCP state numbers as the kernel defines them, and their names (pure)."""

ESTABLISHED = 1
SYN_SENT = 2
SYN_RECV = 3
FIN_WAIT1 = 4
FIN_WAIT2 = 5
TIME_WAIT = 6
CLOSE = 7
CLOSE_WAIT = 8
LAST_ACK = 9
LISTEN = 10
CLOSING = 11
NEW_SYN_RECV = 12

NAMES = {
    ESTABLISHED: "ESTABLISHED",
    SYN_SENT: "SYN_SENT",
    SYN_RECV: "SYN_RECV",
    FIN_WAIT1: "FIN_WAIT1",
    FIN_WAIT2: "FIN_WAIT2",
    TIME_WAIT: "TIME_WAIT",
    CLOSE: "CLOSE",
    CLOSE_WAIT: "CLOSE_WAIT",
    LAST_ACK: "LAST_ACK",
    LISTEN: "LISTEN",
    CLOSING: "CLOSING",
    NEW_SYN_RECV: "NEW_SYN_RECV",
}

# Transitions the kernel makes only from a system call of the process that
# owns the socket (connect, listen, close, shutdown). Every other transition
# can run in softirq on top of whatever task was on the CPU, so the task the
# tracepoint sees there says nothing about the socket.
PROCESS_CONTEXT = {
    (CLOSE, SYN_SENT),          # connect()
    (CLOSE, LISTEN),            # listen()
    (LISTEN, CLOSE),            # close() of a listener
    (ESTABLISHED, FIN_WAIT1),   # close() or shutdown(SHUT_WR)
    (CLOSE_WAIT, LAST_ACK),     # close() or shutdown(SHUT_WR)
}


def name(state: int) -> str:
    return NAMES.get(state, f"STATE_{state}")


def runs_in_process_context(old: int, new: int) -> bool:
    return (old, new) in PROCESS_CONTEXT
