"""The record schema: builders produce it, readers enforce it, docs/schema.md
documents it, and version-1 recordings still read the same."""

import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closewait_trace.evidence import diagnosis
from closewait_trace.sockets import owners
from closewait_trace.output import records, render, report, schema
from closewait_trace.files import parts
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints, KernelEvent
from closewait_trace.sockets.tracker import Closed, Lingerer
from tests.unit.fakeproc import FakeProc

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
V1 = DATA / "v1-recording.jsonl"
EP = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000)


def lingerer_over_fake_proc(tmp_path, cloexec=False) -> Lingerer:
    fake = FakeProc(tmp_path)
    fake.process(10, comm="server", threads={10: ("S", "232 0x4 0x7ff 0x1", "ep_poll")})
    fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000,
             tcpstates.CLOSE_WAIT, 900, rx=14)
    fake.fd(10, 5, 900, cloexec=cloexec)
    own = owners.resolve([EP], fake.root)[EP]
    l = Lingerer(endpoints=EP, enter_ns=1_000, skaddr=1)
    l.ownership = own
    l.diagnosis = diagnosis.gather(own, fake.root, machine="x86_64")
    return l


def test_linger_record_matches_schema_and_says_each_fact_once(tmp_path):
    rec = records.linger(lingerer_over_fake_proc(tmp_path), 1_700_000_000.0, 2_000_000_000)
    assert schema.problem(rec) is None
    assert rec["owners"][0]["cloexec"] is False            # the fd's facts, on the owner
    assert rec["diagnosis"]["evidence"] == {"holders": [{"pid": 10, "fd": 5}]}
    assert rec["unread_bytes"] == 13
    flat = json.dumps(rec["diagnosis"])
    assert "unread_bytes" not in flat and "cmdline" not in flat   # not repeated below
    assert rec["age_source"] == "traced" and rec["age_max_s"] is None


def test_estimated_age_has_its_upper_bound(tmp_path):
    l = lingerer_over_fake_proc(tmp_path)
    l.age_source, l.enter_max_ns = "estimated", 0         # entered at least at 0
    rec = records.linger(l, 1_700_000_000.0, 2_000_000_000)
    assert schema.problem(rec) is None
    assert rec["age_source"] == "estimated" and not rec["age_is_lower_bound"]
    assert rec["age_max_s"] == pytest.approx(2.000001)    # now (1000 + 2e9 ns) - 0


def test_every_builder_matches_its_schema(tmp_path):
    l = lingerer_over_fake_proc(tmp_path)
    entry = records.lingering_entry(l, 3_000_000_000)
    ev = KernelEvent(kind=3, ts_ns=5, skaddr=1, endpoints=EP, oldstate=tcpstates.CLOSE_WAIT,
                     newstate=tcpstates.LAST_ACK, duration_ns=7, pid=10, tid=10, comm="server")
    closed = Closed(endpoints=EP, ts_ns=9, duration_ns=4_000_000_000, duration_is_lower_bound=True,
                    duration_source="lower_bound",
                    how="close", closer=(10, "server"), cpu_task=(10, "server"),
                    newstate=tcpstates.LAST_ACK, pre_existing=True, reported=True)
    built = [
        records.start(1.0, 10**9, {"lports": [], "rports": [], "family": None}, 0, "h", "ring", False),
        records.process(1.0, l.diagnosis._holders[0].process_dict()),
        records.closed(closed, 1.0),
        records.transition(ev, 1.0),
        records.lost(1.0, "events_lost", 3, 9),
        records.snapshot(1.0, [entry], {"cw_enter": 1}, [0, 2, 1]),
        records.summary(2.0, 1.0, {"cw_enter": 1}, [0, 1], [entry], 1, 1,
                        {"tracer_cost": {"ticks": 3, "idle_max_ms": 0.5}, "write_errors": 0,
                         "changes_reported": 0}),
    ]
    for rec in built:
        assert schema.problem(rec) is None, rec
    assert built[2]["duration_source"] == "lower_bound" and built[2]["duration_is_lower_bound"]


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.update(age_s="2.0"), "age_s: expected a finite number"),
    (lambda r: r.update(age_s=float("nan")), "age_s"),
    (lambda r: r.update(age_s=float("inf")), "age_s"),
    (lambda r: r["owners"].append(None), "owners"),
    (lambda r: r.update(diagnosis=["stopped"]), "diagnosis"),
    (lambda r: r.update(lport=70000), "lport"),
    (lambda r: r.pop("owners"), "owners"),
    (lambda r: r.update(pre_existing=1), "pre_existing"),
    (lambda r: r.update(type="lingerx"), "unknown record type"),
])
def test_wrong_shapes_are_named(tmp_path, mutate, expected):
    rec = records.linger(lingerer_over_fake_proc(tmp_path), 1_700_000_000.0, 2_000_000_000)
    mutate(rec)
    assert expected in (schema.problem(rec) or "")


def test_not_a_dict_and_deep_nesting_are_problems():
    assert "not an object" in schema.problem([1, 2])
    deep = {"type": "lost", "ts": 1.0, "time": "", "counter": "x", "count": 1, "total": 1}
    nest = cur = {}
    for _ in range(5000):
        cur["a"] = {}
        cur = cur["a"]
    bad = dict(deep, counter=nest)
    assert schema.problem(bad)


# --- version 1 -----------------------------------------------------------------

def v1_records():
    return [json.loads(line) for line in V1.read_text().splitlines()]


def test_v1_fixture_is_really_version_1_and_upgrades_to_valid_v2():
    recs = v1_records()
    assert recs[0]["format_version"] == 1
    assert any("holders" in (r.get("diagnosis") or {}).get("evidence", {}) for r in recs)
    for rec in recs[1:]:
        assert schema.problem(rec) is not None or rec["type"] not in ("linger", "closed")
        up = schema.upgrade(copy.deepcopy(rec), 1)
        assert schema.problem(up) is None, (schema.problem(up), rec["type"])
    lingers = [schema.upgrade(r, 1) for r in v1_records() if r["type"] == "linger"]
    leaked = next(r for r in lingers if r["diagnosis"]["cause"] == "leaked")
    assert leaked["owners"][0]["cloexec"] is True          # moved from the evidence
    assert leaked["diagnosis"]["evidence"]["holders"] == [
        {"pid": o["pid"], "fd": o["fd"]} for o in leaked["owners"]]


def run_cli(*args):
    env = dict(os.environ, TZ="UTC")
    return subprocess.run([sys.executable, "-m", "closewait_trace", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [[], ["-v"], ["--json"]])
def test_v1_replays_as_the_same_capture_written_as_v2(tmp_path, args):
    """A version-1 recording (a real one, made by closewait-trace 0.1) shows
    exactly what the same capture shows once written as version 2: the
    upgrade on reading loses nothing the output uses. (Until the text layout
    changed, its replay was also byte-identical to 0.1's own; see git log.)"""
    v2 = tmp_path / "v2.jsonl"
    with open(v2, "w") as f:
        for i, rec in enumerate(v1_records()):
            rec = schema.upgrade(rec, 1)
            if i == 0:
                rec["format_version"] = schema.SCHEMA_VERSION
            f.write(json.dumps(rec) + "\n")
    old, new = run_cli("-r", str(V1), *args), run_cli("-r", str(v2), *args)
    assert old.returncode == new.returncode == 0, (old.stderr, new.stderr)
    # The banner names each file: a path of another length wraps the banner
    # differently (80 columns), so the words are compared, not the wrapping.
    assert (old.stdout.replace(str(V1), "FILE").split()
            == new.stdout.replace(str(v2), "FILE").split())
    assert "LINGER" in old.stdout or '"linger"' in old.stdout


def test_reader_skips_and_counts_records_of_the_wrong_shape(tmp_path):
    recs = v1_records()
    lines = [json.dumps(r) for r in recs]
    bad = copy.deepcopy(recs[4])
    assert bad["type"] == "linger"
    bad["age_s"] = "soon"
    lines.insert(5, json.dumps(bad))
    lines.insert(5, json.dumps({"type": "closed", "owners": [None]}))
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rec = parts.read([str(path)])
    assert rec.skipped == 2
    assert len(rec.of("linger")) == len([r for r in recs if r["type"] == "linger"])


# Hostile values in otherwise well-formed records: whatever passes the
# schema must render, replay and report without an error.
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=int(os.environ.get("SCHEMA_FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_values_are_refused_or_harmless(data):
    recs = [schema.upgrade(r, 1) for r in v1_records()[1:]]
    i = data.draw(st.integers(0, len(recs) - 1))
    rec = copy.deepcopy(recs[i])
    paths = [p for p in _paths(rec) if p]
    path = data.draw(st.sampled_from(paths))
    target = rec
    for key in path[:-1]:
        target = target[key]
    if data.draw(st.booleans()):
        target[path[-1]] = data.draw(_values)
    elif isinstance(target, dict):
        del target[path[-1]]
    else:
        target.pop(path[-1])
    if schema.problem(rec) is not None:
        return
    stream = recs[:i] + [rec] + recs[i + 1:]
    renderer = render.TextRenderer(verbose=True)
    for r in stream:
        for line in renderer.render(r):
            assert isinstance(line, str)
    fake = parts.Recording(records=[v1_records()[0]] + stream, files=["x"])
    report.render_text(report.build(fake), top=5)
    json.dumps(report.build(fake))


# --- docs/schema.md ---------------------------------------------------------------

def readme_tables() -> dict[str, list[tuple[str, str]]]:
    """The schema's tables, moved from the README to docs/schema.md."""
    text = (ROOT / "docs" / "schema.md").read_text()
    tables: dict[str, list[tuple[str, str]]] = {}
    for m in re.finditer(r"^### (.+?)\n\n\| field \| type \| meaning \|\n\|---\|---\|---\|\n((?:\|.*\n)+)",
                         text, re.M):
        rows = []
        for line in m.group(2).splitlines():
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.append((cells[0].strip("`"), cells[1]))
        tables[m.group(1)] = rows
    return tables


def test_readme_schema_tables_match_the_code():
    tables = readme_tables()
    assert set(tables) == set(schema.DOCUMENTED), "docs/schema.md tables vs schema.DOCUMENTED"
    for name, spec in schema.DOCUMENTED.items():
        expected = [(f, t + ("" if required else " (optional)"))
                    for f, t, required in schema.fields(spec)]
        assert tables[name] == expected, name


def test_every_type_a_field_names_is_documented():
    names = set(schema.DOCUMENTED)
    for spec in schema.DOCUMENTED.values():
        for _f, t, _r in schema.fields(spec):
            for word in re.findall(r"\b[A-Z][A-Za-z]+\b", t):
                assert word in names, (spec.__name__, t)


# Counts no machine can have, in records otherwise valid: refused by the
# reader (counted as damaged), never stated. Until 2026-12-07 `Count` had no
# upper bound, and `-r -v` said "and 1208925819614629174706176 more fds on
# it, not listed", the report "3626777458843887524118528 holder(s) past the
# first 4" (the review's absurd_counts.sh), a 10**4000 a 4,000-digit number.
def _absurd_counts():
    """(what, make, value): make(n) is a valid record with n in that place."""
    from tests.unit import recordfactory as rf

    def linger(**kw):
        return dict(rf.linger(owners=[rf.holder()]), **kw)
    listener = {"local": "0.0.0.0:80", "accept_queue": 0, "backlog": 128, "owners": []}
    yield "owners_not_listed", lambda n: linger(owners_not_listed=n), 2**80
    yield "owners_not_listed 10**4000", lambda n: linger(owners_not_listed=n), 10**4000
    yield "owners_not_listed 2^31", lambda n: linger(owners_not_listed=n), 2**31
    yield ("listener.owners_not_listed",
           lambda n: linger(listener=dict(listener, owners_not_listed=n)), 2**80)
    yield "listener.accept_queue", lambda n: linger(listener=dict(listener, accept_queue=n)), 2**40
    yield "unread_bytes", lambda n: linger(unread_bytes=n), 2**40
    yield "denied_processes", lambda n: linger(diagnosis={
        "cause": "unknown", "summary": "s", "evidence": {"denied_processes": n}}), 2**40
    yield "threads_total", lambda n: rf.process(threads_total=n), 2**40
    yield "counters", lambda n: rf.summary(counters={"cw_enter": n}), 2**64
    yield "lost count", lambda n: {"type": "lost", "ts": 1.0, "time": "",
                                   "counter": "events_lost", "count": n, "total": n}, 2**63
    yield "fd", lambda n: linger(owners=[rf.holder(fd=n)]), 2**31


@pytest.mark.parametrize("what,make,value", list(_absurd_counts()),
                         ids=[w for w, _, _ in _absurd_counts()])
def test_impossible_counts_are_refused(what, make, value):
    assert schema.problem(make(1)) is None, what
    assert schema.problem(make(value)) is not None, what


def test_the_largest_counts_the_writer_can_write_pass():
    from tests.unit import recordfactory
    linger = recordfactory.linger(owners=[recordfactory.holder()])
    assert schema.problem(dict(linger, owners_not_listed=2**31 - 1)) is None
    assert schema.problem(dict(linger, unread_bytes=2**32 - 1)) is None
    assert schema.problem(recordfactory.process(threads_total=4_194_304)) is None
    buckets = [{"from_us": 1 << 62, "to_us": 1 << 63, "count": 2**63 - 1}]
    assert schema.problem(recordfactory.summary(histogram_us=buckets)) is None


def test_an_impossible_count_is_not_stated_by_replay_or_report(tmp_path):
    """The review's absurd_counts.sh: a linger record saying 2**80 fds are
    not listed is skipped as damaged by -r -v and report, and not said."""
    from tests.unit import recordfactory
    path = tmp_path / "counts.jsonl"
    good = recordfactory.linger(owners=[recordfactory.holder()], rport=1)
    bad = dict(recordfactory.linger(owners=[recordfactory.holder()], rport=2),
               owners_not_listed=2**80)
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        recordfactory.header(), recordfactory.start(), good, bad)))
    replay = run_cli("-r", str(path), "-v")
    assert replay.returncode == 0, replay.stderr
    assert "more fds" not in replay.stdout and str(2**80) not in replay.stdout
    assert "skipped 1 damaged line(s)" in replay.stderr
    rep = run_cli("report", str(path))
    assert rep.returncode == 0, rep.stderr
    assert str(2**80) not in rep.stdout and "fd(s) on sockets" not in rep.stdout
    assert "skipped 1 damaged line(s)" in rep.stderr


# A socket's addresses are IP literals, as the writer writes them
# (events.format_address); readers key sockets by them, and any string up
# to the 4 KiB cap was taken (60,000 sockets: report --since at 525 MB).
@pytest.mark.parametrize("address", [
    "127.0.0.1", "0.0.0.0", "255.255.255.255", "::", "::1", "2001:db8::1",
    "::ffff:127.0.0.1", "2001:db8:ffff:ffff:ffff:ffff:ffff:1", "fe80::1:2:3:4",
    "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"])
def test_ip_literals_are_addresses(address):
    from tests.unit import recordfactory
    rec = recordfactory.linger(owners=[recordfactory.holder()], laddr=address, raddr=address)
    assert schema.problem(rec) is None


@pytest.mark.parametrize("address", [
    "", "x", "localhost", "1.2.3", "256.0.0.1", "01.2.3.4", "1.2.3.4 ", "1.2.3.4\n",
    "1:2:3:4:5:6:7:8:9", "fe80::1%eth0", "00000000" + "z" * 4088, "1" * 5000])
def test_anything_else_is_refused_as_an_address(address):
    from tests.unit import recordfactory
    for field in ("laddr", "raddr"):
        rec = recordfactory.linger(owners=[recordfactory.holder()], **{field: address})
        assert schema.problem(rec) is not None, (field, address)
    assert schema.problem(recordfactory.closed(laddr=address)) is not None


def test_addresses_the_writer_writes_are_all_literals():
    """events.format_address over random IPv4, IPv6 and mapped addresses."""
    import random
    import re
    from closewait_trace.kernel.events import format_address
    rng = random.Random(7)
    pattern = re.compile(schema.IP_LITERAL)
    for i in range(3000):
        raw = bytes(rng.getrandbits(8) for _ in range(16))
        if i % 4 == 0:
            text = format_address(socket.AF_INET, raw)
        elif i % 4 == 1:
            text = format_address(socket.AF_INET6, bytes(10) + b"\xff\xff" + raw[:4])
        elif i % 4 == 2:
            text = format_address(socket.AF_INET6, raw[:2] + bytes(12) + raw[2:4])
        else:
            text = format_address(socket.AF_INET6, raw)
        assert pattern.search(text), text


# Lists the writer bounds are bounded on reading: past the writer's own
# length, a record is refused. Until 2026-12-07 any length passed, and a
# process record of one thread with 200,000 Python frames (the review's
# gen_fat_process.py) was a valid record that -r kept whole.
def _long_lists():
    """(what, make, the writer's bound): make(n) is a record with n items there."""
    from tests.unit import recordfactory as rf
    frame = {"pc": "0x1", "function": None, "offset": None, "module": None,
             "build_id": None, "method": "pc", "symbols": None}
    py = {"function": "f", "file": "a.py", "line": 1}
    thread = {"tid": 1, "state": "S", "wchan": "", "syscall": None, "syscall_fd": None,
              "syscall_fd_target": None, "stack": []}
    capture = {"ts": 1000.0, "after_s": 0.0, "pid": 1, "tid": 1, "comm": "srv",
               "place": None, "stack": [], "stack_bytes": 0, "unwound": True}

    def linger(code):
        return rf.linger(owners=[rf.holder()], code=code)
    yield "threads", lambda n: rf.process(threads=[thread] * n), 16
    yield "thread stack", lambda n: rf.process(threads=[dict(thread, stack=[frame] * n)]), 16
    yield "thread python", lambda n: rf.process(threads=[dict(thread, python=[py] * n)]), 32
    yield "eof_read stack", lambda n: linger({"eof_read": dict(capture, stack=[frame] * n),
                                              "eof_read_unknown": None}), 32
    yield "eof_read python", lambda n: linger({"eof_read": dict(capture, python=[py] * n),
                                               "eof_read_unknown": None}), 16
    yield "opened stack", lambda n: linger({"eof_read": None, "eof_read_unknown": None,
                                            "opened": dict(capture, stack=[frame] * n)}), 32
    yield "opened python", lambda n: linger({"eof_read": None, "eof_read_unknown": None,
                                             "opened": dict(capture, python=[py] * n)}), 16
    bucket = {"from_us": 1, "to_us": 2, "count": 1}
    yield "summary histogram", lambda n: rf.summary(histogram_us=[bucket] * n), 64
    yield "snapshot histogram", lambda n: rf.snapshot(histogram_us=[bucket] * n), 64


@pytest.mark.parametrize("what,make,most", list(_long_lists()),
                         ids=[w for w, _, _ in _long_lists()])
def test_lists_past_the_writers_length_are_refused(what, make, most):
    assert schema.problem(make(most)) is None, what
    assert schema.problem(make(most + 1)) is not None, what
    assert schema.problem(make(200_000)) is not None, what


def test_list_bounds_are_the_writers_own():
    """The bounds are those of the code that writes the lists."""
    from closewait_trace.evidence import pyframes, symbolize
    import inspect
    hints = {k: v for k, v in schema.Thread.__annotations__.items()}
    assert diagnosis.MAX_THREADS == 16 and pyframes.MAX_FRAMES == 32
    assert inspect.signature(symbolize.user_stack).parameters["max_frames"].default == 16
    assert inspect.signature(symbolize.captured_stack).parameters["max_frames"].default == 32
    assert "stack" in hints and "python" in hints
    bpf = (Path(__file__).resolve().parents[2] / "bpf" / "closewait.bpf.c").read_text()
    assert re.search(r"#define PY_MAX_FRAMES (\d+)", bpf).group(1) == "16"
    assert "BPF_PERCPU_ARRAY(cw_hist, u64, 64)" in bpf
