"""The text table (issue 12 §1), ages with their source (issue 9), the
replay banner and the sanitizer itself. The layout tests use only the
renderer's old interface and failed on the old code (PYTHONPATH=/work/main/src):
the command was cut to a few letters, --wide narrowed OWNER, cuts had no
ellipsis and an IPv4-mapped address overflowed its column."""

import datetime as dt

import pytest

from closewait_trace.output import render, textsafe

TS = 1_800_000_000.0          # a fixed moment; lines are compared by column
COMM15 = "averylongcomm15"


def linger(**over):
    rec = {"type": "linger", "ts": TS, "family": "ipv4", "laddr": "255.255.255.255",
           "lport": 65535, "raddr": "255.255.255.255", "rport": 65535, "age_s": 723.0,
           "age_is_lower_bound": True, "owner_kind": "fd",
           "owners": [{"pid": 4194304, "comm": COMM15, "fd": 3, "state": "T", "cmdline": "x"}],
           "diagnosis": {"cause": "stopped", "summary": "stopped by a signal: " + "y" * 100}}
    rec.update(over)
    return rec


def start(**over):
    rec = {"type": "start", "ts": TS, "threshold_s": 1.0, "filters": {},
           "all_transitions": False, "headers": "/usr/src/linux-headers-6.18",
           "transport": "ring buffer"}
    rec.update(over)
    return rec


def rows(renderer, rec):
    return renderer.render(rec)


# ---------------------------------------------------------------- OWNER and widths

def test_full_comm_and_seven_digit_pid_fit_80_columns():
    r = render.TextRenderer()
    line, why = rows(r, linger())
    assert len(line) <= 80, line
    assert line.endswith(f"4194304/{COMM15}")
    assert len(why) <= 80 and why.endswith("\u2026")         # a cut shows an ellipsis
    header = r.header()
    assert line.index("4194304/") == header.index("OWNER")


def test_wide_never_narrows_owner_or_cuts_the_diagnosis():
    narrow, wide = render.TextRenderer(), render.TextRenderer(wide=True)
    for owners in ([{"pid": 4194304, "comm": COMM15, "fd": 3, "state": "T"}],
                   [{"pid": 4194304, "comm": COMM15, "fd": 3, "state": "T"},
                    {"pid": 4194305, "comm": "b", "fd": 3, "state": "T"}]):
        n = rows(narrow, linger(owners=owners))
        w = rows(wide, linger(owners=owners))
        n_owner = n[0][narrow.header().index("OWNER"):]
        w_owner = w[0][wide.header().index("OWNER"):]
        assert len(w_owner) >= len(n_owner) and COMM15 in w_owner
        assert w[1].endswith("y" * 100)                  # the whole diagnosis
    assert w_owner.endswith(" +1")


def test_more_holders_marked_and_cut_with_an_ellipsis_only_when_needed():
    r = render.TextRenderer()
    two = [{"pid": 4242, "comm": "srv", "fd": 3, "state": "S"},
           {"pid": 4243, "comm": "srv", "fd": 3, "state": "S"}]
    assert rows(r, linger(owners=two))[0].endswith("4242/srv +1")
    crowded = [dict(o, pid=4194304 + i, comm=COMM15) for i, o in enumerate(two)]
    line = rows(r, linger(owners=crowded))[0]
    assert len(line) <= 80 and line.endswith("\u2026 +1")


def test_long_ipv6_is_shortened_in_the_middle_and_keeps_its_port():
    r = render.TextRenderer()
    addr = "2001:db8:85a3:1234:5678:8a2e:370:7334"
    line = rows(r, linger(family="ipv6", laddr=addr, lport=443, raddr=addr, rport=50000))[0]
    assert len(line) <= 80
    local = line.split()[2]
    assert local.startswith("[2001") and local.endswith("7334]:443") and "\u2026" in local
    assert len(local) <= 15
    # Columns stay aligned whatever the addresses.
    assert line.index(line.split()[3]) == r.header().index("REMOTE")
    wide = rows(render.TextRenderer(wide=True), linger(laddr=addr, lport=443))[0]
    assert f"[{addr}]:443" in wide


def test_ipv4_mapped_prints_as_ipv4_with_a_marker():
    r = render.TextRenderer()
    line = rows(r, linger(family="ipv6", laddr="::ffff:127.0.0.1", lport=5601,
                          raddr="::ffff:10.1.2.3", rport=40000))[0]
    assert line.split()[2:4] == ["*127.0.0.1:5601", "*10.1.2.3:40000"]
    assert len(line) <= 80 and line.index("*10.1") == r.header().index("REMOTE")
    assert render.hostport("::ffff:1.2.3.4", 80) == "*1.2.3.4:80"
    assert render.hostport("::1", 80) == "[::1]:80"


def test_all_transitions_layout_keeps_alignment_and_80_columns():
    r = render.TextRenderer()
    header = rows(r, start(all_transitions=True))[-1]
    tr = {"type": "transition", "ts": TS, "family": "ipv4", "laddr": "255.255.255.255",
          "lport": 65535, "raddr": "10.0.0.1", "rport": 80, "oldstate": "SYN_SENT",
          "newstate": "ESTABLISHED", "prev_state_s": 0.001, "task": {"pid": 12345, "comm": COMM15}}
    line = rows(r, tr)[0]
    assert len(line) <= 80 and line.index("10.0.0.1") == header.index("REMOTE")
    assert line.endswith(f"12345/{COMM15}")


# ---------------------------------------------------------------- ages

def test_age_sources_in_text():
    r = render.TextRenderer()
    est = rows(r, linger(age_s=6.5, age_source="estimated", age_max_s=9.0,
                         age_is_lower_bound=False))[0]
    low = rows(r, linger(age_s=0.51, age_source="lower_bound", age_is_lower_bound=True))[0]
    traced = rows(r, linger(age_s=1.42, age_source="traced", age_is_lower_bound=False))[0]
    assert est.split()[4] == "~6.5s" and low.split()[4] == ">=510ms" and traced.split()[4] == "1.4s"
    # Old records carry no source: age_is_lower_bound says what they meant.
    old = linger(age_s=2.0, age_is_lower_bound=True)
    assert render.age_text(old) == ">=2.0s"
    assert render.age_text(linger(age_s=2.0, age_is_lower_bound=False)) == "2.0s"
    closed = dict(linger(), type="closed", duration_s=7.0, duration_source="estimated",
                  duration_max_s=9.0, duration_is_lower_bound=False, how="close",
                  closed_by={"pid": 1, "comm": "a"})
    assert rows(r, closed)[0].split()[4] == "~7.0s"


def test_summary_keeps_estimated_durations_apart():
    r = render.TextRenderer()
    rows(r, start())
    for i, source in enumerate(("estimated", "estimated", "traced", "lower_bound")):
        rows(r, dict(linger(rport=i), type="closed", duration_s=6.5 + i, duration_source=source,
                     duration_is_lower_bound=source == "lower_bound", how="close",
                     closed_by={"pid": 1, "comm": "a"}))
    summary = {"type": "summary", "ts": TS + 10, "traced_s": 10.0, "counters": {"cw_enter": 1},
               "histogram_us": [{"from_us": 4194304, "to_us": 8388608, "count": 1}],
               "linger_reported": 4, "closed_reported": 4,
               "still_lingering": [dict(linger(), age_s=6.5, age_source="estimated")]}
    text = "\n".join(rows(r, summary))
    assert "timed by the kernel" in text
    assert "Estimated, not timed" in text and "2 socket(s) closed" in text
    assert "Lower bounds only" in text and "1 socket(s)" in text
    assert "~6.5s" in text


def test_untimed_says_which_of_its_sockets_are_counted_again_below():
    """The sockets already in CLOSE_WAIT at the start that closed are
    both untimed exits (the kernel saw them leave, not enter) and the
    estimated or bounded durations below: the summary says how many of
    the first are the second, so that nobody adds the two."""
    r = render.TextRenderer()
    rows(r, start())
    for i, source in enumerate(("estimated", "estimated", "lower_bound")):
        rows(r, dict(linger(rport=i), type="closed", duration_s=6.5 + i, duration_source=source,
                     duration_is_lower_bound=source == "lower_bound", how="close",
                     closed_by={"pid": 1, "comm": "a"}))
    summary = {"type": "summary", "ts": TS + 10, "traced_s": 10.0,
               "counters": {"cw_enter": 0, "exit_untracked": 5},
               "histogram_us": [], "linger_reported": 3, "closed_reported": 3,
               "still_lingering": []}
    text = " ".join(" ".join(rows(r, summary)).split())
    assert ("Untimed: 5 sockets left CLOSE_WAIT that were in it before tracing began "
            "(or not tracked); 3 of them are counted again below") in text, text
    assert "Estimated, not timed: 2 socket(s) closed" in text
    # Without any listed below, the line says nothing more.
    plain = render.TextRenderer()
    rows(plain, start())
    text = " ".join(" ".join(rows(plain, summary)).split())
    assert "(or not tracked)." in text and "counted again" not in text


# ---------------------------------------------------------------- time

def test_clock_adds_a_date_line_when_the_day_changes():
    r = render.TextRenderer()
    day0 = dt.datetime(2026, 11, 28, 23, 59, 58).timestamp()
    rows(r, start(ts=day0))
    assert len(rows(r, linger(ts=day0 + 1))) == 2               # row + diagnosis
    later = rows(r, linger(ts=day0 + 5))
    assert later[0] == "2026-11-29 Sunday" and later[1].startswith("00:00:03 LINGER")
    assert not rows(r, linger(ts=day0 + 6))[0].startswith("2026")   # said once


@pytest.mark.parametrize("style,cell", [
    ("epoch", f"{TS + 1.5:.3f}"),
    ("elapsed", "1.500"),
    ("iso", dt.datetime.fromtimestamp(TS + 1.5).astimezone().isoformat(timespec="seconds")),
])
def test_time_formats(style, cell):
    r = render.TextRenderer(time_format=style)
    header = rows(r, start())[-1]
    line = rows(r, linger(ts=TS + 1.5))[0]
    assert line.split()[0] == cell
    assert line.index("LINGER") == header.index("EVENT")


# ---------------------------------------------------------------- banner, -v, replay

def test_verbose_says_kernel_headers_before_the_column_header():
    lines = rows(render.TextRenderer(verbose=True), start(compile_s=0.31))
    assert lines[0].startswith("Tracing")
    assert lines[-2].startswith("kernel headers: /usr/src/linux-headers-6.18; ring buffer")
    assert lines[-1].startswith("TIME")


def test_replay_banner_is_not_a_live_banner():
    source = render.ReplaySource(paths=["cw.jsonl"], filters="comm socat")
    r = render.TextRenderer(replay=source)
    header = {"type": "header", "capture_id": "vm-1-2", "hostname": "vm",
              "kernel_release": "6.18", "start_ts": TS}
    text = "\n".join(rows(r, header) + rows(r, start(filters={"lports": [5555]})))
    assert "Tracing" not in text and "Ctrl-C" not in text
    assert "Replay of cw.jsonl" in text and "vm" in text and "vm-1-2" in text
    assert "Shown: only comm socat" in text and "local port 5555" in text
    for rec in (linger(), linger(rport=1)):
        source.saw(rec)
        rows(r, rec)
    source.saw(linger(rport=2))                 # read, filtered out
    end = "\n".join(r.replay_end())
    assert "counts what was shown" in end and "comm socat" in end
    assert "shown: 2 LINGER" in end and "in the recording: 3 linger" in end
    assert "no summary" in end


def test_replay_shows_odd_values_as_unknown_and_counts_what_it_cannot_show():
    source = render.ReplaySource(paths=["x"])
    r = render.TextRenderer(replay=source)
    line = rows(r, linger(owners="not a list", ts="soon", age_s=float("nan"),
                          age_is_lower_bound=False))[0]
    assert line.split()[:2] == ["?", "LINGER"] and line.split()[4] == "?"
    assert rows(r, {"type": "closed", "how": ["unhashable"], "duration_s": None}) == []
    assert source.unshowable == 1
    assert "1 record(s) could not be shown" in "\n".join(r.replay_end())


# ---------------------------------------------------------------- sanitizer

def test_escape_covers_c0_c1_del_bidi_and_invalid_utf8():
    assert textsafe.escape("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert textsafe.escape("\n\r\t\x00\x7f\x9b") == "\\n\\r\\t\\x00\\x7f\\u009b"
    assert textsafe.escape("\u202eabc\u2066") == "\\u202eabc\\u2066"
    assert textsafe.escape(b"ok\xff\xfe") == "ok\\xff\\xfe"
    assert textsafe.escape("x\ufffd") == "x\\ufffd"
    assert textsafe.escape("back\\slash") == "back\\\\slash"
    assert textsafe.escape("caf\u00e9 \u65e5\u672c") == "caf\u00e9 \u65e5\u672c"   # printable stays


def test_a_byte_that_is_not_utf8_and_a_character_never_look_the_same():
    # A process name is bytes: 0x9b alone is not UTF-8 (surrogateescape keeps
    # it), c2 9b is the character U+009B. Both were shown as \x9b.
    for byte in (0x85, 0x9b, 0xa0, 0xad, 0xff):
        raw = bytes([0x61, byte]).decode("utf-8", "surrogateescape")
        char = "a" + chr(byte)
        assert textsafe.escape(raw) != textsafe.escape(char), hex(byte)
        assert textsafe.escape(bytes([0x61, byte])) == textsafe.escape(raw)
    assert textsafe.escape(b"a\x9b") == "a\\x9b" and textsafe.escape("a\x9b") == "a\\u009b"
    assert textsafe.safe_line("a\x9b") == "a\\u009b"


def test_cut_never_splits_an_escape_and_counts_columns():
    s = "ab\x1b[31mcd"
    for n in range(0, 14):
        cut = textsafe.fit(s, n)
        assert textsafe.width_of_escaped(cut) <= n
        body = cut.rstrip("\u2026")
        assert body.count("\\") == 0 or "\\x1b" in body     # whole escape or none
    assert textsafe.width("\u65e5\u672c") == 4
    assert textsafe.fit("\u65e5\u672c\u8a9e", 5) == "\u65e5\u672c\u2026"
    mid = textsafe.fit_middle("2001:db8::1\x1b", 9)
    assert textsafe.width_of_escaped(mid) <= 9 and "\u2026" in mid


def test_safe_line_is_the_last_defence():
    assert textsafe.safe_line("ok line") == "ok line"
    assert textsafe.safe_line("a\x1bb\u2028c") == "a\\x1bb\\u2028c"


def test_safe_line_escapes_each_ascii_character_alike_in_short_and_long_lines():
    """Long ASCII lines are checked as bytes, short ones with isprintable:
    every ASCII character, anywhere in a line of either length, is left or
    escaped the same way."""
    for code in range(128):
        ch = chr(code)
        short = textsafe.safe_line("a" + ch + "b")
        expected = "a" + textsafe._escape_char(ch) + "b" if not ch.isprintable() else "a" + ch + "b"
        assert short == expected, code
        for at in (0, textsafe._LONG_LINE // 2, textsafe._LONG_LINE * 4 - 1):
            line = "x" * at + ch + "y" * (textsafe._LONG_LINE * 4 - at)
            assert textsafe.safe_line(line) == \
                "x" * at + expected[1:-1] + "y" * (textsafe._LONG_LINE * 4 - at), (code, at)
        edge = "z" * (textsafe._LONG_LINE - 1) + ch
        assert textsafe.safe_line(edge) == "z" * (textsafe._LONG_LINE - 1) + expected[1:-1]


def test_json_dumps_writes_null_for_non_finite():
    assert textsafe.json_dumps({"a": float("nan"), "b": [float("inf"), 1.5]}) == \
        '{"a": null, "b": [null, 1.5]}'
    assert textsafe.json_dumps({"a": 1}) == '{"a": 1}'


def test_addresses_are_escaped_once_and_cut_on_whole_escapes():
    for n in range(10, 30):
        text = render.hostport("a\\b\x1b" + "c" * 30, 1, n)
        assert text.endswith(":1") and textsafe.width_of_escaped(text) <= n
        assert "\\\\\\\\" not in text                       # never escaped twice
        assert not text.replace("\\\\", "").replace("\\x1b", "").count("\\")   # no half escape


def test_cli_replay_banner_gives_the_capture_span_and_filters(tmp_path):
    import json
    import subprocess
    import sys
    from closewait_trace.files import recording
    start_ts = dt.datetime(2026, 11, 28, 23, 59, 0).timestamp()
    from tests.unit import recordfactory as rf
    header = recording.header(0, "vm-1-2", 0, 10**9, rf.NO_FILTERS, "closewait")
    header.update(start_ts=start_ts, hostname="vm", kernel_release="6.18")
    recs = [header, rf.start(ts=start_ts),
            rf.linger(ts=start_ts + 30, lport=5555, rport=1,
                      owners=[rf.holder(pid=4194304, comm=COMM15, state="T")]),
            rf.linger(ts=start_ts + 90, lport=5555, rport=2,
                      owners=[rf.holder(pid=7, comm="other", state="S")])]
    path = tmp_path / "days.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = subprocess.run([sys.executable, "-m", "closewait_trace", "-r", str(path), "--comm",
                          COMM15], capture_output=True, text=True, timeout=60).stdout
    lines = out.splitlines()
    # The banner, wrapped to 80 columns (a temporary path is long).
    banner = " ".join(l.strip() for l in lines[:lines.index(f"Shown: only comm {COMM15}")])
    assert all(len(l) <= 80 for l in lines if not l.strip().startswith("/"))
    assert (banner.startswith(f"Replay of {path} (a recording, not a live trace) Captured on vm")
            or banner.startswith(f"Replay of a recording (not a live trace): {path} Captured "
                                 f"on vm")), banner
    assert "from 2026-11-28 23:59:00 to 2026-11-29 00:00:30" in banner
    assert not any("Tracing" in l or "Ctrl-C" in l for l in lines)
    # Only the first LINGER matches the filter; the day changes after it.
    assert sum(1 for l in lines if " LINGER " in l) == 1
    assert "shown: 1 LINGER" in out and "in the recording: 2 linger" in out


def test_verbose_explains_an_estimated_age():
    r = render.TextRenderer(verbose=True)
    text = "\n".join(r.render(linger(age_s=6.5, age_source="estimated", age_max_s=9.0,
                                      age_is_lower_bound=False)))
    assert "age estimated: 6.5s since the last ACK received, at most 9.0s" in text
    assert "age estimated" not in "\n".join(r.render(linger(age_source="traced")))


from hypothesis import given, settings, strategies as st  # noqa: E402

_ANY_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10ffff,
                                           blacklist_categories=()), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_ANY_TEXT, st.integers(min_value=0, max_value=50))
def test_any_text_is_safe_and_cut_on_whole_escapes(text, columns):
    shown = textsafe.escape(text)
    assert textsafe.safe_line(shown) == shown            # nothing left for the last pass
    for cut in (textsafe.fit(text, columns), textsafe.fit_middle(text, columns)):
        assert textsafe.width_of_escaped(cut) <= columns
        assert textsafe.safe_line(cut) == cut
        # Every backslash left starts a whole escape of the sanitized text.
        pieces = [p for p, _ in textsafe.pieces(cut)]
        assert "".join(pieces) == cut
        assert all(p in shown for p in pieces if p.startswith("\\"))
        assert all(len(p) in (2, 4, 6, 10) for p in pieces if p.startswith("\\"))
