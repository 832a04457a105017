"""The Debian package (issue 19 §1): built from this checkout with Debian's
own tooling (scripts/build-deb.sh: debian/, pybuild, Debian 12's hatchling),
installed with apt from the file alone (no PyPI), and the seed scenario
traced through /usr/sbin/closewait-trace, the installed code only. The
package is purged at the end."""

import os
import subprocess

import pytest

from tests.kernel.harness import (Tracer, free_port, record_row, ss_close_wait,
                                  start_seed_scenario, stretch)

pytestmark = pytest.mark.kernel
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-qq"]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=stretch(600), **kw)


@pytest.fixture
def installed(tmp_path):
    if run(["dpkg-query", "-W", "closewait-trace"]).returncode == 0:
        pytest.fail("closewait-trace is installed as a package already: this test "
                    "installs and purges it")
    built = run(["bash", os.path.join(REPO, "scripts", "build-deb.sh"), str(tmp_path)])
    assert built.returncode == 0, built.stderr
    [deb] = [p for p in os.listdir(tmp_path) if p.endswith("_all.deb")]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SYSTEM_PATH)
    got = run(APT + ["install", "--no-install-recommends", str(tmp_path / deb)], env=env)
    assert got.returncode == 0, got.stdout + got.stderr
    try:
        yield tmp_path / deb
    finally:
        purged = run(["dpkg", "--purge", "closewait-trace"], env=env)
        assert purged.returncode == 0, purged.stderr


def test_the_package_installs_without_pypi_and_traces_the_seed_scenario(
        installed, procs, monkeypatch):
    files = run(["dpkg", "-L", "closewait-trace"]).stdout.split()
    assert "/usr/sbin/closewait-trace" in files
    assert not [f for f in files if f.startswith("/usr/local") or f.startswith("/opt")]
    assert "/usr/share/bash-completion/completions/closewait-trace" in files
    assert any(f.endswith("closewait_trace/bpf/closewait.bpf.c") for f in files)
    unit = "/lib/systemd/system/closewait-trace.service"
    assert unit in files
    text = open(unit).read()
    assert "ExecStart=/usr/sbin/closewait-trace " in text
    assert "ExecStartPre=/usr/lib/closewait-trace/keep-runs " in text
    # Installed, not enabled: starting a root tracer is the admin's choice.
    assert not os.path.exists("/etc/systemd/system/multi-user.target.wants/"
                              "closewait-trace.service")
    # man finds the package's page (setup.sh's copy under /usr/local may be first).
    assert "/usr/share/man/man8/closewait-trace.8.gz" in run(
        ["man", "-aw", "closewait-trace"]).stdout.split()
    assert "/usr/share/doc/closewait-trace/examples/closewait-trace.rules.yml" in files

    # The installed code, not this checkout's: no PYTHONPATH, the distro's
    # python3 (the script's own #!).
    monkeypatch.delenv("PYTHONPATH", raising=False)
    where = run(["/usr/bin/python3", "-c", "import closewait_trace; print(closewait_trace.__file__)"],
                cwd="/")
    assert where.stdout.startswith("/usr/lib/python3/dist-packages/"), where
    port = free_port()
    tracer = Tracer(["-p", str(port), "-t", "1s"], command=["/usr/sbin/closewait-trace"]).start()
    procs.append(tracer)
    server, _entered = start_seed_scenario(port, procs)
    lingers = tracer.wait_for(lambda r: r["type"] == "linger", count=5, timeout=20)
    assert {record_row(r) for r in lingers} == ss_close_wait(port)
    assert all(r["diagnosis"]["cause"] == "stopped" for r in lingers)
    assert all(r["owners"][0]["comm"] == "socat" for r in lingers)
    summary = tracer.stop()
    assert summary["counters"]["cw_enter"] == 5
    assert len(summary["still_lingering"]) == 5
