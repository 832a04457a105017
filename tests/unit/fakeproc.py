"""A fake /proc tree on disk, for owner and diagnosis logic without root."""

import os
import socket
import struct


def hex_addr(family, addr: str) -> str:
    raw = socket.inet_pton(family, addr)
    # /proc prints each 32-bit word as a native (little-endian here) integer
    return "".join("%08X" % struct.unpack("<I", raw[i:i + 4])[0] for i in range(0, len(raw), 4))


class FakeProc:
    def __init__(self, root):
        self.root = str(root)
        self._tables = {}      # netns -> {"tcp": [...], "tcp6": [...]}
        self._netns_of = {}    # pid -> netns: every pid of a namespace shows its table

    def process(self, pid, comm="srv", state="S", ppid=1, netns=4026531840,
                cmdline=None, tracer_pid=0, threads=None, flags=0, start_time=100,
                uid=1000, exe=None):
        base = os.path.join(self.root, str(pid))
        os.makedirs(os.path.join(base, "fd"), exist_ok=True)
        os.makedirs(os.path.join(base, "fdinfo"), exist_ok=True)
        os.makedirs(os.path.join(base, "ns"), exist_ok=True)
        os.makedirs(os.path.join(base, "net"), exist_ok=True)
        # Every field up to starttime (22nd) as the kernel writes them; comm
        # is written raw, as the kernel does (spaces, ')' and newlines too).
        stat = (f"{pid} ({comm}) {state} {ppid} {pid} {pid} 0 -1 {flags} 0 0 0 0 0 0 0 0 "
                f"20 0 1 0 {start_time} 1000 100 18446744073709551615 0 0 0 0 0 0 0 0 0 17 0 0 0\n")
        self._write(base, "stat", stat)
        self._write(base, "comm", comm + "\n")
        self._write(base, "status", f"Name:\t{comm}\nState:\t{state}\nTracerPid:\t{tracer_pid}\n"
                                    f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nThreads:\t1\n")
        self._write(base, "cmdline", "\0".join(cmdline or [comm]) + "\0")
        link = os.path.join(base, "ns", "net")
        if not os.path.lexists(link):
            os.symlink(f"net:[{netns}]", link)
        if exe is not None:
            # /proc/PID/exe: what the kernel says the process runs.
            link = os.path.join(base, "exe")
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(exe, link)
        for tid, (tstate, syscall, wchan) in (threads or {pid: (state, "running", "0")}).items():
            tbase = os.path.join(base, "task", str(tid))
            os.makedirs(tbase, exist_ok=True)
            self._write(tbase, "stat", stat.replace(f"{pid} ({comm}) {state}", f"{tid} ({comm}) {tstate}", 1))
            self._write(tbase, "syscall", syscall + "\n")
            self._write(tbase, "wchan", wchan)
            # As the kernel shows a thread that shares its process's table:
            # task/TID/fd is that table (fd() with tid makes one of its own).
            for sub in ("fd", "fdinfo"):
                if not os.path.lexists(os.path.join(tbase, sub)):
                    os.symlink(os.path.join("..", "..", sub), os.path.join(tbase, sub))
        self._netns_of[pid] = netns
        self._tables.setdefault(netns, {"tcp": [], "tcp6": []})
        self._flush(netns, pids=[pid])     # the others' copies of the table are current
        return self

    def fd(self, pid, fd, inode=None, target=None, cloexec=False, tid=None):
        """An fd in pid's table, or in thread tid's own (unshare(CLONE_FILES))."""
        base = os.path.join(self.root, str(pid)) if tid is None else \
            os.path.join(self.root, str(pid), "task", str(tid))
        for sub in ("fd", "fdinfo"):
            if os.path.islink(os.path.join(base, sub)):
                os.unlink(os.path.join(base, sub))      # the shared table: one of its own now
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        os.symlink(target or f"socket:[{inode}]", os.path.join(base, "fd", str(fd)))
        flags = 0o2 | (0o2000000 if cloexec else 0)
        self._write(os.path.join(base, "fdinfo"), str(fd),
                    f"pos:\t0\nflags:\t{flags:07o}\nmnt_id:\t9\n")
        return self

    def tcp(self, pid, family, laddr, lport, raddr, rport, state, inode, rx=0, tx=0, uid=1000):
        name = "tcp" if family == socket.AF_INET else "tcp6"
        netns = self._netns_of[pid]
        n = len(self._tables[netns][name])
        self._tables[netns][name].append(
            f"{n:4d}: {hex_addr(family, laddr)}:{lport:04X} {hex_addr(family, raddr)}:{rport:04X} "
            f"{state:02X} {tx:08X}:{rx:08X} 00:00000000 00000000 {uid:5d}        0 {inode} 1 "
            f"0000000000000000 20 4 0 10 -1")
        self._flush(netns)
        return self

    def _flush(self, netns, pids=None):
        """Writes the namespace's tables into each of its pids' net/ (or only
        into those of pids): rewriting every pid's on each new process made
        a tree of 300 forks write 90,000 files (30 s of a unit test)."""
        header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        if pids is None:
            pids = [p for p, ns in self._netns_of.items() if ns == netns]
        for pid in pids:
            for name, lines in self._tables[netns].items():
                self._write(os.path.join(self.root, str(pid), "net"), name,
                            header + "".join(l + "\n" for l in lines))

    @staticmethod
    def _write(base, name, text):
        with open(os.path.join(base, name), "w") as f:
            f.write(text)


class Denials:
    """EACCES for chosen paths of a fake tree, as the kernel answers a
    tracer without CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH. Root is never
    denied by file modes, so the unit tests (run as root or not) inject the
    kernel's answer at the system call; tests/kernel checks the real one."""

    def __init__(self, monkeypatch):
        self.paths = set()
        real_open, real_listdir, real_readlink = os.open, os.listdir, os.readlink

        def check(path, dir_fd):
            if dir_fd is None and isinstance(path, str) and (
                    path in self.paths or any(path.startswith(p + "/") for p in self.paths)):
                raise PermissionError(13, "Permission denied", path)

        def fake_open(path, flags, mode=0o777, *, dir_fd=None):
            check(path, dir_fd)
            return real_open(path, flags, mode, dir_fd=dir_fd)

        def fake_listdir(path="."):
            check(path, None)
            return real_listdir(path)

        def fake_readlink(path, *, dir_fd=None):
            check(path, dir_fd)
            return real_readlink(path, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", fake_open)
        monkeypatch.setattr(os, "listdir", fake_listdir)
        monkeypatch.setattr(os, "readlink", fake_readlink)

    def deny(self, path):
        self.paths.add(str(path))
        return self
