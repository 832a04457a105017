"""CPU time and peak memory of `report` over N synthetic sockets (no root).

    python bench/report_build.py 200000            # report.build over a one-pass generator
    python bench/report_build.py 200000 --list     # the same records held in a list first

Half of the sockets close (a `closed` record each), half are still lingering
at the end; 100 holder processes of one program in 5 systemd units.
CPU time (time.process_time) rather than wall time: the machine may be shared.
"""

import argparse
import resource
import time

from closewait_trace.output import report


def records(n: int):
    yield {"type": "header", "capture_id": "c", "start_ts": 1e9, "hostname": "h", "part": 0}
    for pid in range(100):
        yield {"type": "process", "ts": 1e9, "pid": 1000 + pid, "comm": "srv",
               "identity": {"unit": f"u{pid % 5}.service", "container": None, "pod_uid": None}}
    for i in range(n):
        pid = 1000 + i % 100
        where = {"family": "ipv4", "laddr": "10.0.0.1", "lport": 80 + i % 7,
                 "raddr": f"10.1.{i % 250}.{i % 200}", "rport": i % 60000}
        yield dict(where, type="linger", ts=1e9 + i * 0.001, age_s=1.5,
                   age_is_lower_bound=False, owner_kind="fd",
                   owners=[{"pid": pid, "comm": "srv", "fd": i, "state": "S",
                            "cmdline": "/usr/bin/srv -d"}],
                   diagnosis={"cause": "ignoring_eof", "summary": "alive but never closes",
                              "evidence": {"holders": []}})
        if i % 2:
            yield dict(where, type="closed", ts=1e9 + i * 0.001 + 5, duration_s=6.5,
                       duration_is_lower_bound=False, how="close",
                       closed_by={"pid": pid, "comm": "srv"})
    yield {"type": "summary", "ts": 1e9 + n, "histogram_us": [], "still_lingering": []}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sockets", type=int)
    ap.add_argument("--list", action="store_true", help="hold every record in a list first")
    args = ap.parse_args()
    started = time.process_time()
    source = list(records(args.sockets)) if args.list else records(args.sockets)
    rep = report.build(source)
    built = time.process_time() - started
    report.render_text(rep)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{'list' if args.list else 'stream'}: {rep['sockets']} sockets, "
          f"build {built:.2f} s CPU, peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
