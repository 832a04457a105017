"""Testing knobs: environment variables that change how the tool behaves so
that its tests can run on machines unlike production. Not user options: they
are documented in docs/kernels.md, and `-v` says when one is set.

CLOSEWAIT_TRACE_FORCE (kernel/probe.py) picks the pre-5.8 transport, clock
and map reads on a newer kernel. CLOSEWAIT_TRACE_TIME_SCALE multiplies the
symbolizer's wall-clock budgets (elfindex.Limits.parse_seconds, symbolize's
batch budget): the kernel matrix runs the tests under QEMU without KVM, about
50 times slower, where a budget sized for real hardware would measure the
emulator instead of the code under test. The test harness sets it to the
tests' stretch factor (CLOSEWAIT_TEST_STRETCH). CLOSEWAIT_TRACE_RECONCILE_S
sets how often the live loop compares the sockets in CLOSE_WAIT with what
it knows (its census; live/tracer.py RECONCILE_EVERY_S), so that a test
sees it in seconds instead of minutes.
"""

from __future__ import annotations

import os

TIME_SCALE_ENV = "CLOSEWAIT_TRACE_TIME_SCALE"
MAX_TIME_SCALE = 1000.0


def time_scale(environ=os.environ) -> float:
    """The factor CLOSEWAIT_TRACE_TIME_SCALE sets, 1.0 when unset or not a
    number in (0, 1000]."""
    try:
        value = float(environ.get(TIME_SCALE_ENV, "1"))
    except ValueError:
        return 1.0
    return value if 0.0 < value <= MAX_TIME_SCALE else 1.0


RECONCILE_ENV = "CLOSEWAIT_TRACE_RECONCILE_S"


def reconcile_override(environ=os.environ) -> "float | None":
    """The period CLOSEWAIT_TRACE_RECONCILE_S sets, in seconds; None when
    unset or not a number in [1, 86400] (the loop's own period then)."""
    try:
        value = float(environ[RECONCILE_ENV])
    except (KeyError, ValueError):
        return None
    return value if 1.0 <= value <= 86400.0 else None
