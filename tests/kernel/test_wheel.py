"""The pip/pipx path of docs/install.md: a wheel built from the tree, installed
into a fresh venv made with --system-site-packages on /usr/bin/python3,
runs the seed scenario from `/` (nothing borrowed from the checkout)."""

import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.kernel import harness
from tests.kernel.harness import start_seed_scenario, Tracer, children_of, free_port

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]


def test_wheel_in_a_fresh_venv_runs_the_seed_scenario(procs, tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--disable-pip-version-check", "-w", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=harness.stretch(600))
    assert build.returncode == 0, build.stderr
    [wheel] = dist.glob("closewait_trace-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "closewait_trace/bpf/closewait.bpf.c" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in names), names
    assert "License: Apache-2.0" in meta or "License-Expression: Apache-2.0" in meta
    assert "Requires-Dist: prometheus-client" in meta
    assert not any(n.startswith("tests/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=harness.stretch(300))
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                              "--disable-pip-version-check", str(wheel)],
                             capture_output=True, text=True, timeout=harness.stretch(600))
    assert install.returncode == 0, install.stderr
    tool = venv / "bin" / "closewait-trace"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(["env", "-C", "/", str(venv / "bin" / "python"), "-c",
                            "import closewait_trace; print(closewait_trace.__file__)"],
                           capture_output=True, text=True, env=env, check=True)
    assert where.stdout.startswith(str(venv)), where.stdout

    port = free_port()
    tracer = Tracer(["-p", str(port), "-t", "1s"],
                    command=["env", "-u", "PYTHONPATH", "-C", "/", str(tool)]).start()
    procs.append(tracer)
    server, entered = start_seed_scenario(port, procs)
    lingers = tracer.wait_for(lambda r: r["type"] == "linger", count=5, timeout=20)
    assert all(r["owners"][0]["comm"] == "socat" and r["diagnosis"]["cause"] == "stopped"
               for r in lingers)
    for pid in children_of(server.pid):
        os.kill(pid, signal.SIGKILL)
    tracer.wait_for(lambda r: r["type"] == "closed", count=5, timeout=10)
    summary = tracer.stop()
    assert summary["counters"]["cw_enter"] == 5
