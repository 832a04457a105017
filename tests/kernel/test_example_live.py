"""scripts/make-example.sh on the real kernel: it still runs, and what the
examples file's commentary says of the output still holds (the stopped socat
children diagnosed as stopped, the C server's EOF read named by function and
line, top's rows, report's code table, the replay's banner), so that a change
of the tool that makes the commentary false fails here, not in a reader's
hands. The output goes to a temporary file, never into the tree."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.harness import stretch
from tests.repo.test_docs import TEMPLATE

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]


def test_make_example_runs_and_its_commentary_holds(tmp_path):
    out = tmp_path / "example.txt"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "make-example.sh"), str(out)],
                         capture_output=True, text=True, timeout=stretch(180),
                         env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode == 0, res.stdout + res.stderr
    text = out.read_text()
    # The commentary, whole and in order, with every placeholder filled.
    pos = 0
    for piece in re.split(r"^@@\w+@@$", TEMPLATE.read_text(), flags=re.M):
        at = text.find(piece.strip("\n"), pos)
        assert at >= 0, piece[:200]
        pos = at + len(piece.strip("\n"))
    assert "@@" not in text

    def block(command: str) -> str:
        """The output under `# closewait-trace COMMAND...`, up to the next blank-and-prose."""
        m = re.search(rf"^    # closewait-trace {re.escape(command)}.*\n((?:    .*\n|\n)*)",
                      text, re.M)
        assert m, command
        return m.group(1)

    live = block("-p ")
    assert len(re.findall(r" LINGER .*/socat\n\s+\[T\] stopped by a signal", live)) == 5, live
    assert len(re.findall(r" LINGER .*/eof_server\n\s+\[S\] read EOF in handle_client "
                          r"\(eof_server\.c:\d+\) and never closed", live)) == 2, live
    assert len(re.findall(r" CLOSED .*/socat", live)) == 5, live
    assert "Still lingering at exit: 2" in live
    snapshot = block("snapshot -p")
    assert "7 sockets in CLOSE_WAIT" in snapshot and "By holder process:" in snapshot
    # The five socat forks of one listener: one footer line, one top row
    # (the commentary says so).
    footer = snapshot[snapshot.index("By holder process:"):]
    assert re.search(r"^\s+socat \[/usr/bin/socat\] \(5 processes\): 5 sockets, oldest ~",
                     footer, re.M) and "/socat [T]" not in footer, footer
    assert re.search(r"alive \(accept\) but never closes: \d+/eof_server fd \d+, EOF read",
                     snapshot), snapshot
    verbose = block("snapshot -v")
    assert "age estimated:" in verbose and re.search(r"thread \d+ \[S\] accept", verbose)
    top = block("top ")
    # NEW/MIN 0: the sockets were there before top started, not new ones.
    assert re.search(r"^\s+2\s+\S+\s+0\s+0 \d+/eof_server \[ignoring_eof\]$", top, re.M), top
    # Its cause whole (it was cut: "[stop…"), the executable's directory cut
    # to fit 80 columns if need be.
    assert re.search(r"^\s+5\s+\S+\s+0\s+0 socat \[\S*/socat\] \(5 processes\) \[stopped\]$",
                     top, re.M) and not re.search(r"^\s+1\s.* \d+/socat \[", top, re.M), top
    report = block("report incident.jsonl")
    assert "By program" in report and "socat [/usr/bin/socat] (5 processes)" in report
    assert re.search(r"handle_client \(eof_server\.c:\d+\)", block("report --by code,cause"))
    assert "Replay of incident.jsonl (a recording, not a live trace)" in block("-r ")
