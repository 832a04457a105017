"""A tiny run of the benchmark, so that it cannot rot (the real one is run
by hand: see docs/benchmarks.md)."""

import json
import os
import subprocess
import sys

import pytest

from tests.kernel.harness import stretch

pytestmark = pytest.mark.kernel
BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "run.py")


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, BENCH, "--smoke", "--json", str(out)],
                            capture_output=True, text=True, timeout=stretch(300))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    churn = data["churn"]
    assert {"none", "empty", "default", "all"} <= set(churn)
    # The default mode loses nothing even at saturation; --all may (it says
    # how many), which is why its count is only checked for being reported.
    assert churn["default"]["lost"] == [0]
    assert isinstance(churn["all"]["lost"][0], int)
    for mode in ("default", "all"):
        assert churn[mode]["rate"][0] > 1000
        assert churn[mode]["startup_s"][0] < 10
        assert churn[mode]["exit_s"][0] is not None and churn[mode]["exit_s"][0] < 5
    scale = data["scale"][0]
    assert scale["sockets"] == scale["reported"] == scale["with_owners"] == 200
    assert "| closewait-trace |" in result.stdout


def test_benchmark_says_why_tcpstates_could_not_start(tmp_path):
    """Whatever header trees a machine has, the benchmark finishes: a
    tcpstates that cannot compile is a row saying so, not a failure. Forced
    here with a header tree that has nothing in it."""
    empty = tmp_path / "no-headers"
    empty.mkdir()
    result = subprocess.run([sys.executable, BENCH, "churn", "--smoke", "--modes",
                             "none,tcpstates"], capture_output=True, text=True, timeout=stretch(300),
                            env=dict(os.environ, BENCH_TCPSTATES_HEADERS=str(empty)))
    assert result.returncode == 0, result.stderr[-2000:]
    row = [l for l in result.stdout.splitlines() if l.startswith("| tcpstates-bpfcc |")]
    assert len(row) == 1 and f"could not start: {empty}:" in row[0], result.stdout
    assert "| no tracer |" in result.stdout


def test_startup_benchmark_smoke():
    """bench/startup.py, one round of each mode under load: it runs, and
    each exit's summary was read and accounts for every transition."""
    startup = os.path.join(os.path.dirname(BENCH), "startup.py")
    result = subprocess.run([sys.executable, startup, "--rounds", "1", "--load",
                             "--modes", "port,all"],
                            capture_output=True, text=True, timeout=stretch(300))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| port ")
            or line.startswith("| all ")]
    assert len(rows) == 2, result.stdout
    assert all(row.rstrip().endswith("| 1/1 |") for row in rows), rows
    assert "| 0 | 1/1 |" in rows[1], rows[1]          # --all: nothing uncounted
