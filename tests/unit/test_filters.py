"""Socket filters (ports, family) and holder filters (pid, comm, cgroup,
container, unit), over endpoints and over records."""

import socket

import pytest

from closewait_trace.kernel.events import Endpoints
from closewait_trace.sockets.filters import (HolderFilter, SocketFilter, describe_filters,
                                             parse_ports, record_people, validate_container)


def test_parse_ports():
    assert parse_ports(["80,443", "8080", "80"]) == (80, 443, 8080)
    for bad in (["0"], ["65536"], ["http"], ["1,-2"]):
        with pytest.raises(ValueError):
            parse_ports(bad)


def test_port_ranges_within_the_kernel_maps_64():
    assert parse_ports(["8080-8083,22"]) == (22, 8080, 8081, 8082, 8083)
    assert parse_ports(["1-64"]) == tuple(range(1, 65))
    for bad, said in ((["8090-8080"], "from low to high"), (["1-65"], "65 ports"),
                      (["a-b"], "not a port number"), (["0-3"], "not a port number"),
                      (["65530-70000"], "not a port number"), (["1-60", "100-110"], "at most 64")):
        with pytest.raises(ValueError, match=said):
            parse_ports(bad)


@pytest.mark.parametrize("pattern, comm, matches", [
    ("python", "python3", True),            # a prefix (issue 19 §6: found nothing)
    ("python3", "python3", True),
    ("python3", "python", False),
    ("py*3", "python3", True),
    ("*worker*", "gunicorn-worker", True),
    ("*worker", "worker-1", False),
    ("java", "javac", True),
    ("my-long-service-name", "my-long-service", True),   # the kernel's 15 bytes
    ("my-long-service-xyz", "my-long-service", True),
    ("my-long-service-name", "my-long-servic", False),
    ("nginx", None, False),
])
def test_comm_is_a_prefix_or_a_glob(pattern, comm, matches):
    assert HolderFilter(comms=(pattern,)).matches_person({"pid": 1, "comm": comm}) is matches


def test_what_a_prefix_or_glob_matched_is_said():
    people = [{"pid": i, "comm": c} for i, c in enumerate(["python3", "python3.11", "java",
                                                            "python3", "nginx"])]
    f = HolderFilter(comms=("python", "nginx", "*ava"))
    assert f.names_matched(people) == {"python": ["python3", "python3.11"], "*ava": ["java"]}


def test_filter_matches():
    ep = Endpoints(socket.AF_INET, "1.2.3.4", 80, "5.6.7.8", 4000)
    assert SocketFilter().matches(ep)
    assert SocketFilter(lports=(80,)).matches(ep)
    assert not SocketFilter(lports=(81,)).matches(ep)
    assert not SocketFilter(rports=(80,)).matches(ep)
    assert not SocketFilter(family=socket.AF_INET6).matches(ep)


def test_socket_filter_over_records_is_the_same_test():
    f = SocketFilter(lports=(80,), family=socket.AF_INET6)
    assert f.matches_record({"family": "ipv6", "lport": 80, "rport": 1})
    assert not f.matches_record({"family": "ipv4", "lport": 80, "rport": 1})
    assert not f.matches_record({"family": "ipv6", "lport": 81, "rport": 1})
    ep = Endpoints(socket.AF_INET6, "::1", 80, "::1", 1)
    assert f.matches(ep) == f.matches_record({"family": "ipv6", "lport": 80, "rport": 1})


def test_holder_filter_pid_comm_same_person():
    assert not HolderFilter().active and HolderFilter().matches([])
    f = HolderFilter(pids=(1, 2), comms=("a",))
    assert f.matches([{"pid": 2, "comm": "a"}])
    assert not f.matches([{"pid": 2, "comm": "b"}, {"pid": 3, "comm": "a"}])
    assert not f.matches([])


def test_unmatched_names_each_value_no_process_matches_on_its_own():
    people = [{"pid": 7, "comm": "nginx", "identity": {"unit": "nginx.service",
                                                        "cgroup": "/system.slice/nginx.service"}},
              {"pid": 8, "comm": "java"}]
    f = HolderFilter(pids=(7, 99), comms=("java", "ngnix"), units=("nginx", "web"),
                     cgroups=("/system.slice", "/b"))
    assert f.unmatched(people) == ["--pid 99", "--comm ngnix", "--cgroup /b", "--unit web"]
    assert HolderFilter(pids=(7,), comms=("nginx",)).unmatched(people) == []
    assert HolderFilter().unmatched([]) == []


def test_unmatched_stops_reading_people_once_every_value_matched():
    def people():
        yield {"pid": 7, "comm": "nginx"}
        raise AssertionError("read past the point where everything had matched")
    assert HolderFilter(pids=(7,), comms=("nginx",)).unmatched(people()) == []


IDENT = {"cgroup": "/system.slice/web.service/sub", "unit": "web.service"}
DOCKER = {"cgroup": "/system.slice/docker-ab12" + "0" * 60 + ".scope",
          "container": {"runtime": "docker", "id": "ab12" + "0" * 60}}


@pytest.mark.parametrize("f,expected", [
    (HolderFilter(cgroups=("/system.slice/web.service",)), True),
    (HolderFilter(cgroups=("/system.slice/web.service/",)), True),
    (HolderFilter(cgroups=("/",)), True),
    (HolderFilter(cgroups=("/system.slice/web",)), False),     # not a parent: a prefix
    (HolderFilter(units=("web",)), True),
    (HolderFilter(units=("web.service",)), True),
    (HolderFilter(units=("db",)), False),
    (HolderFilter(units=("web",), pids=(9,)), False),
])
def test_holder_filter_identity(f, expected):
    assert f.needs_identity or f.pids
    assert f.matches([{"pid": 1, "comm": "x", "identity": IDENT}]) is expected


@pytest.mark.parametrize("f,expected", [
    (HolderFilter(containers=("ab12",)), True),
    (HolderFilter(containers=("ab13",)), False),
    (HolderFilter(units=("web",)), False),
])
def test_holder_filter_container(f, expected):
    assert f.matches([{"pid": 1, "comm": "x", "identity": DOCKER}]) is expected


DELEGATED = ("/user.slice/user-1000.slice/user@1000.service/kubepods-besteffort-pod"
             "1234abcd_1111_2222_3333_444455556666.slice/cri-containerd-" + "ab12" * 16 + ".scope")


def test_container_and_unit_filters_take_nothing_a_user_named():
    """Issue 17 §2: the fields an identity carries (a recording of another
    host, an older version) are not believed; the container and unit are
    decided again from the cgroup path, where a user's delegated subtree
    (user@UID.service) names nothing."""
    forged = {"cgroup": DELEGATED, "container": {"runtime": "containerd", "id": "ab12" * 16},
              "pod_uid": "1234abcd-1111-2222-3333-444455556666", "unit": "web.service"}
    person = {"pid": 1, "comm": "x", "identity": forged}
    assert not HolderFilter(containers=("ab12",)).matches([person])
    assert not HolderFilter(units=("web",)).matches([person])
    assert HolderFilter(units=("user@1000",)).matches([person])     # the unit systemd made
    no_path = {"container": {"runtime": "docker", "id": "ab12" * 16}, "unit": "web.service"}
    assert not HolderFilter(containers=("ab12",)).matches(
        [{"pid": 1, "comm": "x", "identity": no_path}])


def test_holder_filter_without_identity_does_not_match_identity_filters():
    assert not HolderFilter(units=("web",)).matches([{"pid": 1, "comm": "x"}])
    f = HolderFilter(cgroups=("/a",), containers=("abcd",), units=("u",))
    for junk in ([1], "x", {"cgroup": 5, "container": [1], "unit": {}},
                 {"container": {"id": 7}}):
        assert not f.matches([{"pid": 1, "comm": "x", "identity": junk}])


def test_record_people_names_holders_listener_closer_and_task():
    rec = {"owners": [{"pid": 1, "comm": "a"}, None],
           "listener": {"owners": [{"pid": 2, "comm": "b"}]},
           "closed_by": {"pid": 3, "comm": "c"}, "task": None}
    assert [p["pid"] for p in record_people(rec)] == [1, 2, 3]
    people = record_people(rec, {1: IDENT})
    assert people[0]["identity"] == IDENT and people[1]["identity"] is None
    assert record_people({"owners": "junk", "listener": [1]}) == []


def test_validate_container():
    assert validate_container(" AB12cd ") == "ab12cd"
    for bad in ("abc", "xyz123", ""):
        with pytest.raises(ValueError):
            validate_container(bad)


def test_filters_round_trip_through_a_start_record_and_say_what_they_keep():
    sockets = SocketFilter(lports=(80,), family=socket.AF_INET)
    holders = HolderFilter(pids=(7,), comms=("java",), units=("web",))
    d = {**sockets.as_dict(), **holders.as_dict()}
    assert SocketFilter.from_dict(d) == sockets and HolderFilter.from_dict(d) == holders
    assert describe_filters(d) == "local port 80; ipv4 only; pid 7; comm java; unit web"
    assert describe_filters(sockets.as_dict()) == "local port 80; ipv4 only"
    assert HolderFilter().as_dict() == {}        # no holder filter: the record is as before


def test_holder_filter_from_a_hostile_dict():
    assert HolderFilter.from_dict({"pids": [1, "2", True, None], "comms": "x",
                                   "units": [["a"]]}) == HolderFilter(pids=(1,))
    assert HolderFilter.from_dict([1]) == HolderFilter()
    assert describe_filters("junk") == ""
