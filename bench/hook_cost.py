#!/usr/bin/env python3
"""What closewait-trace's BPF programs cost, measured by the kernel itself
(kernel.bpf_stats_enabled: run_time_ns and run_cnt of each program, from
/proc/PID/fdinfo), with the EOF-read capture (default) and without it
(CLOSEWAIT_TRACE_FORCE=noeof, as on a kernel without sock:sock_recv_length),
interleaved, under two workloads:

- reads:  bench/recv_cost.c reads a loopback connection one byte at a time
          (1,000,000 reads that return data): the sock:sock_recv_length
          hook's price for an ordinary read, paid by every read on the host;
- churn:  bench/churn.c, where every connection's server reads EOF in
          CLOSE_WAIT: the capture's price (registers + 4 KiB of stack into
          a map) and the state-change hook's.

    sudo .venv/bin/python bench/hook_cost.py [--rounds 3]

Run as root. Turns kernel.bpf_stats_enabled on for the run and restores it.
The tracer runs with -p on the workloads' ports (as bench/run.py does), or
with --no-filter on every socket (then connect()s are captured too: -p
cannot apply at connect(), when a client's local port is not chosen yet).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (bench/run.py: churn build, free ports, tracer command)

RECV = os.path.join("/tmp", f"closewait-bench-recv-{os.getuid()}")
STATS = "/proc/sys/kernel/bpf_stats_enabled"


def programs(pid: int) -> dict:
    """prog name -> (run_time_ns, run_cnt) for the BPF programs pid holds."""
    return {info.get("prog_tag", info["fd"]): (int(info["run_time_ns"]), int(info["run_cnt"]))
            for info in run.bpf_programs(pid) if "run_time_ns" in info}


FILTER = ["-p"]      # --no-filter: [] (every socket; connect()s captured too)


def start_tracer(port: int, env: dict) -> subprocess.Popen:
    args = FILTER + [str(port)] if FILTER else []
    proc = subprocess.Popen(run.TRACER + ["--json"] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, cwd=run.REPO)
    while True:
        line = proc.stdout.readline()
        if not line or line.startswith('{"type": "start"'):
            return proc


def measure(workload, port: int, env: dict):
    """({tag: (ns per run, runs)}, units of work the workload did)."""
    tracer = start_tracer(port, env)
    try:
        before = programs(tracer.pid)
        units = workload(port)
        after = programs(tracer.pid)
    finally:
        tracer.terminate()
        tracer.wait()
    out = {}
    for tag, (ns, cnt) in after.items():
        ns0, cnt0 = before.get(tag, (0, 0))
        if cnt - cnt0 > 0:
            out[tag] = ((ns - ns0) / (cnt - cnt0), cnt - cnt0)
    return out, units


READS = 1_000_000
CHURN_S = 3.0


def reads(_port: int) -> int:
    subprocess.run([RECV, str(READS)], check=True, stdout=subprocess.DEVNULL)
    return READS


def churn(port: int) -> int:
    return int(run.run_churn(CHURN_S, 2, 2, port) * CHURN_S)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-filter", action="store_true",
                    help="trace every socket, as `closewait-trace` with no option: the "
                         "connect() capture is on (with -p it cannot apply)")
    args = ap.parse_args()
    if args.no_filter:
        FILTER.clear()
    if os.geteuid() != 0:
        print("hook_cost: needs root", file=sys.stderr)
        return 3
    subprocess.run(["gcc", "-O2", "-o", RECV, os.path.join(HERE, "recv_cost.c")], check=True)
    run.build_churn()
    with open(STATS) as f:
        saved = f.read().strip()
    env = run.bcc_env()
    results: dict = {}
    per_unit: dict = {}
    run.setup_netns()
    try:
        with open(STATS, "w") as f:
            f.write("1")
        for r in range(args.rounds):
            for mode, mode_env in (("default", env), ("noeof", dict(env, CLOSEWAIT_TRACE_FORCE="noeof"))):
                for name, workload in (("reads", reads), ("churn", churn)):
                    port = run.fresh_port()
                    got, units = measure(workload, port, mode_env)
                    total = sum(ns * cnt for ns, cnt in got.values())
                    per_unit.setdefault((name, mode), []).append(total / max(1, units))
                    for tag, (ns, cnt) in got.items():
                        results.setdefault((name, mode, tag), []).append((ns, cnt))
                        print(f"  round {r + 1} {mode:7} {name:5} prog {tag}: {ns:8.0f} ns/run "
                              f"over {cnt} runs", flush=True)
                    print(f"  round {r + 1} {mode:7} {name:5} all programs: "
                          f"{total / max(1, units):8.0f} ns per {'read' if name == 'reads' else 'connection'} "
                          f"({units} of them)", flush=True)
    finally:
        with open(STATS, "w") as f:
            f.write(saved)
        run.teardown_netns()
    print("\n| workload | tracer | program (tag) | runs per round | ns per run, median (min-max) |")
    print("|---|---|---|---|---|")
    for (name, mode, tag), rows in sorted(results.items()):
        ns = [r[0] for r in rows]
        print(f"| {name} | {mode} | {tag} | {int(statistics.median(r[1] for r in rows))} | "
              f"{statistics.median(ns):.0f} ({min(ns):.0f}-{max(ns):.0f}) |")
    print("\n| workload | tracer | BPF ns per unit (read / connection), median (min-max) |")
    print("|---|---|---|")
    for (name, mode), xs in sorted(per_unit.items()):
        print(f"| {name} | {mode} | {statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
