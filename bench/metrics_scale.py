#!/usr/bin/env python3
"""Do Prometheus scrapes delay the tracer? The scale workload of run.py (N
sockets held in CLOSE_WAIT at once), traced without --metrics, with
--metrics scraped every second (a normal Prometheus), and with --metrics
scraped back to back by a client that never pauses (the worst case).

    sudo .venv/bin/python bench/metrics_scale.py --sockets 100000
    sudo .venv/bin/python bench/metrics_scale.py --smoke

Per mode: seconds from the last close until every socket was reported,
tick costs from the tracer's summary (an idle tick includes building the
metrics snapshot), the largest gap between two ticks as the scraper saw it
(closewait_last_tick_timestamp_seconds; ticks are due every 500 ms), scrape
latency and size, and the tracer's memory. Numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (the scale workload and helpers)

MODES = {"no --metrics": None, "scraped every 1 s": 1.0, "scraped back to back": 0.0}


class Scraper(threading.Thread):
    def __init__(self, port: int, interval: float):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.sizes: list[int] = []
        self.ticks: list[float] = []      # distinct last-tick timestamps, in order
        self.errors = 0

    def run(self):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                body = urllib.request.urlopen(self.url, timeout=10).read()
            except OSError:
                self.errors += 1
                time.sleep(0.1)
                continue
            self.latencies.append(time.monotonic() - started)
            self.sizes.append(len(body))
            for line in body.splitlines():
                if line.startswith(b"closewait_last_tick_timestamp_seconds "):
                    ts = float(line.split()[1])
                    if not self.ticks or ts != self.ticks[-1]:
                        self.ticks.append(ts)
            if self.interval:
                self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))


def one(total: int, scrape: float | None, per_process: int = 10_000) -> dict:
    groups = [per_process] * (total // per_process) + ([total % per_process] if total % per_process else [])
    metrics_port = bench.free_port()
    # Traced with a port filter: on a shared machine, other people's sockets
    # in CLOSE_WAIT would otherwise be measured too.
    ports = [bench.free_port() for _ in groups]
    cmd = bench.TRACER + ["--json", "-t", "1s", "-i", "500ms",
                          "-p", ",".join(str(p) for p in ports)]
    if scrape is not None:
        cmd += ["--metrics", str(metrics_port)]
    tracer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holders, clients = [], []
    scraper = None
    try:
        assert tracer.stdout.readline().startswith('{"type": "start"')
        if scrape is not None:
            scraper = Scraper(metrics_port, scrape)
            scraper.start()
        closed_at = bench.start_lingering(groups, ports, holders, clients)
        lines, reported, _with_owners, report_s = bench.follow_reports(
            tracer, ports, total, closed_at, 90)
        time.sleep(5.0)                    # idle ticks, scraped, with N lingering
        rss = bench.rss_kb(tracer.pid, "VmHWM")
        if scraper:
            scraper.stop.set()
            scraper.join(timeout=15)
        summary = bench.stop_for_summary(tracer, lines)
        cost = (summary or {}).get("tracer_cost", {})
        out = {"sockets": total, "reported": reported, "report_s": round(report_s, 2),
               "idle_tick_mean_ms": cost.get("idle_mean_ms"),
               "idle_tick_max_ms": cost.get("idle_max_ms"),
               "resolve_max_ms": cost.get("resolve_max_ms"), "rss_peak_mb": round(rss / 1024, 1),
               "gc_max_ms": cost.get("gc_max_ms")}
        if scraper:
            gaps = [b - a for a, b in zip(scraper.ticks, scraper.ticks[1:])]
            lat = sorted(scraper.latencies)
            out.update({"scrapes": len(lat), "scrape_errors": scraper.errors,
                        "scrape_median_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
                        "scrape_max_ms": round(lat[-1] * 1000, 1) if lat else None,
                        "scrape_kb": round(max(scraper.sizes) / 1024, 1) if scraper.sizes else None,
                        "tick_gap_max_s": round(max(gaps), 2) if gaps else None})
        return out
    finally:
        if scraper:
            scraper.stop.set()
        bench.stop_all(clients + holders + [tracer])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=100_000)
    ap.add_argument("--smoke", action="store_true", help="200 sockets: seconds")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: needs root (it loads BPF programs)", file=sys.stderr)
        return 3
    total = 200 if args.smoke else args.sockets
    rows = {mode: one(total, scrape) for mode, scrape in MODES.items()}
    print("| mode | sockets reported | all reported, s after close | idle tick mean / max ms "
          "| resolve batch max ms | largest gap between ticks s | scrapes | scrape median / max ms | scrape KB | tracer peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['reported']} | {r['report_s']} | {r['idle_tick_mean_ms']} / "
              f"{r['idle_tick_max_ms']} | {r['resolve_max_ms']} | {r.get('tick_gap_max_s', '-')} | {r.get('scrapes', '-')} | "
              f"{r.get('scrape_median_ms', '-')} / {r.get('scrape_max_ms', '-')} | "
              f"{r.get('scrape_kb', '-')} | {r['rss_peak_mb']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
