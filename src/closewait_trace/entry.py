"""The command's entry point (`closewait-trace`, `python -m closewait_trace`):
cli.main, with `snapshot`'s gathering worker started first.

A snapshot's answer waits on its worker's start-up (an interpreter and its
imports). Started here, before the command line's own imports, the two
start-ups run side by side on two cores (evidence/spawn.py)."""

import sys


def main() -> None:
    if sys.argv[1:2] == ["snapshot"]:
        from closewait_trace.evidence import spawn
        try:
            spawn.prestart(spawn.DEFAULT_CALLS, **spawn.SNAPSHOT_WORKER)
        except OSError:
            # No process to be had (a user's process limit, no memory): the
            # snapshot tries again itself, where a failure is one line.
            pass
    from closewait_trace.cli import main as cli_main
    cli_main()
