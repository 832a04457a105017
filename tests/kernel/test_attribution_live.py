"""Attribution only from what root made (issue 17 §2), against real cgroups,
a real unprivileged user and real sockets: a container and pod a user names
in the cgroup subtree systemd delegates to them (user@UID.service) are not
the holder's container and pod, in `snapshot`, the live tracer and
`report`; the same names made by root under kubepods.slice are. The program
is the executable, not the argv[0] a process chose."""

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from tests.kernel.harness import (HOLDING_SERVER, TRACER, Tracer, connect_and_close, free_port,
                                  ss_close_wait, stretch, wait_until)

pytestmark = pytest.mark.kernel

NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def cgroup2_root() -> str:
    """Where the unified hierarchy is mounted (/sys/fs/cgroup, or
    /sys/fs/cgroup/unified on a hybrid host)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return left.split()[4]
    pytest.fail("no cgroup2 hierarchy mounted")


class Cgroups:
    """Cgroups a test made; removed afterwards (their processes killed)."""

    def __init__(self):
        self.root = cgroup2_root()
        self.made: list[str] = []

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel.lstrip("/"))

    def mkdir(self, rel: str) -> str:
        """mkdir -p as root, remembering each level made."""
        parts = rel.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = self.path("/".join(parts[:i]))
            if not os.path.isdir(p):
                os.mkdir(p)
                self.made.append(p)
        return self.path(rel)

    def remember_tree(self, rel: str) -> None:
        """Levels another user made below what we made: removed too."""
        parts = rel.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = self.path("/".join(parts[:i]))
            if p not in self.made and os.path.isdir(p):
                self.made.append(p)

    def move(self, pid: int, rel: str) -> None:
        with open(os.path.join(self.path(rel), "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def cleanup(self) -> None:
        for p in sorted(self.made, key=len, reverse=True):
            def emptied():
                with open(os.path.join(p, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    os.rmdir(p)
                    return True
                except OSError:
                    return False
            wait_until(emptied, timeout=10, what=f"rmdir {p}")


@pytest.fixture
def cgroups():
    made = Cgroups()
    yield made
    made.cleanup()


def holder(port: int, user=(), argv0=None) -> subprocess.Popen:
    """The tests' holding server (keeps accepted connections, never reads
    or closes them), as user, with argv0 as its argv[0]."""
    args = [argv0 or sys.executable, "-c", HOLDING_SERVER, "4", str(port)]
    p = subprocess.Popen(list(user) + args if user else args,
                         executable=None if user else sys.executable,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


POD = str(uuid.uuid4())
CID = uuid.uuid4().hex * 2
KUBE_TAIL = (f"kubepods-besteffort.slice/kubepods-besteffort-pod{POD.replace('-', '_')}.slice/"
             f"cri-containerd-{CID}.scope")
USER_SERVICE = f"user.slice/user-{NOBODY}.slice/user@{NOBODY}.service"


def delegated_holder(cgroups: Cgroups, port: int, procs) -> subprocess.Popen:
    """nobody, in the subtree systemd delegates to a logged-in user (the
    directory and its cgroup.procs, cgroup.threads, cgroup.subtree_control
    theirs), makes the other tenant's container and pod cgroups there and
    moves a process of theirs, which holds a CLOSE_WAIT socket, in."""
    service = cgroups.mkdir(USER_SERVICE)
    for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
        os.chown(os.path.join(service, name), NOBODY, NOBODY)
    subprocess.run(AS_NOBODY + ["mkdir", os.path.join(service, "init.scope")], check=True)
    cgroups.remember_tree(USER_SERVICE + "/init.scope")
    # A login's processes start in the user's init.scope (systemd moves them).
    server = holder(port, user=AS_NOBODY)
    procs.append(server)
    cgroups.move(server.pid, USER_SERVICE + "/init.scope")
    forged = os.path.join(service, KUBE_TAIL)
    subprocess.run(AS_NOBODY + ["sh", "-c", 'mkdir -p "$1" && echo "$2" > "$1/cgroup.procs"',
                                "sh", forged, str(server.pid)], check=True)
    cgroups.remember_tree(USER_SERVICE + "/" + KUBE_TAIL)
    with open(f"/proc/{server.pid}/cgroup") as f:
        assert f"/{USER_SERVICE}/{KUBE_TAIL}\n" in f.read()
    return server


def kube_holder(cgroups: Cgroups, port: int, procs) -> subprocess.Popen:
    """A real pod's container, made by root where the kubelet makes it."""
    cgroups.mkdir("kubepods.slice/" + KUBE_TAIL)
    server = holder(port)
    procs.append(server)
    cgroups.move(server.pid, "kubepods.slice/" + KUBE_TAIL)
    return server


def snapshot(*args):
    out = subprocess.run(TRACER + ["snapshot", "--json", *args], capture_output=True,
                         text=True, timeout=stretch(120))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    return [json.loads(l) for l in out.stdout.splitlines()]


def test_a_users_delegated_cgroup_is_not_another_tenants_container(cgroups, procs):
    forged_port, real_port = free_port(), free_port()
    forged = delegated_holder(cgroups, forged_port, procs)
    real = kube_holder(cgroups, real_port, procs)
    connect_and_close(forged_port, 1)
    connect_and_close(real_port, 1)
    wait_until(lambda: ss_close_wait(forged_port) and ss_close_wait(real_port),
               what="CLOSE-WAIT on both")
    ports = f"{forged_port},{real_port}"

    # snapshot: the identity says where each lives; --container keeps only
    # the real container's socket.
    recs = snapshot("-p", ports)
    ident = {r["pid"]: r["identity"] for r in recs if r["type"] == "process"}
    assert ident[forged.pid]["container"] is None and ident[forged.pid]["pod_uid"] is None
    assert ident[forged.pid]["unit"] == f"user@{NOBODY}.service"
    assert ident[forged.pid]["claimed"]["container"]["id"] == CID
    assert ident[forged.pid]["claimed"]["under"] == "/" + USER_SERVICE
    assert ident[real.pid]["container"] == {"runtime": "containerd", "id": CID}
    assert ident[real.pid]["pod_uid"] == POD
    for flag, value in (("--container", CID[:12]),):
        kept = [r for r in snapshot("-p", ports, flag, value) if r["type"] == "linger"]
        assert [r["lport"] for r in kept] == [real_port], kept

    # The live tracer with --container: the real container's socket is
    # reported, the user's (in CLOSE_WAIT first) never is.
    live = Tracer(["-t", "0.5", "-p", ports, "--container", CID[:12]])
    procs.append(live)
    live.start()
    live.wait_for(lambda r: r["type"] == "linger" and r["lport"] == real_port)
    live.settle(2)
    live.stop()
    assert [r["lport"] for r in live.of("linger")] == [real_port]


def test_report_counts_the_container_and_pod_and_names_the_exe(cgroups, procs, tmp_path):
    forged_port, real_port, argv_port = free_port(), free_port(), free_port()
    delegated_holder(cgroups, forged_port, procs)
    kube_holder(cgroups, real_port, procs)
    # A process that calls itself nginx (argv[0]) and runs python.
    liar = holder(argv_port, argv0="nginx")
    procs.append(liar)
    with open(f"/proc/{liar.pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[0] == b"nginx"
    ports = f"{forged_port},{real_port},{argv_port}"
    path = tmp_path / "rec.jsonl"
    live = Tracer(["-t", "0.5", "-p", ports, "-w", str(path)])
    procs.append(live)
    live.start()
    for port in (forged_port, real_port, argv_port):
        connect_and_close(port, 1)
    live.wait_for(lambda r: r["type"] == "linger", count=3)
    live.stop()
    out = subprocess.run(TRACER + ["report", "--json", "--by", "container,pod,program",
                                   str(path)], capture_output=True, text=True,
                         timeout=stretch(60))
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    containers = {r["container"]: r["count"] for r in rep["by_container"]}
    assert containers.get("containerd " + CID[:12]) == 1, containers
    pods = {r["pod"]: r["count"] for r in rep["by_pod"]}
    assert pods.get(POD) == 1, pods
    exe = os.path.realpath(sys.executable)
    programs = [r["program"] for r in rep["by_program"]]
    assert programs and all(f"[{exe}]" in p for p in programs), programs
    assert not any("nginx" in p for p in programs), programs
