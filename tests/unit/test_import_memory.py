"""What the tracer holds because a module was imported, not because it
was used: the --all JSON state-pair table (65,536 entries, 11 MB) is made
at the first --all batch, not when the cli imports output/transitions."""

import subprocess
import sys

CODE = """
import tracemalloc
tracemalloc.start()
import closewait_trace.cli
snap = tracemalloc.take_snapshot().filter_traces(
    [tracemalloc.Filter(True, "*closewait_trace/output/transitions.py")])
print(sum(s.size for s in snap.statistics("filename")))
"""


def test_importing_the_cli_does_not_build_the_all_tables():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         check=True).stdout
    assert int(out) < 1_000_000, f"{int(out) / 1e6:.1f} MB allocated by importing transitions.py"


def test_the_table_is_built_at_first_use():
    from closewait_trace.output import transitions
    for compact in (False, True):
        pairs = transitions._json_pairs(compact)
        assert len(pairs) == 65536 and transitions._json_pairs(compact) is pairs
    assert transitions._json_pairs(True)[0][0] != transitions._json_pairs(False)[0][0]
