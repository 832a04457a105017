#!/usr/bin/env python3
"""`closewait-trace top` with many sockets in CLOSE_WAIT held by one process
(issue 19 §3), in a real terminal (tmux, 100x30): what the refresh costs.

    sudo .venv/bin/python bench/top_scale.py                  # 0 and 5,000 sockets
    sudo .venv/bin/python bench/top_scale.py --sockets 0,5000,20000 --seconds 10

For each count: one process holds N sockets (tests/kernel/many_holder.py),
`top -p PORT` runs in tmux; once the view shows N, the CPU time of the top
process and its children (the evidence worker) is read from /proc over
--seconds (utime + stime, clock ticks), given as % of one CPU; then `q` is
sent and the time until the process is gone is measured. Prints a Markdown
table (the one in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRACER = [sys.executable, "-m", "closewait_trace"]
HOLDER = os.path.join(REPO, "tests", "kernel", "many_holder.py")
TICK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, REPO)
from tests.kernel.harness import free_port, wait_until  # noqa: E402  (the tests' own waits)


def cpu_ticks(pid: int) -> int:
    """utime + stime of pid and of its live children (one level: the
    evidence worker), in clock ticks."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def one(n: int, seconds: float) -> dict:
    port = free_port()
    holder = subprocess.Popen([sys.executable, HOLDER, str(n), str(port)],
                              stdout=subprocess.PIPE, text=True)
    sock = f"cwtop-bench-{os.getpid()}"
    tmux = ["tmux", "-L", sock]
    tmp = tempfile.mkdtemp(prefix="cwtop-bench-")
    pidfile = os.path.join(tmp, "pid")
    try:
        assert holder.stdout.readline().strip() == "ready"
        ss = subprocess.run(["ss", "-Htan", "state", "close-wait", "sport", "=", f":{port}"],
                            capture_output=True, text=True).stdout
        in_ss = len(ss.splitlines())
        cmd = shlex.join(TRACER + ["top", "-p", str(port)])
        env = f"PYTHONPATH={shlex.quote(os.path.join(REPO, 'src'))}"
        shell = f"echo $$ > {shlex.quote(pidfile)}; {env} exec {cmd}"
        started = time.monotonic()
        subprocess.run(tmux + ["new-session", "-d", "-x", "100", "-y", "30", shell], check=True)
        pid = wait_until(lambda: os.path.exists(pidfile) and open(pidfile).read().strip()
                         and int(open(pidfile).read()), 30, "the pid")
        headline = f"{n} socket{'' if n == 1 else 's'} in CLOSE_WAIT"
        wait_until(lambda: headline in subprocess.run(tmux + ["capture-pane", "-p"],
                                                       capture_output=True, text=True).stdout,
                   120, "the view")
        first_view = time.monotonic() - started
        time.sleep(1.0)                  # past the first frames
        t0, c0 = time.monotonic(), cpu_ticks(pid)
        time.sleep(seconds)
        t1, c1 = time.monotonic(), cpu_ticks(pid)
        screen = subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True,
                                text=True).stdout
        rows = [l for l in screen.splitlines() if f"{holder.pid}/python" in l]
        q_at = time.monotonic()
        subprocess.run(tmux + ["send-keys", "q"], check=True)
        wait_until(lambda: not alive(pid), 60, "top to quit")
        quit_s = time.monotonic() - q_at
        return {"sockets": n, "in_ss": in_ss, "rows": len(rows),
                "row": rows[0].split()[0] if rows else "-",
                "cpu_pct": 100.0 * (c1 - c0) / TICK / (t1 - t0),
                "first_view_s": first_view, "quit_s": quit_s}
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True)
        holder.kill()
        holder.wait()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sockets", default="0,5000", help="comma-separated counts")
    ap.add_argument("--seconds", type=float, default=10.0, help="CPU measured over this long")
    args = ap.parse_args()
    results = [one(int(n), args.seconds) for n in args.sockets.split(",")]
    print(f"| sockets (ss) | rows for the holder (its count) | top CPU % of one core over "
          f"{args.seconds:g} s | first view (s after start) | q to exit (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sockets']} ({r['in_ss']}) | {r['rows']} ({r['row']}) | "
              f"{r['cpu_pct']:.1f} | {r['first_view_s']:.1f} | {r['quit_s']:.2f} |")


if __name__ == "__main__":
    main()
