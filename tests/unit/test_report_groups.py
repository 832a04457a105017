"""report answers "what do I fix" (issue 12 §5): by cause, by program with
the children of one server folded, by unit/container/pod where known, by
port; the cause in each row; --by; estimated durations kept apart (issue 9);
build() consumes a one-pass iterable."""

import json
import re
import subprocess
import sys

import pytest

from closewait_trace.files import recording
from closewait_trace.output import report
from tests.unit import recordfactory

T0 = 1_800_000_000.0


def header(cid="cap", start=T0):
    return {"type": "header", "format": recording.FORMAT, "format_version": 2,
            "capture_id": cid, "part": 0, "start_ts": start, "hostname": "vm",
            "threshold_s": 1.0, "filters": {}}


def process(pid, comm="socat", unit=None, container=None, pod=None, cmdline=None, exe=None,
            ppid=9950, uid=0):
    # The cgroup path is what the container, pod and unit are decided from.
    if pod and container:
        cgroup = (f"/kubepods.slice/kubepods-pod{pod.replace('-', '_')}.slice/"
                  f"docker-{container * 32}.scope")
    elif container:
        cgroup = f"/system.slice/docker-{container * 32}.scope"
    else:
        cgroup = f"/system.slice/{unit}" if unit else "/user.slice/user-0.slice/session-1.scope"
    return {"type": "process", "ts": T0, "pid": pid, "comm": comm, "ppid": ppid,
            "cmdline": cmdline or comm,
            "identity": {"user": "root", "uid": uid, "unit": unit, "pod_uid": pod, "netns": 1,
                         "cgroup": cgroup,
                         "exe": {"path": exe or f"/usr/bin/{comm}", "deleted": False,
                                 "replaced": False},
                         "container": {"runtime": "docker", "id": container * 32}
                         if container else None}}


def linger(i, pid, comm="socat", cause="stopped", lport=5555, age=1.4, cmdline=None, **over):
    rec = {"type": "linger", "ts": T0 + 1 + i, "family": "ipv4", "laddr": "127.0.0.1",
           "lport": lport, "raddr": "127.0.0.1", "rport": 40000 + i, "age_s": age,
           "age_is_lower_bound": False, "update": False, "owner_kind": "fd",
           "owners": [{"pid": pid, "comm": comm, "fd": 6, "state": "T",
                       "cmdline": cmdline if cmdline is not None else f"{comm} -T 1"}],
           "diagnosis": {"cause": cause, "summary": f"{cause}: {pid}/{comm}"}}
    rec.update(over)
    return rec


def closed(i, duration, **over):
    rec = {"type": "closed", "ts": T0 + 10 + i, "family": "ipv4", "laddr": "127.0.0.1",
           "lport": over.pop("lport", 5555), "raddr": "127.0.0.1", "rport": 40000 + i,
           "duration_s": duration, "duration_is_lower_bound": False, "how": "close",
           "closed_by": {"pid": 1, "comm": "x"}}
    rec.update(over)
    return rec


def seed_like():
    """Five stopped socat children of one listener, one C program blocked in
    pause(), in a systemd unit; one socket already in CLOSE_WAIT at start
    with an estimated age."""
    recs = [header()]
    for i, pid in enumerate(range(9956, 9976, 4)):
        recs += [process(pid), linger(i, pid)]
    recs += [process(9952, "hold_fp", unit="hold.service", cmdline="/tmp/hold_fp 6001",
                     exe="/tmp/hold_fp"),
             linger(5, 9952, "hold_fp", "blocked_elsewhere", lport=6001, cmdline="/tmp/hold_fp 6001"),
             process(7000, "java", container="ab", pod="1234abcd-0000-0000-0000-000000000000"),
             linger(6, 7000, "java", "ignoring_eof", lport=8080, age=6.5,
                    age_source="estimated", age_max_s=9.0)]
    recs += [closed(i, 7.2 - i) for i in range(5)]
    recs += [closed(5, 4.0, lport=6001), closed(6, 15.5, lport=8080, duration_source="estimated",
                                                duration_max_s=18.0)]
    recs.append({"type": "summary", "ts": T0 + 20, "histogram_us":
                 [{"from_us": 2097152, "to_us": 4194304, "count": 3}], "still_lingering": [],
                 "write_errors": 0})
    return recs


def test_five_children_of_one_server_are_one_program_row_with_the_cause():
    rep = report.build(iter(seed_like()))          # a one-pass iterator is enough
    programs = {r["program"]: r for r in rep["by_program"]}
    socat = programs["socat [/usr/bin/socat]"]
    assert socat["processes"] == 5 and socat["count"] == 5 and socat["causes"] == {"stopped": 5}
    assert programs["hold_fp [/tmp/hold_fp]"]["causes"] == {"blocked_elsewhere": 1}
    causes = {r["cause"]: r for r in rep["by_cause"]}
    assert causes["stopped"]["programs"] == {"socat [/usr/bin/socat]": 5}
    assert set(causes) == {"stopped", "blocked_elsewhere", "ignoring_eof"}
    text = "\n".join(report.render_text(rep))
    assert "socat [/usr/bin/socat] (5 processes)" in text
    row = next(l for l in text.splitlines() if "socat [/usr/bin/socat] (5 processes)" in l)
    assert row.rstrip().endswith("stopped")


def test_unit_container_and_pod_where_known():
    rep = report.build(seed_like())
    assert rep["groupings"] == ["cause", "program", "unit", "container", "pod", "port", "peer"]
    units = {r["unit"]: r["count"] for r in rep["by_unit"]}
    assert units == {"hold.service": 1, "(not known)": 6}
    assert {r["container"] for r in rep["by_container"]} == {"docker " + "ab" * 6, "(not known)"}
    assert any(r["pod"].startswith("1234abcd") for r in rep["by_pod"])
    ports = {r["port"]: r["count"] for r in rep["by_port"]}
    assert ports == {5555: 5, 6001: 1, 8080: 1}


def test_unknown_groupings_are_left_out_unless_asked_for():
    recs = [r for r in seed_like() if r.get("type") != "process"]
    rep = report.build(recs)
    assert "unit" not in rep["groupings"] and "by_unit" not in rep
    rep = report.build(recs, by=["unit", "pid"])
    assert rep["groupings"] == ["unit", "pid"] and "by_cause" not in rep
    assert rep["by_unit"][0]["unit"] == "(not known)"
    with pytest.raises(ValueError):
        report.build(recs, by=["nonsense"])


def test_estimated_durations_are_kept_apart_and_counted():
    rep = report.build(seed_like())
    assert rep["durations"] == {"traced": 6, "estimated": 1, "lower_bound": 0}
    assert sum(b["count"] for b in rep["estimated_histogram_us"]) == 1
    assert sum(b["count"] for b in rep["histogram_us"]) == 3      # the kernel's, untouched
    java = next(r for r in rep["by_program"] if r["program"] == "java [/usr/bin/java]")
    assert java["estimated"] == 1 and java["longest_source"] == "estimated"
    text = "\n".join(report.render_text(rep))
    assert "1 estimated" in text and "~15.5s" in text and "Estimated, not timed" in text


def test_old_records_without_sources_mean_what_they_meant():
    recs = [header(), linger(0, 1, age=3.0, age_is_lower_bound=True),
            closed(0, 5.0, duration_is_lower_bound=True)]
    rep = report.build(recs)
    assert rep["durations"]["lower_bound"] == 1
    assert ">=5.0s" in "\n".join(report.render_text(rep))


def test_cli_report_by_and_json_agree(tmp_path):
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(json.dumps(recordfactory.complete(r)) + "\n" for r in seed_like()))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "closewait_trace", "report", *args],
                              capture_output=True, text=True, timeout=60)
    result = run("--json", "--by", "cause,program", str(path))
    assert result.returncode == 0, result.stderr
    rep = json.loads(result.stdout)
    assert rep["groupings"] == ["cause", "program"]
    text = run("--by", "program", "--by", "port", str(path)).stdout
    assert "By program" in text and "By local port" in text and "By cause" not in text
    bad = run("--by", "colour", str(path))
    assert bad.returncode == 2 and "colour" in bad.stderr


def test_names_are_escaped_once_in_every_table():
    """Escaped before it is cut or padded, and only once: `\\x1b` in the
    output stands for an ESC, `\\\\` for a backslash."""
    recs = [header(), process(1, "ev\x1bil\\", exe="/ev"), process(2, "ev\x1bil\\", exe="/ev"),
            linger(0, 1, "ev\x1bil\\", cmdline="ev"), linger(1, 2, "ev\x1bil\\", cmdline="ev"),
            linger(2, 3, "x", raddr="10.0.0.1\\\x1b" + "9" * 40)]
    text = "\n".join(report.render_text(report.build(recs, by=["program", "pid", "peer"])))
    assert "ev\\x1bil\\\\ [/ev] (2 processes)" in text
    assert "1/ev\\x1bil\\\\" in text
    assert "\\\\\\x1b" in text and "\\\\\\\\" not in text


def test_events_left_unread_at_a_captures_end_are_a_loss_of_the_report():
    """A capture whose tracer stopped with events still in the kernel's
    buffer says so in its summary (counters.events_unread); the report adds
    them up over captures and lists them among the losses."""
    from tests.unit import recordfactory as rf
    recs = []
    for cid, unread in (("a", 904), ("b", 96), ("c", 0)):
        recs.append(rf.header(capture_id=cid))
        recs.append(rf.summary(counters={"cw_enter": 1, "cw_exit": 1, "events_lost": 0,
                                         "map_full": 0, "events_unread": unread}))
        if unread:          # the tracer's lost record before its summary: not counted twice
            recs.insert(-1, {"type": "lost", "ts": 2.0, "time": "x", "counter": "events_unread",
                             "count": unread, "total": unread})
    rep = report.build(recs, by=["cause"])
    assert rep["losses"]["events_unread"] == 1000
    text = "\n".join(report.render_text(rep))
    assert "1000 kernel events not read (in the buffer when a capture ended)" in text


def test_state_changes_the_kernel_skipped_are_a_loss_of_the_report():
    """A live trace's lost records for the kernel's skipped runs
    (transitions_skipped) are added up over captures and listed."""
    from tests.unit import recordfactory as rf
    recs = []
    for cid, skipped in (("a", 7), ("b", 5)):
        recs.append(rf.header(capture_id=cid))
        recs.append({"type": "lost", "ts": 2.0, "time": "x", "counter": "transitions_skipped",
                     "count": skipped, "total": skipped})
        recs.append(rf.summary(counters={"cw_enter": 1, "cw_exit": 1,
                                         "transitions_skipped": skipped}))
    rep = report.build(recs, by=["cause"])
    assert rep["losses"]["transitions_skipped"] == 12
    text = " ".join(" ".join(report.render_text(rep)).split())
    assert "12 kernel state changes not seen (the kernel skipped the program" in text


def test_client_side_leaks_are_grouped_by_the_remote_service_and_script():
    """Issue 19 §5: 'By remote peer' mixed a server's clients and a client's
    service under one address; each ephemeral local port was a row; every
    Python service was one program row."""
    recs = [header(),
            process(20, comm="python3", cmdline="python3 -u /srv/leaky_client.py --pool 8",
                    exe="/usr/bin/python3.11"),
            process(21, comm="python3", cmdline="python3 /srv/api.py", exe="/usr/bin/python3.11"),
            process(22, comm="socat")]
    # A client's three sockets to 10.0.0.9:5432, from three ephemeral ports.
    for i in range(3):
        recs.append(linger(i, 20, comm="python3", cause="blocked_elsewhere", lport=45000 + i,
                           raddr="10.0.0.9", rport=5432, listener=None))
    # A server's sockets on :5555 from two clients of one host.
    for i in range(3, 5):
        recs.append(linger(i, 22, lport=5555, listener={"local": "0.0.0.0:5555"}))
    recs.append(linger(5, 21, comm="python3", lport=8080, rport=41000 + 5))
    rep = report.build(recs, by=["program", "port", "peer"])
    peers = {r["peer"]: r["count"] for r in rep["by_peer"]}
    assert peers == {"10.0.0.9:5432": 3, "127.0.0.1:*": 3}
    text = "\n".join(report.render_text(rep))
    assert re.search(r"^  10\.0\.0\.9:5432 +3 ", text, re.M), text
    assert re.search(r"^  127\.0\.0\.1:\* +3 ", text, re.M), text
    ports = {r["port"]: r["count"] for r in rep["by_port"]}
    assert ports == {report.EPHEMERAL: 3, 5555: 2, 8080: 1}
    programs = {r["program"]: r["count"] for r in rep["by_program"]}
    assert programs == {"python3 [/usr/bin/python3.11] /srv/leaky_client.py": 3,
                        "python3 [/usr/bin/python3.11] /srv/api.py": 1,
                        "socat [/usr/bin/socat]": 2}


@pytest.mark.parametrize("exe, cmdline, script", [
    ("/usr/bin/python3.11", "python3 -u /srv/app.py", "/srv/app.py"),
    ("/usr/bin/python3.11", "python3 -W ignore -m http.server 80", "-m http.server"),
    ("/usr/bin/python3.11", "python3 -c import time", "-c"),
    ("/usr/lib/jvm/java-17/bin/java", "java -Xmx1g -cp /a:/b com.x.Main", "com.x.Main"),
    ("/usr/lib/jvm/java-17/bin/java", "java -jar /opt/svc.jar", "-jar /opt/svc.jar"),
    ("/usr/bin/node", "node /srv/index.js", "/srv/index.js"),
    ("/usr/bin/socat", "socat TCP-LISTEN:1 -", None),
    ("/usr/bin/python3.11", "python3", None),
    (None, "python3 /x.py", None),
])
def test_the_script_an_interpreter_runs(exe, cmdline, script):
    from closewait_trace.sockets import identity
    assert identity.script_of(exe, cmdline) == script


def test_by_pid_shows_each_process_command_line():
    """Issue 19 §5: --by pid named 4312/python3 for every Python service."""
    recs = [header(),
            process(20, comm="python3", cmdline="python3 /srv/a.py",
                    exe="/usr/bin/python3.11"),
            process(21, comm="python3", cmdline="python3 /b\x1b[2J",
                    exe="/usr/bin/python3.11"),
            linger(0, 20, comm="python3"), linger(1, 21, comm="python3")]
    rep = report.build(recs, by=["pid"])
    assert {r["pid"]: r.get("cmdline") for r in rep["by_pid"]} == {
        20: "python3 /srv/a.py", 21: "python3 /b\x1b[2J"}
    text = "\n".join(report.render_text(rep))
    assert "20/python3 python3 /srv/a.py " in text      # the name column is 36 wide
    assert "21/python3 python3 /b\\x1b[2J" in text and "\x1b" not in text


def test_the_program_leaking_fastest_is_one_line():
    """Issue 19 §5: per program, sockets that lingered per minute of capture
    and how many are still held, so 'which service leaks fastest' is one line."""
    recs = [header(start=T0),
            process(20, comm="python3", cmdline="python3 /srv/leaky.py", exe="/usr/bin/python3.11"),
            process(22, comm="socat")]
    for i in range(6):                       # 6 in the 2 minutes, none closed
        recs.append(linger(i, 20, comm="python3", cause="blocked_elsewhere", lport=45000 + i,
                           raddr="10.0.0.9", rport=5432, listener=None))
    recs.append(linger(6, 22))               # socat: one, closed
    recs.append(closed(6, 3.0, rport=40006))
    recs.append({"type": "summary", "ts": T0 + 120, "counters": {}, "traced_s": 120.0,
                 "histogram_us": [], "linger_reported": 7, "closed_reported": 1,
                 "still_lingering": []})
    rep = report.build(recs, by=["program"])
    rows = {r["program"]: r for r in rep["by_program"]}
    leaky = rows["python3 [/usr/bin/python3.11] /srv/leaky.py"]
    assert (leaky["per_min"], leaky["still_held"]) == (3.0, 6)
    assert rows["socat [/usr/bin/socat]"]["still_held"] == 0
    text = "\n".join(report.render_text(rep))
    # One line in 80 columns: the figures, the program cut in its middle.
    [line] = [l for l in text.splitlines() if "Leaking fastest" in l]
    assert line.startswith("  Leaking fastest (3/min, 6 still held): python3 [/usr/")
    assert line.endswith("/srv/leaky.py") and len(line) <= 80, line


def code(function=None, unknown=None, module="/srv/api", line=None):
    if function is None:
        return {"eof_read": None, "eof_read_unknown": unknown}
    f = {"pc": "0x1", "function": function, "offset": 8, "module": module,
         "build_id": None, "method": "cfi", "symbols": "symtab"}
    if line:
        f.update(file="srv.c", line=line)
    return {"eof_read": {"ts": T0, "after_s": 0.0, "pid": 7, "tid": 7, "comm": "api",
                         "place": f, "stack": [f], "stack_bytes": 4096, "unwound": True},
            "eof_read_unknown": None}


def test_by_code_location_names_the_functions_that_leaked_most():
    recs = [header(), process(7, "api")]
    places = ["handle_client.isra.0"] * 3 + ["fetch_user"] + [None]
    for i, function in enumerate(places):
        recs.append(linger(i, 7, "api", cause="ignoring_eof", code=code(function)))
    recs.append(linger(9, 7, "api", code=code(unknown="in CLOSE_WAIT before the trace began")))
    rep = report.build(recs)
    assert "code" in rep["groupings"]
    rows = {r["code"]: r["count"] for r in rep["by_code"]}
    assert rows == {"handle_client (api) in /srv/api": 3, "fetch_user (api) in /srv/api": 1,
                    report.NO_EOF_SEEN: 1, report.PLACE_NOT_KNOWN: 1}
    assert rep["by_code"][0]["code"] == "handle_client (api) in /srv/api"   # most first
    # No place known anywhere: the table is left out unless asked for.
    plain = report.build([header(), process(7, "api"), linger(0, 7, "api")])
    assert "code" not in plain["groupings"]
    assert "code" in report.build([header(), linger(0, 7, "api")], by=["code"])["groupings"]


def test_the_same_function_and_line_in_two_programs_are_two_rows():
    """A function's name and its file:line are the program's own words: any
    user can name theirs handle_client and claim srv.c:12. The row says the
    file it is in, so another program never joins a service's row."""
    recs = [header(), process(7, "api"), process(8, "evil")]
    recs.append(linger(0, 7, "api", cause="ignoring_eof",
                       code=code("handle_client", module="/usr/sbin/api", line=12)))
    recs.append(linger(1, 8, "evil", cause="ignoring_eof",
                       code=code("handle_client", module="/tmp/evil", line=12)))
    rows = {r["code"]: r["count"] for r in report.build(recs)["by_code"]}
    assert rows == {"handle_client (srv.c:12) in /usr/sbin/api": 1,
                    "handle_client (srv.c:12) in /tmp/evil": 1}


def test_a_code_location_row_keeps_its_line_when_cut():
    """The row's name was cut at its end: "Api.handle_request
    (api_server.py:1…" lost the line the on-call looks for (a newcomer's
    report). The module's middle goes first, then the function's."""
    recs = [header(), process(7, "api")]
    recs.append(linger(0, 7, "api", cause="ignoring_eof",
                       code=code("handle_request_of_the_api", module="/srv/deploy/api/bin/api",
                                 line=1234)))
    text = report.render_text(report.build(recs))
    table = "\n".join(text).split("By code location", 1)[1].split("\n\n", 1)[0]
    [row] = [l for l in table.splitlines() if "handle_request" in l]
    assert "(srv.c:1234)" in row and len(row) <= 80, row
    assert report._cut_code("a_very_long_function_name_indeed (server.py:12)", 30).endswith(
        "(server.py:12)")


def test_places_the_kernel_did_not_keep_are_losses_in_the_report_and_the_summary():
    """A newcomer's report said "Gaps and losses: none." beside 195 sockets
    whose place was "(not known)": the capture's summary counted 33,679 EOF
    reads and 38,053 connect()s over the capture rate."""
    from closewait_trace.output import render
    counters = {"eof_rate_limited": 33679, "open_rate_limited": 38053, "eof_map_full": 2,
                "open_map_full": 0}
    recs = [header(), recordfactory.start(ts=T0),
            recordfactory.summary(ts=T0 + 60, counters=counters)]
    rep = report.build(iter(recs))
    assert rep["losses"]["places_not_kept"] == counters
    text = "\n".join(report.render_text(rep))
    assert "Gaps and losses: none." not in text
    assert "33679 EOF reads not located (over the capture rate" in text
    assert "38053 connect()s not located (over the capture rate" in text
    assert "2 EOF reads not located (their map was full)" in text
    live = " ".join(render.summary_lines(recs[-1]))
    assert "38053 connect()s not located (over the capture" in " ".join(live.split())


def test_a_socket_lingering_across_two_back_to_back_captures_is_counted_once():
    """`report cw.jsonl cw.jsonl.gz` over two captures on one host counted
    every socket still lingering at the first's end twice (623 for ~320;
    'stopped 10 (10~)' for 5 socat sockets): the second capture reports
    them again, as older than its trace."""
    def lingering(rport, ts, age, pre=False):
        return recordfactory.linger(ts=ts, rport=rport, age_s=age, pre_existing=pre,
                                    age_source="estimated" if pre else "traced",
                                    owners=[recordfactory.holder(pid=9, comm="socat",
                                                                 state="T")])
    first = [header("a", T0), recordfactory.start(ts=T0),
             lingering(40000, T0 + 10, 5.0), lingering(40001, T0 + 10, 5.0),
             recordfactory.summary(ts=T0 + 60)]
    second = [header("b", T0 + 61), recordfactory.start(ts=T0 + 61),
              lingering(40000, T0 + 62, 57.0, pre=True),
              lingering(40001, T0 + 62, 57.0, pre=True),
              recordfactory.closed(ts=T0 + 90, rport=40001, duration=85.0, pre_existing=True,
                                   duration_source="estimated"),
              lingering(40002, T0 + 70, 3.0),              # a new one in the second
              recordfactory.summary(ts=T0 + 120)]
    rep = report.build(iter(first + second))
    assert rep["sockets"] == 3
    [stopped] = [r for r in rep["by_cause"] if r["cause"] == "stopped"]
    assert stopped["count"] == 3
    # 40000 lingered from T0+5 to the second capture's end (115 s); 40001
    # closed at 85 s; 40002 from T0+67 to the end (53 s).
    assert rep["still_lingering_total"] == 2
    assert round(stopped["total_s"]) == 115 + 85 + 53
    # Another host's capture is other sockets, whatever their addresses.
    other = [dict(header("c", T0 + 61), hostname="elsewhere")] + second[1:]
    assert report.build(iter(first + other))["sockets"] == 5


def test_a_table_s_columns_line_up_when_counts_carry_estimates():
    """'123 (111~)' was wider than the SOCKETS column and pushed its row's
    TOTAL and LONGEST right of the other rows' (a newcomer's report)."""
    def lingering(rport, pre, pid, comm):
        return recordfactory.linger(ts=T0 + 10, rport=rport, age_s=5.0, pre_existing=pre,
                                    age_source="estimated" if pre else "traced",
                                    owners=[recordfactory.holder(pid=pid, comm=comm, state="T")])
    recs = [header(), recordfactory.start(ts=T0)]
    recs += [lingering(40000 + i, i < 111, 9, "socat") for i in range(123)]
    recs += [lingering(41000 + i, False, 10, "nc") for i in range(15)]
    recs.append(recordfactory.summary(ts=T0 + 60))
    text = report.render_text(report.build(iter(recs)))
    table = text[text.index("By program (the holders that never closed; children of one "
                            "server folded):") + 1:]
    table = table[:table.index("")]
    heading = table[0]
    total_end = heading.index("TOTAL") + len("TOTAL")
    assert len(table) == 3, table
    for line in table[1:]:
        # Each row's TOTAL ends under the heading's: the columns after the
        # name are right-aligned, so the value's last character is there.
        count_and_total = re.match(r"(.{38}\s*\d+(?: \(\d+~\))?\s+\S+)", line)
        assert count_and_total and count_and_total.end(1) == total_end, (line, heading)


def test_the_estimates_footnote_reads_as_two_whole_lines():
    """The footnote under the tables was one 91-column line that the
    80-column fitting wrapped into an orphan ("    their durations are")
    above a line at the original indentation (a newcomer's report)."""
    text = report.render_text(report.build(seed_like()))
    first = next(i for i, line in enumerate(text) if line.startswith("  N (M~):"))
    footnote = text[first:text.index("", first)]
    assert len(footnote) == 2, footnote
    assert all(line.startswith("  ") and not line.startswith("   ") and len(line) <= 80
               for line in footnote), footnote
    assert " ".join(line.strip() for line in footnote) == (
        "N (M~): M of the N sockets were already in CLOSE_WAIT when tracing began: "
        "their durations are estimates (~) or lower bounds (>=), not kernel-timed.")


def test_two_scripts_of_one_interpreter_are_told_apart_in_by_program():
    """In 80 columns both rows read "python3.11 [/usr/bin/python3.11] /s…"
    (a newcomer's report on a leaking server and a stopped one, both
    Python): the name is cut in the middle, keeping the script."""
    recs = [header()]
    for pid, script in ((1, "leaky"), (2, "stopped")):
        cmdline = f"/usr/bin/python3.11 /srv/app/services/{script}.py"
        recs += [process(pid, "python3.11", cmdline=cmdline, exe="/usr/bin/python3.11"),
                 linger(pid, pid, "python3.11", cmdline=cmdline)]
    text = report.render_text(report.build(iter(recs)))
    table = text[text.index("By program (the holders that never closed; children of one "
                            "server folded):") + 2:]
    rows = table[:table.index("")]
    assert len(rows) == 2, rows
    assert [r for r in rows if "leaky.py" in r] and [r for r in rows if "stopped.py" in r], rows
    assert all(r.startswith("  python3.11 [") and len(r) <= 80 for r in rows), rows


def test_sockets_there_before_the_trace_are_not_a_leak_rate():
    """30 sockets already in CLOSE_WAIT when tracing began and 5 new ones
    in 79 s read "Leaking fastest (26.61/min, 35 still held)" (a
    newcomer's report): per_min counts the sockets that began lingering
    during the capture, as top's NEW/MIN does."""
    recs = [header(start=T0),
            process(20, comm="python3", cmdline="python3 /srv/leaky.py", exe="/usr/bin/python3.11"),
            process(22, comm="python3", cmdline="python3 /srv/old.py", exe="/usr/bin/python3.11")]
    for i in range(30):                      # old.py: all there before the trace
        recs.append(linger(i, 22, comm="python3", cause="ignoring_eof", lport=46000,
                           rport=41000 + i, cmdline="python3 /srv/old.py", age=60.0,
                           age_source="estimated", pre_existing=True))
    for i in range(5):                       # leaky.py: 5 in the 2 minutes
        recs.append(linger(30 + i, 20, comm="python3", cause="ignoring_eof", lport=45000,
                           rport=42000 + i, cmdline="python3 /srv/leaky.py"))
    recs.append({"type": "summary", "ts": T0 + 120, "counters": {}, "traced_s": 120.0,
                 "histogram_us": [], "linger_reported": 35, "closed_reported": 0,
                 "still_lingering": []})
    rep = report.build(recs, by=["program"])
    rows = {r["program"]: r for r in rep["by_program"]}
    old = rows["python3 [/usr/bin/python3.11] /srv/old.py"]
    assert old["estimated"] == 30, old
    assert (old["per_min"], old["still_held"]) == (0.0, 30)
    assert rows["python3 [/usr/bin/python3.11] /srv/leaky.py"]["per_min"] == 2.5
    [line] = [l for l in report.render_text(rep) if "Leaking fastest" in l]
    assert line.startswith("  Leaking fastest (2.5/min, 5 still held): ") and \
        line.endswith("/srv/leaky.py"), line


def owner(pid, comm, fd):
    return {"pid": pid, "comm": comm, "fd": fd, "state": "S", "cmdline": comm}


def dup_and_other():
    """One socket: pid 10 (srv, unit a.service) holds it on fds 3-6 (it
    dup()ed it), pid 20 (other, unit b.service) on fd 3."""
    owners = [owner(10, "srv", fd) for fd in (3, 4, 5, 6)] + [owner(20, "other", 3)]
    return [header(), process(10, "srv", unit="a.service"), process(20, "other", unit="b.service"),
            linger(0, 10, "srv", owners=owners)]


def test_a_process_with_several_fds_takes_one_holder_slot():
    """The first MAX_HOLDERS owners entries were kept, one per fd: pid 10's
    four fds filled them and pid 20, named by the record, was in no row by
    program, pid or unit. The cap is on processes."""
    rep = report.build(dup_and_other(), by=["cause", "program", "pid", "unit"])
    programs = {r["program"]: (r["count"], r["processes"]) for r in rep["by_program"]}
    assert programs == {"srv [/usr/bin/srv]": (1, 1), "other [/usr/bin/other]": (1, 1)}
    assert {(r["pid"], r["comm"]): r["processes"] for r in rep["by_pid"]} == {
        (10, "srv"): 1, (20, "other"): 1}
    assert {r["unit"]: r["processes"] for r in rep["by_unit"]} == {
        "a.service": 1, "b.service": 1}
    [cause] = rep["by_cause"]
    assert cause["processes"] == 2
    assert cause["programs"] == {"srv [/usr/bin/srv]": 1, "other [/usr/bin/other]": 1}
    # Nothing was left out: pid 10's other fds are no more holders.
    assert "holders" not in rep["losses"]["folded"]


def test_each_person_row_counts_only_its_own_processes():
    """A socket's pids were added to every row it landed in: program A's row
    counted program B's holder among A's processes ("(2 processes)")."""
    recs = [header(), process(10, "srv", unit="a.service"),
            process(20, "other", unit="b.service"),
            linger(0, 10, "srv", owners=[owner(10, "srv", 3), owner(20, "other", 3)]),
            linger(1, 10, "srv", owners=[owner(10, "srv", 3)])]
    rep = report.build(recs, by=["program", "pid", "unit", "port"])
    programs = {r["program"]: (r["count"], r["processes"]) for r in rep["by_program"]}
    assert programs == {"srv [/usr/bin/srv]": (2, 1), "other [/usr/bin/other]": (1, 1)}
    assert {r["pid"]: r["processes"] for r in rep["by_pid"]} == {10: 1, 20: 1}
    assert {r["unit"]: r["processes"] for r in rep["by_unit"]} == {
        "a.service": 1, "b.service": 1}
    # A row not keyed by a person: every holder of its sockets.
    assert {r["port"]: r["processes"] for r in rep["by_port"]} == {5555: 2}
    text = "\n".join(report.render_text(rep))
    assert "(2 processes)" not in text


def test_holders_past_the_cap_are_counted_in_processes():
    """Five processes hold one socket, the first on six fds: the four first
    processes are in its rows, one process is left out and counted as one
    (not as the entries past the fourth: 6 + 4 - 4 = 6)."""
    owners = [owner(10, "a", fd) for fd in range(3, 9)]
    owners += [owner(pid, "a", 3) for pid in (11, 12, 13, 14)]
    recs = [header(), linger(0, 10, "a", owners=owners)]
    rep = report.build(recs, by=["pid"])
    assert sorted(r["pid"] for r in rep["by_pid"]) == [10, 11, 12, 13]
    assert rep["losses"]["folded"]["holders"] == 1
    text = "\n".join(report.render_text(rep))
    assert "1 holder process(es) past the first 4 of a socket" in text


def test_holders_left_out_are_counted_once_per_socket():
    """A CHANGE record that replaces what is known of a socket (its cause
    was unknown) counted its holders left out a second time."""
    owners = [owner(pid, "a", 3) for pid in (10, 11, 12, 13, 14)]
    recs = [header(), linger(0, 10, "a", cause="unknown", owners=owners),
            linger(0, 10, "a", cause="stopped", owners=owners, update=True)]
    rep = report.build(recs, by=["cause"])
    assert rep["losses"]["folded"]["holders"] == 1
    assert [r["cause"] for r in rep["by_cause"]] == ["stopped"]


def test_a_still_lingering_socket_lists_every_holding_process_first():
    """The still-lingering list kept the first MAX_HOLDERS entries: pid 10's
    fds hid pid 20, and the entries dropped were not counted in "and N more
    fds on it, not listed"."""
    rep = report.build(dup_and_other() + [linger(1, 10, "srv",
                       owners=[owner(10, "srv", fd) for fd in range(3, 10)])], by=["cause"])
    listed = {s["rport"]: s for s in rep["still_lingering"]}
    shared = listed[40000]
    assert [(o["pid"], o["fd"]) for o in shared["owners"]] == [(10, 3), (10, 4), (10, 5), (20, 3)]
    assert shared["owners_not_listed"] == 1
    alone = listed[40001]
    assert [o["fd"] for o in alone["owners"]] == [3, 4, 5, 6]
    assert alone["owners_not_listed"] == 3
    text = report.render_text(rep)
    assert text[text.index("      and 1 more fds on it, not listed") - 1].endswith(
        "20/other fd 3"), text
