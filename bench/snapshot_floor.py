#!/usr/bin/env python3
"""The least a snapshot written in Python can do, for bench/snapshot.py's
"python floor" row: what target 3 (`snapshot` within 2x `ss -tanp`) is
measured against besides `ss`.

One sock_diag dump of the sockets in CLOSE_WAIT with tcp_info (this
namespace only), one walk of every process's fd links, each holder's
command read once, and one line per socket: local, remote, age from
tcp_info's last data received, holder pid/comm. Nothing else: no other
namespaces, no deadlines (a process whose /proc blocks would hang it: the
tool reads /proc in a worker it can abandon), no diagnosis, no escaping,
no checks of what the kernel sent. Not a tool, a yardstick: the cost of
the reads and of one Python line per socket.

    .venv/bin/python bench/snapshot_floor.py | head
"""

import os
import socket
import struct
import sys

NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLMSG_DONE = 4, 20, 3
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
TCP_CLOSE_WAIT, INET_DIAG_INFO = 8, 2
TCPI_LAST_DATA_RECV = 52
HEADER = struct.Struct("=IHHII")
MESSAGE = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
RTATTR = struct.Struct("=HH")


def dump(family: int) -> list:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    body = struct.pack("=BBBxI48x", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1),
                       1 << TCP_CLOSE_WAIT)
    sock.send(HEADER.pack(HEADER.size + len(body), SOCK_DIAG_BY_FAMILY,
                          NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
    rows = []
    size = 4 if family == socket.AF_INET else 16
    while True:
        data = sock.recv(1 << 20)
        offset = 0
        while offset < len(data):
            length, kind = HEADER.unpack_from(data, offset)[:2]
            if kind == NLMSG_DONE:
                sock.close()
                return rows
            msg = MESSAGE.unpack_from(data, offset + HEADER.size)
            last_data_ms = None
            attr = offset + HEADER.size + MESSAGE.size
            while attr + RTATTR.size <= offset + length:
                attr_len, attr_kind = RTATTR.unpack_from(data, attr)
                if attr_kind == INET_DIAG_INFO:
                    last_data_ms = struct.unpack_from("=I", data, attr + RTATTR.size
                                                      + TCPI_LAST_DATA_RECV)[0]
                    break
                attr += (attr_len + 3) & ~3
            rows.append((family, msg[6][:size], int.from_bytes(msg[4], "big"),
                         msg[7][:size], int.from_bytes(msg[5], "big"), msg[15],
                         last_data_ms))
            offset += (length + 3) & ~3


def main() -> None:
    rows = dump(socket.AF_INET) + dump(socket.AF_INET6)
    wanted = {row[5] for row in rows}
    holder: dict = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        base = f"/proc/{pid}/fd/"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(base + fd)
            except OSError:
                continue
            if link.startswith("socket:[") and int(link[8:-1]) in wanted:
                holder[int(link[8:-1])] = pid
    comms: dict = {}
    for pid in set(holder.values()):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comms[pid] = f.read().strip()
        except OSError:
            comms[pid] = "?"
    lines = []
    for family, src, sport, dst, dport, inode, last_data_ms in rows:
        pid = holder.get(inode)
        age = "?" if last_data_ms is None else f"{last_data_ms / 1000:.1f}s"
        lines.append(f"{socket.inet_ntop(family, src)}:{sport} "
                     f"{socket.inet_ntop(family, dst)}:{dport} {age} "
                     f"{pid}/{comms[pid] if pid else '-'}\n")
    sys.stdout.write("".join(lines))


if __name__ == "__main__":
    main()
