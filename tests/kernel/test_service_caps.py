"""The systemd unit's capability set, for real: the seed scenario traced as
uid 0 under setpriv with only the unit's bounding set must see the same
owners and diagnoses as unrestricted root."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernel.harness import stretch
from closewait_trace.errors import EXIT_NOT_ROOT
from tests.kernel import harness
from tests.kernel.harness import PERF_RESTRICTED
from tests.kernel.harness import (start_seed_scenario, Tracer, children_of, free_port,
                                  tracer_process, wait_until)

pytestmark = pytest.mark.kernel

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "closewait-trace.service"


def unit_capabilities() -> list[str]:
    """CapabilityBoundingSet= of the unit, as setpriv names (bpf, perfmon, ...)."""
    caps = []
    for line in UNIT.read_text().splitlines():
        m = re.match(r"\s*CapabilityBoundingSet=(.*)", line)
        if m:
            caps += [c.removeprefix("CAP_").lower() for c in m.group(1).split()]
    assert caps, "no CapabilityBoundingSet in the unit"
    return caps


def restricted(caps: list[str]) -> list[str]:
    wanted = ",".join(f"+{c}" for c in caps)
    # uid 0 keeps running as root; only what the bounding set allows survives
    # the exec (no inheritable or ambient capabilities either), as under systemd.
    return ["setpriv", f"--bounding-set=-all,{wanted}", "--inh-caps=-all",
            "--ambient-caps=-all", "--no-new-privs", "--"]


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def seed_scenario(procs, prefix: list[str]) -> tuple[list, dict, str]:
    """The seed scenario, with what production adds: the server runs as an
    unprivileged user (not as root, as the tracer does), and a second server
    in another network namespace (a container) holds two more sockets."""
    port = free_port()
    tracer = Tracer(["-p", str(port), "-t", "1s"], command=prefix + harness.TRACER).start()
    procs.append(tracer)
    server, entered = start_seed_scenario(port, procs, as_user=NOBODY)
    ns = f"cwt-caps-{os.getpid()}-{port}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        contained = subprocess.Popen(["ip", "netns", "exec", ns] + NOBODY +
                                     [sys.executable, "-c", harness.HOLDING_SERVER, "4", str(port)],
                                     stdout=subprocess.PIPE, text=True)
        procs.append(contained)
        assert contained.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                        "import socket,sys; [socket.create_connection(('127.0.0.1', "
                        "int(sys.argv[1]))).close() for _ in range(2)]", str(port)], check=True)
        tracer.wait_for(lambda r: r["type"] == "linger", count=7, timeout=20)
        tracer.settle(0.5)
        children = children_of(server.pid)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        tracer.wait_for(lambda r: r["type"] == "closed", count=5, timeout=10)
        summary = tracer.stop(signal.SIGTERM)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
    return tracer.records, summary, port


def comparable(records: list, port: int) -> list:
    """What root and the unit must agree on, without pids, times and ports."""
    out = []
    for r in records:
        if r["type"] == "linger":
            out.append(("linger", r["owner_kind"],
                        tuple((o["comm"], o["state"], o["fd"] >= 0) for o in r["owners"]),
                        r["diagnosis"]["cause"], sorted(r["diagnosis"]["evidence"])))
        elif r["type"] == "closed":
            out.append(("closed", r["how"], r["closed_by"]["comm"] if r["closed_by"] else None))
        elif r["type"] == "process":
            # How often a process record comes depends on timing; what it
            # could find out (which fields are filled in) must not differ.
            fields = ("process", r.get("comm"),
                      tuple(sorted(k for k, v in r.items() if v not in (None, [], {}, ""))))
            if fields not in out:
                out.append(fields)
    return sorted(out, key=repr)


def test_unit_capabilities_see_what_root_sees(procs):
    caps = unit_capabilities()
    as_root, root_summary, root_port = seed_scenario(procs, [])
    as_unit, unit_summary, unit_port = seed_scenario(procs, restricted(caps))
    assert comparable(as_unit, unit_port) == comparable(as_root, root_port)
    lingers = [r for r in as_unit if r["type"] == "linger"]
    assert len(lingers) == 7
    assert sorted((r["owners"][0]["comm"], r["diagnosis"]["cause"]) for r in lingers) == \
        [(os.path.basename(sys.executable)[:15], "ignoring_eof")] * 2 + [("socat", "stopped")] * 5
    assert unit_summary["counters"]["cw_enter"] == 7


def traced_with(procs, caps: list[str]):
    """What the seed scenario comes to under setpriv with only `caps`:
    ("refused", message) when the tracer ends at once with its documented
    exit code for a missing capability, else ("ran", what comparable() keeps).
    Anything else (a timeout, a crash, a different exit code) fails the
    test: a slow run on a loaded machine must not pass for "sees less"."""
    try:
        records, _, port = seed_scenario(procs, restricted(caps))
    except AssertionError as failure:
        m = re.match(r"tracer exited early: (-?\d+) (.*)", str(failure), re.S)
        if m and int(m.group(1)) == EXIT_NOT_ROOT:     # a capability it needs is missing
            return "refused", m.group(2).strip()
        raise
    return "ran", comparable(records, port)


def test_one_capability_less_is_not_enough(procs):
    """Each capability in the unit is needed: without it the tracer refuses
    to start (saying which capability) or, having reported every socket,
    knows less than root (so the set is the smallest, not just sufficient).
    CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON, so those two are checked
    without it; it is in the set for kernels that let only it attach."""
    caps = unit_capabilities()
    assert "sys_admin" in caps
    base = [c for c in caps if c != "sys_admin"]
    as_root, _, root_port = seed_scenario(procs, [])
    seen_by_root = comparable(as_root, root_port)
    assert sum(1 for r in seen_by_root if r[0] == "linger") == 7

    def knows_less(dropped: str, kept: list[str]) -> None:
        how, what = traced_with(procs, kept)
        if how == "refused":
            # Only a capability that loading the program needs may stop it.
            assert dropped in ("bpf", "perfmon", "sys_admin"), (dropped, what)
            assert f"CAP_{dropped.upper()}" in what, what
            return
        # It ran, and every socket was reported (seed_scenario waited for
        # all 7), yet what it could find out differs from root's.
        assert sum(1 for r in what if r[0] == "linger") == 7, (dropped, what)
        assert what != seen_by_root, f"CAP_{dropped.upper()} is not needed"

    for dropped in base:
        knows_less(dropped, [c for c in base if c != dropped])
    for dropped in ("sys_ptrace", "dac_read_search"):     # not covered by CAP_SYS_ADMIN
        knows_less(dropped, [c for c in caps if c != dropped])
    # CAP_SYS_ADMIN: where perf events are restricted (Debian's and Ubuntu's
    # kernels) nothing traces without it; elsewhere it changes nothing the
    # comparison shows (it reads other namespaces over sock_diag instead of
    # /proc/PID/net/tcp).
    if PERF_RESTRICTED:
        knows_less("sys_admin", base)
    else:
        assert traced_with(procs, base) == ("ran", seen_by_root)


def unit_command(state_dir, metrics_port: int) -> list[str]:
    """The unit's ExecStart, run here: state dir and metrics port moved."""
    import shlex
    text = UNIT.read_text().replace("\\\n", " ")
    line = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
    argv = shlex.split(line)
    assert argv[0] == "/opt/closewait-trace/bin/closewait-trace"
    out = [sys.executable, "-m", "closewait_trace"]
    for arg in argv[1:]:
        arg = arg.replace("/var/lib/closewait-trace/", f"{state_dir}/")
        out.append(arg.replace("127.0.0.1:9477", f"127.0.0.1:{metrics_port}"))
    return out


def test_unit_command_records_and_sigterm_leaves_the_summary(procs, tmp_path):
    """What systemd runs, with the unit's capabilities: it records quietly,
    serves metrics, and `systemctl stop` (SIGTERM) ends the recording with
    its summary."""
    from closewait_trace.files import parts
    port = free_port()
    metrics_port = free_port()
    cmd = restricted(unit_capabilities()) + unit_command(tmp_path, metrics_port)
    with tracer_process([], command=cmd, text=True) as tracer:
        wait_until(lambda: b"closewait_entered_total" in _scrape(metrics_port), timeout=30,
                   what="metrics served")
        server, entered = start_seed_scenario(port, procs, as_user=NOBODY)
        wait_until(lambda: b'comm="socat"' in _scrape(metrics_port) and
                   re.search(rb'closewait_lingering_sockets\{comm="socat",port="%d".*\} 5\.0' % port,
                             _scrape(metrics_port)), timeout=20, what="5 sockets in the metrics")
        tracer.send_signal(signal.SIGTERM)
        out, err = tracer.communicate(timeout=stretch(30))
    assert tracer.returncode == 0, err
    assert out == "" and "Traceback" not in err
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["closewait.jsonl.gz"]
    assert files[0].stat().st_mode & 0o777 == 0o600
    rec = parts.read([str(files[0])])
    types = [r["type"] for r in rec.records]
    assert types[0] == "header" and types[-1] == "summary", types
    summary = rec.records[-1]
    # The unit traces the whole machine (other tests run beside this one):
    # ours are the sockets on our port.
    ours = [s for s in summary["still_lingering"] if s["lport"] == port]
    assert len(ours) == 5 and summary["linger_reported"] >= 5
    assert all(s["owners"][0]["comm"] == "socat" for s in ours)


def _scrape(port: int) -> bytes:
    import urllib.request
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=stretch(5)).read()
    except OSError:
        return b""
