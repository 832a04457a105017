"""Whose share a uid is counted in (sockets/subids.py): a subordinate uid
(/etc/subuid, for rootless containers) as the user root lent it to,
wherever users take turns or share places: the owner lookup's fd walk, the
other namespaces' turns, the CPython scan and its map, the metrics
endpoint's connections. A user with 65,536 subordinate uids had as many
shares as everyone else together had users."""

import os
import socket

import pytest

from closewait_trace.evidence import pyframes
from closewait_trace.output import scrape
from closewait_trace.sockets import owners, subids
from tests.unit.fakeproc import FakeProc

PASSWD = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n" \
         "bob:x:1001:1001::/home/bob:/bin/sh\n"
SUBUID = "alice:100000:65536\nbob:165536:65536\n"


@pytest.fixture
def lent(tmp_path, monkeypatch):
    """Root's two files in tmp_path, used as /etc/subuid and /etc/passwd."""
    def write(subuid: str = SUBUID, passwd: str = PASSWD) -> None:
        (tmp_path / "subuid").write_text(subuid)
        (tmp_path / "passwd").write_text(passwd)
        # A new mtime even within the file system's clock's resolution.
        for name in ("subuid", "passwd"):
            st = os.stat(tmp_path / name)
            os.utime(tmp_path / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    write()
    monkeypatch.setattr(subids, "SUBUID", str(tmp_path / "subuid"))
    monkeypatch.setattr(subids, "PASSWD", str(tmp_path / "passwd"))
    return write


def test_a_subordinate_uid_counts_as_its_users(lent):
    user_of = subids.shares().user_of
    assert [user_of(u) for u in (100000, 165535, 165536, 231071, 231072)] == \
        [1000, 1000, 1001, 1001, 231072]
    assert [user_of(u) for u in (0, 1000, 65534, 99999)] == [0, 1000, 65534, 99999]
    assert user_of(None) is None and user_of(-1) == -1


def test_the_files_lines_as_root_may_write_them():
    shares = subids.parse(
        "# comment\n"
        "2000:300000:10\n"             # a uid instead of a name
        "carol:400000:10\n"            # not in /etc/passwd: one share of its own
        "carol:500000:10\n"
        "bad line\nx:1:y\n:5:5\ndave:600000:0\n"
        "erin:4294967290:100\n",       # runs past the last uid
        PASSWD + "erin:x:1002:1002::/:/bin/sh\n")
    assert shares.user_of(300005) == 2000
    assert shares.user_of(400001) == shares.user_of(500001) == 400000
    assert shares.user_of(600000) == 600000
    assert shares.user_of(4294967295) == 1002
    assert len(shares) == 4


def test_overlapping_ranges_name_one_of_their_users():
    shares = subids.parse("alice:100000:100000\nbob:150000:10\n", PASSWD)
    assert shares.user_of(150005) in (1000, 1001)
    assert shares.user_of(180000) == 1000


def test_the_table_follows_the_files_and_a_file_too_large_is_not_read(lent, tmp_path):
    assert subids.shares().user_of(100000) == 1000
    lent(subuid="bob:100000:10\n")
    assert subids.shares().user_of(100000) == 1001
    lent(subuid="bob:100000:10\n" + "#" * subids.MAX_FILE_BYTES)
    assert subids.shares() is subids.NO_SHARES
    os.unlink(tmp_path / "subuid")
    assert subids.shares().user_of(100000) == 100000


def test_the_fd_walk_counts_a_users_containers_as_that_user(lent, tmp_path, monkeypatch):
    """Alice's 30 containers, each under a subordinate uid of its own and
    holding 10 fds, against bob's one process of 100: counted one user each
    they were 30 users of 10 fds, walked before bob; as alice's, 300 fds,
    walked after him."""
    fake = FakeProc(tmp_path / "proc")
    for i in range(30):
        fake.process(100 + i, comm="ctr", uid=100000 + i * 1000)
        for fd in range(3, 13):
            fake.fd(100 + i, fd, target="/dev/null")
    fake.process(50, comm="bob", uid=1001)
    for fd in range(3, 103):
        fake.fd(50, fd, target="/dev/null")
    monkeypatch.setattr(owners, "FDS_IN_ANY_ORDER", 20)
    order = owners.walk_order(fake.root)[0]
    assert order[0] == 50 and sorted(order[1:]) == list(range(100, 130))
    lent(subuid="")                     # no subordinate uids: as before
    assert owners.walk_order(fake.root)[0][-1] == 50


def test_namespace_turns_count_a_users_containers_as_that_user(lent):
    owner_of = {10 + i: 100000 + i for i in range(100)}     # alice's containers
    owner_of.update({5: 1001, 6: 1001})                     # bob's two
    order = owners.fair_order(owner_of, {})
    # One of alice's a turn: bob's second comes second, not 101st.
    assert set(order[:2]) & {5, 6} and set(order[2:4]) & {5, 6}
    assert sorted(order) == sorted(owner_of)


def test_the_cpython_scan_takes_turns_by_user_and_skips_a_user_whole(lent, monkeypatch):
    """The scan's queues by user: alice's processes under her subordinate
    uids are one queue; a user skipped (one of theirs blocked a read) is
    skipped under all of them."""
    uids = {11: 100001, 12: 100002, 13: 100003, 21: 1001}
    monkeypatch.setattr(pyframes.os, "listdir", lambda _p: [str(p) for p in uids])
    monkeypatch.setattr(pyframes.os, "readlink", lambda _p: "/usr/bin/python3.11")
    import time
    from closewait_trace.sockets import procfs
    monkeypatch.setattr(procfs, "real_uid", lambda pid, _proc=None: uids[pid])
    # Every process's stat "read", none of them CPython: the order only.
    monkeypatch.setattr(procfs, "read_bytes", lambda _p, *a, **k: b"")
    monkeypatch.setattr(procfs, "parse_stat", lambda _t: object())

    class NoImage:
        def __init__(self, *a): pass
        def close(self): pass
    monkeypatch.setattr("closewait_trace.evidence.procimage.ProcessImage", NoImage)
    monkeypatch.setattr(pyframes, "_runtime_or_none", lambda *a: None)
    read = [(pid, uid) for kind, pid, uid in pyframes.scan_python_processes(
        "/p", time.monotonic() + 5, 10) if kind == "reading"]
    # Turns: bob's one and one of alice's, then alice's others.
    assert {pid for pid, _uid in read[:2]} & {21} and len(read) == 4
    assert dict(read) == uids           # each reported under its own uid
    skipped = [pid for kind, pid, _x in pyframes.scan_python_processes(
        "/p", time.monotonic() + 5, 10, skip_uids=[100002]) if kind == "reading"]
    assert skipped == [21]


def test_the_metrics_places_count_a_subordinate_uid_as_its_user(lent, tmp_path):
    """SO_PEERCRED's uid, as the places are shared by: this process's uid
    lent to alice in the table, it is alice's connection."""
    lent(subuid=f"alice:{os.geteuid()}:1\n")
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert scrape._Peers(socket.AF_UNIX).key(a) == ("uid", 1000)
        lent(subuid="")
        assert scrape._Peers(socket.AF_UNIX).key(a) == ("uid", os.geteuid())
    finally:
        a.close()
        b.close()


def test_lookups_with_time_for_one_namespace_serve_a_users_containers_as_one_user(
        lent, monkeypatch):
    """Each lookup reads one other namespace and remembers whose it was
    (served, by the answer's netns_uid: other_turns' user). Alice's 50
    containers, each under a subordinate uid never served, came first at
    every lookup: bob's one namespace was read at the 51st (a review). As
    alice's, bob's comes at the 2nd."""
    alice = {1000 + i: [10 + i] for i in range(50)}
    namespaces = {**alice, 5: [5]}
    owner_of = {**{ns: 100000 + i for i, ns in enumerate(alice)}, 5: 1001}
    monkeypatch.setattr(owners, "namespace_users", lambda ns, own, proc: dict(owner_of))
    last_read, served = {}, {}
    for lookup in range(1, 60):
        turns, uid_of = owners.other_turns(namespaces, None, [], last_read, served)
        first = turns[0]
        last_read[first] = lookup
        served[uid_of[first]] = lookup
        if first == 5:
            break
    assert lookup == 2


class StuckWorker:
    """A worker of which one, blocked in alice's memory, was left behind:
    its tag, what the resolver gave it. What the resolver asks it to read
    is kept (and answered with nothing)."""

    def __init__(self, tag):
        self.tag = tag
        self.asked: list = []

    def stuck_tags(self):
        return {self.tag}

    def call(self, name, *args, **kw):
        self.asked.append((name, args))
        return []

    def tag_last_abandoned(self, tag):
        pass


def test_a_worker_stuck_in_one_of_a_users_containers_leaves_all_of_theirs_unread(lent):
    """MAX_STUCK_WORKERS bounds how many workers blocked in a user's memory
    the tracer keeps; while one is, that user's memory is not read again.
    Tagged and compared by raw uid, each container (a subordinate uid of
    its own) could block one more, and the rest were read (a review): now
    the tag is the user, and every uid of theirs compares as it."""
    from closewait_trace.evidence import resolver
    assert resolver._user(100001) == 1000 == resolver._user(1000)
    assert resolver._user(1001) == 1001 and resolver._user(None) is None
    worker = StuckWorker(resolver._user(100000))
    r = resolver.ProcResolver("/nonexistent", worker=worker)
    # The captures of alice's processes, under any of her uids, are not
    # read; bob's are.
    r.captured_stacks([(1, 12, 0, 0), (2, 13, 0, 0), (3, 14, 0, 0)],
                      uids={12: 100001, 13: 1000, 14: 1001})
    [(name, args)] = worker.asked
    assert name == "captured_stacks" and [c[1] for c in args[0]] == [14]


def test_odd_lines_in_either_file_are_skipped_not_raised(lent, tmp_path):
    """Digits Python's isdigit() takes and int() refuses ("6\u00b2"), 5,000
    of them, in either file: the line is skipped; the table still maps the
    good lines, and nobody who asks for it gets an error (the tracer would
    not start; the metrics endpoint's thread died, a review)."""
    lent(subuid="alice:100000:6\u00b2\n\u00b9\u00b2:100000:65536\n"
                f"{'9' * 5000}:1:1\nbob:{'1' * 5000}:5\nbob:165536:65536\n2000:300000:10\n",
         passwd=PASSWD.replace("bob:x:1001", "bob:x:1\u00b2") + f"carol:x:{'7' * 5000}:0::/:/bin/sh\n")
    shares = subids.shares()
    assert shares.user_of(300001) == 2000          # the good line
    assert shares.user_of(165537) == 165536        # bob's uid unreadable: his first
    assert shares.user_of(100000) == 100000        # alice's line skipped
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert scrape._Peers(socket.AF_UNIX).key(a)[0] == "uid"
    finally:
        a.close()
        b.close()
