"""Crafted ELF files, built from a real binary compiled here and then
corrupted the way a hostile local user would (issue 8 §1). Shared by the
unit tests (the index refuses them) and the kernel test (a process runs
inside one while the live tracer diagnoses it).

The editing below reads ELF64 little-endian section headers with struct on
purpose: it is the attacker's tool, independent of the code under test.
"""

from __future__ import annotations

import os
import struct
import subprocess
import zlib

SHDR = struct.Struct("<IIQQQQIIQQ")   # name type flags addr offset size link info align entsize
SHF_COMPRESSED = 0x800
SHT_SYMTAB = 2

# A function that only loops in pause(): position-independent, no relocations,
# so its bytes can be copied into any file and called from any address.
SOURCE = r"""
#include <unistd.h>
__attribute__((noinline, used)) void parked_in_crafted_file(void) {
    for (;;) pause();
}
int main(void) { return 0; }
"""


def compile_base(directory: str, name: str = "base") -> str:
    src = os.path.join(directory, name + ".c")
    out = os.path.join(directory, name)
    with open(src, "w") as f:
        f.write(SOURCE)
    subprocess.run(["gcc", "-O1", "-fPIC", "-fno-stack-protector", "-o", out, src], check=True)
    return out


def sections(data: bytes) -> list[dict]:
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    out = []
    for i in range(shnum):
        at = shoff + i * shentsize
        fields = dict(zip(("name", "type", "flags", "addr", "offset", "size", "link", "info",
                           "align", "entsize"), SHDR.unpack_from(data, at)))
        fields["header_at"] = at
        out.append(fields)
    names = out[shstrndx]
    for s in out:
        start = names["offset"] + s["name"]
        s["label"] = data[start:data.index(b"\0", start)].decode()
    return out


def section(data: bytes, label: str) -> dict:
    return next(s for s in sections(data) if s["label"] == label)


def put_header(data: bytearray, s: dict) -> None:
    SHDR.pack_into(data, s["header_at"], *(s[k] for k in (
        "name", "type", "flags", "addr", "offset", "size", "link", "info", "align", "entsize")))


def _break_eh_frame_hdr(data: bytearray) -> None:
    # Without a usable .eh_frame_hdr the index walks .eh_frame itself: the
    # path the old code took through pyelftools' EH_CFI_entries().
    hdr = section(data, ".eh_frame_hdr")
    data[hdr["offset"]] = 9          # version 9: not read


def _first_cie_and_fde(data: bytes) -> tuple[int, int]:
    eh = section(data, ".eh_frame")
    base, off, cie, fde = eh["offset"], 0, None, None
    while off < eh["size"]:
        length, = struct.unpack_from("<I", data, base + off)
        if length == 0:
            break
        cie_id, = struct.unpack_from("<I", data, base + off + 4)
        if cie_id == 0 and cie is None:
            cie = base + off
        elif cie_id != 0 and fde is None:
            fde = base + off
        off += 4 + length
    return cie, fde


def _damage_cfi(base: str, out: str, break_hdr: bool, damage) -> str:
    """Copy base to out with damage(data, first CIE offset, first FDE offset)
    applied to its .eh_frame."""
    data = bytearray(open(base, "rb").read())
    if break_hdr:
        _break_eh_frame_hdr(data)
    damage(data, *_first_cie_and_fde(data))
    open(out, "wb").write(data)
    return out


def _augmentation_xr(data: bytearray, cie: int, fde: int) -> None:
    aug = cie + 9                    # length, id, version, then the string
    assert data[aug:aug + 1] == b"z"
    data[aug] = ord("x")             # "xR": not 'z', not armcc


def _cie_pointer_to_itself(data: bytearray, cie: int, fde: int) -> None:
    struct.pack_into("<I", data, fde + 4, 4)     # CIE = (fde + 4) - 4 = the FDE itself


def _cie_pointer_to_zero(data: bytearray, cie: int, fde: int) -> None:
    # Point 4 bytes into the CIE, at its id field: zero, so it reads as a
    # zero terminator where a CIE should be.
    struct.pack_into("<I", data, fde + 4, (fde + 4) - (cie + 4))


def unknown_cie_augmentation(base: str, out: str, break_hdr: bool = True) -> str:
    return _damage_cfi(base, out, break_hdr, _augmentation_xr)


def fde_cie_pointer_to_itself(base: str, out: str, break_hdr: bool = True) -> str:
    return _damage_cfi(base, out, break_hdr, _cie_pointer_to_itself)


def fde_cie_pointer_to_zero(base: str, out: str, break_hdr: bool = True) -> str:
    return _damage_cfi(base, out, break_hdr, _cie_pointer_to_zero)


def section_count_bomb(base: str, out: str, size: int = 64 << 20) -> str:
    """e_shnum = 0 and section 0 claiming 2^32 sections, in a large sparse
    file whose zeros read as (empty) section headers."""
    data = bytearray(open(base, "rb").read())
    s0 = sections(data)[0]
    struct.pack_into("<H", data, 0x3C, 0)        # e_shnum
    s0["size"] = 1 << 32
    put_header(data, s0)
    with open(out, "wb") as f:
        f.write(data)
        f.truncate(size)
    return out


def zlib_bomb(base: str, out: str, expands_to: int = 256 << 20) -> str:
    """.eh_frame_hdr marked SHF_COMPRESSED, holding a zlib stream of zeros
    that expands to expands_to bytes (about 1000:1)."""
    data = bytearray(open(base, "rb").read())
    hdr = section(data, ".eh_frame_hdr")
    z = zlib.compressobj(1)
    chunk = bytes(1 << 20)
    blob = b"".join(z.compress(chunk) for _ in range(expands_to >> 20)) + z.flush()
    chdr = struct.pack("<IIQQ", 1, 0, expands_to, 4)   # ELFCOMPRESS_ZLIB
    hdr["offset"], hdr["size"] = len(data), len(chdr) + len(blob)
    hdr["flags"] |= SHF_COMPRESSED
    put_header(data, hdr)
    data += chdr + blob
    open(out, "wb").write(data)
    return out


def symbol_count_bomb(base: str, out: str, size: int = 1 << 30) -> str:
    """.symtab claiming 44 million entries (a 1 GiB sparse file of zeros)."""
    data = bytearray(open(base, "rb").read())
    symtab = next(s for s in sections(data) if s["type"] == SHT_SYMTAB)
    symtab["offset"], symtab["size"] = 0, size - size % 24
    put_header(data, symtab)
    with open(out, "wb") as f:
        f.write(data)
        f.truncate(size)
    return out


def within_limits(base: str, out: str, functions: int, fdes: int) -> str:
    """The costliest file the limits let through: a .symtab of `functions`
    distinct function symbols, and an .eh_frame of `fdes` FDEs without an
    .eh_frame_hdr (so the index walks them all)."""
    data = bytearray(open(base, "rb").read())
    if functions:
        symtab = next(s for s in sections(data) if s["type"] == SHT_SYMTAB)
        strtab = sections(data)[symtab["link"]]
        names = bytearray(b"\0")
        syms = bytearray(bytes(24))
        for i in range(functions):
            syms += struct.pack("<IBBHQQ", len(names), 0x12, 0, 1, 0x1000 + 16 * i, 16)
            names += b"function_%07d\0" % i
        strtab["offset"], strtab["size"] = len(data), len(names)
        data += names
        symtab["offset"], symtab["size"] = len(data), len(syms)
        data += syms
        put_header(data, strtab)
        put_header(data, symtab)
    cie = struct.pack("<I", 0) + b"\x01zR\x00\x01\x78\x10\x01\x1b\x0c\x07\x08\x90\x01"
    cie = struct.pack("<I", len(cie) + 2) + cie + b"\0\0"
    eh = bytearray(cie)
    for i in range(fdes):
        at = len(eh)
        eh += struct.pack("<IIiIB3x", 16, at + 4, 0x1000 + 16 * i - (at + 8), 16, 0)
    eh += bytes(4)
    frames = section(data, ".eh_frame")
    frames["offset"], frames["size"] = len(data), len(eh)
    data += eh
    put_header(data, frames)
    hdr = section(data, ".eh_frame_hdr")
    data[hdr["offset"]] = 9
    open(out, "wb").write(data)
    return out


def slow_fde_walk(base: str, out: str) -> str:
    """Within every limit, but 200,000 FDEs and no .eh_frame_hdr: walking
    them takes pyelftools longer than a file is allowed (the old code took
    it whole, tick after tick)."""
    return within_limits(base, out, 0, 200_000)


CRAFTED = {
    "unknown_cie_augmentation": unknown_cie_augmentation,
    "fde_cie_pointer_to_itself": fde_cie_pointer_to_itself,
    "fde_cie_pointer_to_zero": fde_cie_pointer_to_zero,
    "section_count_bomb": section_count_bomb,
    "zlib_bomb": zlib_bomb,
    "symbol_count_bomb": symbol_count_bomb,
    "slow_fde_walk": slow_fde_walk,
}


def craft_all(directory: str) -> dict:
    base = compile_base(directory)
    return {name: make(base, os.path.join(directory, name)) for name, make in CRAFTED.items()}
