"""Attribution from what root made, never from names a user chose (issue 17
§2): container, pod and unit from cgroup paths, the program from
/proc/PID/exe. Pure parsing, plus the report and -v over such identities."""

import pytest

from closewait_trace.output import render, report, schema
from closewait_trace.sockets import identity
from tests.unit import recordfactory

POD = "1234abcd-1111-2222-3333-444455556666"
CID = "ab" * 32
OTHER = "cd" * 32
KUBE = ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
        + POD.replace("-", "_") + ".slice/cri-containerd-" + CID + ".scope")
# What a logged-in user can make in the subtree systemd delegates to them.
DELEGATED = "/user.slice/user-1000.slice/user@1000.service" + KUBE[len("/kubepods.slice"):]


def test_a_delegated_user_subtree_names_no_container_pod_or_unit():
    got = identity.parse_cgroup("0::" + DELEGATED + "\n")
    assert got["container"] is None and got["pod_uid"] is None
    assert got["unit"] == "user@1000.service"          # the unit systemd made
    assert got["claimed"] == {"container": {"runtime": "containerd", "id": CID},
                              "pod_uid": POD,
                              "under": "/user.slice/user-1000.slice/user@1000.service"}


@pytest.mark.parametrize("path", [
    # Any level of user.slice, and a look-alike top level below it.
    "/user.slice/kubepods.slice/kubepods-pod" + POD.replace("-", "_") + ".slice/docker-"
    + CID + ".scope",
    "/user.slice/user-1000.slice/user@1000.service/app.slice/kubepods.slice/kubepods-pod"
    + POD.replace("-", "_") + ".slice/cri-containerd-" + CID + ".scope",
    "/user.slice/user-1000.slice/user@1000.service/system.slice/docker-" + CID + ".scope",
    "/user.slice/user-1000.slice/user@1000.service/docker/" + CID,
    # Relative to a cgroup namespace: nothing in it is where root put it.
    "/../../kubepods.slice/kubepods-pod" + POD.replace("-", "_") + ".slice/cri-containerd-"
    + CID + ".scope",
    # A top level no runtime uses.
    "/evil/kubepods.slice/kubepods-pod" + POD.replace("-", "_") + ".slice/docker-" + CID
    + ".scope",
])
def test_look_alikes_anywhere_else_are_claims(path):
    got = identity.attribute(path)
    assert got["container"] is None and got["pod_uid"] is None
    assert got["claimed"]["container"]["id"] == CID


def test_inside_a_container_its_own_names_are_claims_the_outer_one_counts():
    nested = KUBE + "/kubepods-pod" + "9" * 8 + "_1111_2222_3333_444455556666.slice/docker-" \
        + OTHER + ".scope"
    got = identity.attribute(nested)
    assert got["container"] == {"runtime": "containerd", "id": CID} and got["pod_uid"] == POD
    assert got["claimed"]["container"]["id"] == OTHER and got["claimed"]["under"] == KUBE


def test_a_delegated_service_names_no_unit_below_itself():
    got = identity.attribute("/system.slice/ci-runner.service/job/nginx.service")
    assert got["unit"] == "ci-runner.service"
    assert got["claimed"] == {"unit": "nginx.service", "under": "/system.slice/ci-runner.service"}


@pytest.mark.parametrize("path,container,pod,unit", [
    (KUBE, ("containerd", CID), POD, None),
    ("/kubepods/burstable/pod" + POD + "/" + CID, ("cri", CID), POD, None),
    ("/kubepods/pod" + POD + "/crio-" + CID, ("cri-o", CID), POD, None),
    ("/system.slice/docker-" + CID + ".scope", ("docker", CID), None, None),
    ("/docker/" + CID, ("docker", CID), None, None),
    ("/machine.slice/libpod-" + CID + ".scope/container", ("podman", CID), None, None),
    ("/machine.slice/machine-web.scope", ("machined", "web"), None, None),
    ("/lxc.payload.web", ("lxc", "web"), None, None),
    ("/system.slice/system-getty.slice/getty@tty1.service", None, None, "getty@tty1.service"),
    ("/user.slice/user-1000.slice/session-2.scope", None, None, None),
    ("/", None, None, None),
])
def test_where_root_puts_them(path, container, pod, unit):
    got = identity.attribute(path)
    assert (tuple(got["container"].values()) if got["container"] else None) == container
    assert got["pod_uid"] == pod and got["unit"] == unit and got["claimed"] is None


def test_long_hostile_paths_parse_in_bounded_time():
    # cgroup.max.depth is unbounded by default: a path of 100,000 levels.
    path = DELEGATED + "/a" * 100_000 + "/docker-" + CID + ".scope"
    got = identity.attribute(path)
    assert got["container"] is None and got["claimed"]["container"]["id"] == CID


def test_a_recorded_identity_is_decided_again_from_its_cgroup():
    """A recording written by an older version (or another host) says the
    user's process is in a container: the path says otherwise."""
    forged = {"cgroup": DELEGATED, "container": {"runtime": "containerd", "id": CID},
              "pod_uid": POD, "unit": "victim.service"}
    got = identity.attribution(forged)
    assert got["container"] is None and got["pod_uid"] is None
    assert got["unit"] == "user@1000.service"
    assert identity.attribution({"container": {"runtime": "docker", "id": CID}})["container"] \
        is None


def _report(ident, comm="sleep", cmdline="nginx: worker process"):
    recs = [recordfactory.header(),
            recordfactory.process(pid=42, comm=comm, cmdline=cmdline, identity=ident),
            recordfactory.linger(owners=[recordfactory.holder(pid=42, comm=comm,
                                                              cmdline=cmdline)])]
    assert all(schema.problem(r) is None for r in recs)
    return report.build(recs)


def test_report_counts_no_claimed_container_or_pod():
    rep = _report({"cgroup": DELEGATED, "container": {"runtime": "containerd", "id": CID},
                   "pod_uid": POD, "claimed": None})
    assert [r["container"] for r in rep.get("by_container", [])] in ([], ["(not known)"])
    assert [r["pod"] for r in rep.get("by_pod", [])] in ([], ["(not known)"])
    assert [r["unit"] for r in rep["by_unit"]] == ["user@1000.service"]
    rep = _report({"cgroup": KUBE})
    assert [r["container"] for r in rep["by_container"]] == ["containerd " + CID[:12]]
    assert [r["pod"] for r in rep["by_pod"]] == [POD]


def test_report_program_is_the_exe_never_argv0():
    exe = {"path": "/usr/bin/sleep", "deleted": False, "replaced": False}
    rep = _report({"exe": exe})
    assert [r["program"] for r in rep["by_program"]] == ["sleep [/usr/bin/sleep]"]
    # No exe recorded (an older recording): unknown, not argv[0].
    rep = _report({})
    assert [r["program"] for r in rep["by_program"]] == ["sleep [program unknown]"]
    rep = _report({"exe": dict(exe, deleted=True, replaced=True)})
    assert [r["program"] for r in rep["by_program"]] == [
        "sleep [/usr/bin/sleep (deleted, replaced on disk)]"]


@pytest.mark.parametrize("exe,label", [
    ({"path": "/a", "deleted": False, "replaced": False}, "/a"),
    ({"path": "/a", "deleted": True, "replaced": False}, "/a (deleted)"),
    ({"path": "/a", "deleted": True, "replaced": None}, "/a (deleted)"),
    ({"path": "/a (deleted)", "deleted": None, "replaced": None}, "/a (deleted)"),
    ({"path": "/a", "deleted": False, "replaced": True}, "/a (replaced on disk)"),
    ({"path": ""}, None), (None, None), ("/a", None), ({"path": 5}, None),
])
def test_program_label(exe, label):
    assert identity.program_label(exe) == label


def test_verbose_line_says_a_claim_as_a_claim():
    ident = identity.parse_cgroup("0::" + DELEGATED + "\n")
    rec = recordfactory.linger(owners=[recordfactory.holder(pid=42)])
    lines = render.evidence_lines(rec, {42: {"identity": ident}})
    where = next(l for l in lines if "user@1000.service" in l)
    assert "claims containerd " + CID[:12] in where and "not trusted" in where
    assert "named under /user.slice/user-1000.slice/user@1000.service" in where
    assert not any(("containerd " + CID[:12]) in l and "claims" not in l for l in lines)
