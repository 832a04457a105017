"""`closewait-trace snapshot` run as a command starts its gathering worker
before the CLI imports click and the renderer (cli._snapshot_worker_first),
so that the worker's interpreter start-up is not on the way to the first
socket read; anything else (a test importing the CLI, --help, another
command) starts none that way."""

import os
import subprocess
import sys

from closewait_trace import cli
from closewait_trace.live import early

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


def _import_order(args):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "closewait_trace"] + args,
                          capture_output=True, text=True, env=env, timeout=60)
    names = [line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:") and "|" in line]
    return done, names


def test_snapshot_worker_is_started_before_click():
    # A port nothing listens on: an empty snapshot, through the real worker.
    done, names = _import_order(["snapshot", "-p", "1"])
    assert done.returncode == 0, done.stderr[-500:]
    assert "0 sockets in CLOSE_WAIT" in done.stdout
    assert names.index("closewait_trace.live.early") < names.index("click")


def test_help_and_other_commands_start_no_early_worker():
    done, names = _import_order(["snapshot", "--help"])
    assert done.returncode == 0
    assert "closewait_trace.live.early" not in names
    done, names = _import_order(["report", "--help"])
    assert "closewait_trace.live.early" not in names


def test_imported_by_a_test_it_starts_nothing(monkeypatch):
    started = []
    monkeypatch.setattr(early, "start_worker", lambda: started.append(1))
    monkeypatch.setattr(sys, "argv", ["pytest", "snapshot"])
    cli._snapshot_worker_first()
    monkeypatch.setattr(sys, "argv", ["/usr/bin/closewait-trace", "snapshot", "-p", "80"])
    cli._snapshot_worker_first()
    assert started == [1]
    assert early.take_worker() is None
