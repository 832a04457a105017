#!/usr/bin/env python3
"""Python's cyclic collector in the tracer with N sockets lingering: every
collector pass timed (gc.callbacks in the tracer process), the longest idle
tick (the tracer's summary), peak RSS, and a census of the objects the
collector tracks, by type, taken in the tracer once all N were reported.
Then the holders close every socket and the census is taken again: a socket
that left must leave no tracked objects behind.

Every tick is also timed by section (the loop's calls, what was written
between ticks), and a control loop of the tracer's shape runs alongside:
"slow_ticks" says where a slow tick's time went, "control" what the
machine's load did to an empty tick in the same window. Run it in a
private network namespace so that its sockets are in no one else's tables:

    unshare -n -- bash -c 'ulimit -n 1048576; ip link set lo up;
        GC_SCALE_RAW=/tmp/ticks.json PYTHONPATH=src .venv/bin/python bench/gc_scale.py --sockets 100000'

    sudo .venv/bin/python bench/gc_scale.py --sockets 10000
    sudo .venv/bin/python bench/gc_scale.py --sockets 100000 --metrics   (scraped every 1 s)
    PYTHONPATH=/tmp/old/src ... bench/gc_scale.py ...   (the old code)

The backlog figures ("backlog") also list every stretch over 20 ms
between two looks at the ring buffer (a sip or a poll) with the loop's
frames where it ended: where a burst of departures can overflow the ring.

Numbers in docs/benchmarks.md ("Python's collector kept off the idle tick",
"The idle tick and the departures' tick traced", "The last gaps closed").
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
ticks = []           # (idle, ms, start, sections) of every tick the census did not interrupt
in_census = [False]
# Where a tick's time goes: each of these calls timed (ms, nested ones
# inside their callers'), and what the loop did between two ticks (drain).
sections = {}
between = {"drain_ms": 0.0, "drains": 0, "events": 0}
def timed(name, fn):
    def call(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sections[name] = sections.get(name, 0.0) + (time.perf_counter() - t0) * 1000
    return call
from closewait_trace.live import tracer as _tracer
from closewait_trace.sockets import tracker as _tracker
for _name in ("check_counters", "recheck_owners", "unwatch_left", "take_late_eof_reads",
              "resolve", "view"):
    setattr(_tracer.LiveTracer, _name, timed(_name, getattr(_tracer.LiveTracer, _name)))
for _name in ("sync_entries", "due", "take_left"):
    setattr(_tracker.Tracker, _name, timed(_name, getattr(_tracker.Tracker, _name)))
_drain = _tracer.LiveTracer.drain
def drain(self, *a, **k):
    n = len(self.pending)
    t0 = time.perf_counter()
    _drain(self, *a, **k)
    if n:
        between["drain_ms"] += (time.perf_counter() - t0) * 1000
        between["drains"] += 1
        between["events"] += n
_tracer.LiveTracer.drain = drain
# The backlog a burst of departures leaves out of the ring (kernel/probe.py
# sip; absent from the code before it): its largest size, and the calls.
backlog = {"max_bytes": 0, "sips": 0, "gaps_over_20ms": []}
# The longest stretches between two looks at the ring (a sip or a poll),
# with where the loop was when the look came (the caller's frames): where
# a burst's events can overflow the 1 MiB ring.
last_look = [0.0]
import traceback
def looked(t0):
    if last_look[0]:
        gap = (t0 - last_look[0]) * 1000
        if gap > 20:
            where = [f"{f.name}:{f.lineno}" for f in traceback.extract_stack(limit=7)[:-2]]
            backlog["gaps_over_20ms"].append((round(gap, 1), round(t0, 3), where))
from closewait_trace.kernel import probe as _probe
if hasattr(_probe.KernelProbe, "sip"):
    _sip = _probe.KernelProbe.sip
    def sip(self):
        looked(time.perf_counter())
        took = _sip(self)
        last_look[0] = time.perf_counter()
        backlog["sips"] += 1
        ring = self._ring
        if ring is not None and ring.backlog_bytes > backlog["max_bytes"]:
            backlog["max_bytes"] = ring.backlog_bytes
        return took
    _probe.KernelProbe.sip = sip
# The background sipper's looks (ringreader.sip_in_background; absent from
# the code before it) end a stretch too: they are the ring's, not the loop's.
from closewait_trace.kernel import ringreader as _ringreader
if hasattr(_ringreader.RingReader, "_sip_when_full"):
    _sip_when_full = _ringreader.RingReader._sip_when_full
    def sip_when_full(self, *a):
        looked(time.perf_counter())
        try:
            return _sip_when_full(self, *a)
        finally:
            last_look[0] = time.perf_counter()
            if self.backlog_bytes > backlog["max_bytes"]:
                backlog["max_bytes"] = self.backlog_bytes
    _ringreader.RingReader._sip_when_full = sip_when_full
_poll = _probe.KernelProbe.poll
def poll(self, *a, **k):
    looked(time.perf_counter())
    try:
        return _poll(self, *a, **k)
    finally:
        last_look[0] = time.perf_counter()
_probe.KernelProbe.poll = poll
_tick = _tracer.LiveTracer.tick
wrapped = set()
def tick(self, *a, **k):
    in_census[0] = False
    for obj, name in [(self.probe, "tracked_entries"), (self.resolver, "holder_states"),
                      (self.resolver, "owners"), (self.gc_policy, "after_change")] + \
                     [(s, "tick") for s in self.sinks]:
        if (id(obj), name) not in wrapped:
            wrapped.add((id(obj), name))
            setattr(obj, name, timed(type(obj).__name__ + "." + name, getattr(obj, name)))
    idle = self.tick_stats["idle_ticks"]
    sections.clear()
    context = {"left": len(self.tracker.left), "watched_pids": len(self.watched),
               "lingering": len(self.tracker.by_skaddr), "departed": len(self.tracker.departed),
               **between}
    between.update(drain_ms=0.0, drains=0, events=0)
    started = time.perf_counter()
    _tick(self, *a, **k)
    took = (time.perf_counter() - started) * 1000
    if not in_census[0]:
        ticks.append((self.tick_stats["idle_ticks"] != idle, took, started,
                      dict({k: round(v, 2) for k, v in sections.items()}, **context)))
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
                            "passes": passes[:], "ticks": ticks[:], "backlog": dict(backlog)}) + "\n")
signal.signal(signal.SIGUSR1, census)
sys.argv = ["closewait-trace"] + sys.argv[1:]
from closewait_trace.cli import main
main()
"""

# The control: an empty loop of the tracer's shape, run alongside it, so that
# what the machine's load alone does to a tick can be told from the loop's
# work. Like LiveTracer.run(): waits in poll() at most 100 ms at a time, a
# tick every TICK_S; each tick does a fixed piece of Python work (about 1 ms
# on this machine at rest: the least of 30 tries, calibrated at the start)
# and one round trip to another process (as an idle tick's holder_states
# goes to the gathering worker). On stdin's end, prints its ticks
# [(ms, start)] (time.perf_counter: CLOCK_MONOTONIC, the wrapper's clock).
CONTROL = r"""
import json, os, select, sys, threading, time
TICK_S = float(sys.argv[1])
def work(n):
    x = 0
    for i in range(n):
        x += i & 7
    return x
n = 1000
while True:
    best = min((lambda t0: (work(n), time.perf_counter() - t0)[1])(time.perf_counter())
               for _ in range(30))
    if best >= 0.001:
        break
    n = int(n * 0.0011 / max(best, 1e-6)) + 1
from_parent, to_child = os.pipe()       # (read end, write end)
from_child, to_parent = os.pipe()
if os.fork() == 0:
    os.close(to_child)
    while os.read(from_parent, 1):
        os.write(to_parent, b"x")
    os._exit(0)
done = []
threading.Thread(target=lambda: (sys.stdin.read(), done.append(1)), daemon=True).start()
ticks = []
poller = select.poll()
r, _w = os.pipe()               # never readable: poll() waits its timeout, as on an idle ring buffer
poller.register(r, select.POLLIN)
next_tick = time.monotonic()
while not done:
    now = time.monotonic()
    if now >= next_tick:
        t0 = time.perf_counter()
        work(n)
        os.write(to_child, b"x")
        os.read(from_child, 1)
        ticks.append(((time.perf_counter() - t0) * 1000, t0))
        next_tick = now + TICK_S
    poller.poll(int(max(0.0, min(0.1, next_tick - time.monotonic())) * 1000))
os.close(to_child)
print(json.dumps(ticks), flush=True)
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


def summarize_ticks(ticks: list, passes: list, control: list = ()) -> dict:
    """ticks: (idle, ms, start, sections) from the wrapper; control: (ms,
    start) of the control loop's ticks, of which those in the same window
    are summed up alongside."""
    idle = [(ms, t) for i, ms, t, _s in ticks if i]

    def gc_in(ms, t):       # collector time inside this tick
        return sum(p_ms for _g, p_ms, p_t in passes if t <= p_t < t + ms / 1000)
    slow = [(ms, gc_in(ms, t)) for ms, t in idle if ms > 5]
    out = {"ticks": len(ticks), "idle": len(idle),
           "idle_max_ms": round(max((ms for ms, _t in idle), default=0), 2),
           "idle_over_5ms": len(slow),
           "idle_over_5ms_gc_ms": [(round(a, 1), round(b, 1)) for a, b in slow],
           "idle_gc_max_ms": round(max((gc_in(ms, t) for ms, t in idle), default=0), 2),
           "any_max_ms": round(max((ms for _i, ms, _t, _s in ticks), default=0), 1),
           # Every tick over 5 ms, idle or not, with where its time went.
           "slow_ticks": [{"idle": i, "ms": round(ms, 1), **sec}
                          for i, ms, _t, sec in ticks if ms > 5]}
    if ticks and control:
        first, last = ticks[0][2], ticks[-1][2] + ticks[-1][1] / 1000
        same = [ms for ms, t in control if first <= t <= last]
        out["control"] = {"ticks": len(same), "max_ms": round(max(same, default=0), 2),
                          "over_5ms": sum(ms > 5 for ms in same),
                          "median_ms": round(sorted(same)[len(same) // 2], 2) if same else None}
    return out


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
    control = subprocess.Popen([sys.executable, "-c", CONTROL, "0.5"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
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
        all_reported_at = time.monotonic()
        time.sleep(10.0)                   # idle ticks with N lingering
        lingering = census(tracer, path, 1)
        rss_lingering = bench.rss_kb(tracer.pid)
        # The holders close every socket: each leaves CLOSE_WAIT.
        closing_at = time.monotonic()
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
        closed_lines: dict = {}
        summary = bench.stop_for_summary(tracer, lines, closed_lines)
        control_ticks = json.loads(control.communicate("", timeout=30)[0] or "[]")
        n_lingering = len(lingering.get("ticks", []))
        cost = (summary or {}).get("tracer_cost", {})
        if os.environ.get("GC_SCALE_RAW"):     # every tick, for a timeline
            with open(os.environ["GC_SCALE_RAW"], "w") as f:
                json.dump({"lingering": lingering, "after": after, "control": control_ticks,
                           "all_reported_at": all_reported_at, "closing_at": closing_at,
                           "left_at": left_at}, f)
        counters = (summary or {}).get("counters", {})
        return {"sockets": total, "metrics": metrics, "reported": reported,
                "closed_lines": closed_lines,
                "lost": {k: v for k, v in counters.items() if "lost" in k or "unread" in k},
                "report_s": round(report_s, 2),
                "idle_tick_mean_ms": round(cost.get("idle_mean_ms") or 0, 2),
                "idle_tick_max_ms": cost.get("idle_max_ms"),
                "idle_ticks": cost.get("idle_ticks"),
                "resolve_max_ms": cost.get("resolve_max_ms"),
                "gc_total_ms": cost.get("gc_total_ms"),
                "gc_freezes": cost.get("gc_freezes"), "gc_unfreezes": cost.get("gc_unfreezes"),
                "ticks_to_census": summarize_ticks(lingering.get("ticks", []), lingering.get("passes", []),
                                                   control_ticks),
                # From the last report to the census: N lingering, nothing else.
                "ticks_lingering": summarize_ticks(
                    [t for t in lingering.get("ticks", []) if t[2] >= all_reported_at],
                    lingering.get("passes", []), control_ticks),
                "ticks_after": summarize_ticks(after.get("ticks", [])[n_lingering:],
                                               after.get("passes", []), control_ticks),
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
                "rss_peak_mb": round(hwm / 1024, 1),
                "backlog": after.get("backlog"),
                "unreported": dict(bench.unreported),
                "load_average": bench.load_average()}
    finally:
        if scraper:
            scraper.stop.set()
        bench.stop_all(clients + holders + [tracer, control])
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
