"""Memory of one piece of work, measured in a fresh interpreter of its own.

Why not resource.getrusage(...).ru_maxrss: Linux keeps a process's peak RSS
across execve, so a child forked from pytest starts with pytest's own peak
(whatever the tests before it left on its heap: 163 MB in a full CI run)
and its ru_maxrss says nothing about the work it did. VmHWM (the peak RSS
of the address space) starts afresh at exec, and tracemalloc's peak counts
only Python's allocations since it was started, independent of how malloc
lays out its arenas: both are the child's own, the same in a run alone or in
the full suite.
"""

import json
import resource
import subprocess
import sys

ADDRESS_SPACE = 2 << 30     # the child's RLIMIT_AS: a regression fails, not the machine

_WRAPPER = """\
import json, sys, tracemalloc
sys.argv = [sys.argv[0]] + sys.argv[2:]
traced = sys.argv.pop(1) == '1'
if traced:
    tracemalloc.start()
namespace = {'__name__': '__probe__'}
exec(compile(CODE, '<probe>', 'exec'), namespace)
peak = tracemalloc.get_traced_memory()[1] if traced else None
hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
sys.stdout.flush()
sys.stderr.write('\\nMEMPROBE ' + json.dumps({'hwm_kib': hwm, 'traced_peak': peak}) + '\\n')
"""


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run(code: str, *args: str, traced: bool = False, timeout: float = 600,
        stdin=None):
    """Run `code` in a fresh interpreter; return (completed process,
    peak RSS in MiB, tracemalloc peak in MiB or None). With traced=True the
    tracemalloc peak is that of everything `code` allocated (imports
    included), which does not depend on the allocator or the machine."""
    wrapper = "CODE = " + repr(code) + "\n" + _WRAPPER
    proc = subprocess.run([sys.executable, "-c", wrapper, "probe", "1" if traced else "0",
                           *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limit, stdin=stdin)
    err = proc.stderr
    marker = err.rfind("\nMEMPROBE ")
    if proc.returncode != 0 or marker < 0:
        raise AssertionError(f"probe failed ({proc.returncode}): {err[-3000:]}")
    figures = json.loads(err[marker + len("\nMEMPROBE "):])
    proc.stderr = err[:marker]
    peak = figures["traced_peak"]
    return proc, figures["hwm_kib"] / 1024, None if peak is None else peak / (1 << 20)
