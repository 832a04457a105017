"""The metrics' series kept as sockets arrive and leave (metrics.LiveSeries)
give exactly the exposition the walk of every lingering socket gave, for
the same events: random sequences of arrivals, departures, reuses of a
socket's address, resolutions, owner changes and hidden sockets, with and
without a holder filter, the series cap folding some into "other"."""

import random
import socket
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from closewait_trace.kernel.events import Endpoints
from closewait_trace.output import metrics
from closewait_trace.output.sinks import TickView
from closewait_trace.live.tracer import LiveTracer
from closewait_trace.sockets import ages
from closewait_trace.sockets.owners import OWNER_DENIED, OWNER_FD, OWNER_NONE, Holder, Ownership
from closewait_trace.sockets.tracker import Lingerer, Tracker

S = 1_000_000_000
THRESHOLD = 2 * S


def exposition(sink) -> str:
    registry = CollectorRegistry()
    registry.register(sink.collector)
    return generate_latest(registry).decode()


def ownership(rng):
    kind = rng.choice([OWNER_FD, OWNER_FD, OWNER_FD, OWNER_NONE, OWNER_DENIED])
    holders = ([Holder(pid=rng.randint(2, 9), comm=rng.choice(["nginx", "app", "db", "x\x1by"]),
                       fd=3, state="S", ppid=1, uid=0, cmdline="c")]
               if kind == OWNER_FD else [])
    return Ownership(kind=kind, holders=holders,
                     listener=object() if rng.random() < 0.5 else None)


def endpoints(rng, n):
    return Endpoints(socket.AF_INET, "10.0.0.1", rng.choice([80, 443, 8080, 9000 + n % 5]),
                     "10.0.0.2", rng.choice([5432, 6379, 40000 + n]))


def run_sequence(seed, filter_active, steps=600, max_series=4):
    rng = random.Random(seed)
    now = 100 * S
    wall = 1000.0
    tracker = Tracker(THRESHOLD, now)
    walk = metrics.MetricsSink(max_series=max_series)
    walk.state.keep_zero_s = 5.0
    live = metrics.MetricsSink(max_series=max_series)
    live.state.keep_zero_s = 5.0
    live.attach_lingering(tracker, THRESHOLD, filter_active)
    fake = SimpleNamespace(config=SimpleNamespace(threshold_ns=THRESHOLD), tracker=tracker,
                           holder_filter=SimpleNamespace(active=filter_active))
    entries: dict[int, int] = {}        # the kernel map: skaddr -> enter_ns
    eps: dict[int, Endpoints] = {}
    n = 0
    snapshots = 0
    for _ in range(steps):
        op = rng.random()
        if op < 0.25:                   # sockets enter CLOSE_WAIT, some before now
            for _ in range(rng.randint(1, 4)):
                n += 1
                skaddr = rng.randint(1, 60)     # addresses are reused
                entries[skaddr] = now - rng.randint(0, 4 * S)
                eps[skaddr] = endpoints(rng, n)
            tracker.sync_entries(entries, eps.__getitem__, now)
        elif op < 0.35 and entries:     # some leave
            for skaddr in rng.sample(sorted(entries), min(len(entries), rng.randint(1, 3))):
                del entries[skaddr]
            tracker.sync_entries(entries, eps.__getitem__, now)
        elif op < 0.40:                 # found at start-up, ages estimated (a range)
            n += 1
            enter = now - rng.randint(0, 5 * S)
            l = Lingerer(endpoints=endpoints(rng, n), enter_ns=enter, skaddr=None,
                         pre_existing=True, age_source=rng.choice([ages.RANGE, ages.ESTIMATED]),
                         enter_max_ns=enter - rng.randint(0, 3 * S))
            if l.endpoints not in tracker.pre_existing:     # as seed() does
                tracker._add_pre_existing(l)
        elif op < 0.43 and tracker.pre_existing:
            tracker.forget_pre_existing(rng.choice(sorted(tracker.pre_existing, key=str)))
        elif op < 0.60:                 # resolved and reported (or hidden by the filter)
            due = tracker.due(now)
            for l in rng.sample(due, min(len(due), rng.randint(1, 5))):
                tracker.mark_reported(l)
                if rng.random() < 0.2:
                    l.hidden = True
                    tracker.relabel(l)
                    continue
                l.ownership = ownership(rng)
                tracker.relabel(l)
        elif op < 0.70:                 # a reported socket's holders changed
            reported = [l for l in tracker.lingering() if l.reported and not l.hidden]
            for l in rng.sample(reported, min(len(reported), 2)):
                l.ownership = ownership(rng) if rng.random() < 0.8 else None
                tracker.relabel(l)
        elif op < 0.85:                 # time passes
            now += rng.randint(0, S)
        else:                           # a snapshot: both must say the same
            wall += rng.choice([1.0, 1.5, 3.0, 7.0])
            view = TickView(wall_ts=wall, now_ns=now, threshold_ns=THRESHOLD, counters={},
                            histogram=[0] * 64, histogram_sum_ns=None,
                            lingering=lambda: LiveTracer.lingering(fake, now))
            walk.tick(view)
            live.tick(TickView(**{**view.__dict__, "lingering": None}))   # never walked
            assert exposition(live) == exposition(walk), f"seed {seed}, snapshot {snapshots}"
            snapshots += 1
    return snapshots


@pytest.mark.parametrize("filter_active", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_same_exposition_as_the_walk(seed, filter_active):
    assert run_sequence(seed, filter_active) > 40


def test_departed_sockets_leave_no_state():
    """Sockets that arrive and leave, before and after the threshold, leave
    nothing behind in the series (its heaps are rebuilt, not grown)."""
    tracker = Tracker(THRESHOLD, 0)
    sink = metrics.MetricsSink()
    sink.attach_lingering(tracker, THRESHOLD, False)
    live = sink.state.live
    rng = random.Random(1)
    now = 10 * S
    for round_ in range(200):
        entries = {k: now - rng.randint(0, 4 * S) for k in range(round_ * 50, round_ * 50 + 50)}
        tracker.sync_entries(entries, lambda k: endpoints(rng, k), now)
        live.current(now)
        tracker.sync_entries({}, lambda k: None, now)
        now += S // 10
    assert live.current(now) == {}
    assert not live.tracked and not live.counts and not live.oldest and not live.keys
    assert len(live.waiting) <= 2 * 50 + 64


def test_sockets_join_their_series_in_the_tick_that_sees_them_cross():
    """Every tick ripens (the one that reports the sockets), not only the
    once-a-second rebuild: a later, otherwise idle tick then has nothing
    to do for them."""
    tracker = Tracker(THRESHOLD, 0)
    sink = metrics.MetricsSink()
    sink.attach_lingering(tracker, THRESHOLD, False)
    rng = random.Random(2)
    now = 10 * S
    base = dict(threshold_ns=THRESHOLD, counters={}, histogram=[0] * 64,
                histogram_sum_ns=None, lingering=None)
    sink.tick(TickView(wall_ts=1000.0, now_ns=now, **base))         # builds
    tracker.sync_entries({k: now - S for k in range(100)}, lambda k: endpoints(rng, k), now)
    now += S
    sink.tick(TickView(wall_ts=1000.5, now_ns=now, **base))         # no rebuild
    assert len(sink.state.live.counts) and sum(sink.state.live.counts.values()) == 100
    assert sink.state.live.n_waiting == 0 and len(sink.state.live.waiting) == 0
