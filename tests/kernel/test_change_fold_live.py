"""A real holder of many sockets stopped and continued: the text shows a
few CHANGE rows and one line counting the rest (output/changefold.py),
while the recording keeps a record per socket, and its replay shows what
the live trace showed. Counted against ss."""

import json
import os
import re
import signal
import subprocess
import threading

import pytest

from tests.kernel.harness import (TRACER, connect_and_close, free_port, ss_close_wait,
                                  start_holding_server, state_of, stretch, tracer_process,
                                  wait_until)
from closewait_trace.output.changefold import CHANGE_ROWS_SHOWN

pytestmark = pytest.mark.kernel

SOCKETS = 40


def is_row(line: str, event: str) -> bool:
    return f" {event} " in line and not line.startswith(" ")


def test_a_stopped_holders_changes_are_folded_in_text_and_each_recorded(tmp_path, procs):
    port = free_port()
    path = tmp_path / "run.jsonl"
    server = start_holding_server(port)
    procs.append(server)
    lines: list[str] = []
    with tracer_process(["-p", str(port), "-t", "300ms", "-w", str(path)], text=True) as proc:
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        wait_until(lambda: lines, what="the banner")
        connect_and_close(port, SOCKETS)
        wait_until(lambda: sum(is_row(l, "LINGER") for l in lines) == SOCKETS,
                   timeout=stretch(20), what=f"{SOCKETS} LINGER rows")
        # What ss sees is what the tracer listed: every socket, its holder.
        assert len(ss_close_wait(port)) == SOCKETS
        assert {pids for _l, _r, pids in ss_close_wait(port)} == {(server.pid,)}

        os.kill(server.pid, signal.SIGSTOP)
        wait_until(lambda: state_of(server.pid) == "T", what="stopped")
        folded = re.compile(rf"^ {{9}}\+{SOCKETS - CHANGE_ROWS_SHOWN} more alike: "
                            rf"\[T\] stopped, {server.pid}/\S+$")
        wait_until(lambda: any(folded.match(l.rstrip("\n")) for l in lines),
                   timeout=stretch(20), what="the folded CHANGE line")
        os.kill(server.pid, signal.SIGCONT)
        wait_until(lambda: sum("more alike" in l for l in lines) == 2,
                   timeout=stretch(20), what="the second folded line (continued)")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=stretch(15))
    assert proc.returncode == 0
    live = "".join(lines)
    # Two state changes, a few rows each, where each was a row per socket.
    assert sum(is_row(l, "CHANGE") for l in lines) == 2 * CHANGE_ROWS_SHOWN
    assert len(ss_close_wait(port)) == SOCKETS
    # The recording has every socket's CHANGE, twice: stopped, then not.
    recs = [json.loads(l) for l in path.read_text().splitlines()]
    changes = [r for r in recs if r["type"] == "linger" and r["update"]]
    assert len(changes) == 2 * SOCKETS
    assert [r["diagnosis"]["cause"] for r in changes[:SOCKETS]] == ["stopped"] * SOCKETS
    assert len({(r["raddr"], r["rport"]) for r in changes[:SOCKETS]}) == SOCKETS
    summary = [r for r in recs if r["type"] == "summary"][0]
    assert summary["changes_reported"] == 2 * SOCKETS
    # The replay folds the same records into the same lines.
    replayed = subprocess.run(TRACER + ["-r", str(path)], capture_output=True, text=True,
                              timeout=stretch(60))
    assert replayed.returncode == 0, replayed.stderr

    def table(text: str) -> list[str]:
        return [l for l in text.splitlines()
                if is_row(l, "CHANGE") or is_row(l, "LINGER") or "more alike: " in l]
    assert table(replayed.stdout) == table(live)
    assert f"shown: {SOCKETS} LINGER, {2 * SOCKETS} CHANGE" in replayed.stdout
