#!/usr/bin/env python3
"""The text's cost of a batch of CHANGE records (output/changefold.py):
a holder of many sockets stopped, every socket re-diagnosed at once, its
records written through the terminal sink (text, to memory), folded as
the live trace writes them, and with every row shown (what the text wrote
before the fold, the group's key still made). CPU time of the sink only:
the owner lookup and diagnosis that come before it are not in it.

    .venv/bin/python bench/change_fold.py --sockets 100000 --holders 1
    .venv/bin/python bench/change_fold.py --sockets 2500 --holders 2000   # shared by forks
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import time

from closewait_trace.evidence import diagnosis
from closewait_trace.kernel.events import Endpoints
from closewait_trace.output import render
from closewait_trace.output.lingerlines import LingerReport
from closewait_trace.output.terminal import TerminalSink
from closewait_trace.sockets import owners
from closewait_trace.sockets.tracker import Lingerer


def batch(sockets: int, holders: int) -> list[LingerReport]:
    """sockets lingering sockets held by the same holders processes (the
    first of them on a different fd each), all stopped."""
    out = []
    shared = tuple(owners.Holder(2000 + j, "worker", 5, "T", 1, 1000, "worker --serve")
                   for j in range(1, holders))
    for i in range(sockets):
        ep = Endpoints(socket.AF_INET, "10.0.0.1", 8080, "10.0.0.2", 10000 + i % 50000)
        l = Lingerer(endpoints=ep, enter_ns=1_000_000_000, skaddr=1)
        l.ownership = owners.Ownership(owners.OWNER_FD, holders=(
            owners.Holder(2000, "server", 10 + i, "T", 1, 1000, "server --serve"),) + shared)
        l.diagnosis = diagnosis.Diagnosis(diagnosis.STOPPED, "stopped by a signal: 2000/server")
        out.append(LingerReport(l, 1_700_000_000.0 + i * 1e-6, 5_000_000_000, update=True))
    return out


def run(reports: list, fold: bool) -> tuple[float, int]:
    out = io.StringIO()
    sink = TerminalSink(False, render.TextRenderer(), stream=out)
    if not fold and hasattr(sink, "_changes"):     # (code before the fold: none)
        sink._changes.shown = len(reports) + 1
    started = time.process_time()
    sink.hold_batch(True)
    for r in reports:
        sink.emit_linger(r)
    sink.hold_batch(False)
    return time.process_time() - started, len(out.getvalue().splitlines())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=100_000)
    ap.add_argument("--holders", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    reports = batch(args.sockets, args.holders)
    times: dict = {True: [], False: []}
    lines = {}
    for _ in range(args.rounds):            # interleaved
        for fold in (True, False):
            seconds, lines[fold] = run(reports, fold)
            times[fold].append(seconds)
    for fold in (True, False):
        name = "folded" if fold else "every row shown"
        print(f"{name:16} {statistics.median(times[fold]):7.3f} s CPU median "
              f"({min(times[fold]):.3f}-{max(times[fold]):.3f}), {lines[fold]:,} lines, "
              f"{args.sockets:,} CHANGE records of sockets held by {args.holders} "
              f"process{'es' if args.holders != 1 else ''}")


if __name__ == "__main__":
    main()
