"""Crafted recordings that cost little on disk and much to a naive reader:
many distinct sockets (each a new key in every table), long strings,
repeated huge names. Written as gzip members built once and repeated where
the content may repeat, so a recording of 400,000 sockets is made in
seconds. Used by the tests and by the figures in docs/benchmarks.md."""

import gzip
import json

from tests.unit import recordfactory


def _line(rec: dict) -> bytes:
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode()


def _header(capture_id: str = "crafted") -> bytes:
    return _line(recordfactory.header(capture_id=capture_id))


def distinct_socket(i: int, ts: float = 1001.0) -> dict:
    """Socket i: its own peer, port, holder pid and program, so it is a new
    row in every table the report can build."""
    owner = recordfactory.holder(pid=100_000 + i, comm=f"p{i % 10**9}"[:15], fd=3 + i % 1000,
                                 cmdline=f"/opt/app{i}/bin/server --id {i}")
    return recordfactory.linger(
        ts=ts + i * 1e-3, owners=[owner], cause=f"cause-{i}", summary=f"held by p{i}",
        laddr="10.0.0.1", lport=1 + i % 65535,
        raddr=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", rport=1024 + i % 60000)


def many_sockets(path: str, n: int, closed: bool = False) -> None:
    """n distinct sockets that linger (and, with closed, close again)."""
    with open(path, "wb") as f:
        f.write(gzip.compress(_header(), mtime=0))
        batch = []
        for i in range(n):
            rec = distinct_socket(i)
            batch.append(_line(rec))
            if closed:
                batch.append(_line(recordfactory.closed(
                    ts=rec["ts"] + 5, duration=7.0, laddr=rec["laddr"], lport=rec["lport"],
                    raddr=rec["raddr"], rport=rec["rport"])))
            if len(batch) >= 5000:
                f.write(gzip.compress(b"".join(batch), compresslevel=1, mtime=0))
                batch = []
        if batch:
            f.write(gzip.compress(b"".join(batch), compresslevel=1, mtime=0))


def huge_names(path: str, name_bytes: int, records: int, field: str = "comm") -> None:
    """`records` process and linger records whose holder's `field` (comm or
    cmdline) is name_bytes long: one gzip member repeated."""
    name = "n" * name_bytes
    owner = recordfactory.holder(pid=4242, **{field: name})
    body = (_line(recordfactory.process(pid=4242, **{field: name}))
            + _line(recordfactory.linger(owners=[owner])))
    member = gzip.compress(body, compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(_header(), mtime=0))
        for _ in range(records):
            f.write(member)


def fat_sockets(path: str, n: int) -> None:
    """n distinct sockets, each as costly to a report as a record can make
    it: MAX_HOLDERS and more holders, every string long and distinct (cause,
    summary, command line, unit, addresses), a process record per holder."""
    long = "x" * 5000
    with open(path, "wb") as f:
        f.write(gzip.compress(_header(), mtime=0))
        batch = []
        for i in range(n):
            owners = []
            for h in range(6):
                pid = 1 + i * 6 + h
                owners.append(recordfactory.holder(pid=pid, comm=f"c{pid}"[:15],
                                                   cmdline=f"/{pid}{long}"))
                batch.append(_line(recordfactory.process(
                    pid=pid, cmdline=f"/{pid}{long}",
                    identity={"unit": f"{pid}{long}", "pod_uid": f"{pid}{long}",
                              "container": {"runtime": "x", "id": f"{pid}{long}"}})))
            # Addresses are IP literals (the schema refuses anything else):
            # distinct ones, the longest form there is.
            rec = recordfactory.linger(ts=1001.0 + i, owners=owners, cause=f"{i}{long}",
                                       summary=f"{i}{long}", family="ipv6",
                                       laddr=f"ffff:ffff:ffff:ffff:ffff:ffff:ffff:{i & 0xffff:x}",
                                       raddr=f"ffff:ffff:ffff:ffff:ffff:ffff:{i >> 16:x}:ffff",
                                       rport=i % 65536)
            batch.append(_line(rec))
            if len(batch) >= 700:
                f.write(gzip.compress(b"".join(batch), compresslevel=1, mtime=0))
                batch = []
        if batch:
            f.write(gzip.compress(b"".join(batch), compresslevel=1, mtime=0))


def fat_processes(path: str, n: int, frames: int = 10, identity_extra: int = 0) -> None:
    """n process records, each with a linger record of a socket it holds
    (for -v to show): one thread with `frames` minimal Python frames (200,000
    were valid until the schema bounded the list at 32: the review's
    gen_fat_process.py), and with identity_extra an extra key under
    `identity`, tolerated by the schema, holding a list of that many short
    strings (the review's gen_fat_identity.py: 1,300,000, 7 MB). A record
    with 600,000 costs a reader who keeps it some 40 MB."""
    with open(path, "wb") as f:
        f.write(gzip.compress(_header(), mtime=0))
        for i in range(n):
            pid = 50_000 + i
            ident = {"unit": "u.service"}
            if identity_extra:
                ident["x"] = ["ab"] * identity_extra
            thread = {"tid": pid, "state": "S", "wchan": "", "syscall": None,
                      "syscall_fd": None, "syscall_fd_target": None, "stack": [],
                      "python": [{"function": "", "file": "", "line": None}] * frames}
            proc = recordfactory.process(pid=pid, threads=[thread], identity=ident)
            owner = recordfactory.holder(pid=pid, comm="srv")
            body = _line(proc) + _line(recordfactory.linger(ts=1001.0 + i, owners=[owner],
                                                            rport=1024 + i))
            f.write(gzip.compress(body, compresslevel=1, mtime=0))


def fat_keys(path: str, n: int) -> None:
    """n linger records of distinct sockets held by `python`, whose laddr
    and raddr are 4,096-character strings (the string cap), the review's
    gen_fat_keys.py: readers that key sockets by their addresses keep
    8 KB a socket."""
    a = "%08d" + "z" * 4088
    line = _line(recordfactory.linger(owners=[recordfactory.holder(comm="python")],
                                      laddr=a, raddr=a)).replace(b"%", b"%%").replace(
                                          b"%%08d", b"%08d")
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(_header())
        for start in range(0, n, 1000):
            f.write(b"".join(line % (i, i) for i in range(start, min(n, start + 1000))))
