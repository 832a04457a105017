"""The live session's start-up order (live/session.py). bcc's compile,
which runs in a thread while the session starts (KernelProbe.
load_in_background), chdir()s the whole process into the kernel header
tree until it ends: a relative `-w` path opened meanwhile went into the
header cache (seen: a recording written there, and "FILE exists" said of a
file the user never made). So every path relative to the user's directory
is opened before the compile starts, unless the compile's thread has a
working directory of its own (KernelProbe.load_in_background(own_cwd_only=
True)): then the compile starts first and the rest overlaps it. Here the
compile is a stand-in that moves the process elsewhere, as bcc does, and
stops the start-up there."""

import os

import pytest

from closewait_trace.evidence import worker
from closewait_trace.files import recording as recording_files
from closewait_trace.kernel import kernel_headers, probe
from closewait_trace.live import session
from closewait_trace.output import render
from closewait_trace.output.terminal import TerminalSink
from closewait_trace.sockets import capabilities
from closewait_trace.sockets.filters import SocketFilter


class CompileStarted(Exception):
    pass


class Headers:
    def describe(self):
        return "stand-in headers"


def start_until_the_compile(monkeypatch, compile_in_background) -> None:
    """The live session's start-up, recording to cw.jsonl in the current
    directory, with everything but its order stood in for, until the stand-in
    compile raises CompileStarted."""
    # Root, to the session; the directory recorded into is the test's, so
    # its owner (this user, nobody when the unit tests run as nobody) is
    # one the recording trusts, as it would be for a root that owns it.
    trusted = recording_files.trusted_owners()
    monkeypatch.setattr(recording_files, "trusted_owners", lambda: trusted)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(capabilities, "cannot_trace", lambda caps: None)
    monkeypatch.setattr(capabilities, "warning", lambda caps: None)
    monkeypatch.setattr(kernel_headers, "choose_headers", lambda: Headers())
    monkeypatch.setattr(kernel_headers, "apply", lambda choice: None)
    monkeypatch.setattr(probe, "bcc_missing", lambda: None)
    monkeypatch.setattr(probe.KernelProbe, "load_in_background", compile_in_background)
    monkeypatch.setattr(probe.KernelProbe, "close", lambda self: None)
    monkeypatch.setattr(worker.GatherWorker, "start", lambda self: None)
    monkeypatch.setattr(worker.GatherWorker, "close", lambda self: None)
    out = TerminalSink(False, render.TextRenderer(), quiet=True)
    recording = dict(path="cw.jsonl", force=False, compress=False, max_bytes=None,
                     max_files=None, max_seconds=None, snapshot_s=60.0)
    with pytest.raises(CompileStarted):
        session.run(1_000_000_000, SocketFilter(), False, 500_000_000, 1000, False, out,
                    recording_options=recording)


def test_the_recording_is_opened_before_the_compile_moves_the_process(tmp_path, monkeypatch):
    user_dir = tmp_path / "here"
    header_tree = tmp_path / "headers"
    user_dir.mkdir()
    header_tree.mkdir()
    monkeypatch.chdir(user_dir)
    seen = {}

    def compile_in_background(self, own_cwd_only=False):
        if own_cwd_only:
            return False        # a thread that cannot have a directory of its own
        seen["recording in the user's directory"] = sorted(os.listdir(user_dir))
        os.chdir(header_tree)               # what bcc's compile does to the process
        raise CompileStarted

    start_until_the_compile(monkeypatch, compile_in_background)
    assert seen["recording in the user's directory"] == ["cw.jsonl"], seen
    assert os.listdir(header_tree) == []


def test_with_a_directory_of_its_own_the_compile_starts_before_the_rest(tmp_path, monkeypatch):
    """The compile's thread took a working directory of its own: the compile
    starts right after the worker, before the tracer's imports and the
    recording (about 30 ms of the start-up overlap it), and the recording
    is still made in the user's directory."""
    user_dir = tmp_path / "here"
    user_dir.mkdir()
    monkeypatch.chdir(user_dir)
    calls = []

    def compile_in_background(self, own_cwd_only=False):
        calls.append((own_cwd_only, sorted(os.listdir(user_dir))))
        if not own_cwd_only:
            raise CompileStarted        # stop the start-up at its second call
        return True                     # under way, in a thread of its own

    start_until_the_compile(monkeypatch, compile_in_background)
    assert calls[0] == (True, []), calls          # started before the recording was made
    assert calls[1] == (False, ["cw.jsonl"]), calls
