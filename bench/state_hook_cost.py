#!/usr/bin/env python3
"""What the state-change hook costs a connection: the raw tracepoint (the
tracer's way where the kernel's BTF gives the socket's fields) against the
tracepoint's perf event (CLOSEWAIT_TRACE_FORCE=perftp, the way without
BTF), each beside an empty program attached the same way (the floor).

    sudo .venv/bin/python bench/state_hook_cost.py [--rounds 5] [--rate 15000]

bench/churn.c runs paced below saturation (every connection through
CLOSE_WAIT, in a private network namespace), so that each mode makes about
the same connections; what is compared is the CPU time the workload's own
processes used per connection (user + system, its children included:
softirq work on loopback is mostly charged to the task it interrupts),
interleaved rounds, medians. Throughput at saturation (bench/run.py churn)
says the same more noisily on a shared machine. Run as root.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (bench/run.py: churn, namespace, tracer starters)

MODES = ("none", "empty", "empty-raw", "default-perftp", "default")
NAMES = {"none": "no tracer", "empty": "empty program, tracepoint's perf event",
         "empty-raw": "empty program, raw tracepoint",
         "default-perftp": "closewait-trace, perf event (perftp)",
         "default": "closewait-trace, raw tracepoint"}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(mode: str, seconds: float, rate: float, env: dict) -> tuple:
    """(CPU us per connection of the workload, connections, runs the
    kernel skipped of the tracer's programs or None)."""
    port = run.fresh_port()
    tracer = None if mode == "none" else run.Traced(mode, port, env)
    if tracer is not None:
        tracer.wait_ready()
    before = children_cpu_s()
    made = run.churned(seconds, 1, 1, port, rate)
    cpu = children_cpu_s() - before
    skipped = None
    if tracer is not None:
        skipped = run.bpf_recursion_misses(tracer.proc.pid)
        tracer.stop()
    return cpu / made.connections * 1e6, made.connections, skipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rate", type=float, default=15000.0)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m in MODES]
    run.build_churn()
    env = run.bcc_env()
    results = {m: {"us": [], "conns": [], "skipped": []} for m in modes}
    load_before = run.load_average()
    run.setup_netns()
    try:
        for r in range(args.rounds):
            for mode in modes:          # interleaved: A B C, A B C, ...
                us, conns, skipped = one_run(mode, args.seconds, args.rate, env)
                results[mode]["us"].append(us)
                results[mode]["conns"].append(conns)
                results[mode]["skipped"].append(skipped)
                print(f"  round {r + 1} {mode:>15}: {us:6.2f} us CPU a connection, "
                      f"{conns} connections, runs skipped {skipped}", file=sys.stderr)
    finally:
        run.teardown_netns()
    base = statistics.median(results["none"]["us"]) if "none" in results else None
    print(f"Paced churn: {args.rate:g} conn/s for {args.seconds:g} s, {args.rounds} "
          f"interleaved rounds, load average {load_before} before, {run.load_average()} after.")
    print()
    print("| hook | workload CPU us a connection, median | min-max | over no tracer "
          "| runs the kernel skipped, each run |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        med = statistics.median(r["us"])
        over = f"{med - base:+.2f} us" if base is not None and mode != "none" else "-"
        skipped = ", ".join("-" if s is None else str(s) for s in r["skipped"])
        print(f"| {NAMES[mode]} | {med:.2f} | {min(r['us']):.2f}-{max(r['us']):.2f} | {over} "
              f"| {skipped} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
