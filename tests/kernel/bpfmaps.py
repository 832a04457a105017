"""Another process's BPF map, written from a test through the bpf(2) system
call: what the kernel leaves behind when it skips the program at a socket's
exit (an entry whose socket left) cannot be made on demand, so a test puts
such an entry in the tracer's map itself; nor can a state change the hook
never hands over, so a test takes a port out of the program's filter for
a moment; and a test waits on what the tracer put in a map (u32_keys).
x86_64 and root only."""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Optional

SYS_BPF = 321                       # x86_64
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_GET_NEXT_KEY = 4
BPF_MAP_GET_NEXT_ID = 12
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
ATTR_SIZE = 128

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    res = _libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), attr,
                        ctypes.c_uint(ATTR_SIZE))
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


class MapInfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("_rest", ctypes.c_uint8 * 64)]


def find_map(name: str, max_entries: Optional[int] = None) -> Optional[tuple[int, MapInfo]]:
    """(fd, info) of the newest map with that name and size (any size:
    None); None if none."""
    found = None
    next_id = 0
    while True:
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("=I", attr, 0, next_id)
        try:
            _bpf(BPF_MAP_GET_NEXT_ID, attr)
        except OSError:
            break                   # ENOENT: no more
        next_id = struct.unpack_from("=I", attr, 4)[0]
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("=I", attr, 0, next_id)
        try:
            fd = _bpf(BPF_MAP_GET_FD_BY_ID, attr)
        except OSError:
            continue                # gone meanwhile
        info = MapInfo()
        attr = ctypes.create_string_buffer(ATTR_SIZE)
        struct.pack_into("=IIQ", attr, 0, fd, ctypes.sizeof(info), ctypes.addressof(info))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
        if info.name.decode() == name and max_entries in (None, info.max_entries):
            if found is not None:
                os.close(found[0])
            found = (fd, info)
        else:
            os.close(fd)
    return found


def update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
    _bpf(BPF_MAP_UPDATE_ELEM, attr)


def lookup(fd: int, key: bytes, value_size: int) -> Optional[bytes]:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("=IIQQQ", attr, 0, fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except FileNotFoundError:
        return None
    return v.raw


def delete(fd: int, key: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("=IIQ", attr, 0, fd, 0, ctypes.addressof(k))
    _bpf(BPF_MAP_DELETE_ELEM, attr)


def _next_key(fd: int, key: Optional[bytes], size: int) -> Optional[bytes]:
    k = ctypes.create_string_buffer(key, size) if key is not None else None
    following = ctypes.create_string_buffer(size)
    attr = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into("=IIQQ", attr, 0, fd, 0, ctypes.addressof(k) if k is not None else 0,
                     ctypes.addressof(following))
    try:
        _bpf(BPF_MAP_GET_NEXT_KEY, attr)
    except FileNotFoundError:
        return None                 # no more
    return following.raw


def u32_keys(name: str, max_entries: Optional[int] = None) -> set[int]:
    """The u32 keys of the newest map of that name (and size, when given)
    now loaded: a running tracer's, for a test to wait on what it put in
    the kernel instead of sleeping (its cw_py: the CPython processes it
    registered). Empty if there is none."""
    found = find_map(name, max_entries)
    if found is None:
        return set()
    fd, info = found
    keys: set[int] = set()
    try:
        if info.key_size != 4:
            return keys
        key = _next_key(fd, None, 4)
        while key is not None:
            keys.add(struct.unpack("=I", key)[0])
            key = _next_key(fd, key, 4)
    finally:
        os.close(fd)
    return keys
