"""One socket in CLOSE_WAIT held by a server and N forks of it (a leaked
fd in a pre-fork server), traced with -v: how long from the peer's close
to the report, how many lines and how wide the widest, and how long from
SIGINT to exit. Usage (root): bench/shared_socket.py N [ROUNDS]
(docs/benchmarks.md, issue 17)."""
import os, signal, socket, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACER = [sys.executable, "-m", "closewait_trace"]


def one_round(n: int) -> dict:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    out = tempfile.NamedTemporaryFile("w+", prefix="shared-socket-", suffix=".txt")
    tracer = subprocess.Popen(TRACER + ["-v", "-p", str(port), "-t", "500ms"], stdout=out,
                              stderr=subprocess.DEVNULL,
                              env=dict(os.environ, PYTHONPATH=os.path.join(HERE, "src")))
    while "TIME" not in open(out.name).read():      # the column header: ready
        time.sleep(0.05)
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    kids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            client.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                signal.pause()
        kids.append(pid)
    client.close()                  # the peer's FIN: conn enters CLOSE_WAIT
    closed = time.monotonic()
    while "LINGER" not in open(out.name).read():
        time.sleep(0.05)
        if time.monotonic() - closed > 120:
            break
    reported = time.monotonic() - closed
    time.sleep(3)
    sent = time.monotonic()
    tracer.send_signal(signal.SIGINT)
    try:
        tracer.wait(120)
        exit_s = time.monotonic() - sent
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait()
        exit_s = None
    for k in kids:
        os.kill(k, signal.SIGKILL)
    for k in kids:
        os.waitpid(k, 0)
    lines = open(out.name).read().splitlines()
    conn.close()
    srv.close()
    return {"reported_s": reported, "exit_s": exit_s, "lines": len(lines),
            "widest": max(len(l) for l in lines)}


if __name__ == "__main__":
    n = int(sys.argv[1])
    for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1):
        got = one_round(n)
        exit_s = "not within 120 s" if got["exit_s"] is None else f"{got['exit_s']:.2f} s"
        print(f"{n} forks: reported after {got['reported_s']:.2f} s; {got['lines']} lines, "
              f"widest {got['widest']} characters; SIGINT to exit {exit_s}", flush=True)
