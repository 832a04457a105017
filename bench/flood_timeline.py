#!/usr/bin/env python3
"""Where the time goes when N sockets linger at once: the live loop's
ticks, owner lookups and report batches on one time line, counted from the
moment the workload's clients had closed (bench/run.py's scale workload).

    unshare -n -- bash -c 'ip link set lo up;
        PYTHONPATH=src .venv/bin/python bench/flood_timeline.py --sockets 100000'

The tracer (`python -m closewait_trace --json -t 1s -i 500ms -p ...`, its
output to a file, no reader competing for the CPUs) runs with its
LiveTracer.tick, LiveTracer._resolve and ProcResolver.owners wrapped to log
their start and end (those over 20 ms), and ProcResolver.owners_begin (a
lookahead's lookup begun: its answer is taken at the next tick's start);
nothing else is changed. Printed:
when the sockets entered CLOSE_WAIT, when the first and last were reported,
and each lookup and batch. Numbers in docs/benchmarks.md ("where a flood's
time goes").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def as_tracer(log_path: str, argv: list) -> None:
    """In the tracer's process: the wrappers, then the command's entry point."""
    from closewait_trace.evidence import resolver
    from closewait_trace.live import tracer
    log = open(log_path, "w", buffering=1)

    def timed(cls, name, describe=lambda args: "", least_s=0.02):
        inner = getattr(cls, name)

        @functools.wraps(inner)
        def wrapper(*args, **kwargs):
            began = time.time()
            try:
                return inner(*args, **kwargs)
            finally:
                ended = time.time()
                if ended - began >= least_s:
                    log.write(json.dumps({"name": name, "began": began, "ended": ended,
                                          "what": describe(args)}) + "\n")
        setattr(cls, name, wrapper)

    timed(tracer.LiveTracer, "tick")
    timed(tracer.LiveTracer, "_resolve", lambda args: f"batch of {len(args[1])}")
    timed(resolver.ProcResolver, "owners", lambda args: f"{len(args[1])} sockets")
    # A lookahead's lookup is only begun here (its answer is waited for at
    # the next tick's start, inside "tick"): every one logged.
    timed(resolver.ProcResolver, "owners_begin", lambda args: f"{len(args[1])} sockets",
          least_s=0.0)
    sys.argv = ["closewait-trace"] + argv
    from closewait_trace.entry import main
    main()


def run(total: int, seconds: float) -> dict:
    sys.path.insert(0, HERE)
    import run as bench
    groups = [10_000] * (total // 10_000) + ([total % 10_000] if total % 10_000 else [])
    ports = [bench.free_port() for _ in groups]
    filters = [arg for port in ports for arg in ("-p", str(port))]
    work = tempfile.mkdtemp(prefix="closewait-timeline-")
    out_path, log_path = os.path.join(work, "out.json"), os.path.join(work, "log.json")
    holders: list = []
    clients: list = []
    with open(out_path, "w") as out:
        tracer = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--as-tracer", log_path, "--",
             "--json", "-t", "1s", "-i", "500ms"] + filters,
            stdout=out, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                with open(out_path) as f:
                    if f.readline().startswith('{"type": "start"'):
                        break
                if time.monotonic() > deadline or tracer.poll() is not None:
                    raise SystemExit("flood_timeline: the tracer did not start in 60 s")
                time.sleep(0.1)
            bench.start_lingering(groups, ports, holders, clients)
            closed = time.time()
            time.sleep(seconds)
        finally:
            tracer.send_signal(2)
            tracer.wait(timeout=60)
            bench.stop_all(holders + clients)
    entered, reported = [], []
    with open(out_path) as f:
        for line in f:
            if line.startswith('{"type": "linger"'):
                rec = json.loads(line)
                if rec["update"]:
                    continue        # a new diagnosis of one reported before
                entered.append(rec["entered_at"])
                reported.append(rec["ts"])
    steps = []
    with open(log_path) as f:
        for line in f:
            step = json.loads(line)
            steps.append({"name": step["name"], "what": step["what"],
                          "began_s": round(step["began"] - closed, 3),
                          "ended_s": round(step["ended"] - closed, 3)})

    shutil.rmtree(work, ignore_errors=True)

    def rel(values, pick):
        return round(pick(values) - closed, 2) if values else None
    return {"sockets": total, "reported": len(reported),
            "entered_s": [rel(entered, min), rel(entered, max)],
            "first_report_s": rel(reported, min), "last_report_s": rel(reported, max),
            "steps": steps}


def main() -> None:
    if sys.argv[1:2] == ["--as-tracer"]:
        as_tracer(sys.argv[2], sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sockets", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="how long the tracer runs after the close (default 10)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = ap.parse_args()
    results = []
    for _ in range(args.runs):
        r = run(args.sockets, args.seconds)
        results.append(r)
        print(f"{r['reported']}/{r['sockets']} reported; entered {r['entered_s'][0]} to "
              f"{r['entered_s'][1]} s; first report {r['first_report_s']} s, last "
              f"{r['last_report_s']} s (after the close)")
        for step in r["steps"]:
            if step["name"] != "tick":
                print(f"  {step['began_s']:7.2f} {step['ended_s']:7.2f}  "
                      f"{step['name']} ({step['what']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
