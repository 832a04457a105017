#!/usr/bin/env python3
"""Python's cyclic collector in the tracer with N sockets lingering: every
collector pass timed (gc.callbacks in the tracer process), the longest idle
tick (the tracer's summary), peak RSS, and a census of the objects the
collector tracks, by type, taken in the tracer once all N were reported.
Then the holders close every socket and the census is taken again: a socket
that left must leave no tracked objects behind.

    sudo .venv/bin/python bench/gc_scale.py --sockets 10000
    sudo .venv/bin/python bench/gc_scale.py --sockets 100000 --metrics   (scraped every 1 s)
    PYTHONPATH=/tmp/old/src ... bench/gc_scale.py ...   (the old code)

Numbers in docs/benchmarks.md ("Metrics under scale": the collector).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402
import metrics_scale  # noqa: E402

# Runs the tracer in a process that times every collector pass and, on
# SIGUSR1, writes what the collector tracks (by type) to $GC_CENSUS.
WRAPPER = r"""
import collections, gc, json, os, signal, sys, time
passes = []          # (generation, ms, start)
t = [0.0]
def on_gc(phase, info):
    if phase == "start":
        t[0] = time.perf_counter()
    else:
        passes.append((info["generation"], (time.perf_counter() - t[0]) * 1000, t[0]))
gc.callbacks.append(on_gc)
ticks = []           # (idle, ms, start) of every tick the census did not interrupt
in_census = [False]
from closewait_trace.live import tracer as _tracer
_tick = _tracer.LiveTracer.tick
def tick(self, *a, **k):
    in_census[0] = False
    idle = self.tick_stats["idle_ticks"]
    started = time.perf_counter()
    _tick(self, *a, **k)
    took = (time.perf_counter() - started) * 1000
    if not in_census[0]:
        ticks.append((self.tick_stats["idle_ticks"] != idle, took, started))
_tracer.LiveTracer.tick = tick
def census(_s, _f):
    in_census[0] = True
    objs = gc.get_objects()
    by_type = collections.Counter(type(o).__name__ for o in objs)
    n = len(objs)
    del objs
    gc.callbacks.remove(on_gc)      # not one of the tracer's own passes
    started = time.perf_counter()
    gc.collect()        # what a full pass costs now, wherever it would fall
    full_ms = (time.perf_counter() - started) * 1000
    gc.callbacks.append(on_gc)
    with open(os.environ["GC_CENSUS"], "a") as f:
        f.write(json.dumps({"tracked": n, "frozen": gc.get_freeze_count(), "full_pass_ms": full_ms,
                            "by_type": by_type.most_common(25),
                            "passes": passes[:], "ticks": ticks[:]}) + "\n")
signal.signal(signal.SIGUSR1, census)
sys.argv = ["closewait-trace"] + sys.argv[1:]
from closewait_trace.cli import main
main()
"""


def census(tracer, path: str, n_before: int) -> dict:
    tracer.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                rows = f.read().splitlines()
            if len(rows) > n_before:
                return json.loads(rows[n_before])
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    return {}


def summarize_passes(passes: list) -> dict:
    full = [ms for g, ms, _t in passes if g == 2]
    return {"collections": len(passes), "full": len(full),
            "gc_max_ms": round(max((ms for _g, ms, _t in passes), default=0), 1),
            "full_max_ms": round(max(full, default=0), 1)}


def summarize_ticks(ticks: list, passes: list) -> dict:
    idle = [(ms, t) for i, ms, t in ticks if i]

    def gc_in(ms, t):       # collector time inside this tick
        return sum(p_ms for _g, p_ms, p_t in passes if t <= p_t < t + ms / 1000)
    slow = [(ms, gc_in(ms, t)) for ms, t in idle if ms > 5]
    return {"ticks": len(ticks), "idle": len(idle),
            "idle_max_ms": round(max((ms for ms, _t in idle), default=0), 2),
            "idle_over_5ms": len(slow),
            "idle_over_5ms_gc_ms": [(round(a, 1), round(b, 1)) for a, b in slow],
            "idle_gc_max_ms": round(max((gc_in(ms, t) for ms, t in idle), default=0), 2),
            "any_max_ms": round(max((ms for _i, ms, _t in ticks), default=0), 1)}


def one(total: int, metrics: bool, per_process: int = 10_000) -> dict:
    groups = [per_process] * (total // per_process) + ([total % per_process] if total % per_process else [])
    ports = [bench.free_port() for _ in groups]
    fd, path = tempfile.mkstemp(prefix="gc-census-")
    os.close(fd)
    cmd = [sys.executable, "-c", WRAPPER, "--json", "-t", "1s", "-i", "500ms",
           "-p", ",".join(str(p) for p in ports)]
    metrics_port = bench.free_port()
    if metrics:
        cmd += ["--metrics", str(metrics_port)]
    tracer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, GC_CENSUS=path))
    holders, clients = [], []
    scraper = None
    try:
        assert tracer.stdout.readline().startswith('{"type": "start"')
        baseline = census(tracer, path, 0)
        if metrics:                        # scraped every second, as Prometheus would
            scraper = metrics_scale.Scraper(metrics_port, 1.0)
            scraper.start()
        closed_at = bench.start_lingering(groups, ports, holders, clients)
        lines, reported, _with_owners, report_s = bench.follow_reports(
            tracer, ports, total, closed_at, 120)
        time.sleep(10.0)                   # idle ticks with N lingering
        lingering = census(tracer, path, 1)
        rss_lingering = bench.rss_kb(tracer.pid)
        # The holders close every socket: each leaves CLOSE_WAIT.
        for h in holders:
            h.stdin.close()
        for h in holders:
            h.wait(timeout=60)
        left_at = time.monotonic()
        while bench.ss_close_wait_count(ports) and time.monotonic() < left_at + 60:
            time.sleep(1.0)
        time.sleep(15.0)                   # the tracer takes every socket's leaving
        after = census(tracer, path, 2)
        rss_after = bench.rss_kb(tracer.pid)
        hwm = bench.rss_kb(tracer.pid, "VmHWM")
        if scraper:
            scraper.stop.set()
            scraper.join(timeout=15)
        summary = bench.stop_for_summary(tracer, lines)
        cost = (summary or {}).get("tracer_cost", {})
        return {"sockets": total, "metrics": metrics, "reported": reported,
                "report_s": round(report_s, 2),
                "idle_tick_mean_ms": round(cost.get("idle_mean_ms") or 0, 2),
                "idle_tick_max_ms": cost.get("idle_max_ms"),
                "idle_ticks": cost.get("idle_ticks"),
                "resolve_max_ms": cost.get("resolve_max_ms"),
                "gc_total_ms": cost.get("gc_total_ms"),
                "gc_freezes": cost.get("gc_freezes"), "gc_unfreezes": cost.get("gc_unfreezes"),
                "ticks_to_census": summarize_ticks(lingering.get("ticks", []), lingering.get("passes", [])),
                "ticks_after": summarize_ticks(after.get("ticks", [])[len(lingering.get("ticks", [])):],
                                               after.get("passes", [])),
                "reporting": summarize_passes(lingering.get("passes", [])),
                "whole_run": summarize_passes(after.get("passes", [])),
                "idle_and_leaving": summarize_passes(after.get("passes", [])[len(lingering.get("passes", [])):]),
                "tracked_start": baseline.get("tracked"),
                "tracked_lingering": lingering.get("tracked"),
                "full_pass_ms_lingering": round(lingering.get("full_pass_ms", 0), 1),
                "frozen_lingering": lingering.get("frozen"),
                "tracked_after_close": after.get("tracked"),
                "frozen_after_close": after.get("frozen"),
                "by_type_lingering": lingering.get("by_type"),
                "by_type_start": baseline.get("by_type", [])[:8],
                "by_type_after_close": after.get("by_type", [])[:8],
                "rss_lingering_mb": round(rss_lingering / 1024, 1),
                "rss_after_close_mb": round(rss_after / 1024, 1),
                "rss_peak_mb": round(hwm / 1024, 1)}
    finally:
        if scraper:
            scraper.stop.set()
        bench.stop_all(clients + holders + [tracer])
        os.unlink(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=10_000)
    ap.add_argument("--metrics", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it loads BPF programs)", file=sys.stderr)
        return 3
    print(json.dumps(one(args.sockets, args.metrics), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
