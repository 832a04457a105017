"""A running tracer's kernel maps, seen from the test's own process: the
keys of every BPF map of a name (bpf(2) through libbcc: the next map id, an
fd on it, its info, then its keys), for a test to wait on what the tracer
put in the kernel instead of sleeping. Root only, as the kernel tests."""

import ctypes
import os

from bcc import libbcc

_lib = libbcc.lib
_lib.bpf_map_get_next_id.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
_lib.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
_lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                        ctypes.POINTER(ctypes.c_uint32)]
_lib.bpf_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


class _MapInfo(ctypes.Structure):
    # The head of struct bpf_map_info (uapi/linux/bpf.h), the rest room.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("rest", ctypes.c_uint8 * 256)]


def u32_keys(name: str) -> set[int]:
    """The u32 keys of every map named name now loaded (empty if none)."""
    keys: set[int] = set()
    at = ctypes.c_uint32(0)
    while _lib.bpf_map_get_next_id(at.value, ctypes.byref(at)) == 0:
        fd = _lib.bpf_map_get_fd_by_id(at.value)
        if fd < 0:
            continue                    # gone meanwhile
        try:
            info = _MapInfo()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            if (_lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) != 0
                    or info.name.decode() != name or info.key_size != 4):
                continue
            key, following = ctypes.c_uint32(), ctypes.c_uint32()
            first = True
            while _lib.bpf_get_next_key(fd, None if first else ctypes.byref(key),
                                        ctypes.byref(following)) == 0:
                keys.add(following.value)
                key.value, first = following.value, False
        finally:
            os.close(fd)
    return keys
