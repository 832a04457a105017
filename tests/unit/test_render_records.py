"""Text rendering of output records built by records.py (the layout's own
tests are in test_render.py)."""

import json
import socket

import pytest

from closewait_trace.output import records, render
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints


def linger_record(**over):
    rec = {"type": "linger", "ts": 1_800_000_000.0, "family": "ipv4",
           "laddr": "255.255.255.255", "lport": 65535, "raddr": "255.255.255.255",
           "rport": 65535, "age_s": 723.0, "age_is_lower_bound": True,
           "owners": [{"pid": 4194304, "comm": "averylongcomm15", "fd": 3, "state": "T",
                       "cmdline": "x"}], "owner_kind": "fd",
           "diagnosis": {"summary": "stopped by a signal: " + "x" * 100}}
    rec.update(over)
    return rec


def test_default_text_fits_80_columns_even_at_the_widest_ipv4():
    r = render.TextRenderer()
    assert len(r.header()) <= 80
    for line in r.render(linger_record()):
        assert len(line) <= 80, line
    closed = dict(linger_record(), type="closed", duration_s=5.0,
                  duration_is_lower_bound=False, how="close",
                  closed_by={"pid": 4194304, "comm": "averylongcomm15"})
    for line in r.render(closed):
        assert len(line) <= 80
    assert all(len(l) <= 80 for l in render.banner(10**9, "local port 80,443; remote port 5432; ipv4 only"))


def test_text_linger_and_closed_lines():
    r = render.TextRenderer()
    rec = linger_record(laddr="127.0.0.1", lport=5555, raddr="127.0.0.1", rport=33836,
                        age_s=1.42, age_is_lower_bound=False,
                        owners=[{"pid": 4242, "comm": "socat", "fd": 6, "state": "T", "cmdline": ""}],
                        diagnosis={"summary": "stopped by a signal: 4242/socat"})
    line, why = r.render(rec)
    assert line.split()[1:] == ["LINGER", "127.0.0.1:5555", "127.0.0.1:33836", "1.4s", "4242/socat"]
    assert why.strip() == "[T] stopped by a signal: 4242/socat"
    closed = dict(rec, type="closed", duration_s=7.0, duration_is_lower_bound=True,
                  how="reset", closed_by=None)
    assert r.render(closed)[0].split()[1:] == ["RESET", "127.0.0.1:5555", "127.0.0.1:33836", ">=7.0s", "-"]


def test_ipv6_uses_brackets_and_wide_mode():
    rec = linger_record(family="ipv6", laddr="2001:db8::1", lport=443, raddr="2001:db8::2",
                        rport=50000, age_is_lower_bound=False)
    line = render.TextRenderer(wide=True).render(rec)[0]
    assert "[2001:db8::1]:443" in line and "[2001:db8::2]:50000" in line


def test_summary_lines_mention_losses():
    rec = records.summary(10.0, 0.0, {"cw_enter": 3, "cw_exit": 2, "events_lost": 4,
                                      "map_full": 1, "exit_untracked": 0,
                                      "transitions_skipped": 6},
                          [0] * 64, [], 1, 0)
    text = " ".join(" ".join(render.summary_lines(rec)).split())
    assert "4 events lost" in text and "1 sockets not timed" in text
    assert "6 state changes not seen (the kernel skipped the program" in text
    json.dumps(rec)


def test_summary_lines_say_the_execs_not_looked_at_for_cpython():
    rec = records.summary(10.0, 0.0, {"cw_enter": 0, "cw_exit": 0, "events_lost": 0,
                                      "map_full": 0, "exit_untracked": 0,
                                      "exec_new_full": 7}, [0] * 64, [], 0, 0)
    text = " ".join(" ".join(render.summary_lines(rec)).split())
    assert ("7 exec()s not looked at for CPython (their map was full): Python frames from "
            "those processes' second lingering socket on") in text


@pytest.mark.parametrize("counters, said", [
    ({"untracked_over": 2},                 # a recording from before the most was counted
     "2 sockets in CLOSE_WAIT not followed (beyond --max-tracked untracked ones, at the "
     "last look)"),
    ({"untracked_over": 2, "untracked_over_most": 2},
     "2 sockets in CLOSE_WAIT not followed (beyond --max-tracked untracked ones, at the "
     "last look)"),
    ({"untracked_over": 0, "untracked_over_most": 3},
     "0 sockets in CLOSE_WAIT not followed at the last look, 3 at most at one look"),
    ({"untracked_over": "x", "untracked_over_most": ["y"]}, None),     # from elsewhere
])
def test_summary_lines_say_sockets_not_followed_at_the_last_look_and_at_most(counters, said):
    rec = records.summary(10.0, 0.0, dict({"cw_enter": 3, "cw_exit": 2}, **counters),
                          [0] * 64, [], 1, 0)
    text = " ".join(" ".join(render.summary_lines(rec)).split())
    if said is None:
        assert "not followed" not in text
    else:
        assert said in text, text


def test_transition_lines_align_and_fit():
    from closewait_trace.kernel.events import KernelEvent
    r = render.TextRenderer()
    start = {"type": "start", "ts": 1_800_000_000.0, "threshold_s": 1.0, "filters": {},
             "all_transitions": True}
    header = r.render(start)[-1]
    ev = KernelEvent(kind=3, ts_ns=0, skaddr=1, duration_ns=35_000, pid=7, tid=7, comm="python3",
                     endpoints=Endpoints(socket.AF_INET, "255.255.255.255", 65535,
                                         "255.255.255.255", 65535),
                     oldstate=tcpstates.SYN_SENT, newstate=tcpstates.SYN_RECV)
    rec = records.transition(ev, 1_800_000_000.0)
    assert rec["task"] is None              # softirq transition: no task named
    line = r.render(rec)[0]
    assert len(line) <= 80 and line.index("255.") == header.index("LOCAL")
    assert line.split()[1] == "SYNS>SYNR" and "35us" in line
    first = records.transition(KernelEvent(**{**ev.__dict__, "duration_ns": 0,
                                              "oldstate": tcpstates.CLOSE_WAIT,
                                              "newstate": tcpstates.LAST_ACK}), 1.0)
    assert first["prev_state_s"] is None and first["task"] == {"pid": 7, "comm": "python3"}
    age, task = r.render(first)[-1].split()[-2:]
    assert age == "?" and task == "7/python3"        # fits whole, even with --all


def test_verbose_lines_take_threads_and_identity_from_the_process_record():
    r = render.TextRenderer(verbose=True)
    process = {"type": "process", "ts": 1.0, "pid": 4242, "comm": "srv",
               "identity": {"user": "www", "container": {"runtime": "docker", "id": "ab" * 32},
                            "pod_uid": None, "unit": None, "netns": 4026531840},
               "threads": [{"tid": 4242, "state": "S", "syscall": "pause", "wchan": "sys_pause",
                            "stack": [{"pc": "0x1", "function": "pause", "offset": 16,
                                       "module": "/lib/libc.so.6", "method": "pc"}]}]}
    assert r.render(process) == []            # shown through the linger lines
    rec = linger_record(laddr="127.0.0.1", lport=80, raddr="127.0.0.1", rport=5000,
                        owners=[{"pid": 4242, "comm": "srv", "fd": 7, "state": "S", "ppid": 1,
                                 "cmdline": "srv -d", "cloexec": False}],
                        diagnosis={"summary": "blocked in pause", "evidence": {"holders": [
                            {"pid": 4242, "fd": 7}]}})
    text = "\n".join(r.render(rec))
    assert "holder 4242/srv fd 7 no-cloexec [S] ppid 1: srv -d" in text
    assert "user www, docker abababababab, netns 4026531840" in text
    assert "thread 4242 [S] pause wchan sys_pause" in text and "pause+0x10 (libc.so.6) [pc]" in text


def test_pre_6_15_syn_recv_without_peer_is_said_not_printed_as_0_0_0_0():
    """Before Linux 6.15 the accepted socket's LISTEN -> SYN_RECV carries the
    listener's addresses: the record says the peer is unknown, the text
    line says why instead of showing 0.0.0.0:0 as the peer."""
    from closewait_trace.kernel.events import KernelEvent
    r = render.TextRenderer()
    r.render({"type": "start", "ts": 1.0, "threshold_s": 1.0, "filters": {},
              "all_transitions": True})
    listener_side = Endpoints(socket.AF_INET, "0.0.0.0", 8080, "0.0.0.0", 0)
    ev = KernelEvent(kind=3, ts_ns=0, skaddr=1, duration_ns=0, pid=7, tid=7, comm="x",
                     endpoints=listener_side, oldstate=tcpstates.LISTEN,
                     newstate=tcpstates.SYN_RECV)
    rec = records.transition(ev, 1_800_000_000.0)
    assert rec["peer_known"] is False
    line = r.render(rec)[-1]
    assert "0.0.0.0:0" not in line and render.PEER_NOT_GIVEN in line and len(line) <= 80
    # 6.15+: the same transition with the peer's address is an ordinary line.
    with_peer = KernelEvent(**{**ev.__dict__, "endpoints": Endpoints(
        socket.AF_INET, "127.0.0.1", 8080, "127.0.0.1", 50000)})
    rec = records.transition(with_peer, 1_800_000_000.0)
    line = r.render(rec)[-1]        # (--all's address columns cut the middle, keep the port)
    assert rec["peer_known"] is True and ":50000" in line and render.PEER_NOT_GIVEN not in line
    # A listener's own transitions (CLOSE -> LISTEN) have no peer by nature.
    listen = KernelEvent(**{**ev.__dict__, "oldstate": tcpstates.CLOSE,
                            "newstate": tcpstates.LISTEN})
    assert records.transition(listen, 1.0)["peer_known"] is True


def test_every_summary_sentence_fits_80_columns():
    # The summary's sentences, with every loss and problem at once and big
    # numbers, fit an 80-column terminal (bcc's tool checklist); rows of
    # sockets are rows, not sentences, and are not wrapped.
    from closewait_trace.output.textsafe import width_of_escaped
    big = 123_456_789_012
    rec = records.summary(98765.4, 0.0, {"cw_enter": big, "cw_exit": big, "events_lost": big,
                                         "map_full": big, "exit_untracked": big,
                                         "events_unread": big},
                          [0] * 20 + [big] + [0] * 43, [], big, big,
                          {"symbolizer_problems": {"more than 4096 sections": big,
                                                   "no .eh_frame": big, "time budget": big,
                                                   # two columns each on a terminal
                                                   "\u6f22\u5b57 " * 30: big},
                           "write_errors": big})
    r = render.TextRenderer()
    r.closed_by_source = {"estimated": big, "lower_bound": big}
    r.estimated_us = [0] * 20 + [big] + [0] * 43
    lines = render.summary_lines(rec, r)
    text = " ".join(l.strip() for l in lines)      # a wrap may fall inside a needle
    for needle in ("events lost", "sockets not timed", "before tracing began", "events not read",
                   "could not be written", "left without symbols", "Estimated, not timed",
                   "Lower bounds only", "Still lingering at exit"):
        assert needle in text
    too_wide = [l for l in lines if width_of_escaped(l) > 80]
    assert len([l for l in lines if "\u6f22" in l]) >= 2
    assert not too_wide, too_wide


def test_the_banner_says_ctrl_c_only_to_a_terminal():
    assert render.banner(10**9)[0].endswith("... Ctrl-C to end.")
    assert render.banner(10**9, at_terminal=False)[0] == (
        "Tracing TCP sockets lingering in CLOSE_WAIT >= 1.0s...")


def test_a_socket_held_by_thousands_is_one_short_line_in_the_summary():
    owners = [{"pid": 1000 + i, "comm": "python3", "fd": 5, "state": "S"} for i in range(3001)]
    still = [{"laddr": "127.0.0.1", "lport": 5555, "raddr": "127.0.0.1", "rport": 40000,
              "age_s": 5.2, "age_source": "traced", "owners": owners, "owner_kind": "fd"}]
    rec = records.summary(10.0, 0.0, {}, [0] * 64, still, 1, 0)
    [line] = [l for l in render.summary_lines(rec) if "5555" in l]
    assert line.endswith(f" and {3001 - render.MAX_OWNERS_NAMED} more processes"), line
    assert line.count("python3") == render.MAX_OWNERS_NAMED


def test_the_summary_names_the_first_processes_not_the_first_fds():
    """A process that dup()ed its socket filled the three names with its
    own fds and pushed the other holder's name out ("7/srv fd 3 [S],
    7/srv fd 4 [S], 7/srv fd 5 [S] and 2 more"): one fd of each of the first
    processes is named, and what is not named is counted in its unit."""
    def still(owners, unlisted=0):
        entry = {"laddr": "127.0.0.1", "lport": 5555, "raddr": "127.0.0.1", "rport": 40000,
                 "age_s": 5.2, "age_source": "traced", "owners": owners, "owner_kind": "fd"}
        if unlisted:
            entry["owners_not_listed"] = unlisted
        rec = records.summary(10.0, 0.0, {}, [0] * 64, [entry], 1, 0)
        [line] = [l for l in render.summary_lines(rec) if "5555" in l]
        return line

    def fd(pid, n, comm="srv"):
        return {"pid": pid, "comm": comm, "fd": n, "state": "S"}

    # 7 holds it on fds 3-5 (and 2 more not listed), 8 on fd 6: both named.
    line = still([fd(7, 3), fd(7, 4), fd(7, 5), fd(8, 6, "java")], unlisted=2)
    assert line.endswith(" 7/srv fd 3 [S], 8/java fd 6 [S] and 4 more fds"), line
    # One process, many fds: more fds, no more processes.
    assert still([fd(7, 3), fd(7, 4)], unlisted=6).endswith(" 7/srv fd 3 [S] and 7 more fds")
    # Five processes, one fd each: the two not named are processes.
    line = still([fd(10 + i, 3) for i in range(5)])
    assert line.endswith(" 12/srv fd 3 [S] and 2 more processes"), line
    # Both: the processes not named, and every fd not named.
    line = still([fd(10, 3), fd(10, 4)] + [fd(11 + i, 3) for i in range(3)])
    assert line.endswith(" 12/srv fd 3 [S] and 1 more process, 2 more fds in all"), line
    assert still([fd(10 + i, 3) for i in range(3)]).endswith(" 12/srv fd 3 [S]")


def test_with_v_a_long_diagnosis_is_wrapped_to_80_columns_not_cut():
    from closewait_trace.output.textsafe import width_of_escaped
    summary = "held by 3001 processes: " + ", ".join(f"{1000 + i}/python3 fd 5" for i in range(8)) \
        + " and 2993 more; holders may be missing: permission denied reading 1 other process (1/init)"
    rec = {"type": "linger", "ts": 1.0, "time": "", "laddr": "127.0.0.1", "lport": 5555,
           "raddr": "127.0.0.1", "rport": 40000, "age_s": 2.0, "age_source": "traced",
           "owners": [{"pid": 1000, "comm": "python3", "fd": 5, "state": "S"}],
           "owner_kind": "fd", "diagnosis": {"cause": "leaked", "summary": summary}}
    lines = render.TextRenderer(verbose=True).render(rec)
    assert all(width_of_escaped(l) <= 80 for l in lines), lines
    text = " ".join(l.strip() for l in lines)
    assert "and 2993 more" in text and "(1/init)" in text


def test_the_connect_line_is_said_of_client_sockets_only():
    """A server's accepted socket was never connect()ed here: `-v` said
    "connect(): place not known" under every one of them (a newcomer's
    snapshot of 65 sockets was 1,450 lines)."""
    from closewait_trace.output import records
    code = records.code_unknown(records.CODE_SNAPSHOT)
    server = {"lport": 8080, "rport": 45000, "code": code}
    client = {"lport": 45000, "rport": 8080, "code": code}
    assert not any("connect(): place" in l for l in render.code_lines(server, verbose=True))
    assert any("connect(): place not known" in l for l in render.code_lines(client, verbose=True))


def test_since_when_entered_at_and_an_entered_column():
    """Issue 19 §4: since when, on the wall clock, not only when a row was
    printed: `entered_at` in the record, and --time-format entered."""
    import datetime as dt
    from closewait_trace.output import schema
    from tests.unit import recordfactory as rf
    ts = dt.datetime(2026, 12, 4, 9, 30, 0).timestamp()
    rec = rf.linger(ts=ts, age_s=125.0, entered_at=ts - 125.0)
    assert schema.problem(rec) is None
    r = render.TextRenderer(time_format="entered")
    assert r.header().startswith("ENTERED  EVENT")
    row = [l for l in r.render(rec) if " LINGER " in l][0]
    assert row.startswith("09:27:55 LINGER ")               # 09:30:00 less 2m05s
    closed = rf.closed(ts=ts + 60, duration=185.0)           # no entered_at: from its duration
    row = [l for l in r.render(closed) if " CLOSED " in l][0]
    assert row.startswith("09:27:55 CLOSED ")
    assert [l for l in render.TextRenderer().render(rec) if " LINGER " in l][0].startswith(
        "09:30:00 LINGER ")


def test_still_lingering_at_exit_lists_the_oldest_first():
    """top's exit listed the sockets still in CLOSE_WAIT in no order (a
    newcomer's report: ~1m51s and ~36.9s mixed); only 50 are shown, so
    they are the 50 oldest, oldest first, as snapshot orders them."""
    def entry(rport, age):
        return {"family": "ipv4", "laddr": "127.0.0.1", "lport": 80, "raddr": "127.0.0.1",
                "rport": rport, "age_s": age, "age_source": "traced", "owner_kind": "fd",
                "owners": [{"pid": 7, "comm": "srv", "fd": rport, "state": "S"}]}
    still = [entry(40000 + i, float((i * 37) % 59 + 1)) for i in range(60)] + [entry(1, "x")]
    rec = records.summary(100.0, 10.0, {}, [0] * 64, still, 61, 0)
    lines = render.summary_lines(rec)
    shown = [l for l in lines if l.startswith("  127.0.0.1:80 <- ")]
    assert len(shown) == 50
    ages = [float(l.split()[3].rstrip("s")) for l in shown]
    assert ages == sorted(ages, reverse=True) and ages[0] == 59.0 and ages[-1] == 10.0, ages
