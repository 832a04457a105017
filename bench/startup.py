#!/usr/bin/env python3
"""Start-up to "ready" and SIGINT to exit, per mode, old code against new.

    sudo .venv/bin/python bench/startup.py                       # this checkout
    sudo .venv/bin/python bench/startup.py --rounds 10 --modes default,port,all \\
        --src /tmp/old/src --src src                              # interleaved A/B
    sudo .venv/bin/python bench/startup.py --load                 # exit under churn

Each round starts `python -m closewait_trace --json [...]` (with each --src
tree as its PYTHONPATH, in turn, so that old and new code share the
machine's load) and times:
- ready: launch to the "start" record on stdout (what a user or script
  waits for; the header cache is warm: every round after the first reuses
  /var/cache/closewait-trace's merged headers, and a first, untimed round
  makes sure of it);
- exit: SIGINT to the process reaped (os.wait4), either at idle, 0.5 s
  after ready, or with --load while bench/churn.c saturates the machine on
  the traced port (2 clients, 2 servers, in a network namespace of its
  own, as bench/run.py churn), the signal sent 1 s into the churn.
Modes: default (`--json`, every port), port (`--json -p PORT`), all
(`--all --json -p PORT`). The summary's counters are checked at each exit:
lost, unread and written add up (nothing left uncounted). Prints a
Markdown table: median, min and max per mode and tree.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (bench/run.py: Traced, the churn and its namespace)

PYCACHE = f"/tmp/closewait-bench-pycache-{os.getuid()}"
MODES = {"default": [], "port": ["-p", "{port}"], "all": ["--all", "-p", "{port}"]}


def start(src: str, mode: str, port: int) -> "run.Traced":
    # Not bench/run.py's environment: the tracer chooses its own headers
    # (warm cache). Byte-compiled modules, as an installed package has them
    # (kept outside the tree; the untimed first round writes them).
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src),
               PYTHONPYCACHEPREFIX=PYCACHE)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    args = [a.format(port=port) for a in MODES[mode]]
    return run.Traced("all" if mode == "all" else "default", port, env,
                      cmd=run.TRACER + ["--json"] + args)


def one_round(src: str, mode: str, load: bool) -> dict:
    port = run.fresh_port() if load else run.free_port()
    traced = start(src, mode, port)
    ready_s = traced.wait_ready(timeout=run.STARTUP_LIMIT_S)
    churn = None
    if load:
        churn = subprocess.Popen(run.churn_cmd(port, 3, 2, 2), stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    else:
        time.sleep(0.5)
    stopped = traced.stop()
    if churn is not None:
        churn.wait()
    summary = stopped["summary"] or {}
    counters = summary.get("counters", {})
    uncounted = None
    if mode == "all" and counters:
        uncounted = (counters.get("transitions", 0) - stopped["written"]
                     - counters.get("events_lost", 0) - counters.get("events_unread", 0))
    return {"ready_s": ready_s, "exit_s": stopped["exit_s"], "killed": stopped["killed"],
            "unread": counters.get("events_unread"), "uncounted": uncounted,
            "summary": bool(summary)}


def fmt(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default="default,port,all")
    ap.add_argument("--src", action="append",
                    help="a tree's src/ directory (repeat to compare; default: this checkout's)")
    ap.add_argument("--load", action="store_true",
                    help="SIGINT while bench/churn.c saturates the traced port")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it loads BPF programs)", file=sys.stderr)
        return 3
    # The thread that reaps the tracer (run.Traced.stop) takes the time as
    # soon as it has the interpreter: not after 5 ms of the output reader's.
    sys.setswitchinterval(0.0005)
    srcs = args.src or [os.path.join(run.REPO, "src")]
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            print(f"bench: unknown mode {m!r} (use {', '.join(MODES)})", file=sys.stderr)
            return 2
    if args.load:
        run.build_churn()
        run.setup_netns()
    results = {(s, m): [] for s in srcs for m in modes}
    try:
        # Untimed: the header cache warm, the files in the page cache.
        start(srcs[0], modes[0], run.free_port()).stop()
        for _ in range(args.rounds):
            for m in modes:
                for s in srcs:
                    results[(s, m)].append(one_round(s, m, args.load))
    finally:
        if args.load:
            run.teardown_netns()
    print(f"Machine: {run.machine()}; load average at the end: {run.load_average()}; "
          f"{args.rounds} rounds, interleaved; exit {'under churn' if args.load else 'at idle'}")
    print()
    print("| mode | tree | ready s: median (min-max) | SIGINT -> exit s: median (min-max) | "
          "unread at exit (max) | uncounted | summary |")
    print("|---|---|---|---|---|---|---|")
    for m in modes:
        for s in srcs:
            r = results[(s, m)]
            unread = [x["unread"] for x in r if x["unread"] is not None]
            uncounted = {x["uncounted"] for x in r if x["uncounted"] is not None}
            print(f"| {m} | {s} | {fmt([x['ready_s'] for x in r])} | "
                  f"{fmt([x['exit_s'] for x in r])} | {max(unread) if unread else '-'} | "
                  f"{','.join(str(u) for u in sorted(uncounted)) or '-'} | "
                  f"{sum(x['summary'] for x in r)}/{len(r)} |")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
