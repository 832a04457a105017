#!/usr/bin/env python3
"""bench/all_cost.py's fast path (raw churn events -> --all's lines ->
/dev/null, CPU time per event) for two source trees, side by side:

    .venv/bin/python bench/all_cost_ab.py BEFORE_TREE AFTER_TREE [--rounds 5]

(a tree: a checkout or `git archive REV src bench tests/unit` extracted.)
Each measurement runs in a fresh process importing that tree's code,
the trees alternating round after round; per round the better of two
passes of 100,000 events. Prints the median (minimum) per tree and the
ratio, with the load average."""

import argparse
import statistics
import subprocess
import sys

CODE = r'''
import sys, time
sys.path[:0] = [sys.argv[1] + "/bench", sys.argv[1], sys.argv[1] + "/src"]
import all_cost
raws = all_cost.raw_events(100000)
off = time.time_ns() - 10**12
print(*[min(all_cost.fast_path(raws, j, off) for _ in range(2)) / 1e5 * 1e6
        for j in (True, False)])
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    res: dict = {}
    for _ in range(args.rounds):
        for name, root in (("before", args.before), ("after", args.after)):
            out = subprocess.run([sys.executable, "-c", CODE, root], capture_output=True,
                                 text=True, check=True).stdout.split()
            res.setdefault(name, []).append(tuple(map(float, out)))
    print(f"{args.rounds} interleaved rounds, load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    print("| output | before us/event median (min) | after | ratio |")
    print("|---|---|---|---|")
    for i, fmt in enumerate(("json", "text")):
        b = [x[i] for x in res["before"]]
        a = [x[i] for x in res["after"]]
        print(f"| {fmt} | {statistics.median(b):.2f} ({min(b):.2f}) | "
              f"{statistics.median(a):.2f} ({min(a):.2f}) | "
              f"{statistics.median(b) / statistics.median(a):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
