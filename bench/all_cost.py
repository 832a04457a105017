#!/usr/bin/env python3
"""--all's user-space cost per event, without the kernel: raw struct
cw_event records (a churn's five server-side transitions per connection)
turned into output lines written to /dev/null, CPU time per event.

    .venv/bin/python bench/all_cost.py [--events 100000] [--rounds 3]

Two paths, interleaved round by round (a shared machine's load weighs on
both alike):
- records: what every event went through before issue 20 and what a
  recording (-w) still takes: decode_event (a KernelEvent, an Endpoints),
  records.transition (a dict), json.dumps or the text renderer, a write per
  line;
- fast: the terminal's path since: one struct unpacking per record
  (struct.iter_unpack here; the ring buffer is read the same way),
  output/transitions.py's templates, one write per batch of 4,096.
The ring buffer's own cost (libbpf's callback, or reading the mapping) is
not in either; bench/run.py sweep measures the whole tracer.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "src")]

from closewait_trace.output.terminal import TerminalSink as Output                       # noqa: E402
from closewait_trace.kernel.events import EventLayout, decode_event   # noqa: E402
from closewait_trace.output import records, render          # noqa: E402
from tests.unit.transition_golden import RawEvent, _ip4      # noqa: E402

# LISTEN->SYN_RECV, SYN_RECV->ESTABLISHED, ESTABLISHED->CLOSE_WAIT,
# CLOSE_WAIT->LAST_ACK (the server's close(): its task is named), LAST_ACK->CLOSE
SERVER_SIDE = [(10, 3), (3, 1), (1, 8), (8, 9), (9, 7)]


def raw_events(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        old, new = SERVER_SIDE[i % 5]
        ev = RawEvent(ts_ns=10**12 + i * 20_000, skaddr=0xffff888000000000 + (i // 5) * 64,
                      duration_ns=12_345 * (i % 5), pid=100, tid=100, oldstate=old,
                      newstate=new, kind=3, comm=b"churn")
        ev.ep.family = socket.AF_INET
        ctypes.memmove(ev.ep.saddr, _ip4("127.0.0.1"), 16)
        ctypes.memmove(ev.ep.daddr, _ip4("127.0.0.1"), 16)
        ev.ep.sport, ev.ep.dport = 20001, 30000 + (i // 5) % 30000
        out.append(bytes(ev))
    return out


def sink(as_json: bool, out) -> Output:
    s = Output(as_json, render.TextRenderer(), stream=out)
    s.emit(records.start(time.time(), 10**9, {}, 0, "", "ring buffer", True))
    return s


def records_path(raws: list, as_json: bool, offset: int) -> float:
    with open(os.devnull, "w") as out:
        s = sink(as_json, out)
        ptr = ctypes.POINTER(RawEvent)
        bufs = [ctypes.create_string_buffer(r, len(r)) for r in raws]
        started = time.process_time()
        for b in bufs:
            ev = decode_event(ctypes.cast(b, ptr).contents)
            s.emit(records.transition(ev, (ev.ts_ns + offset) / 1e9))
        out.flush()
        return time.process_time() - started


def fast_path(raws: list, as_json: bool, offset: int) -> float:
    layout = EventLayout(RawEvent)
    blob = b"".join(raws)
    with open(os.devnull, "w") as out:
        s = sink(as_json, out)
        started = time.process_time()
        rows = list(layout.struct.iter_unpack(blob))
        for i in range(0, len(rows), 4096):
            s.emit_transitions(rows[i:i + 4096], offset)
        out.flush()
        return time.process_time() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    raws = raw_events(args.events)
    offset = time.time_ns() - 10**12
    results: dict = {}
    for _ in range(args.rounds):
        for name, path in (("records", records_path), ("fast", fast_path)):
            for as_json in (True, False):
                key = (name, "json" if as_json else "text")
                results.setdefault(key, []).append(
                    path(raws, as_json, offset) / args.events * 1e6)
    print(f"{args.events} events, {args.rounds} interleaved rounds, "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print("| output | records path us/event (median, min) | fast path us/event | ratio |")
    print("|---|---|---|---|")
    for fmt in ("json", "text"):
        old, new = results[("records", fmt)], results[("fast", fmt)]
        print(f"| {fmt} | {statistics.median(old):.2f} ({min(old):.2f}) | "
              f"{statistics.median(new):.2f} ({min(new):.2f}) | "
              f"{statistics.median(old) / statistics.median(new):.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
