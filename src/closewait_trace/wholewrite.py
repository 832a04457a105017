"""Writing a whole buffer to a file descriptor, whatever partial counts the
kernel returns: for writes to pipes that another process may read slowly.

write(2) on a pipe may write only part of a buffer larger than PIPE_BUF
(4 KB) and return how much: when it is interrupted while it waits for room,
by a signal whose handler runs (the tracer's own for SIGINT, SIGTERM,
SIGHUP) or by the process being stopped and continued (SIGSTOP, a
debugger or py-spy attaching). A buffered stream takes that up. But with
PYTHONUNBUFFERED=1 (python -u; set in many container images, and where
this project is developed) sys.stdout writes straight to the descriptor:
its .buffer is then the raw file, whose write() returns the partial count
to a caller that ignores it, and sys.stdout.write() drops the rest. Measured
here: 60 lines of 0.1-0.6 MB written by a child stopped and continued
every other read, its reader behind: cut at the 7th line through
sys.stdout or sys.stdout.buffer under PYTHONUNBUFFERED=1, whole through a
buffered stream or this loop. The worker's answers went that way (the
tracer then died unpickling one: "internal error"), and so did the
terminal's lines."""

from __future__ import annotations

import errno
import os
import select


def write_all(fd: int, data) -> None:
    """Writes all of data (bytes-like) to fd; on a descriptor left
    non-blocking, waits until it can take more rather than drop the rest.
    Raises OSError (BrokenPipeError when the reader is gone) as os.write
    does, and EIO for a write that took nothing (a file system that says
    so would otherwise be asked again forever)."""
    with memoryview(data) as view:
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                # poll, not select: any descriptor number.
                waiting = select.poll()
                waiting.register(fd, select.POLLOUT)
                waiting.poll()
                continue
            if n == 0:
                raise OSError(errno.EIO, "write(2) took nothing")
            view = view[n:]


def is_unbuffered(stream) -> bool:
    """Whether a text stream writes straight to its descriptor (its buffer
    is the raw file: PYTHONUNBUFFERED=1), so that its write() can drop
    part of what it was given."""
    buffer = getattr(stream, "buffer", None)
    return buffer is not None and not hasattr(buffer, "raw")
