"""One process's address space as /proc shows it: its mappings and reads of
its memory. The only place that opens /proc/PID/maps and /proc/PID/mem.

Never attaches to or stops the process; a process that exits or remaps
while we look simply gives fewer answers (empty reads), never an error.

Reading another process's memory can make the kernel fault in a page of a
file it maps, and opening a mapped file reads that file: on a FUSE mount
the user's own server answers those reads, and may never answer. So a
file-backed mapping is read (its memory, or its file for symbols) only when
its filesystem is one where the kernel itself serves the pages (LOCAL_FS),
decided by the mapping's device in the process's own mountinfo; anything
else, or a device not found there, is left unread and said so. Addresses
outside the mappings we parsed are never read either.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass
from typing import Optional

from closewait_trace.sockets import procfs

# Filesystems whose pages the kernel reads from local storage or memory,
# never from a user's server process. Everything else (fuse, fuse.*,
# fuseblk, nfs, cifs, 9p, ceph, ...) is not read: a remote or user-served
# read can take as long as its server wants.
LOCAL_FS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "vfat",
    "exfat", "squashfs", "erofs", "iso9660", "tmpfs", "ramfs", "devtmpfs",
    "hugetlbfs", "overlay", "zfs",
})
# /proc/PID/maps of a process at vm.max_map_count (65,530) is about 6 MB;
# more than that is not parsed (the addresses past it are never read).
MAX_MAPS_BYTES = 8 << 20
MAX_MOUNTINFO_BYTES = 4 << 20
UNREAD_UNKNOWN_FS = "not read: filesystem not known"
# Local filesystems that an unprivileged user can mount in a user namespace
# of their own over anything, FUSE included (overlay's lower layer): trusted
# only for processes in the tracer's own user namespace, where such a mount
# cannot be seen (mounts made in a user namespace never propagate out).
USER_STACKABLE_FS = frozenset({"overlay"})
UNREAD_USERNS_OVERLAY = "not read: overlay mounted in a user namespace"


@dataclass(slots=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    dev: str = "00:00"

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")


def parse_maps(text: str) -> list[Mapping]:
    maps = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        try:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            maps.append(Mapping(start, end, parts[1], int(parts[2], 16), int(parts[4]),
                                parts[5].strip() if len(parts) > 5 else "", parts[3]))
        except ValueError:
            continue
    return maps


def parse_mountinfo_types(text: str) -> dict[str, str]:
    """mountinfo -> {"major:minor": filesystem type} (hex-free decimal, as
    mountinfo writes it; maps writes hex, see _dev_key)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 3:
            continue
        fstype = right.split(" ", 1)[0]
        # The first mount of a device decides; a device is one filesystem.
        out.setdefault(fields[2], fstype)
    return out


def _dev_key(dev: str) -> str:
    """maps' "fd:01" (hex) -> mountinfo's "253:1" (decimal)."""
    major, _, minor = dev.partition(":")
    try:
        return f"{int(major, 16)}:{int(minor, 16)}"
    except ValueError:
        return ""


def _root_device(text: str) -> str:
    """mountinfo -> "major:minor" of the mount at the process's root ("/"),
    "" if none."""
    for line in text.splitlines():
        fields = line.split(" - ", 1)[0].split()
        if len(fields) >= 5 and fields[4] == "/":
            return fields[2]
    return ""


RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_IN_ROOT = 1, 2, 4, 0x10
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> Optional[int]:
    """openat2(2) (Linux 5.6): a descriptor, or None (refused, or a kernel
    without it: then no path is walked at all)."""
    import ctypes
    import platform
    number = _SYS_OPENAT2.get(platform.machine())
    if number is None:
        return None

    class OpenHow(ctypes.Structure):
        _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                    ("resolve", ctypes.c_uint64)]

    libc = ctypes.CDLL(None, use_errno=True)
    how = OpenHow(flags, 0, resolve)
    fd = libc.syscall(number, dirfd, path.encode("utf-8", "surrogateescape"),
                      ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    return fd if fd >= 0 else None


_AT_EMPTY_PATH, _AT_STATX_DONT_SYNC = 0x1000, 0x4000
_STATX_INO, _STATX_MNT_ID = 0x100, 0x1000


def _cached_identity(fd: int) -> Optional[tuple]:
    """("major:minor", inode, mount id) of the file fd refers to, from
    what the kernel holds: statx(AT_STATX_DONT_SYNC) asks no server (a
    FUSE one would be asked for the attributes by fstat, and may never
    answer). None if statx is not there."""
    import ctypes
    try:
        statx = ctypes.CDLL(None, use_errno=True).statx
    except AttributeError:
        return None
    buf = ctypes.create_string_buffer(256)
    if statx(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, _STATX_INO | _STATX_MNT_ID,
             buf) != 0:
        return None
    mask, = struct.unpack_from("<I", buf, 0)
    ino, = struct.unpack_from("<Q", buf, 32)
    major, minor = struct.unpack_from("<II", buf, 136)
    mount_id, = struct.unpack_from("<Q", buf, 144)
    return f"{major}:{minor}", ino, mount_id if mask & _STATX_MNT_ID else -1


def _read_capped(path: str, limit: int) -> str:
    try:
        raw = procfs.read_bytes(path, limit)
    except procfs.ProcError:
        return ""
    if len(raw) > limit:        # cut: drop the partial last line
        raw = raw[:raw.rfind(b"\n", 0, limit) + 1]
    return raw.decode("utf-8", "replace")


class ProcessImage:
    """Mappings and memory of one process, read through /proc."""

    def __init__(self, pid: int, proc: str = procfs.PROC):
        self.pid = pid
        self.proc = proc
        self.maps = parse_maps(_read_capped(f"{proc}/{pid}/maps", MAX_MAPS_BYTES))
        self.starts = [m.start for m in self.maps]
        self._fs_types: Optional[dict] = None
        self._our_fs_types: Optional[dict] = None
        self._same_userns: Optional[bool] = None
        self._mem = None
        self._root_dev: Optional[str] = None
        self._fds: list = []             # O_PATH descriptors of file_of (_held)
        self._files: dict = {}           # file_of's answers, by mapping
        self._mount_devices: Optional[dict] = None  # mount id -> device (_mount_device)

    def mapping(self, addr: int) -> Optional[Mapping]:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and self.maps[i].start <= addr < self.maps[i].end:
            return self.maps[i]
        return None

    def unreadable_reason(self, m: Mapping) -> str:
        """"" when m may be read (anonymous, or on a LOCAL_FS filesystem);
        otherwise why not."""
        if not m.file_backed:
            return ""
        if self._fs_types is None:
            self._fs_types = parse_mountinfo_types(
                _read_capped(f"{self.proc}/{self.pid}/mountinfo", MAX_MOUNTINFO_BYTES))
        fstype = self._fs_types.get(_dev_key(m.dev))
        if fstype is None:
            # A chrooted process's mountinfo lists only the mounts beneath
            # its root, not the one its root directory lies on: the device
            # (one numbering for the whole kernel) is then looked up among
            # the tracer's own mounts. A device in neither stays unknown.
            if self._our_fs_types is None:
                self._our_fs_types = parse_mountinfo_types(
                    _read_capped(f"{self.proc}/self/mountinfo", MAX_MOUNTINFO_BYTES))
            fstype = self._our_fs_types.get(_dev_key(m.dev))
        if fstype is None:
            return UNREAD_UNKNOWN_FS
        if fstype in USER_STACKABLE_FS and not self._in_our_user_namespace():
            return UNREAD_USERNS_OVERLAY
        if fstype in LOCAL_FS:
            return ""
        return f"not read: on a {fstype[:32]} filesystem"

    def _mount_device(self, mount_id: int) -> str:
        """The device ("major:minor") of the mount with that id, from the
        process's mountinfo or the tracer's (ids are the kernel's own);
        "" if in neither."""
        if self._mount_devices is None:         # read once per image (4 MB each at most)
            self._mount_devices = {}
            for who in ("self", self.pid):       # the process's own last: it decides
                text = _read_capped(f"{self.proc}/{who}/mountinfo", MAX_MOUNTINFO_BYTES)
                for line in text.splitlines():
                    fields = line.split(None, 3)
                    if len(fields) >= 3:
                        self._mount_devices[fields[0]] = fields[2]
        return self._mount_devices.get(str(mount_id), "")

    def _in_our_user_namespace(self) -> bool:
        if self._same_userns is None:
            theirs = procfs.read_link(f"{self.proc}/{self.pid}/ns/user")
            ours = procfs.read_link(f"{self.proc}/self/ns/user")
            self._same_userns = theirs is not None and theirs == ours
        return self._same_userns

    def file_of(self, m: Mapping) -> Optional[str]:
        """A path that opens the very file mapped: map_files works for a
        deleted file or one in a container; otherwise (the tracer without
        CAP_SYS_ADMIN, or the mapping changed since its maps were read) the
        file found by its path from the process's root, only if that walk
        stays on the mapping's own filesystem (_beneath_root). None for
        anonymous and special mappings, and for files on filesystems we do
        not read (unreadable_reason)."""
        if not m.path.startswith("/") or self.unreadable_reason(m):
            return None
        key = (m.start, m.end, m.dev, m.inode)
        if key in self._files:
            return self._files[key]
        via_map_files = f"{self.proc}/{self.pid}/map_files/{m.start:x}-{m.end:x}"
        try:
            # O_PATH: follows the link to the file without opening it in
            # its filesystem; refused without CAP_SYS_ADMIN (or
            # CAP_CHECKPOINT_RESTORE), which lstat is not.
            fd = os.open(via_map_files, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            path = self._beneath_root(m)
        else:
            # The range may hold another file now than when the maps were
            # read (the process mapped a FUSE file over it since): the
            # descriptor is believed only if it is the mapping's very file,
            # and held, so that the file opened later is this one, never
            # what the link names by then.
            path = self._held(fd, m)
        self._files[key] = path
        return path

    def _held(self, fd: int, m: Mapping) -> Optional[str]:
        """"/proc/self/fd/N" of an O_PATH descriptor kept until close(),
        if it is the mapping's file (device and inode, asked without a word
        to the file's filesystem: _cached_identity); else None, closed."""
        found = _cached_identity(fd)
        if found is None or found[1] != m.inode or (
                found[0] != _dev_key(m.dev) and self._mount_device(found[2]) != _dev_key(m.dev)):
            # (btrfs: statx says a subvolume's own device, maps and
            # mountinfo the filesystem's: then the descriptor's mount says.)
            os.close(fd)
            return None
        self._fds.append(fd)
        return f"/proc/self/fd/{fd}"

    def _beneath_root(self, m: Mapping) -> Optional[str]:
        """The mapped file by its path, as "/proc/self/fd/N" of an O_PATH
        descriptor held until close(); None unless the process's root is on
        the mapping's filesystem and the path reaches the mapped inode
        without a symlink or a mount crossed. The path is the process's
        to choose: a mount of its user's over a directory of it (a FUSE
        server via fusermount3, that never answers a LOOKUP), a symlink, or
        a root on FUSE (chroot in a user namespace) would otherwise have
        the lookup wait on that server for good."""
        if self._root_dev is None:
            self._root_dev = _root_device(
                _read_capped(f"{self.proc}/{self.pid}/mountinfo", MAX_MOUNTINFO_BYTES))
        if not self._root_dev or self._root_dev != _dev_key(m.dev):
            return None
        try:
            root = os.open(f"{self.proc}/{self.pid}/root",
                           os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fd = _openat2(root, m.path.replace(" (deleted)", "").lstrip("/"),
                          os.O_PATH | os.O_CLOEXEC,
                          RESOLVE_IN_ROOT | RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS
                          | RESOLVE_NO_MAGICLINKS)
        finally:
            os.close(root)
        if fd is None:
            return None
        return self._held(fd, m)

    def read(self, addr: int, size: int) -> bytes:
        """Up to size bytes at addr, within one mapping we parsed and may
        read; b"" otherwise."""
        m = self.mapping(addr)
        if m is None or self.unreadable_reason(m):
            return b""
        size = max(0, min(size, m.end - addr))
        try:
            if self._mem is None:
                self._mem = open(f"{self.proc}/{self.pid}/mem", "rb", buffering=0)
            self._mem.seek(addr)
            data = self._mem.read(size) or b""
            procfs.note_progress()
            return data
        except (OSError, ValueError, OverflowError):
            return b""

    def close(self) -> None:
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._files = {}
