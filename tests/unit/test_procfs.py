"""Gone vs denied, pid reuse and hostile process names over a fake /proc."""

import errno
import json
import os
import shutil
import socket

import pytest

from closewait_trace.evidence import diagnosis as d
from closewait_trace.sockets import owners, procfs
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints
from tests.unit.fakeproc import Denials, FakeProc

V4 = socket.AF_INET
CW = tcpstates.CLOSE_WAIT
EP = Endpoints(V4, "127.0.0.1", 5555, "127.0.0.1", 40000)


@pytest.fixture
def fake(tmp_path):
    return FakeProc(tmp_path)


@pytest.fixture
def denials(monkeypatch):
    return Denials(monkeypatch)


def held_socket(fake, pid, fd=5, inode=900, **proc):
    fake.process(pid, **proc)
    fake.tcp(pid, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, CW, inode, rx=1)
    fake.fd(pid, fd, inode)


def resolve_and_diagnose(fake):
    own = owners.resolve([EP], fake.root)[EP]
    return own, d.gather(own, fake.root, machine="x86_64", cache=d.Batch())


# ----------------------------------------------------------- gone vs denied

@pytest.mark.parametrize("err, kind", [(errno.ENOENT, "NoSuchProcess"),
                                       (errno.ESRCH, "NoSuchProcess"),
                                       (errno.EACCES, "AccessDenied"),
                                       (errno.EPERM, "AccessDenied"),
                                       (errno.EIO, "ProcError")])
def test_errors_keep_gone_and_denied_apart(monkeypatch, err, kind):
    kind = getattr(procfs, kind)
    def failing(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, "readlink", failing)
    with pytest.raises(kind) as raised:
        procfs.readlink("/proc/1/fd/0")
    assert type(raised.value) is kind and raised.value.errno == err


def test_missing_file_is_gone(tmp_path):
    with pytest.raises(procfs.NoSuchProcess):
        procfs.read_process(424242, str(tmp_path))


def test_denied_fd_table_is_unknown_never_unheld(fake, denials):
    """The socket is held (by 10), but 10's fd table gives EACCES: the owner
    is unknown, not 'no process holds it'."""
    held_socket(fake, 10)
    fake.process(11)
    denials.deny(f"{fake.root}/10/fd")
    own, diag = resolve_and_diagnose(fake)
    assert "no process holds" not in diag.summary
    assert diag.summary == "unknown: permission denied reading 1 process' file descriptors"
    assert diag.cause == d.UNKNOWN
    assert own.kind == owners.OWNER_DENIED and own.denied_processes == 1
    assert diag.evidence["denied_processes"] == 1


def test_denied_fd_links_count_too(fake, denials):
    """With CAP_DAC_READ_SEARCH but not CAP_SYS_PTRACE the fd table lists,
    but every link in it gives EACCES."""
    held_socket(fake, 10)
    denials.deny(f"{fake.root}/10/fd/5")
    own, diag = resolve_and_diagnose(fake)
    assert "permission denied reading 1 process'" in diag.summary
    assert own.kind == owners.OWNER_DENIED and own.denied_processes == 1


def test_holders_found_while_others_denied_says_the_list_may_be_incomplete(fake, denials):
    held_socket(fake, 10)
    for pid in (11, 12):
        fake.process(pid)
        denials.deny(f"{fake.root}/{pid}/fd")
    own, diag = resolve_and_diagnose(fake)
    assert own.kind == owners.OWNER_FD and [h.pid for h in own.holders] == [10]
    # Named, so that an on-call can look at them (the comm is fakeproc's).
    assert diag.summary.endswith("; holders may be missing: permission denied reading "
                                 "2 other processes (11/srv, 12/srv)"), diag.summary
    assert own.denied_processes == 2


def test_past_a_few_denied_processes_the_rest_are_counted(fake, denials):
    held_socket(fake, 10)
    for pid in range(11, 16):
        fake.process(pid)
        denials.deny(f"{fake.root}/{pid}/fd")
    _own, diag = resolve_and_diagnose(fake)
    assert diag.summary.endswith("permission denied reading 5 other processes "
                                 "(11/srv, 12/srv, 13/srv and 2 more)"), diag.summary


def test_socket_in_a_namespace_we_may_not_read_is_unknown_not_gone(fake, denials):
    fake.process(1, netns=111)
    held_socket(fake, 30, netns=222)
    denials.deny(f"{fake.root}/30/ns/net")
    own, diag = resolve_and_diagnose(fake)
    assert diag.cause == d.UNKNOWN and "no longer in CLOSE_WAIT" not in diag.summary
    assert "permission denied reading 1 process' namespaces" in diag.summary
    assert own.kind == owners.OWNER_DENIED and own.netns_denied == 1
    assert own.eof_read is False       # queue unknown: not claimed read


def test_a_socket_not_in_its_own_namespace_read_whole_is_gone_whoever_is_hidden(fake, denials):
    """Its namespace is known and was read: not there, it has left
    CLOSE_WAIT, whatever the namespaces of processes we may not read. It
    was "unknown: not found in the network namespaces we may read" and
    reported lingering, as soon as any one process's namespace was
    unreadable (pid 1's is, even for root, on some machines)."""
    fake.process(1, netns=111)                       # in 111: read, the socket not there
    fake.process(30, netns=222)
    denials.deny(f"{fake.root}/30/ns/net")
    ep = EP.in_netns(111)
    own = owners.resolve([ep], fake.root)[ep]
    assert own.kind == owners.OWNER_GONE
    # Its namespace not known: any hidden one may have it.
    assert owners.resolve([EP], fake.root)[EP].kind == owners.OWNER_DENIED


def test_unheld_socket_with_full_privileges_is_still_none(fake):
    fake.process(40)
    fake.tcp(40, V4, "127.0.0.1", 5555, "127.0.0.1", 40000, CW, 4242)
    own, diag = resolve_and_diagnose(fake)
    assert own.kind == owners.OWNER_NONE and own.denied_processes == 0
    assert diag.summary == "no process holds a file descriptor on it"


# ------------------------------------------------------------------ races

def after_first_readlink(monkeypatch, link_path, action):
    """Run action right after the fd scan first reads link_path: the race
    between the scan and the reads that follow it, made deterministic."""
    real = os.readlink
    done = []

    def racing(path, *args, dir_fd=None, **kwargs):
        value = real(path, *args, dir_fd=dir_fd, **kwargs)
        # The scan reads each link relative to its open fd directory.
        full = (os.path.join(real(f"/proc/self/fd/{dir_fd}"), path) if dir_fd is not None
                else path)
        if full == link_path and not done:
            done.append(True)
            action()
        return value

    monkeypatch.setattr(os, "readlink", racing)


def test_holder_exiting_between_fd_scan_and_stat_read_is_a_missing_row(fake, monkeypatch):
    held_socket(fake, 50)
    fake.process(51).fd(51, 3, 900)
    after_first_readlink(monkeypatch, f"{fake.root}/51/fd/3",
                         lambda: shutil.rmtree(f"{fake.root}/51"))
    own, diag = resolve_and_diagnose(fake)
    assert [h.pid for h in own.holders] == [50]


def test_pid_reused_between_fd_scan_and_stat_read_is_not_named(fake, monkeypatch):
    """The holder exits after its fd was seen and a new, unrelated process
    gets its pid before the stat read: the new process must not be named."""
    held_socket(fake, 60, comm="holder")

    def reuse():
        shutil.rmtree(f"{fake.root}/60")
        fake.process(60, comm="newcomer", start_time=999)
        fake.fd(60, 5, target="/dev/null")

    after_first_readlink(monkeypatch, f"{fake.root}/60/fd/5", reuse)
    own, diag = resolve_and_diagnose(fake)
    assert list(own.holders) == []
    assert "newcomer" not in diag.summary


def test_pid_reused_before_the_diagnosis_reads_threads(fake):
    """The holder is found, then exits and its pid is reused before its
    threads are read: the newcomer's threads must not explain the socket."""
    held_socket(fake, 70, comm="holder", start_time=500)
    own = owners.resolve([EP], fake.root)[EP]
    shutil.rmtree(f"{fake.root}/70")
    fake.process(70, comm="newcomer", start_time=777,
                 threads={70: ("S", "34 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffc 0x7f00", "pause")})
    diag = d.gather(own, fake.root, machine="x86_64", cache=d.Batch())
    assert diag.cause == d.UNKNOWN and "exited while inspected" in diag.summary
    assert "pause" not in diag.summary
    cache = d.Batch()
    d.gather(own, fake.root, machine="x86_64", cache=cache)
    (process,) = d.process_evidence(cache)
    assert process["threads"] == [] and process["unreadable"] == "gone"


def test_each_process_is_read_once_per_batch(fake, monkeypatch):
    """Two sockets held by one process: its stat/status/cmdline and each
    thread's syscall are read once."""
    fake.process(80, threads={80: ("S", "232 0x3 0x0 0x0 0x0 0x0 0x0 0x7ffc 0x7f00", "ep")})
    for port, inode in ((5555, 901), (5556, 902)):
        fake.tcp(80, V4, "127.0.0.1", port, "127.0.0.1", 40000, CW, inode)
        fake.fd(80, inode - 890, inode)
    reads: list = []
    real = procfs.read_bytes

    def counting(path, limit=procfs.MAX_SMALL_FILE, dir_fd=None):
        reads.append(path)
        return real(path, limit, dir_fd)

    monkeypatch.setattr(procfs, "read_bytes", counting)
    eps = [EP, Endpoints(V4, "127.0.0.1", 5556, "127.0.0.1", 40000)]
    resolved = owners.resolve(eps, fake.root)
    cache = d.Batch()
    for ep in eps:
        assert d.gather(resolved[ep], fake.root, machine="x86_64", cache=cache).cause == d.IGNORING_EOF
    for name in ("stat", "status", "cmdline", "task/80/stat", "task/80/syscall"):
        assert reads.count(name) == 1, (name, reads)


# -------------------------------------------------------- hostile content

HOSTILE_COMM = "a) R 1 (b\n\x1b]0;x\x07 c"


def test_parse_stat_takes_comm_up_to_the_last_paren():
    text = f"42 ({HOSTILE_COMM}) S 7 42 42 0 -1 4 " + "0 " * 8 + "20 0 1 0 12345 0 0\n"
    stat = procfs.parse_stat(text)
    assert stat == procfs.Stat(comm=HOSTILE_COMM, state="S", ppid=7, flags=4, start_time=12345)
    assert procfs.parse_stat("42 (x") is None and procfs.parse_stat("") is None
    assert procfs.parse_stat("42 )x( S 1") is None


def test_hostile_comm_and_non_utf8_bytes_are_kept(fake):
    held_socket(fake, 90, comm=HOSTILE_COMM)
    # A name and an argument that are not UTF-8: kept byte for byte (the
    # renderer escapes them), never replaced by U+FFFD.
    stat_path = f"{fake.root}/90/stat"
    with open(stat_path, "rb") as f:
        raw = f.read()
    with open(stat_path, "wb") as f:
        f.write(raw.replace(b"(a)", b"(\xff\xfea)", 1))
    with open(f"{fake.root}/90/cmdline", "wb") as f:
        f.write(b"srv\0--name=\xc3\x28\0")
    own, diag = resolve_and_diagnose(fake)
    (holder,) = own.holders
    assert holder.comm == "\udcff\udcfe" + HOSTILE_COMM
    assert holder.comm.encode("utf-8", "surrogateescape") == b"\xff\xfe" + HOSTILE_COMM.encode()
    assert holder.cmdline.encode("utf-8", "surrogateescape") == b"srv --name=\xc3\x28"
    json.dumps(diag.as_dict())          # JSON stays writable (\udcff escapes)


def test_huge_cmdline_is_read_up_to_a_cap(fake, monkeypatch):
    held_socket(fake, 91)
    with open(f"{fake.root}/91/cmdline", "wb") as f:
        f.write(b"python\0" + b"A" * (8 << 20) + b"\0")
    own = owners.resolve([EP], fake.root)[EP]
    (holder,) = own.holders
    assert len(holder.cmdline) == procfs.MAX_CMDLINE + len(procfs.CMDLINE_TRUNCATED)
    assert holder.cmdline.startswith("python AAAA") and holder.cmdline.endswith(" [...]")


def test_empty_or_garbage_stat_is_gone_not_a_crash(fake):
    held_socket(fake, 92)
    with open(f"{fake.root}/92/stat", "w") as f:
        f.write("garbage without parens\n")
    own = owners.resolve([EP], fake.root)[EP]
    assert list(own.holders) == [] and own.kind == owners.OWNER_NONE


def test_parse_cmdline_and_syscall():
    assert procfs.parse_cmdline(b"a\0b c\0\0") == "a b c"
    assert procfs.parse_cmdline(b"") == ""
    assert procfs.parse_syscall("-1 0x1 0x2") == procfs.SyscallLine(None, None, 1, 2)
    assert procfs.parse_syscall("zz 0x1") == procfs.NOT_IN_SYSCALL
    assert procfs.parse_syscall("7 nothex") == procfs.SyscallLine(7, None, None, None)


def test_a_batchs_failed_read_is_remembered_without_a_reference_cycle(tmp_path):
    """Review of 2026-12-05: the failed read was kept as the exception,
    whose traceback holds the frame that holds it (13 objects in a cycle
    per holder exiting mid-lookup, pinning the batch's frames), and the
    owner lookups run with the cyclic collector paused. The same error
    every time, read once."""
    from tests.unit.cycles import cycles_left
    with cycles_left() as left:
        batch = procfs.ProcBatch(str(tmp_path))
        for _ in range(3):
            with pytest.raises(procfs.NoSuchProcess) as raised:
                batch.process(4242)
            assert raised.value.path.endswith("4242") and raised.value.errno == errno.ENOENT
            del raised
        os.mkdir(tmp_path / "4242")         # appears now: not read again in this batch
        with pytest.raises(procfs.NoSuchProcess):
            batch.process(4242)
        del batch                           # the lookup ends
    assert left.count == 0, left.kinds
