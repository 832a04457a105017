#!/usr/bin/env python3
"""What the tracer adds to creating threads and processes: its program at
task:task_newtask (a registered CPython process's forks get its entry) and
at sched:sched_process_exec/exit runs at every clone(), fork() and exit.

    .venv/bin/python bench/newtask_cost.py [--rounds 5] [--threads 20000] [--forks 2000]

A small C program creates and joins N threads, then forks and reaps M
children (each exits at once), timing each part; it runs alternately
without the tracer and with `closewait-trace --json -p PORT` running
(default options: both captures on), ROUNDS times each. Printed: the
medians per thread and per fork, and the difference. Root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SOURCE = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void *nothing(void *arg) { return arg; }

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    int threads = atoi(argv[1]), forks = atoi(argv[2]);
    double t0 = now();
    for (int i = 0; i < threads; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, nothing, NULL) != 0) return 1;
        pthread_join(t, NULL);
    }
    double t1 = now();
    for (int i = 0; i < forks; i++) {
        pid_t p = fork();
        if (p == 0) _exit(0);
        waitpid(p, NULL, 0);
    }
    double t2 = now();
    printf("%.9f %.9f\n", (t1 - t0) / threads, (t2 - t1) / forks);
    return 0;
}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=20_000)
    ap.add_argument("--forks", type=int, default=2_000)
    args = ap.parse_args()
    import run as bench
    work = tempfile.mkdtemp(prefix="closewait-newtask-")
    src, binary = os.path.join(work, "tasks.c"), os.path.join(work, "tasks")
    with open(src, "w") as f:
        f.write(SOURCE)
    subprocess.run(["gcc", "-O2", "-pthread", "-o", binary, src], check=True)
    results: dict = {"none": [], "traced": []}
    for _ in range(args.rounds):
        for mode in ("none", "traced"):
            tracer = None
            if mode == "traced":
                tracer = subprocess.Popen(bench.TRACER + ["--json", "-p", str(bench.free_port())],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True)
                if not tracer.stdout.readline().startswith('{"type": "start"'):
                    raise SystemExit("newtask_cost: the tracer did not start")
            try:
                out = subprocess.run([binary, str(args.threads), str(args.forks)],
                                     capture_output=True, text=True, check=True).stdout
            finally:
                if tracer is not None:
                    tracer.send_signal(2)
                    tracer.wait(timeout=30)
            per_thread, per_fork = (float(x) for x in out.split())
            results[mode].append((per_thread, per_fork))
            time.sleep(0.2)
    for mode, rows in results.items():
        t = statistics.median(r[0] for r in rows) * 1e6
        f = statistics.median(r[1] for r in rows) * 1e6
        print(f"{mode:7s} thread create+join {t:7.2f} us   fork+exit+wait {f:8.2f} us")
    t0, f0 = (statistics.median(r[i] for r in results["none"]) for i in (0, 1))
    t1, f1 = (statistics.median(r[i] for r in results["traced"]) for i in (0, 1))
    print(f"added: {(t1 - t0) * 1e6:+.2f} us a thread ({(t1 / t0 - 1) * 100:+.1f}%), "
          f"{(f1 - f0) * 1e6:+.2f} us a fork ({(f1 / f0 - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
