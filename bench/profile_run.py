#!/usr/bin/env python3
"""closewait-trace under cProfile, for the profiles in docs/benchmarks.md.

    PROF_OUT=/tmp/trace.prof PYTHONPATH=src .venv/bin/python bench/profile_run.py --all --json -p PORT

Runs `python -m closewait_trace ARGS` with cProfile on. A trace that ends
cleanly leaves through os._exit (cli.py's quick exit skips the
interpreter's teardown), where `python -m cProfile` would never write its
file: here os._exit dumps the profile first. Read it with
`python -c "import pstats; pstats.Stats('/tmp/trace.prof').sort_stats('tottime').print_stats(15)"`.
Stop the tracer with SIGINT sent to this process.
"""

import cProfile
import os
import runpy
import sys

profile = cProfile.Profile()
_real_exit = os._exit


def _dump_then_exit(code: int) -> None:
    profile.disable()
    profile.dump_stats(os.environ.get("PROF_OUT", "closewait-trace.prof"))
    _real_exit(code)


os._exit = _dump_then_exit
sys.argv = ["closewait_trace"] + sys.argv[1:]
profile.enable()
try:
    runpy.run_module("closewait_trace", run_name="__main__")
finally:
    profile.disable()
    profile.dump_stats(os.environ.get("PROF_OUT", "closewait-trace.prof"))
