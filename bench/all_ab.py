#!/usr/bin/env python3
"""--all's cost, two source trees side by side (issue 20): the kernel's own
statistics of the state-change program (kernel.bpf_stats_enabled:
run_time_ns / run_cnt from /proc/PID/fdinfo), the tracer's CPU per event
written, and what it lost, under the same churn, interleaved round by round.

    sudo .venv/bin/python bench/all_ab.py before=/tmp/old-checkout after=. \
        [--rounds 3] [--seconds 3] [--rate 0] [--tcpstates]

Each tree runs as `python -m closewait_trace --all --json -p PORT` with
PYTHONPATH=TREE/src (its own Python and its own bpf/closewait.bpf.c). The
workload is bench/churn.c (saturating with --rate 0, else paced); after it
the tracer gets until its output is quiet for a second, then SIGINT. Its
loss is what it did not write by then: the transitions the workload made
(bench/churn.c's count) minus the lines written, the same for every
tracer (run.not_written); what it says it lost is shown beside. --tcpstates
adds bcc's tcpstates as a third column in the same rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402
from hook_cost import programs, STATS  # noqa: E402


def one(label: str, tree, env: dict, tcpstates, args) -> dict:
    port = run.fresh_port()
    if tree is None:
        tracer = tcpstates.start(port)
        if tracer is None:
            raise SystemExit(f"tcpstates could not start: {tcpstates.reason}")
    else:
        tracer = run.Traced("all", port, dict(env, PYTHONPATH=os.path.join(tree, "src")))
    tracer.wait_ready(timeout=180)
    cpu0 = run.proc_cpu_s(tracer.proc.pid)
    before = programs(tracer.proc.pid)
    made = run.churned(args.seconds, args.clients, args.servers, port, args.rate)
    rate = made.rate
    after = programs(tracer.proc.pid)
    lag = tracer.wait_written(limit_s=30)
    cpu1 = run.proc_cpu_s(tracer.proc.pid)
    stopped = tracer.stop()
    ns = runs = 0
    each = []
    for tag, (t, n) in after.items():
        t0, n0 = before.get(tag, (0, 0))
        ns += t - t0
        runs += n - n0
        if n > n0:
            each.append(f"{tag[:6]} {(t - t0) / (n - n0):.0f} ns x {n - n0}")
    written = stopped["written"]
    row = {"tree": label, "rate": rate, "written": written, "lost": stopped["lost"],
           "made": made.transitions, "not_written": run.not_written(made, written),
           "lag_s": lag, "ns_per_run": ns / runs if runs else None, "runs": runs,
           # Every program of the tracer (the state change, and the EOF read
           # hook on every read), over the transitions it wrote.
           "bpf_ns_per_event": ns / written if written else None,
           "us_per_event": (cpu1 - cpu0) * 1e6 / written if written else None,
           "exit_s": stopped["exit_s"]}
    print(f"  {label:>10}: {rate:8.0f} conn/s, made {made.transitions}, written {written}, "
          f"not written {row['not_written']}, counted lost {row['lost']}, "
          f"lag {lag:.1f} s, BPF {row['ns_per_run'] or 0:.0f} ns/run over {runs} runs "
          f"({row['bpf_ns_per_event'] or 0:.0f} ns per event written), "
          f"user {row['us_per_event'] or 0:.2f} us/event; by program: {'; '.join(each)}",
          file=sys.stderr, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="LABEL=PATH of a checkout")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=0, help="paced conn/s; 0 = saturating")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--tcpstates", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("all_ab: needs root", file=sys.stderr)
        return 3
    trees = [(t.split("=", 1)[0], os.path.abspath(t.split("=", 1)[1])) for t in args.trees]
    if args.tcpstates:
        trees.append(("tcpstates", None))
    run.build_churn()
    env = run.bcc_env()
    tcpstates = run.TcpstatesStarter(env)
    with open(STATS) as f:
        saved = f.read().strip()
    rows = []
    run.setup_netns()
    try:
        with open(STATS, "w") as f:
            f.write("1")
        for r in range(args.rounds):
            print(f"round {r + 1} (load {run.load_average()})", file=sys.stderr, flush=True)
            for label, tree in trees:
                rows.append(one(label, tree, env, tcpstates, args))
    finally:
        with open(STATS, "w") as f:
            f.write(saved)
        run.teardown_netns()
    print("| tracer | conn/s median | not written per run (counted lost) | BPF ns per event "
          "written, median | tracer CPU us per event written, median |")
    print("|---|---|---|---|---|")
    for label, _ in trees:
        mine = [x for x in rows if x["tree"] == label]
        med = lambda k: statistics.median(x[k] for x in mine if x[k] is not None)  # noqa: E731
        print(f"| {label} | {med('rate'):.0f} | {', '.join('%s (%s)' % (x['not_written'], x['lost']) for x in mine)} | "
              f"{med('bpf_ns_per_event'):.0f} | {med('us_per_event'):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
