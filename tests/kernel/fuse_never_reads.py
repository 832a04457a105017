"""A FUSE filesystem that serves one file, code.bin, and never answers a
READ of it: what a hostile user's FUSE server can do (as `fusermount3`, in
Debian's fuse3, lets any user mount one). It speaks the FUSE device
protocol directly (/dev/fuse and mount(2), as root), so the tests need no
library: INIT, LOOKUP, GETATTR, OPEN, FLUSH, RELEASE answered; READ read
and left unanswered, so the kernel's waiter cannot even be killed
(request_wait_answer's last wait) until the connection ends: closing the
device, in stop(), aborts it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading

IN_HEADER = struct.Struct("=IIQQIIIHH")        # fuse_in_header: 40 bytes
OUT_HEADER = struct.Struct("=IiQ")             # fuse_out_header: 16 bytes
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")      # fuse_attr: 88 bytes
LOOKUP, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT, INTERRUPT, DESTROY = 1, 3, 14, 15, 18, 25, 26, 36, 38
ROOT, FILE = 1, 2
SIZE = 1 << 16
MS_NOSUID, MS_NODEV = 2, 4


class NeverReads:
    def __init__(self, mountpoint: str, answer_lookups: bool = True):
        self.mountpoint = mountpoint
        self.reads = 0                      # READ requests left unanswered
        # False: a LOOKUP of any name is left unanswered too (counted), as
        # a server mounted over a directory someone walks through can do.
        self.answer_lookups = answer_lookups
        self.lookups = 0
        self.fd = -1

    def start(self) -> "NeverReads":
        os.makedirs(self.mountpoint, exist_ok=True)
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if libc.mount(b"closewait-test", self.mountpoint.encode(), b"fuse",
                      MS_NOSUID | MS_NODEV, opts) != 0:
            e = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(e, f"mount fuse: {os.strerror(e)}")
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    @property
    def path(self) -> str:
        return os.path.join(self.mountpoint, "code.bin")

    def stop(self) -> None:
        os.system(f"umount -l {self.mountpoint} 2>/dev/null")
        if self.fd >= 0:
            os.close(self.fd)               # aborts the connection: waiters are freed
            self.fd = -1

    def _attr(self, node: int) -> bytes:
        if node == ROOT:
            return ATTR.pack(ROOT, 0, 0, 0, 0, 0, 0, 0, 0, 0o040755, 2, 0, 0, 0, 4096, 0)
        return ATTR.pack(FILE, SIZE, SIZE // 512, 0, 0, 0, 0, 0, 0, 0o100755, 1, 0, 0, 0,
                         4096, 0)

    def _reply(self, unique: int, body: bytes = b"", error: int = 0) -> None:
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique)
                     + body)
        except OSError:
            pass

    def _serve(self) -> None:
        while True:
            try:
                req = os.read(self.fd, 1 << 20 | 4096)
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT):
                    continue
                return                      # ENODEV: unmounted; EBADF: closed
            _len, op, unique, node, *_rest = IN_HEADER.unpack_from(req)
            body = req[IN_HEADER.size:]
            if op == INIT:
                major, minor, readahead, _flags = struct.unpack_from("=IIII", body)
                out = struct.pack("=IIIIHHIIHHII", 7, min(minor, 31), readahead, 0,
                                  16, 12, 4096, 1, 32, 0, 0, 0) + b"\0" * 28
                self._reply(unique, out[:64])
            elif op == LOOKUP and not self.answer_lookups:
                self.lookups += 1           # never answered
            elif op == LOOKUP:
                if body.rstrip(b"\0") != b"code.bin":
                    self._reply(unique, error=errno.ENOENT)
                else:
                    self._reply(unique, struct.pack("=QQQQII", FILE, 0, 3600, 3600, 0, 0)
                                + self._attr(FILE))
            elif op == GETATTR:
                self._reply(unique, struct.pack("=QII", 3600, 0, 0) + self._attr(node))
            elif op == OPEN:
                self._reply(unique, struct.pack("=QII", 1, 0, 0))
            elif op in (FLUSH, RELEASE):
                self._reply(unique)
            elif op == READ:
                self.reads += 1             # never answered
            elif op in (INTERRUPT, DESTROY):
                pass
            else:
                self._reply(unique, error=errno.ENOSYS)
