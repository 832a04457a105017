"""The few kernel struct offsets the BPF program needs, from the running
kernel's BTF (/sys/kernel/btf/vmlinux), parsed here (pure Python, no
bpftool, no kernel headers).

The program stays header-agnostic: it reads no kernel struct by type. To
know a socket's network namespace it reads two words at offsets taken from
BTF at start and handed to it as -D constants:

    sk->__sk_common.skc_net.net          (struct net *)
    net->ns.inum                         (unsigned int: the inode `ip netns`,
                                          /proc/PID/ns/net and sock_diag name)

The format is the kernel's Documentation/bpf/btf.rst: a header, a type
section of variable-length records whose ids are their position, and a
string section. The file is read like any input: its size is capped, every
offset is checked against the buffer before use, chains of typedefs and
nested anonymous members are followed a bounded number of steps, and any
doubt (a kind this parser does not know, a member missing or a bitfield, two
structs of one name that disagree) gives None: the caller then falls back to
matching sockets by address, and says ambiguity as such.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from typing import Optional

from closewait_trace.wholewrite import write_all

VMLINUX = "/sys/kernel/btf/vmlinux"
# Answers already parsed, by the BTF's SHA-256 (root's, closed to others).
CACHE_DIR = "/var/cache/closewait-trace/btf"
# vmlinux BTF is 5-6 MB on a distribution kernel; 64 MiB is far above any
# real one and keeps a hostile or corrupt file from costing more.
MAX_BYTES = 64 << 20
# Steps through typedef/const/volatile chains and anonymous members.
MAX_HOPS = 32
MAX_NESTING = 8
# Members looked at per lookup, nesting included: a crafted blob whose
# anonymous members all name one struct would otherwise multiply the work
# by its member count at each level. The real lookups visit a few hundred.
MAX_MEMBER_VISITS = 100_000

BTF_MAGIC = 0xEB9F

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION = 1, 2, 3, 4, 5
KIND_ENUM, KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST = 6, 7, 8, 9, 10
KIND_RESTRICT, KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC = 11, 12, 13, 14, 15
KIND_FLOAT, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 16, 17, 18, 19

# Bytes that follow the 12-byte btf_type record: (fixed, per vlen item).
_TRAILER = {
    KIND_INT: (4, 0), KIND_PTR: (0, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12), KIND_ENUM: (0, 8), KIND_FWD: (0, 0), KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0), KIND_CONST: (0, 0), KIND_RESTRICT: (0, 0), KIND_FUNC: (0, 0),
    KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12), KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0), KIND_TYPE_TAG: (0, 0), KIND_ENUM64: (0, 12),
}
_QUALIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class BTFError(ValueError):
    """The blob is not BTF this parser can trust."""


@dataclass(frozen=True)
class NetnsOffsets:
    """Byte offsets for reading a socket's network namespace inode."""

    sk_net: int       # struct sock -> its struct net * (skc_net.net)
    net_inum: int     # struct net -> ns.inum (a u32)

    def cflags(self) -> list[str]:
        return [f"-DNETNS_SK_NET_OFF={self.sk_net}", f"-DNETNS_INUM_OFF={self.net_inum}"]


@dataclass(frozen=True)
class StateOffsets:
    """Byte offsets, from a struct sock pointer, of what the
    sock:inet_sock_set_state tracepoint copies out of the socket. With them
    the program reads the socket itself from the raw tracepoint (its
    arguments: the socket and both states) instead of through the
    tracepoint's perf event, which the kernel can skip without counting
    the skip (docs/how-it-works.md, "Why the raw tracepoint")."""

    family: int       # __sk_common.skc_family (u16)
    protocol: int     # sk_protocol (u16; a bitfield before 5.6: not usable)
    sport: int        # inet_sock.inet_sport (__be16): the tracepoint's sport
    dport: int        # __sk_common.skc_dport (__be16)
    saddr: int        # __sk_common.skc_rcv_saddr (__be32)
    daddr: int        # __sk_common.skc_daddr (__be32)
    v6_saddr: int     # __sk_common.skc_v6_rcv_saddr (struct in6_addr)
    v6_daddr: int     # __sk_common.skc_v6_daddr

    def cflags(self) -> list[str]:
        return ["-DRAW_STATE_CHANGE"] + [f"-DSK_{f.name.upper()}_OFF={getattr(self, f.name)}"
                                         for f in dataclasses.fields(self)]


class BTF:
    """Index of a BTF blob: where each type's record starts, and the struct
    and union ids by name, built in one pass; members are decoded only for
    the types asked about."""

    def __init__(self, blob: bytes):
        if len(blob) < 24:
            raise BTFError("shorter than a BTF header")
        magic_le = struct.unpack_from("<H", blob, 0)[0]
        magic_be = struct.unpack_from(">H", blob, 0)[0]
        if magic_le == BTF_MAGIC:
            self._e = "<"
        elif magic_be == BTF_MAGIC:
            self._e = ">"
        else:
            raise BTFError("no BTF magic")
        e = self._e
        _magic, version, _flags, hdr_len = struct.unpack_from(e + "HBBI", blob, 0)
        if version != 1 or hdr_len < 24 or hdr_len > len(blob):
            raise BTFError(f"unknown BTF version {version} or header length {hdr_len}")
        type_off, type_len, str_off, str_len = struct.unpack_from(e + "IIII", blob, 8)
        types_start, strs_start = hdr_len + type_off, hdr_len + str_off
        if (types_start + type_len > len(blob) or strs_start + str_len > len(blob)):
            raise BTFError("a section runs past the end of the data")
        self.blob = blob
        self.strings = (strs_start, strs_start + str_len)
        self._rec = struct.Struct(e + "III")
        self._member = struct.Struct(e + "III")
        self.offsets: list[int] = [-1]      # type id -> record offset (id 0 is void)
        self.by_name: dict[bytes, list[int]] = {}
        self._index(types_start, types_start + type_len)

    def _index(self, pos: int, end: int) -> None:
        blob, rec, trailer = self.blob, self._rec, _TRAILER
        offsets = self.offsets
        aggregate = (KIND_STRUCT, KIND_UNION)
        while pos < end:
            if pos + 12 > end:
                raise BTFError("a type record is cut short")
            name_off, info, _size = rec.unpack_from(blob, pos)
            kind = (info >> 24) & 0x1F
            sizes = trailer.get(kind)
            if sizes is None:
                # Its length is unknown, so is every later type's id.
                raise BTFError(f"unknown BTF kind {kind}")
            offsets.append(pos)
            if kind in aggregate and name_off:
                self.by_name.setdefault(self._name_key(name_off), []).append(len(offsets) - 1)
            pos += 12 + sizes[0] + sizes[1] * (info & 0xFFFF)
        if pos != end:
            raise BTFError("the last type record runs past its section")

    def _name_key(self, name_off: int) -> bytes:
        start, end = self.strings
        at = start + name_off
        if at >= end:
            return b""
        stop = self.blob.find(b"\0", at, end)
        return self.blob[at:stop if stop >= 0 else end]

    def _type(self, type_id: int) -> tuple[int, int, int, int]:
        """(kind, vlen, kind_flag, size_or_type) of a type id."""
        if not 0 < type_id < len(self.offsets):
            raise BTFError(f"type id {type_id} out of range")
        _name, info, size = self._rec.unpack_from(self.blob, self.offsets[type_id])
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size

    def resolve(self, type_id: int) -> int:
        """The type under typedefs and qualifiers."""
        for _ in range(MAX_HOPS):
            kind, _vlen, _kflag, target = self._type(type_id)
            if kind not in _QUALIFIERS:
                return type_id
            type_id = target
        raise BTFError("typedef chain too long")

    def kind(self, type_id: int) -> int:
        return self._type(type_id)[0]

    def size(self, type_id: int) -> int:
        return self._type(type_id)[3]

    def int_bits(self, type_id: int) -> Optional[int]:
        """The bits of an integer type that are its value, None if it is
        not an integer or its value does not start at bit 0."""
        kind, _vlen, _kflag, _size = self._type(type_id)
        if kind != KIND_INT:
            return None
        pos = self.offsets[type_id] + 12
        if pos + 4 > len(self.blob):
            raise BTFError("an integer record is cut short")
        (encoding,) = struct.unpack_from(self._e + "I", self.blob, pos)
        return encoding & 0xFF if (encoding >> 16) & 0xFF == 0 else None

    def members(self, type_id: int):
        """(name, bit offset, bitfield size, member type id) of a struct or union."""
        kind, vlen, kflag, _size = self._type(type_id)
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise BTFError(f"type {type_id} is not a struct or union")
        pos = self.offsets[type_id] + 12
        for i in range(vlen):
            name_off, mtype, offset = self._member.unpack_from(self.blob, pos + 12 * i)
            if kflag:
                yield self._name_key(name_off), offset & 0xFFFFFF, offset >> 24, mtype
            else:
                yield self._name_key(name_off), offset, 0, mtype

    def member(self, type_id: int, name: bytes, depth: int = 0,
               budget: Optional[list] = None) -> Optional[tuple[int, int]]:
        """(byte offset, member type id) of a named member, looking inside
        anonymous struct and union members as C does; None if absent."""
        if depth > MAX_NESTING:
            raise BTFError("anonymous members nested too deep")
        budget = [MAX_MEMBER_VISITS] if budget is None else budget
        for mname, bit_off, bitfield, mtype in self.members(type_id):
            budget[0] -= 1
            if budget[0] < 0:
                raise BTFError("too many members to look through")
            if mname == name:
                if bitfield or bit_off % 8:
                    raise BTFError(f"member {name.decode()} is a bitfield")
                return bit_off // 8, mtype
            if not mname:
                inner = self.resolve(mtype)
                if self.kind(inner) in (KIND_STRUCT, KIND_UNION):
                    found = self.member(inner, name, depth + 1, budget)
                    if found is not None:
                        if bit_off % 8:
                            raise BTFError("anonymous member not byte aligned")
                        return bit_off // 8 + found[0], found[1]
        return None

    def path(self, struct_name: bytes, *names: bytes) -> Optional[tuple[int, int, int]]:
        """(byte offset, kind, size) of the type at struct_name.a.b...; None when a
        step is missing. Several structs of one name must agree."""
        found = self.locate(struct_name, *names)
        if found is None:
            return None
        offset, type_id = found
        return offset, self.kind(type_id), self.size(type_id)

    def locate(self, struct_name: bytes, *names: bytes) -> Optional[tuple[int, int]]:
        """(byte offset, type id under typedefs) at struct_name.a.b...; None
        when a step is missing or structs of one name disagree (on the
        offset, or the kind or size of what is there)."""
        answers = {}
        for type_id in self.by_name.get(struct_name, []):
            if self.kind(type_id) != KIND_STRUCT:
                continue
            offset, current = 0, type_id
            for name in names:
                if self.kind(current) not in (KIND_STRUCT, KIND_UNION):
                    current = None
                    break
                found = self.member(current, name)
                if found is None:
                    current = None
                    break
                offset += found[0]
                current = self.resolve(found[1])
            if current is not None:
                answers.setdefault((offset, self.kind(current), self.size(current)), current)
        if len(answers) != 1:
            return None
        (offset, _kind, _size), type_id = answers.popitem()
        return offset, type_id


def netns_offsets_from(blob: bytes) -> Optional[NetnsOffsets]:
    """NetnsOffsets from a BTF blob, or None (not BTF, or the kernel's
    structs are not as expected: a kernel without CONFIG_NET_NS has no
    skc_net.net)."""
    try:
        btf = BTF(blob)
        net_ptr = btf.path(b"sock", b"__sk_common", b"skc_net", b"net")
        inum = btf.path(b"net", b"ns", b"inum")
    except (BTFError, struct.error):
        return None
    if net_ptr is None or inum is None:
        return None
    if net_ptr[1] != KIND_PTR:
        return None
    if inum[1] != KIND_INT or inum[2] != 4:
        return None
    return NetnsOffsets(sk_net=net_ptr[0], net_inum=inum[0])


# Where each StateOffsets field is: (struct, member path), and what it must
# be: an integer of that many bytes, or an aggregate (in6_addr) of that size.
_STATE_FIELDS = {
    "family": ((b"sock", b"__sk_common", b"skc_family"), "int", 2),
    "protocol": ((b"sock", b"sk_protocol"), "int", 2),
    "sport": ((b"inet_sock", b"inet_sport"), "int", 2),
    "dport": ((b"sock", b"__sk_common", b"skc_dport"), "int", 2),
    "saddr": ((b"sock", b"__sk_common", b"skc_rcv_saddr"), "int", 4),
    "daddr": ((b"sock", b"__sk_common", b"skc_daddr"), "int", 4),
    "v6_saddr": ((b"sock", b"__sk_common", b"skc_v6_rcv_saddr"), "aggregate", 16),
    "v6_daddr": ((b"sock", b"__sk_common", b"skc_v6_daddr"), "aggregate", 16),
}


def state_offsets_from(blob: bytes) -> Optional[StateOffsets]:
    """StateOffsets from a BTF blob, or None: not BTF, a field missing, a
    bitfield, or not the size the tracepoint copies (then the program uses
    the tracepoint's own fields, as on kernels without BTF)."""
    try:
        btf = BTF(blob)
        # inet_sport is read from the struct sock pointer: inet_sock must
        # begin with its struct sock.
        sk_in_inet = btf.path(b"inet_sock", b"sk")
        if sk_in_inet is None or sk_in_inet[0] != 0:
            return None
        found = {}
        for name, (path, shape, size) in _STATE_FIELDS.items():
            at = _field(btf, path, shape, size)
            if at is None:
                return None
            found[name] = at
    except (BTFError, struct.error):
        return None
    return StateOffsets(**found)


def _field(btf: BTF, path: tuple, shape: str, size: int) -> Optional[int]:
    """The byte offset at path if what is there has that shape and size."""
    found = btf.locate(*path)
    if found is None:
        return None
    offset, type_id = found
    kind = btf.kind(type_id)
    if shape == "int":
        fits = btf.size(type_id) == size and (
            kind == KIND_ENUM or (kind == KIND_INT and btf.int_bits(type_id) == size * 8))
    else:
        fits = kind in (KIND_STRUCT, KIND_UNION) and btf.size(type_id) == size
    return offset if fits else None


def read_bounded(path: str, limit: int = MAX_BYTES) -> Optional[bytes]:
    """The file's bytes, or None when unreadable or larger than limit."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


def netns_offsets(path: str = VMLINUX) -> Optional[NetnsOffsets]:
    """The running kernel's NetnsOffsets, or None (no BTF, or not usable)."""
    blob = read_bounded(path)
    return netns_offsets_from(blob) if blob is not None else None


def netns_offsets_cached(path: str = VMLINUX, cache_dir: str = CACHE_DIR
                         ) -> Optional[NetnsOffsets]:
    """netns_offsets(path), through the cache (offsets_cached)."""
    return offsets_cached(path, cache_dir)[0]


def offsets_cached(path: str = VMLINUX, cache_dir: str = CACHE_DIR
                   ) -> tuple[Optional[NetnsOffsets], Optional[StateOffsets]]:
    """(netns_offsets_from, state_offsets_from) of the BTF at path, each
    answer kept in cache_dir under the BTF's SHA-256: hashing the 5-6 MB
    costs about 3 ms, parsing it about 50 ms of the start-up
    (bench/startup.py). The cache is only an optimisation: a directory not
    ours alone (another user could have written the answer: the program
    would read the socket at the wrong offsets), a file that does not read
    as an answer, or any error, and the BTF is parsed as without it."""
    blob = read_bounded(path)
    if blob is None:
        return None, None
    digest = hashlib.sha256(blob).hexdigest()
    private = _private_dir(cache_dir)
    answers = []
    # Looked up by name at each call (a test replaces them).
    for prefix, kind, parse in (("netns", NetnsOffsets, lambda b: netns_offsets_from(b)),
                                ("state", StateOffsets, lambda b: state_offsets_from(b))):
        name = os.path.join(cache_dir, f"{prefix}-{digest}")
        found = _read_answer(name, kind) if private else None
        if found is not None:
            answers.append(found[0])
            continue
        offsets = parse(blob)
        if private or _make_private_dir(cache_dir):
            private = True
            _write_answer(cache_dir, name, prefix, offsets)
        answers.append(offsets)
    return answers[0], answers[1]


def _private_dir(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & 0o077)


def _make_private_dir(path: str) -> bool:
    try:
        # The parent too (/var/cache/closewait-trace, which the header cache
        # shares), closed to others as kernel_headers makes it.
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return False
    return _private_dir(path)


def _field_names(kind) -> list[str]:
    return [f.name for f in dataclasses.fields(kind)]


def _read_answer(name: str, kind=NetnsOffsets) -> Optional[tuple]:
    """(offsets or None,) as written by _write_answer; None: no usable answer."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None
        text = os.read(fd, 128).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    words = text.split()
    if words == ["none"]:
        return (None,)
    names = _field_names(kind)
    if len(words) == len(names) and all(w.isdigit() and len(w) < 8 for w in words):
        return (kind(**dict(zip(names, map(int, words)))),)
    return None


def _write_answer(cache_dir: str, name: str, prefix: str, offsets) -> None:
    """Written whole then renamed in; the answers of this prefix for other
    BTF (an older kernel's) are removed, so the cache holds one of each."""
    text = "none\n" if offsets is None else " ".join(
        str(getattr(offsets, n)) for n in _field_names(type(offsets))) + "\n"
    tmp = f"{name}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            write_all(fd, text.encode())
        finally:
            os.close(fd)
        os.rename(tmp, name)
        for entry in os.listdir(cache_dir):
            full = os.path.join(cache_dir, entry)
            if entry.startswith(prefix + "-") and full != name and ".tmp-" not in entry:
                os.unlink(full)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
