"""The recording writer and reader, over real files (no root needed)."""

import gzip
import json
import os
import stat

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closewait_trace.files import parts, recording, replay, stream
from closewait_trace.output import report, schema
from closewait_trace.errors import EXIT_FILE, UserError
from closewait_trace.sockets.filters import HolderFilter, SocketFilter


def linger(i, ts=1000.0, pid=42, comm="srv", lport=80, age=2.0):
    """A complete linger record (readers skip records that do not match the schema)."""
    return {"type": "linger", "ts": ts + i, "time": "", "family": "ipv4", "laddr": "127.0.0.1",
            "lport": lport, "raddr": "10.0.0.%d" % (i % 250 + 1), "rport": 40000 + i,
            "age_s": age, "age_source": "traced", "age_max_s": None,
            "age_is_lower_bound": False, "pre_existing": False, "update": False,
            "owner_kind": "fd",
            "owners": [{"pid": pid, "comm": comm, "fd": 3 + i, "state": "T", "ppid": 1,
                        "uid": 0, "cmdline": comm, "tracer_pid": 0}],
            "netns": None, "inode": None, "unread_bytes": 0, "eof_read": False,
            "listener": None, "also_in_netns": [],
            "diagnosis": {"cause": "stopped", "summary": "stopped",
                          "evidence": {"holders": [{"pid": pid, "fd": 3 + i}]}}}


def closed(i, ts=1010.0, duration=12.0, lport=80):
    rec = {k: v for k, v in linger(i, lport=lport).items()
           if k in ("family", "laddr", "lport", "raddr", "rport", "time", "pre_existing")}
    rec.update(type="closed", ts=ts + i, duration_s=duration, duration_source="traced",
               duration_max_s=None, duration_is_lower_bound=False, how="close",
               newstate="LAST_ACK", closed_by={"pid": 42, "comm": "srv"},
               cpu_task={"pid": 42, "comm": "srv"}, reported=True)
    return rec


NO_FILTERS = {"lports": [], "rports": [], "family": None}


def make_recorder(path, **kw):
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=NO_FILTERS, clock_offset_ns=5,
                           snapshot_source=lambda: {"type": "snapshot", "ts": 1.0,
                                                    "lingering": [], "counters": {}},
                           **kw)
    r.open()
    return r


def write_all(path, recs, **kw):
    """Write as the tracer does over time: one batch per record here."""
    r = make_recorder(path, **kw)
    for rec in recs:
        r.write(rec)
        r.flush()
    r.close()
    return r


def test_file_is_private_and_starts_with_a_header(tmp_path):
    path = tmp_path / "cw.jsonl"
    old = os.umask(0)
    try:
        write_all(path, [linger(0)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = json.loads(path.read_text().splitlines()[0])
    assert first["type"] == "header" and first["format"] == recording.FORMAT
    for key in ("format_version", "tool_version", "hostname", "kernel_release", "boot_id",
                "clock_offset_ns", "start_ts", "threshold_s", "filters"):
        assert key in first


def test_refuses_symlink_and_existing_file(tmp_path):
    target = tmp_path / "target"
    target.write_text("precious")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    with pytest.raises(UserError) as exc:
        make_recorder(link)
    assert exc.value.exit_code == EXIT_FILE
    with pytest.raises(UserError) as exc:
        make_recorder(link, force=True)
    assert "symbolic link" in exc.value.message
    assert target.read_text() == "precious"
    with pytest.raises(UserError) as exc:
        make_recorder(target)
    assert "--force" in exc.value.one_line()
    os.chmod(target, 0o644)
    write_all(target, [linger(0)], force=True)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert "precious" not in target.read_text()


def test_rotation_with_file_cap_wraps_and_reads_in_order(tmp_path):
    path = tmp_path / "cw.jsonl"
    r = write_all(path, [linger(i) for i in range(60)], max_bytes=2000, max_files=3)
    assert r.part >= 5
    names = sorted(os.listdir(tmp_path))
    assert names == ["cw.jsonl", "cw.jsonl.1", "cw.jsonl.2"]
    rec = parts.read([str(path)])
    numbers = [h["part"] for h in rec.of("header")]
    assert numbers == sorted(numbers) and numbers[-1] == r.part
    assert len(set(numbers)) == 3
    kept = [x["rport"] for x in rec.of("linger")]
    assert kept == sorted(kept) and kept[-1] == 40059           # newest kept, oldest gone
    assert any("rotated away" in p for p in rec.problems)
    # Each later part opens with a snapshot, to be read on its own.
    assert all(json.loads(open(tmp_path / p).readline())["type"] == "header" for p in names)


def test_gzip_round_trip_and_kill_mid_member(tmp_path):
    path = tmp_path / "cw.jsonl.gz"
    write_all(path, [linger(i) for i in range(5)], compress=True)
    with gzip.open(path, "rt") as f:           # a standard gzip reader agrees
        assert sum(1 for _ in f) == 1 + 5
    rec = parts.read([str(path)])
    assert len(rec.of("linger")) == 5 and rec.skipped == 0
    data = path.read_bytes()
    path.write_bytes(data[:-7])                # cut inside the last member
    rec = parts.read([str(path)])
    assert len(rec.of("linger")) >= 4 and rec.problems


def test_truncated_last_line_and_garbage_in_the_middle(tmp_path):
    path = tmp_path / "cw.jsonl"
    write_all(path, [linger(i) for i in range(5)])
    lines = path.read_bytes().split(b"\n")
    lines.insert(3, b"\xff\xfe not json at all")
    lines.insert(4, b'{"no_type": 1}')
    data = b"\n".join(lines).rstrip(b"\n")
    path.write_bytes(data[:-10])               # last record cut short
    rec = parts.read([str(path)])
    assert len(rec.of("linger")) == 4 and rec.skipped == 3


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b"hello world\n", "not a closewait-trace recording"),
    (b'{"type": "linger"}\n', "not a closewait-trace recording"),
    (b"\x1f\x8b\x08\x00garbage", "damaged compressed"),
    (json.dumps({"type": "header", "format": recording.FORMAT, "format_version": 99}).encode() + b"\n",
     "format version 99"),
])
def test_bad_files_are_one_clear_error(tmp_path, content, needle):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(UserError) as exc:
        parts.read([str(path)])
    assert needle in exc.value.message and exc.value.exit_code == EXIT_FILE


def test_directory_and_missing_file(tmp_path):
    for path, needle in ((tmp_path, "is a directory"), (tmp_path / "nope", "no such file")):
        with pytest.raises(UserError) as exc:
            parts.read([str(path)])
        assert needle in exc.value.message


def test_the_services_recording_missing_says_to_record_now():
    """The README's incident command reads the service's recording; on a
    host without the service it said "no such file; check the path" (the
    glob left as it is), and nothing of what to do (a newcomer's report)."""
    with pytest.raises(UserError) as exc:
        parts.read([f"{parts.SERVICE_RECORDING_DIR}/closewait.jsonl.gz*"])
    assert "the service has not recorded here" in exc.value.message
    assert "closewait-trace -w incident.jsonl.gz" in exc.value.hint


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=4000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
       compress=st.booleans())
def test_reader_survives_any_mutation(tmp_path_factory, cut, flips, compress):
    """Truncation and byte flips: either a clean UserError, or the records
    read are a subset of what was written, with skips counted."""
    path = tmp_path_factory.mktemp("m") / "cw.jsonl"
    written = [linger(i) for i in range(8)]
    write_all(path, written, compress=compress)
    data = bytearray(path.read_bytes())
    data = data[:min(cut, len(data))] if cut else data
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    path.write_bytes(bytes(data))
    try:
        rec = parts.read([str(path)])
    except UserError as err:
        assert err.exit_code == EXIT_FILE
        return
    assert rec.records[0]["type"] == "header"
    good = [json.dumps(w, sort_keys=True) for w in written]
    for r in rec.of("linger"):
        # a flip inside a value can leave valid JSON; everything else must match
        if json.dumps(r, sort_keys=True) not in good:
            assert r["type"] == "linger"


def test_unwritable_records_are_counted_not_fatal(tmp_path):
    path = tmp_path / "cw.jsonl"
    r = make_recorder(path)
    os.close(r.fd)
    r.fd = os.open(os.devnull, os.O_RDONLY)    # every write now fails (EBADF)
    for i in range(3):
        r.write(linger(i))
    r.flush()
    assert r.write_errors == 3 and r.warned


def test_report_over_two_captures():
    rec = parts.Recording()
    for cid, start, pid in (("a", 1000.0, 42), ("b", 2000.0, 43)):
        rec.records.append({"type": "header", "format": recording.FORMAT, "format_version": 1,
                            "capture_id": cid, "part": 0, "start_ts": start, "hostname": "h"})
        rec.records += [linger(i, ts=start, pid=pid) for i in range(3)]
        rec.records += [closed(i, ts=start + 10) for i in range(2)]
        rec.records.append({"type": "summary", "ts": start + 20, "histogram_us":
                            [{"from_us": 8388608, "to_us": 16777216, "count": 2}],
                            "still_lingering": [dict(linger(2, ts=start, pid=pid), age_s=21.0)],
                            "write_errors": 0})
    rep = report.build(rec, by=["pid", "program"])
    assert rep["sockets"] == 6
    assert [(p["pid"], p["count"]) for p in rep["by_pid"]] == [(42, 3), (43, 3)]
    assert rep["by_pid"][0]["longest_s"] == 21.0
    # One program, two processes that init started (a service, restarted
    # between the captures): not forks of one server (output/fold.py), so
    # a row each, told apart by pid.
    assert [(p["program"], p["processes"], p["count"]) for p in rep["by_program"]] == [
        ("srv [program unknown] (pid 42)", 1, 3), ("srv [program unknown] (pid 43)", 1, 3)]
    assert rep["histogram_us"] == [{"from_us": 8388608, "to_us": 16777216, "count": 4}]
    assert len(rep["still_lingering"]) == 2
    assert rep["losses"]["gaps_between_captures"][0]["seconds"] == 980.0
    assert max(p["lingering"] for p in rep["timeline"]) >= 1
    text = "\n".join(report.render_text(rep))
    assert "42/srv" in text and "gap of" in text


def test_replay_filters():
    recs = [linger(0, pid=1, comm="a", lport=80), linger(1, pid=2, comm="b", lport=81),
            {"type": "summary"}]
    keep = replay.ReplayFilter(sockets=SocketFilter(lports=(81,)))
    assert [r.get("lport") for r in replay.replay(recs, keep)] == [81, None]
    keep = replay.ReplayFilter(holders=HolderFilter(comms=("a",)))
    assert [r.get("lport") for r in replay.replay(recs, keep)] == [80, None]
    keep = replay.ReplayFilter(holders=HolderFilter(pids=(2,)), since=1000.5)
    assert [r.get("lport") for r in replay.replay(recs, keep)] == [81, None]
    keep = replay.ReplayFilter(until=1000.5)
    assert [r.get("lport") for r in replay.replay(recs, keep)] == [80, None]


def test_parse_when():
    assert replay.parse_when("1700000000") == 1700000000.0
    ref = replay.parse_when("2026-11-27T10:00:00")
    assert replay.parse_when("13:20", ref) - ref == 3 * 3600 + 20 * 60
    for bad in ("25:00", "yesterday", "13:61", "10x", "m10"):
        with pytest.raises(ValueError):
            replay.parse_when(bad, ref)


def test_since_as_a_time_ago():
    """Issue 19 §6: '--since 10m' in the middle of an incident."""
    now = 1_800_000_000.0
    assert replay.parse_when("10m", now=now) == now - 600
    assert replay.parse_when("1d6h", now=now) == now - 30 * 3600
    assert replay.parse_when("90s", now=now) == now - 90
    assert abs(replay.parse_when("2h") - (time.time() - 7200)) < 5


def test_report_counts_sockets_known_only_from_a_snapshot():
    """After rotation dropped the part with its linger record, a socket is
    still in the report through the next part's opening snapshot."""
    entry = {k: v for k, v in linger(7).items() if k not in ("type", "ts", "time")}
    entry["age_s"] = 30.0
    rec = parts.Recording(records=[
        {"type": "header", "format": recording.FORMAT, "format_version": 1,
         "capture_id": "c", "part": 3, "start_ts": 5000.0, "hostname": "h"},
        {"type": "snapshot", "ts": 5000.0, "lingering": [entry], "counters": {},
         "histogram_us": []},
    ])
    rep = report.build(rec, by=["pid"])
    assert rep["sockets"] == 1 and rep["still_lingering"][0]["rport"] == 40007
    assert rep["by_pid"][0]["pid"] == 42


# Hostile values, not only byte flips: whole lines a foreign host (or a
# hostile user) could put in a recording. json.dumps(allow_nan=True) writes
# NaN/Infinity tokens, as a careless or hostile writer would.
_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
            | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=20))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
_records = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["linger", "closed", "summary", "process"]),
                       st.text(max_size=10), st.integers(), st.none(), st.lists(st.integers()))},
    optional={"ts": _values, "age_s": _values, "owners": _values, "diagnosis": _values,
              "lport": _values, "part": _values})
_hostile = st.one_of(_records, _values)


def _has_non_finite(value) -> bool:
    if isinstance(value, float):
        return value != value or value in (float("inf"), float("-inf"))
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return False


def _acceptable(value) -> bool:
    """The reader's contract: a JSON object with only finite numbers that
    matches its record type's schema."""
    return isinstance(value, dict) and not _has_non_finite(value) \
        and schema.problem(value) is None


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(hostile=st.lists(st.tuples(st.integers(0, 8), _hostile), max_size=12),
       depth=st.one_of(st.none(), st.integers(min_value=5_000, max_value=50_000)),
       compress=st.booleans())
def test_reader_with_hostile_values(tmp_path_factory, hostile, depth, compress):
    """Hostile lines among good ones: each is either kept exactly as written
    (a valid record) or skipped and counted; no NaN/Infinity ever comes out;
    nothing raises but a UserError."""
    path = tmp_path_factory.mktemp("h") / "cw.jsonl"
    written = [linger(i) for i in range(8)]
    write_all(path, written, compress=compress)
    lines = [json.loads(x) for x in _plain_lines(path)]
    expected, rejected = list(lines), 0
    raw = [json.dumps(x) for x in lines]
    placed = sorted(((1 + pos % len(written), value) for pos, value in hostile),
                    key=lambda t: t[0], reverse=True)   # never before the header
    for at, value in placed:               # from the end: earlier indexes stay put
        raw.insert(at, json.dumps(value, allow_nan=True))
        if _acceptable(value):
            expected.insert(at, value)
        else:
            rejected += 1
    if depth:
        raw.insert(2, '{"type": "linger", "x": ' + "[" * depth + "]" * depth + "}")
        rejected += 1
    data = ("\n".join(raw) + "\n").encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    rec = parts.read([str(path)])
    for r in rec.records:
        json.dumps(r, allow_nan=False)        # raises on NaN/Infinity
    assert rec.skipped == rejected
    assert [json.dumps(r, sort_keys=True) for r in rec.records] == \
        [json.dumps(r, sort_keys=True) for r in expected]


def _plain_lines(path):
    data = path.read_bytes()
    if data[:2] == stream.GZIP_MAGIC:
        data = gzip.decompress(data)
    return [x for x in data.decode().split("\n") if x]


def holders_view(*holders):
    """A TickView whose lingering sockets are held by these (pid, comm,
    start_time) processes, one socket each, as the owner lookup read them."""
    from closewait_trace.kernel.events import Endpoints
    from closewait_trace.output.sinks import TickView
    from closewait_trace.sockets import owners, procfs
    from closewait_trace.sockets.tracker import Lingerer
    lingering = []
    for i, (pid, comm, start) in enumerate(holders):
        snap = procfs.ProcessSnapshot(pid=pid, comm=comm, state="S", ppid=1, flags=0,
                                      start_time=start, uid=1000)
        l = Lingerer(endpoints=Endpoints(2, "127.0.0.1", 80, "10.0.0.1", 40000 + i),
                     enter_ns=0, skaddr=0x10 + i)
        l.ownership = owners.Ownership(kind=owners.OWNER_FD,
                                       holders=(owners.Holder.of(snap, 3 + i, False),))
        lingering.append(l)
    return TickView(wall_ts=1001.0, now_ns=2 * 10**9, threshold_ns=10**9, counters={},
                    histogram=[], histogram_sum_ns=None, lingering=lambda: lingering)


def test_a_rotated_part_names_the_programs_of_the_sockets_it_opens_with(tmp_path):
    """A part after a rotation opens with a snapshot of the sockets still
    lingering, but not their holders' process records: read on its own (or
    once the parts before it were rotated away), its oldest sockets'
    program was "program unknown" and one server's forks were not folded
    (a newcomer's report). The sink keeps the latest process record of
    each holder (KEPT_PROCESS_BYTES in all) and writes those of the
    snapshot's holders before it."""
    from closewait_trace.output import records
    from closewait_trace.output.sinks import RecordingSink
    from tests.unit import recordfactory
    path = tmp_path / "cw.jsonl"
    held = linger(0, pid=7, comm="api")
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=NO_FILTERS,
                           clock_offset_ns=5, max_bytes=3000)
    r.open()
    sink = RecordingSink(r)
    entry = ({k: held[k] for k in ("family", "laddr", "lport", "raddr", "rport", "age_s",
                                   "age_source", "age_max_s", "age_is_lower_bound",
                                   "owner_kind")}
             | {"owners": [{k: held["owners"][0][k] for k in ("pid", "comm", "fd", "state")}],
                "diagnosis": {"cause": "ignoring_eof", "summary": "s"}})
    r.snapshot_source = lambda: records.snapshot(1001.0, [entry], {}, [])
    def exe(path):
        return {"exe": {"path": path, "deleted": False, "replaced": False}}
    sink.tick(holders_view((7, "api", 700)))
    sink.emit_process(recordfactory.process(7, "api", identity=exe("/usr/sbin/api")), 700)
    sink.emit_process(recordfactory.process(8, "other", identity=exe("/bin/other")), 800)
    sink.emit(held)
    for i in range(1, 40):                      # past max_bytes: a new part
        sink.emit(linger(i))
        r.flush()                               # a batch each, as over time
    sink.emit(recordfactory.summary(ts=1100.0, still_lingering=[entry]))
    r.close()
    assert r.part >= 1
    last = f"{path}.{r.part}" if os.path.exists(f"{path}.{r.part}") else str(path)
    with open(last) as f:
        kinds = [json.loads(line)["type"] for line in f][:3]
    assert kinds == ["header", "process", "snapshot"]
    read = parts.read([last])
    assert [r["pid"] for r in read.of("process")] == [7], read.problems
    rep = report.build(read.records)
    programs = {row["program"] for row in rep["by_program"]}
    assert any("/usr/sbin/api" in p for p in programs), programs
    assert not any("other" in p for p in programs)


def test_a_rotated_part_opens_only_with_records_of_the_processes_still_named(tmp_path):
    """The kept process records are found by pid, and a pid is reused. A
    socket now held by another process with the old one's pid (another
    user's: its record not written again, a batch that changed no summary
    writes none) opened the next part with the old process's name, user
    and stacks (a review's F6). A record is written again only for a
    holder with the pid and the start time it was written for: names,
    command lines and parents are the process's to choose, and a check
    of those let a process named like the old one through (the first fix,
    found by a second review) and dropped the record of one that renamed
    itself."""
    from closewait_trace.output import records
    from closewait_trace.output.sinks import RecordingSink
    from tests.unit import recordfactory

    class Lines:
        snapshot_source = snapshot_lines = None

        def write_line(self, line, kind):
            pass
    recorder = Lines()
    sink = RecordingSink(recorder)
    sink.emit_process(recordfactory.process(7, "nginx", identity={"uid": 0}), 700)
    sink.emit_process(recordfactory.process(8, "worker"), 800)
    sink.emit(recordfactory.process(9, "unknown"))          # no start time: never again

    def opening(*holders):
        sink.tick(holders_view(*holders))
        snapshot = records.snapshot(1001.0, [{"owners": [{"pid": pid, "comm": comm}]}
                                             for pid, comm, _start in holders], {}, [])
        return [json.loads(line)["pid"] for line in recorder.snapshot_lines(snapshot)]
    assert opening((7, "nginx", 700), (8, "worker", 800)) == [7, 8]
    assert opening((7, "nginx", 7001), (8, "worker", 800)) == [8]    # pid 7 reused
    assert opening((7, "renamed", 700)) == [7]                         # the same process
    assert opening((9, "unknown", 900)) == []
    sink._view = None
    assert recorder.snapshot_lines(records.snapshot(1001.0, [{"owners": [{"pid": 7}]}],
                                                    {}, [])) == []


def test_the_process_records_kept_for_rotations_are_bounded_in_bytes(monkeypatch):
    """The holders' latest process records kept for the next parts stay
    within KEPT_PROCESS_BYTES, the oldest let go first; one larger than a
    64th of it is not kept (a process's stacks can be tens of KB)."""
    from closewait_trace.output import sinks
    from tests.unit import recordfactory

    class Lines:
        snapshot_source = snapshot_lines = None

        def write_line(self, line, kind):
            pass
    monkeypatch.setattr(sinks, "KEPT_PROCESS_BYTES", 64 * 400)
    sink = sinks.RecordingSink(Lines())
    for pid in range(1, 300):
        sink.emit(recordfactory.process(pid, "p", cmdline="x" * 200))
    assert sink._process_bytes <= 64 * 400 and len(sink._processes) < 299
    assert 299 in sink._processes and 1 not in sink._processes
    sink.emit(recordfactory.process(5000, "big", cmdline="x" * 1000))
    assert 5000 not in sink._processes
    assert sink._process_bytes == sum(len(line) for line, _start in sink._processes.values())
