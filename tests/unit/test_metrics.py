"""The metrics sink without a kernel: labels, the cardinality cap, the
histogram, and the exposition prometheus-client serves from a snapshot."""

import socket
import subprocess
import shutil
import sys
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from closewait_trace.output import metrics
from closewait_trace.sockets import owners as owners_mod
from closewait_trace.kernel.events import Endpoints
from closewait_trace.sockets.owners import (OWNER_ACCEPT_QUEUE, OWNER_DENIED, OWNER_FD,
                                           OWNER_NONE, Holder, Ownership)
from closewait_trace.output.sinks import TickView
from closewait_trace.sockets.tracker import Lingerer

S = 1_000_000_000


def holder(pid, comm):
    return Holder(pid=pid, comm=comm, fd=3, state="S", ppid=1, uid=0, cmdline=comm)


def lingerer(comm="srv", lport=8080, rport=40000 , enter_ns=0, listener=True,
             kind=OWNER_FD, resolved=True):
    ep = Endpoints(socket.AF_INET, "10.0.0.1", lport, "10.0.0.2", rport)
    l = Lingerer(endpoints=ep, enter_ns=enter_ns, skaddr=id(ep))
    if resolved:
        listen_row = object() if listener else None
        if kind == OWNER_ACCEPT_QUEUE:
            l.ownership = Ownership(kind=kind, listener=listen_row,
                                    listener_holders=[holder(1, comm)])
        else:
            holders = [holder(2, comm)] if comm is not None else []
            l.ownership = Ownership(kind=kind, holders=holders, listener=listen_row)
    return l


def view(lingering, now_ns=100 * S, counters=None, hist=None, sum_ns=None, wall=1000.0):
    return TickView(wall_ts=wall, now_ns=now_ns, threshold_ns=S,
                    counters=counters or {}, histogram=hist or [0] * 64,
                    histogram_sum_ns=sum_ns, lingering=lambda: list(lingering))


def scrape(sink) -> dict:
    """name -> list of (labels, value), parsed back from the exposition."""
    text = generate_latest(sink.registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_parse_listen():
    assert metrics.parse_listen("9477") == ("127.0.0.1", 9477)
    assert metrics.parse_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert metrics.parse_listen("[::1]:9477") == ("::1", 9477)
    for bad in ("", "0", "65536", "x", "::1:9477", "localhost:9477", "[::1]9477",
                "1.2.3.4:", "1.2.3.4:-1"):
        with pytest.raises(ValueError):
            metrics.parse_listen(bad)


def test_labels_server_client_and_unresolved():
    assert metrics.socket_labels(lingerer("nginx", 443, 51234)) == ("nginx", "443", "server")
    # No listener on the local port: an outgoing connection, named by the peer's port.
    assert metrics.socket_labels(lingerer("app", 51234, 5432, listener=False)) == \
        ("app", "5432", "client")
    # Never accepted: the process that should accept it is the one to blame.
    assert metrics.socket_labels(lingerer("socat", 5555, 40000, kind=OWNER_ACCEPT_QUEUE)) == \
        ("socat", "5555", "server")
    assert metrics.socket_labels(lingerer(resolved=False)) == \
        ("(not resolved yet)", "unknown", "unknown")
    assert metrics.socket_labels(lingerer(None, 443, kind=OWNER_NONE)) == \
        ("(no holder found)", "443", "server")
    assert metrics.socket_labels(lingerer(None, 443, kind=OWNER_DENIED)) == \
        ("(permission denied)", "443", "server")


def test_no_two_process_names_share_a_label_and_none_passes_for_the_tracers_own():
    # A process chooses its name: one named like another name's escape, or
    # like a value the tracer sets, must still get a label of its own.
    names = ["\x1b", "\\x1b", "a\nb", "a\\nb", "", "?", "other", "none", "unresolved",
             "(other processes)", "(no holder found)", "\\x28no holder found)",
             "a\x9b", "a\udc9b", "a\xa0", "a\udca0", "a\xad", "a\udcad"]
    labels = [metrics.socket_labels(lingerer(n, 443))[0] for n in names]
    assert len(set(labels)) == len(names), dict(zip(names, labels))
    own = [metrics.socket_labels(lingerer(resolved=False))[0],
           metrics.socket_labels(lingerer(None, 443, kind=OWNER_NONE))[0],
           metrics.socket_labels(lingerer(None, 443, kind=OWNER_DENIED))[0],
           metrics.OTHER[0]]
    assert len(set(own)) == len(own)
    assert not set(own) & {l for n, l in zip(names, labels) if n}


def test_hostile_comm_stays_one_valid_line():
    sink = metrics.MetricsSink()
    evil = 'a"b\\c\n}d\x1b[31m\udcff'
    sink.tick(view([lingerer(evil)]))
    text = generate_latest(sink.registry).decode("utf-8")
    lines = [l for l in text.splitlines() if l.startswith("closewait_lingering_sockets{")]
    assert len(lines) == 1
    got = scrape(sink)["closewait_lingering_sockets"]
    assert got[0][0]["comm"] == 'a"b\\\\c\\n}d\\x1b[31m\\xff'
    assert "\x1b" not in text


def test_counts_ages_and_exposition():
    sink = metrics.MetricsSink()
    ls = [lingerer("socat", 5555, 40000 + i, enter_ns=(90 + i) * S) for i in range(5)]
    ls.append(lingerer("java", 40001, 5432, enter_ns=97 * S, listener=False))
    hist = [0] * 64
    hist[20] = 3          # [2^19, 2^20) us: 0.52 - 1.05 s
    hist[23] = 2          # 4.2 - 8.4 s
    sink.emit({"type": "linger", "update": False, "diagnosis": {"cause": "stopped"}})
    sink.emit({"type": "linger", "update": True, "diagnosis": {"cause": "exiting"}})
    sink.emit({"type": "linger", "update": False, "diagnosis": None})
    sink.emit({"type": "closed"})
    sink.tick(view(ls, counters={"cw_enter": 11, "events_lost": 2, "map_full": 1,
                                 "transitions_skipped": 4, "found_unseen": 3,
                                 "left_unseen": 1},
                   hist=hist, sum_ns=12_500_000_000))
    got = scrape(sink)
    assert sorted((s[0]["comm"], s[0]["port"], s[0]["side"], s[1])
                  for s in got["closewait_lingering_sockets"]) == [
        ("java", "5432", "client", 1.0), ("socat", "5555", "server", 5.0)]
    oldest = {s[0]["comm"]: s[1] for s in got["closewait_oldest_lingering_seconds"]}
    assert oldest == {"socat": 10.0, "java": 3.0}
    assert got["closewait_entered_total"] == [({}, 11.0)]
    assert got["closewait_events_lost_total"] == [({}, 2.0)]
    assert got["closewait_map_full_total"] == [({}, 1.0)]
    assert got["closewait_transitions_skipped_total"] == [({}, 4.0)]
    assert got["closewait_found_unseen_total"] == [({}, 3.0)]
    assert got["closewait_left_unseen_total"] == [({}, 1.0)]
    assert sorted((s[0]["cause"], s[1]) for s in got["closewait_lingered_total"]) == \
        [("stopped", 1.0), ("unknown", 1.0)]
    buckets = {s[0]["le"]: s[1] for s in got["closewait_duration_seconds_bucket"]}
    assert buckets["0.524288"] == 0 and buckets["1.048576"] == 3
    assert buckets["4.194304"] == 3 and buckets["8.388608"] == 5 and buckets["+Inf"] == 5
    assert got["closewait_duration_seconds_count"] == [({}, 5.0)]
    assert got["closewait_duration_seconds_sum"] == [({}, 12.5)]


def test_no_kernel_sum_means_no_sum_but_a_count():
    sink = metrics.MetricsSink()
    hist = [0] * 64
    hist[3] = 4
    sink.tick(view([], hist=hist, sum_ns=None))
    got = scrape(sink)
    assert got["closewait_duration_seconds_count"] == [({}, 4.0)]
    assert "closewait_duration_seconds_sum" not in got


def test_gone_series_drop_to_zero_then_are_forgotten():
    state = metrics.MetricsState(max_series=10, keep_zero_s=60)
    assert state.per_series([lingerer("a")], 100 * S, 1000.0) == {("a", "8080", "server"): [1, 100.0]}
    assert state.per_series([], 100 * S, 1030.0) == {("a", "8080", "server"): [0, 0.0]}
    assert state.per_series([], 100 * S, 1061.0) == {}


def test_cardinality_cap_with_500_process_names():
    sink = metrics.MetricsSink(max_series=100)
    # 500 distinct names; name i holds i % 7 + 1 sockets; a few big ones.
    ls = []
    for i in range(500):
        ls += [lingerer(f"worker-{i:03d}", 9000, 40000 + j) for j in range(i % 7 + 1)]
    ls += [lingerer("big", 443, 50000 + j, enter_ns=j * S) for j in range(50)]
    sink.tick(view(ls))
    got = scrape(sink)["closewait_lingering_sockets"]
    assert len(got) == 101               # 100 series, and "other"
    assert sum(v for _, v in got) == len(ls)   # nothing lost in the folding
    by_comm = {s[0]["comm"]: s for s in got}
    assert by_comm["big"][1] == 50       # the biggest is always kept by name
    other = by_comm["(other processes)"]
    assert other[0] == {"comm": "(other processes)", "port": "other", "side": "other"}
    # The kept ones are the biggest: 71 names hold 7 sockets, 28 of those with 6.
    kept = sorted(v for c, (_, v) in by_comm.items() if c not in ("big", "(other processes)"))
    assert kept == [6] * 28 + [7] * 71
    # Next tick with other names: the cap still holds, zero series included.
    sink.tick(view([lingerer(f"new-{i}") for i in range(300)], wall=1001.0))
    got = scrape(sink)["closewait_lingering_sockets"]
    assert len(got) == 101 and sum(v for _, v in got) == 300
    assert len(sink.state.last_seen) <= 100 + 300


def test_lingered_causes_are_capped():
    state = metrics.MetricsState()
    for i in range(100):
        state.count_lingered(f"cause{i}")
    assert len(state.lingered) == metrics.MAX_CAUSES + 1
    assert state.lingered["other"] == 100 - metrics.MAX_CAUSES


def test_served_over_http_and_promtool_accepts(tmp_path):
    """The real HTTP server of prometheus-client on loopback, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = metrics.MetricsSink("127.0.0.1", port)
    sink.serve()
    sink.tick(view([lingerer("socat", 5555, 40000)], sum_ns=10))
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert b'closewait_lingering_sockets{comm="socat",port="5555",side="server"} 1.0' in body
    # The same port again: one line, a usage exit code, no traceback.
    with pytest.raises(metrics.UserError) as err:
        metrics.MetricsSink("127.0.0.1", port).serve()
    assert "--metrics" in err.value.one_line() and err.value.exit_code == 2
    if shutil.which("promtool"):
        res = subprocess.run(["promtool", "check", "metrics"], input=body,
                             capture_output=True, timeout=30)
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("args,needle", [
    (["--metrics", "banana"], "not a port"),
    (["--metrics", "localhost:9477"], "not an IP address"),
    (["--metrics", "::1:9477"], "[ADDR]:PORT"),
    (["--metrics", "9477", "-r", "x.jsonl"], "does not go with -r"),
    (["--metrics-no-comm"], "goes with --metrics"),
    (["--metrics", "unix:rel.sock"], "unix:/ABSOLUTE/PATH"),
    (["-q"], "-q goes with -w"),          # -q alone would trace into the void
])
def test_metrics_option_errors_are_one_line(args, needle):
    res = subprocess.run([sys.executable, "-m", "closewait_trace", *args],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_snapshot_rebuilt_at_most_once_a_second():
    sink = metrics.MetricsSink()
    sink.tick(view([lingerer("a")], wall=1000.0))
    sink.tick(view([lingerer("a"), lingerer("b")], wall=1000.5))     # too soon: kept
    assert sum(v for _, v in scrape(sink)["closewait_lingering_sockets"]) == 1
    sink.tick(view([lingerer("a"), lingerer("b")], wall=1001.0))
    assert sum(v for _, v in scrape(sink)["closewait_lingering_sockets"]) == 2
    assert scrape(sink)["closewait_last_tick_timestamp_seconds"] == [({}, 1001.0)]


def test_no_comm_leaves_every_process_name_out():
    """--metrics-no-comm: under hidepid=2 /proc hides other users' process
    names; the endpoint (open to every local user) must be able to as well."""
    sink = metrics.MetricsSink(no_comm=True)
    sink.tick(view([lingerer("secretjob", 5555, 40000), lingerer("other", 443, 40001),
                    lingerer(None, 80, kind=OWNER_NONE)]))
    got = scrape(sink)["closewait_lingering_sockets"]
    comms = {labels["comm"] for labels, _ in got}
    assert comms == {metrics.COMM_HIDDEN, metrics.COMM_NO_HOLDER}
    assert sorted((l["port"], v) for l, v in got) == [("443", 1), ("5555", 1), ("80", 1)]
    body = generate_latest(sink.registry)
    assert b"secretjob" not in body and b"other\"" not in body
    # The reserved value cannot be a process name (16 characters or more).
    assert len(metrics.COMM_HIDDEN) >= 16 and "\\" not in metrics.COMM_HIDDEN


def test_unreadable_owner_has_its_own_label():
    l = lingerer(None, 443, kind=owners_mod.OWNER_UNREADABLE)
    assert metrics.socket_labels(l) == (metrics.COMM_UNREADABLE, "443", "server")


def test_parse_listen_unix():
    assert metrics.parse_listen("unix:/run/closewait-trace/metrics.sock") == \
        ("unix", "/run/closewait-trace/metrics.sock")
    for bad in ("unix:rel.sock", "unix:/x/", "unix:/x/" + "a" * 100, "unix:/a\0b"):
        with pytest.raises(ValueError):
            metrics.parse_listen(bad)
