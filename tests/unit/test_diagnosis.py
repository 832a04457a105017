import socket

import pytest

from closewait_trace.evidence import diagnosis as d
from closewait_trace.sockets import owners, procfs
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints
from tests.unit.fakeproc import FakeProc

V4 = socket.AF_INET
EP = Endpoints(V4, "127.0.0.1", 5555, "127.0.0.1", 40000)


@pytest.fixture
def fake(tmp_path):
    return FakeProc(tmp_path)


def diagnose_fake(fake, endpoints=EP):
    own = owners.resolve([endpoints], fake.root)[endpoints]
    return d.gather(own, fake.root, machine="x86_64")


def with_socket(fake, pid, fd=5, rx=1, cloexec=False, **proc):
    fake.process(pid, **proc)
    fake.tcp(pid, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, tcpstates.CLOSE_WAIT, 900, rx=rx)
    fake.fd(pid, fd, 900, cloexec=cloexec)


def test_stopped(fake):
    with_socket(fake, 10, state="T")
    got = diagnose_fake(fake)
    assert got.cause == d.STOPPED and "10/srv" in got.summary


def test_traced_names_the_tracer(fake):
    fake.process(99, comm="strace")
    with_socket(fake, 10, state="t", tracer_pid=99)
    got = diagnose_fake(fake)
    assert got.cause == d.TRACED and "99/strace" in got.summary


def test_zombie_or_exiting(fake):
    with_socket(fake, 10, state="S", flags=0x4)
    assert diagnose_fake(fake).cause == d.EXITING


def test_two_holders_is_a_leak(fake):
    with_socket(fake, 10)
    fake.process(11, ppid=10).fd(11, 8, 900)
    got = diagnose_fake(fake)
    assert got.cause == d.LEAKED and [h["pid"] for h in got.evidence["holders"]] == [10, 11]


@pytest.mark.parametrize("state, cause", [("S", d.LEAKED), ("T", d.STOPPED)])
def test_a_socket_shared_by_many_forks_names_a_few_and_counts_the_rest(fake, state, cause):
    """One socket held by 3,001 forks once made a 60 KB summary, repeated in
    every line and record about it; the evidence keeps every holder."""
    with_socket(fake, 10, state=state)
    for pid in range(11, 11 + 300):
        fake.process(pid, ppid=10, state=state).fd(pid, 5, 900)
    got = diagnose_fake(fake)
    assert got.cause == cause
    assert got.summary.endswith(f" and {301 - d.MAX_NAMED} more"), got.summary
    assert got.summary.count("/srv") == d.MAX_NAMED
    assert len(got.summary) < 300
    assert len(got.evidence["holders"]) == 301


def test_inherited_without_cloexec_by_a_non_server(fake):
    fake.process(10, comm="server")
    fake.tcp(10, V4, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 500)
    fake.fd(10, 3, 500)
    with_socket(fake, 12, comm="sleep", ppid=10, cloexec=False,
                threads={12: ("S", "230 0x0 0x1", "hrtimer_nanosleep")})
    got = diagnose_fake(fake)
    assert got.cause == d.LEAKED
    assert got.summary == "inherited by 12/sleep fd 5 (no close-on-exec) from 10/server"
    assert got.evidence["holders"] == [{"pid": 12, "fd": 5}]
    # The one-line text (80 columns) keeps the server with 5-digit pids and
    # the comms of a real case (it was cut: "the server is 11…").
    from closewait_trace.output import render
    rec = {"type": "linger", "ts": 1.0, "time": "", "laddr": "127.0.0.1", "lport": 5555,
           "raddr": "127.0.0.1", "rport": 40000, "age_s": 2.0, "age_source": "traced",
           "owners": [{"pid": 13132, "comm": "sleep", "fd": 4, "state": "S"}],
           "owner_kind": "fd", "diagnosis": {"cause": "leaked", "summary": got.summary
                                             .replace("12/sleep", "13132/sleep")
                                             .replace("10/server", "11642/python3")
                                             .replace("fd 5", "fd 4")}}
    assert render.TextRenderer().render(rec)[1].endswith(" from 11642/python3"), rec
    assert got.holder_facts()[(12, 5)]["cloexec"] is False


def test_another_users_listener_on_its_port_is_not_where_it_was_inherited_from(fake):
    """Any user may listen on root's port where the kernel allows it (the
    IPv6 wildcard with IPV6_V6ONLY beside root's v4-mapped client socket,
    or after root's server closed its listener): root's socket was said
    "inherited ... from" the squatter's process. An accepted socket has its
    listener's uid (the kernel's sk_uid): another user's listener is not
    its listener."""
    fake.process(20, comm="squat", uid=65534)
    fake.tcp(20, V4, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 500, uid=65534)
    fake.fd(20, 3, 500)
    fake.process(12, comm="client", uid=0, threads={12: ("S", "230 0x0 0x1", "hrtimer")})
    fake.tcp(12, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, tcpstates.CLOSE_WAIT, 900,
             rx=1, uid=0)
    fake.fd(12, 5, 900, cloexec=False)
    own = owners.resolve([EP], fake.root)[EP]
    assert own.listener is None and not own.listener_holders
    got = d.gather(own, fake.root, machine="x86_64")
    assert "inherited" not in got.summary and "20/squat" not in got.summary, got.summary
    assert "accepting_process" not in got.evidence


def test_a_socket_the_kernel_saw_connected_is_not_inherited_from_a_listener(fake):
    """A listener of the same user on its port (its own server, say): a
    socket the kernel saw connect()ed was never accepted from it."""
    fake.process(10, comm="server")
    fake.tcp(10, V4, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 500)
    fake.fd(10, 3, 500)
    with_socket(fake, 12, comm="client", ppid=1, cloexec=False,
                threads={12: ("S", "230 0x0 0x1", "hrtimer_nanosleep")})
    own = owners.resolve([EP], fake.root)[EP]
    opened = d.Opener(pid=12, place="main (client)", none_read=False)
    got = d.gather(own, fake.root, machine="x86_64", opener=opened)
    assert "inherited" not in got.summary, got.summary
    # Without the kernel's word, as before.
    assert d.gather(own, fake.root, machine="x86_64").summary.startswith("inherited by 12/")


def test_never_accepted_names_each_listening_process_once(fake):
    """A process with its listener dup()ed was named once per fd ("held by
    10/srv [S], 10/srv [S], ... and 72 more"), its fds counted as more."""
    fake.process(10).process(11, ppid=10)
    fake.tcp(10, V4, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 500)
    for fd in range(3, 10):
        fake.fd(10, fd, 500)
    fake.fd(11, 3, 500)
    fake.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, tcpstates.CLOSE_WAIT, 0, rx=1)
    got = diagnose_fake(fake)
    assert got.cause == d.NEVER_ACCEPTED
    assert got.summary.endswith(", held by 10/srv [S], 11/srv [S]"), got.summary


def test_a_zombie_leader_whose_threads_live_on_is_not_exiting(fake):
    """A process whose main thread called pthread_exit() is a zombie leader
    (stat Z, PF_EXITING) while its other threads go on and hold the socket:
    it was "holder exiting" for as long as it lived."""
    with_socket(fake, 10, state="Z", flags=0x4,
                threads={10: ("Z", "running", "0"), 13: ("S", "230 0x0 0x1", "hrtimer")})
    fake.process(11, ppid=10).fd(11, 8, 900)
    got = diagnose_fake(fake)
    assert got.cause == d.LEAKED, got.summary


def test_polling_server_ignores_eof_and_shows_unread(fake):
    with_socket(fake, 10, rx=14, threads={10: ("S", "232 0x4 0x7ff 0x1", "ep_poll")})
    got = diagnose_fake(fake)
    assert got.cause == d.IGNORING_EOF
    assert "13 unread bytes" in got.summary
    assert owners.resolve([EP], fake.root)[EP].unread_bytes == 13


def test_accept_loop_is_serving(fake):
    with_socket(fake, 10, threads={10: ("S", "43 0x3 0x0", "inet_csk_accept")})
    assert diagnose_fake(fake).cause == d.IGNORING_EOF


def test_blocked_elsewhere_in_pause(fake):
    with_socket(fake, 10, threads={10: ("S", "34 0x0 0x0", "sys_pause")})
    got = diagnose_fake(fake)
    assert got.cause == d.BLOCKED_ELSEWHERE and "pause" in got.summary


def test_read_on_a_pipe_is_blocked_elsewhere(fake):
    with_socket(fake, 10, threads={10: ("S", "0 0x7 0x0 0x10", "pipe_read")})
    fake.fd(10, 7, target="pipe:[31337]")
    got = diagnose_fake(fake)
    assert got.cause == d.BLOCKED_ELSEWHERE and "pipe:[31337]" in got.summary


def test_a_thread_reading_its_own_tables_fd_reads_that_not_the_leaders(fake):
    """A thread that called unshare(CLONE_FILES) has a table of its own: its
    read() on fd 5 is of its own fd 5 (a pipe), not of the leader's fd 5
    (the socket in CLOSE_WAIT). It was "alive (read) but never closes ...
    EOF unread", the socket said read by a thread blocked on a pipe (a
    review)."""
    with_socket(fake, 10, threads={10: ("S", "34 0x0 0x0", "sys_pause"),
                                   11: ("S", "0 0x5 0x0 0x10", "pipe_read")})
    fake.fd(10, 5, target="pipe:[31337]", tid=11)
    got = diagnose_fake(fake)
    assert got.cause == d.BLOCKED_ELSEWHERE, got.summary


def test_never_accepted(fake):
    fake.process(20, comm="lazy")
    fake.tcp(20, V4, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 500, rx=2)
    fake.tcp(20, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, tcpstates.CLOSE_WAIT, 0)
    fake.fd(20, 3, 500)
    got = diagnose_fake(fake)
    assert got.cause == d.NEVER_ACCEPTED and "20/lazy" in got.summary
    assert got.evidence == {"holders": [], "listener_holders": [{"pid": 20, "fd": 3}]}
    assert owners.resolve([EP], fake.root)[EP].listener.rx_queue == 2


def test_gone_and_unknown(fake):
    fake.process(30)
    assert diagnose_fake(fake).cause == d.GONE
    fake.tcp(30, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, tcpstates.CLOSE_WAIT, 901)
    assert diagnose_fake(fake).cause == d.UNKNOWN


def test_parse_syscall():
    assert procfs.parse_syscall("running") == procfs.NOT_IN_SYSCALL
    assert procfs.parse_syscall("-1 0x7ffd 0x4011") == procfs.SyscallLine(None, None, 0x7ffd, 0x4011)
    assert procfs.parse_syscall("7 0x55d0 0x2 0xffffffff 0 0 0 0x7ffc 0x7f00") == \
        procfs.SyscallLine(7, 0x55d0, 0x7ffc, 0x7f00)
    assert d.syscall_name(34, "x86_64") == "pause"


def test_a_serving_thread_after_the_sixteenth_is_seen(fake):
    """Red-team finding: only the first 16 threads were examined, so a server
    whose accept thread came later was called blocked_elsewhere, as a fact.
    The cause is decided over up to MAX_EXAMINED threads; 16 are listed."""
    threads = {10 + i: ("S", "230 0x0 0x0", "hrtimer_nanosleep") for i in range(20)}
    threads[40] = ("S", "288 0x3 0x0 0x0", "inet_csk_accept")       # accept4 on fd 3
    with_socket(fake, 10, threads=threads)
    got = diagnose_fake(fake)
    assert got.cause == d.IGNORING_EOF, got.summary
    assert "accept4" in got.summary


def test_blocked_elsewhere_says_when_not_every_thread_was_examined(fake, monkeypatch):
    monkeypatch.setattr(d, "MAX_EXAMINED", 4)
    threads = {10 + i: ("S", "230 0x0 0x0", "hrtimer_nanosleep") for i in range(6)}
    with_socket(fake, 10, threads=threads)
    got = diagnose_fake(fake)
    assert got.cause == d.BLOCKED_ELSEWHERE
    assert got.summary.endswith("; only 4 of its 6 threads examined"), got.summary


@pytest.mark.parametrize("idle", [("34 0x0 0x0", "sys_pause"),            # a sleep loop
                                  ("232 0x4 0x7ff 0x1", "ep_poll")])     # an event loop
def test_a_connection_the_holder_opened_and_never_read_is_never_read_whatever_it_idles_in(
        fake, idle):
    """Issue 18 §3: the same client leak was `blocked_elsewhere` with a
    sleep loop and `ignoring_eof` with a select loop. With the kernel's word
    that this process connect()ed it and no read came since the peer closed,
    it is one cause, whatever the idle call."""
    with_socket(fake, 10, threads={10: ("S",) + idle})
    own = owners.resolve([EP], fake.root)[EP]
    opener = d.Opener(pid=10, place="fetch_user (client.py:6)", none_read=True)
    got = d.gather(own, fake.root, machine="x86_64", opener=opener)
    assert got.cause == d.NEVER_READ
    assert got.summary == ("never read since the peer closed; opened by fetch_user "
                           "(client.py:6): 10/srv fd 5")
    # Not watched (no EOF capture on this kernel, or older than the trace),
    # or opened by another process: no such claim.
    for other in (d.Opener(pid=10, place="fetch_user (client.py:6)", none_read=False),
                  d.Opener(pid=11, place="x", none_read=True)):
        assert d.gather(own, fake.root, machine="x86_64", opener=other).cause != d.NEVER_READ


def test_sockets_with_the_same_diagnosis_share_one_summary_string(fake):
    """100,000 sockets of one holder read the same: one string, not one per
    socket (about 300 bytes of each socket's state, issue 20)."""
    with_socket(fake, 10, threads={10: ("S", "34 0x0 0x0", "sys_pause")})
    first, second = diagnose_fake(fake), diagnose_fake(fake)
    assert first.summary == second.summary and "pause" in first.summary
    assert first.summary is second.summary


def test_a_process_that_stopped_itself_is_seen_in_kill_not_a_number():
    """A Python holder that ran os.kill(os.getpid(), SIGSTOP) showed
    "thread 7375 [T] syscall_62" in snapshot -v (a newcomer's incident):
    the calls that send a signal are named, on both machines."""
    assert [d.syscall_name(n, "x86_64") for n in (62, 200, 234)] == ["kill", "tkill", "tgkill"]
    assert [d.syscall_name(n, "aarch64") for n in (129, 130, 131)] == ["kill", "tkill", "tgkill"]
    assert d.syscall_name(9999, "x86_64") == "syscall_9999"


def test_where_a_thread_waits_is_decided_once_for_every_socket_of_its_process(monkeypatch):
    """The sockets of one holder share its threads' evidence: where a thread
    waits, and whether in the program's own Python code, is worked out at
    the first socket and reused (each cost the loop 3 us a socket at
    100,000), with the same summary for each."""
    from closewait_trace.evidence import pyframes
    asked = []
    real = pyframes.PyFrame.own_code.fget
    monkeypatch.setattr(pyframes.PyFrame, "own_code",
                        property(lambda self: asked.append(self) or real(self)))
    lib = pyframes.PyFrame("join", "/usr/lib/python3.11/threading.py", 1112)
    own_frame = pyframes.PyFrame("process_batch", "/srv/app/worker.py", 42)
    threads = [d.ThreadEvidence(tid=10, state="S", syscall=202, syscall_name="futex",
                                python=[lib]),
               d.ThreadEvidence(tid=11, state="S", syscall=202, syscall_name="futex",
                                python=[own_frame])]
    summaries = set()
    for fd in range(3, 103):
        own = owners.Ownership(kind=owners.OWNER_FD, inode=900 + fd, rx_queue=1)
        h = d.HolderEvidence(pid=10, comm="app", fd=fd, state="S", ppid=1, cmdline="app",
                             threads=threads, threads_total=2)
        got = d.diagnose(own, [h], [], machine="x86_64")
        assert got.cause == d.BLOCKED_ELSEWHERE
        summaries.add(got.summary.replace(f"fd {fd}", "fd N"))
    assert summaries == {"blocked in futex at process_batch (worker.py:42): 10/app"}
    # Once per thread (and per frame it describes), not once per socket.
    assert len(asked) <= 4, len(asked)


def test_sockets_of_one_listener_share_one_listener_tuple_in_a_batch(fake):
    """The sockets accepted from one listener keep one tuple of its holders'
    evidence, not a list each (issue 20: about 90 bytes of every lingering
    socket's state at 100,000), and their holders as a tuple."""
    fake.process(20, comm="srv")
    fake.tcp(20, V4, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 500)
    fake.fd(20, 3, 500)
    for port, inode, fd in ((40000, 900, 5), (40001, 901, 6)):
        fake.tcp(20, V4, "127.0.0.1", 5555, "127.0.0.1", port, tcpstates.CLOSE_WAIT, inode)
        fake.fd(20, fd, inode)
    eps = [EP, Endpoints(V4, "127.0.0.1", 5555, "127.0.0.1", 40001)]
    found = owners.resolve(eps, fake.root)
    cache = d.Batch()
    first, second = (d.gather(found[ep], fake.root, machine="x86_64", cache=cache)
                     for ep in eps)
    assert [h.fd for h in first._holders] == [5] and [h.fd for h in second._holders] == [6]
    assert type(first._holders) is tuple
    assert [h.pid for h in first._listeners] == [20]
    assert first._listeners is second._listeners
    # Another batch builds its own.
    third = d.gather(found[eps[0]], fake.root, machine="x86_64", cache=d.Batch())
    assert third._listeners == first._listeners and third._listeners is not first._listeners


def test_a_leak_names_each_process_once_whatever_its_fds(tmp_path):
    """A process that dup()ed the shared socket took one of the summary's
    MAX_NAMED names per fd: the others holding it went unnamed, and "and N
    more" counted fds and processes together."""
    fake = FakeProc(str(tmp_path / "proc"))
    fake.process(10, comm="server")
    fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000,
             tcpstates.CLOSE_WAIT, 900, rx=1)
    for fd in range(3, 7):
        fake.fd(10, fd, 900)                    # four fds of one process
    for pid in range(20, 28):
        fake.process(pid, comm="child", ppid=10)
        fake.fd(pid, 5, 900)
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", 40000)
    got = d.gather(owners.resolve([ep], fake.root)[ep], fake.root, machine="x86_64")
    assert got.cause == d.LEAKED
    assert got.summary == ("held by 9 processes: 10/server fd 3,4,5,6, "
                           + ", ".join(f"{pid}/child fd 5" for pid in range(20, 27))
                           + " and 1 more")


def test_written_diagnoses_are_shared_within_their_bounds():
    """Written diagnoses are shared by cause and summary (issue 20: one
    object per socket was 8 MB at 100,000), in a table that other users'
    names cannot grow past WRITTEN_SHARED_MAX entries of at most
    SHARED_SUMMARY_MAX_CHARS each: a longer summary's diagnosis is each
    socket's own."""
    pid = 7
    same = [d.Diagnosis(d.UNKNOWN, f"held by {pid}/app") for _ in range(3)]   # 3 texts
    kept = {id(x.written()) for x in same}
    assert len(kept) == 1
    with pytest.raises(d.EvidenceWritten):
        same[2].written().as_dict()
    other = d.Diagnosis(d.STOPPED, f"held by {pid}/app").written()
    assert id(other) not in kept and other.cause == d.STOPPED
    for i in range(3 * d.WRITTEN_SHARED_MAX):
        d.Diagnosis(d.UNKNOWN, f"held by {i}/app").written()
        assert len(d._written_shared) <= d.WRITTEN_SHARED_MAX
    long_text = "x" * (d.SHARED_SUMMARY_MAX_CHARS + 1)
    a, b = d.Diagnosis(d.UNKNOWN, long_text + "!"), d.Diagnosis(d.UNKNOWN, long_text + "!")
    assert a.written() is a and b.written() is b
    assert (d.UNKNOWN, long_text + "!") not in d._written_shared


def test_summaries_are_shared_from_a_bounded_table_not_interned(fake):
    """Equal summaries are one string (the sockets of one holder), but not
    through sys.intern: on CPython 3.12.0-3.12.4 (Ubuntu 24.04's) and on
    free-threaded builds interned strings are immortal, and a summary
    names other users' processes and fds, so each distinct one stayed for
    the tracer's whole life (a review). The table is bounded as the
    written diagnoses' is."""
    import sys
    fake.process(10, comm="app", state="T")
    fake.tcp(10, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, tcpstates.CLOSE_WAIT, 900)
    fake.fd(10, 3, 900)
    first, second = diagnose_fake(fake), diagnose_fake(fake)
    assert first.summary == second.summary and first.summary is second.summary
    copy = "".join(list(first.summary))
    assert sys.intern(copy) is not first.summary        # not in the interpreter's table
    for i in range(3 * d.WRITTEN_SHARED_MAX):
        d.shared_summary(f"held by {i}/app")
        assert len(d._summaries) <= d.WRITTEN_SHARED_MAX
    long_text = "y" * (d.SHARED_SUMMARY_MAX_CHARS + 1)
    assert long_text not in d._summaries and d.shared_summary(long_text) == long_text
    assert long_text not in d._summaries
