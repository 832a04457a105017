"""Every line of text output fits an 80-column terminal (bcc's tool
checklist), whatever the records hold: long command lines and paths, long
diagnoses, estimated ages, long host names, wide characters. Checked as a
class, on the real renderers: the live/replay text with -v, the replay's
end, the report, and the snapshot's footer. (--wide keeps rows whole on
purpose and is not checked.)"""

import json

from closewait_trace.files import parts
from closewait_trace.live import snapshot
from closewait_trace.output import render, report
from closewait_trace.output.textsafe import width_of_escaped
from tests.unit import recordfactory as rf

LONG_PATH = "/srv/" + "deeply/nested/" * 12 + "app.py"
LONG_DIAGNOSIS = ("alive (epoll_wait) but never closes: 4312/gunicorn fd 57, EOF read; holders "
                  "may be missing: permission denied reading 3 other processes (1/systemd, "
                  "77/containerd-shim, 903/\u6f22\u5b57\u6f22\u5b57\u6f22\u5b57)")


def records() -> list[dict]:
    owner = rf.holder(pid=4312, comm="gunicorn: work", fd=57,
                      cmdline="/usr/bin/python3.11 " + LONG_PATH + " --workers 64 " * 4)
    frame = {"pc": "0x7f00", "function": "handle_client_connection_with_a_long_name",
             "offset": 18, "module": "/opt/vendor/lib/" + "x" * 80 + "/libapp.so",
             "build_id": "ab" * 20, "method": "cfi", "symbols": "symtab"}
    thread = {"tid": 4312, "state": "S", "wchan": "do_epoll_wait", "syscall": "epoll_wait",
              "syscall_fd": 7, "syscall_fd_target": "anon_inode:[eventpoll]" + "y" * 60,
              "stack": [frame] * 3,
              "python": [{"function": "Worker.handle_request_" + "z" * 50, "file": LONG_PATH,
                          "line": 120}]}
    process = rf.process(pid=4312, comm="gunicorn: work", cmdline=owner["cmdline"],
                         threads=[thread], threads_total=65,
                         identity={"user": "www-data", "unit": "gunicorn-" + "u" * 70
                                   + ".service", "netns": 4026531840})
    capture = {"ts": 1000.5, "after_s": 0.002, "pid": 4312, "tid": 4312,
               "comm": "gunicorn: work", "place": frame, "stack": [frame] * 4,
               "stack_bytes": 4096, "unwound": True,
               "python": thread["python"], "python_not_read": "x " * 60}
    code = {"eof_read": capture, "eof_read_unknown": None, "opened": dict(capture),
            "opened_unknown": None}
    return [
        rf.header(hostname="build-host-" + "h" * 70, kernel_release="6.18.44-" + "k" * 60,
                  format_version=3),
        rf.start(headers="generic: /var/cache/closewait-trace/kernel-headers/" + "v" * 90,
                 schema=3),
        process,
        rf.linger(owners=[owner], cause="ignoring_eof", summary=LONG_DIAGNOSIS,
                  age_source="estimated", age_s=2.0, age_max_s=20.5, pre_existing=True,
                  code=code),
        rf.linger(ts=1002.0, rport=40001, owners=[owner], cause="ignoring_eof",
                  summary=LONG_DIAGNOSIS, update=True, age_source="range", age_s=2.0,
                  age_max_s=24.6, code=code),
        rf.closed(),
        rf.summary(still_lingering=[{
            "family": "ipv4", "laddr": "127.0.0.1", "lport": 80, "raddr": "10.0.0.1",
            "rport": 40000, "age_s": 9.0, "age_source": "traced", "age_max_s": None,
            "age_is_lower_bound": False, "owner_kind": "fd",
            "owners": [{k: owner[k] for k in ("pid", "comm", "fd", "state")}],
            "diagnosis": {"cause": "ignoring_eof", "summary": LONG_DIAGNOSIS}}]),
    ]


def too_wide(lines: list[str]) -> list[str]:
    return [l for l in lines if width_of_escaped(l) > 80]


def test_replay_and_live_text_with_v_fits_80_columns(tmp_path):
    path = tmp_path / "cw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    loaded = parts.read([str(path)])
    assert loaded.skipped == 0, "the test's records must all be valid ones"
    for verbose in (False, True):
        renderer = render.TextRenderer(verbose=verbose,
                                       replay=render.ReplaySource(paths=[str(path)]))
        lines = []
        for rec in loaded.records:
            renderer.replay.saw(rec)
            lines += renderer.render(rec)
        lines += renderer.replay_end()
        shown = "\n".join(lines)
        assert "handle_client_connection" in shown and "never closes" in shown
        assert not too_wide(lines), too_wide(lines)


def test_report_text_fits_80_columns(tmp_path):
    path = tmp_path / "cw.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    rep = report.build(parts.read([str(path)]))
    lines = report.render_text(rep, top=5)
    assert any("Still lingering" in l for l in lines)
    assert not too_wide(lines), too_wide(lines)


def test_snapshot_footer_fits_80_columns():
    owner = rf.holder(pid=10, comm="server-long-nam")
    lingers = [rf.linger(owners=[], owner_kind="accept_queue", rport=40000 + i,
                         listener={"local": "0.0.0.0:5555", "accept_queue": 1, "backlog": 128,
                                   "owners": [owner]}, cause="never_accepted",
                         summary="x") for i in range(3)]
    lines = snapshot.footer_lines(lingers)
    assert len(lines) > 2 and not too_wide(lines), lines
