"""The command's entry point (`closewait-trace`, `python -m closewait_trace`):
cli.main, with `snapshot`'s gathering worker started first.

A snapshot's answer waits on its worker's start-up (an interpreter and its
imports). Started here, before the command line's own imports, the two
start-ups run side by side on two cores (evidence/spawn.py)."""

import sys


def main() -> None:
    if sys.argv[1:2] == ["snapshot"]:
        from closewait_trace.evidence import spawn
        spawn.prestart(spawn.DEFAULT_CALLS, **spawn.SNAPSHOT_WORKER)
    from closewait_trace.cli import main as cli_main
    cli_main()
