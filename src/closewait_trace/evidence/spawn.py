"""Starting the gathering worker's process (evidence/worker.py), light
enough to import first thing: the standard library only.

`snapshot` is one short process whose answer waits on its worker's start
(an interpreter and its imports, about 70 ms). Started by the command's
entry point (entry.py) before the command line's own imports (click, the
renderers, about 90 ms more), it is ready when the first call comes,
instead of 60-70 ms after it; GatherWorker takes it (take_early) rather
than starting another."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from typing import Optional

# The functions a worker serves (worker.CALLS of this module).
DEFAULT_CALLS = "closewait_trace.evidence.gathering"
# How `snapshot` has its worker: without the imports only the live
# tracer's calls use, and without the cyclic collector (two calls, then it
# is ended).
SNAPSHOT_WORKER = {"preload": False, "collect": False}

# What the worker's reads need of the tracer's capabilities: other users'
# memory and fd tables, other namespaces (sock_diag through setns).
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_SYS_PTRACE, _CAP_SYS_ADMIN = 1, 2, 19, 21
WORKER_CAPS = (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_SYS_PTRACE, _CAP_SYS_ADMIN)
_PR_GET_SECUREBITS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 27, 47, 2
_SECBIT_NOROOT = 1
_CAP_V3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def pass_capabilities_on() -> None:
    """Under SECBIT_NOROOT (the unit's SecureBits=noroot-locked), uid 0
    gains nothing at exec: the worker would start without the capabilities
    the tracer holds, and read less than the tracer could (other users'
    fd tables and memory: "permission denied"). So the ones it needs that
    the tracer has are made ambient, which exec keeps. Nothing to do
    without NOROOT (root's exec gains the bounding set) or when the
    capabilities are ambient already (systemd's AmbientCapabilities=)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if not libc.prctl(_PR_GET_SECUREBITS, 0, 0, 0, 0) & _SECBIT_NOROOT:
            return
        header = _CapHeader(_CAP_V3, 0)
        data = (_CapData * 2)()
        if libc.capget(ctypes.byref(header), data) != 0:
            return
        wanted = [c for c in WORKER_CAPS if data[c // 32].permitted >> (c % 32) & 1]
        for c in wanted:                # ambient needs permitted and inheritable
            data[c // 32].inheritable |= 1 << (c % 32)
        if libc.capset(ctypes.byref(header), data) != 0:
            return
        for c in wanted:
            libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, c, 0, 0)
    except (OSError, AttributeError):
        return


def start_process(calls_module: str, preload: bool, collect: bool) -> subprocess.Popen:
    """A new worker process (worker.serve), its stdin and stdout piped to us."""
    pass_capabilities_on()
    env = dict(os.environ)
    # The child finds this very package, whether installed or a checkout.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    # Absolute: the worker runs in "/" (below), not where these were meant.
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + [os.path.abspath(p)
                          for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from closewait_trace.evidence import worker; "
         "worker.serve(int(sys.argv[1]), sys.argv[2], sys.argv[3] == '1', "
         "sys.argv[4] == '1')",
         str(os.getpid()), calls_module, "1" if preload else "0", "1" if collect else "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        # Not the tracer's stderr: an abandoned worker blocked in the
        # kernel would hold it open after the tracer exits, and whoever
        # reads the tracer's stderr to its end (a pipe, a test harness)
        # would wait as long as the worker is blocked.
        stderr=None if os.environ.get("CLOSEWAIT_TRACE_DEBUG") else subprocess.DEVNULL,
        env=env, close_fds=True,
        # `python -c` puts the working directory first on sys.path: run
        # from a directory another user can write to (/tmp, their home),
        # their closewait_trace/ or pickle.py would be what this root
        # process imports. "/" is root's.
        cwd="/",
        start_new_session=True)      # Ctrl-C at a terminal is not for it


# The worker started ahead (prestart): (its arguments, the process), taken
# once by the first GatherWorker that wants the same.
_early: Optional[tuple] = None


def prestart(calls_module: str, preload: bool, collect: bool) -> None:
    """Start a worker now, for the GatherWorker this process makes next.
    One not taken (the command line was wrong, or only --help) reads the
    end of its stdin when this process exits, and ends."""
    global _early
    if _early is None:
        _early = ((calls_module, preload, collect),
                  start_process(calls_module, preload, collect))


def take_early(calls_module: str, preload: bool, collect: bool) -> Optional[subprocess.Popen]:
    """The worker prestart started, if it was for these arguments and is
    still running; at most once."""
    global _early
    if _early is None or _early[0] != (calls_module, preload, collect):
        return None
    proc, _early = _early[1], None
    if proc.poll() is not None:
        return None
    return proc
