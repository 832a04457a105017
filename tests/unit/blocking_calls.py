"""The gathering worker's calls (evidence/gathering.py), except that a read
of a process listed in BLOCKED_PIDS never returns, as a read of a page a
FUSE server never serves would not (tests/bounds/test_gather_worker.py)."""

import os
import time

from closewait_trace.evidence import gathering

BLOCKED_PIDS_ENV = "CLOSEWAIT_TEST_BLOCKED_PIDS"
# Seconds the worker's import of this module takes: a worker starting on a
# loaded or emulated machine.
SLOW_IMPORT_ENV = "CLOSEWAIT_TEST_SLOW_IMPORT_S"
time.sleep(float(os.environ.get(SLOW_IMPORT_ENV) or 0))


# As the real calls' module: what a worker imports before "ready".
PRELOAD = gathering.PRELOAD


def imported(module: str) -> bool:
    """Whether the worker has imported module."""
    import sys
    return module in sys.modules


def collecting() -> bool:
    """Whether the worker's cyclic collector is on."""
    import gc
    return gc.isenabled()


def collecting_each(n: int):
    """Whether the worker's cyclic collector is on, at each of n items of a
    streamed answer."""
    for _ in range(n):
        yield collecting()


# As the real calls' module, and two calls of this one paused like its
# owner lookups.
WITHOUT_COLLECTOR = gathering.WITHOUT_COLLECTOR | {"collecting_paused", "collecting_each"}


def _blocked(pid) -> bool:
    return str(pid) in os.environ.get(BLOCKED_PIDS_ENV, "").split(",")


def _block() -> None:
    while True:
        time.sleep(3600)


def holder_states(pids, proc):
    if any(_blocked(p) for p in pids):
        _block()
    return gathering.holder_states(pids, proc)


def process_evidence(holders, *args):
    for item in gathering.process_evidence(holders, *args):
        if item[0] == "process" and _blocked(item[1].pid):
            _block()
        yield item


def reading_for(seconds: float) -> str:
    """Work that takes long but completes a read every 50 ms (a large batch)."""
    from closewait_trace.sockets import procfs
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        procfs.note_progress()
        time.sleep(0.05)
    return "done"


def silent_for(seconds: float) -> str:
    """One read that takes that long (a blocked read, then an answer)."""
    time.sleep(seconds)
    return "done"


def bulk(n: int, seed: int) -> bytes:
    """n bytes the caller can make again (random.Random(seed).randbytes)."""
    import random
    return random.Random(seed).randbytes(n)


def stray_frame(which: str, marker: str = "") -> str:
    """A frame that is not what the worker sends, on its stdout before this
    call's own answer: bytes that are not a pickle ("garbled"), a pickle of
    another shape ("shape": 5; "kind": a kind no frame has), or one that
    calls a function no answer names, were it unpickled: os.mkdir(marker)
    ("global"), or this package's own file creation at marker ("package").
    What the tracer would read if a frame's bounds slipped into text
    another user chose."""
    import pickle
    import struct

    from closewait_trace.files import recording

    class Calls:
        def __init__(self, function, *args):
            self.call = function, args

        def __reduce__(self):
            return self.call

    body = {"garbled": b"\x80\x05not a pickle at all",
            "shape": pickle.dumps(5),
            "kind": pickle.dumps(("weird", None)),
            "global": pickle.dumps(("done", Calls(os.mkdir, marker))),
            "package": pickle.dumps(("done", Calls(recording._create_private, marker,
                                                   False)))}[which]
    os.write(1, struct.pack("!I", len(body)) + body)
    return "this call's own answer"


CALLS = dict(gathering.CALLS, holder_states=holder_states, process_evidence=process_evidence,
             reading_for=reading_for, silent_for=silent_for, imported=imported,
             collecting=collecting, collecting_paused=collecting,
             collecting_each=collecting_each, bulk=bulk, stray_frame=stray_frame)

