"""File and line from other people's DWARF (evidence/dwarflines.py): right
on real gcc output (DWARF 5, plain and compressed), bounded on crafted
files: a compression bomb, a size that lies, garbage line programs. No root."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time

import pytest

from closewait_trace.evidence import dwarflines, elfindex

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

SOURCE = """\
#include <unistd.h>

__attribute__((noinline)) long handle_client(int fd)
{
    char buf[64];
    long n, total = 0;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        total += n;
    return total;
}

int main(void) { return (int)handle_client(0); }
"""
READ_LINE = 7


def build(tmp_path, *flags):
    src = tmp_path / "srv.c"
    src.write_text(SOURCE)
    out = tmp_path / ("srv" + "".join(f.strip("-=") for f in flags))
    subprocess.run(["gcc", "-g", "-O2", *flags, "-o", str(out), str(src)], check=True)
    return str(out)


def symbol(binary, name):
    out = subprocess.run(["nm", binary], capture_output=True, text=True, check=True).stdout
    return next(int(l.split()[0], 16) for l in out.splitlines() if l.endswith(" " + name))


def lines_in(binary, name, span=64):
    start = symbol(binary, name)
    found = set()
    for vaddr in range(start, start + span):
        hit = dwarflines.line_of(binary, vaddr)
        if hit:
            found.add(hit)
    return found


@pytest.fixture(autouse=True)
def fresh_cache():
    dwarflines._cache.clear()
    elfindex.problems.clear()
    yield
    dwarflines._cache.clear()


@pytest.mark.parametrize("flags", [(), ("-gz",)])
def test_lines_of_a_function_from_gcc_dwarf(tmp_path, flags):
    binary = build(tmp_path, *flags)
    found = lines_in(binary, "handle_client")
    assert {f for f, _ in found} == {"srv.c"}
    assert READ_LINE in {l for _, l in found}, found
    assert dwarflines.line_of(binary, 0x10) is None      # no code there


def section(binary, name):
    from elftools.elf.elffile import ELFFile
    with open(binary, "rb") as f:
        s = ELFFile(f).get_section_by_name(name)
        return s["sh_offset"], s["sh_size"]


def patched(binary, offset, data, tmp_path, name):
    out = tmp_path / name
    shutil.copy(binary, out)
    with open(out, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return str(out)


def test_a_compressed_section_that_claims_gigabytes_is_refused(tmp_path):
    binary = build(tmp_path, "-gz")
    offset, _ = section(binary, ".debug_line")
    bomb = patched(binary, offset + 8, (3 << 30).to_bytes(8, "little"), tmp_path, "bomb")
    started = time.monotonic()
    assert dwarflines.line_of(bomb, symbol(bomb, "handle_client")) is None
    assert time.monotonic() - started < 5
    assert any("expands past" in reason for reason in elfindex.problems), elfindex.problems


def test_a_compressed_section_whose_size_lies_is_refused(tmp_path):
    binary = build(tmp_path, "-gz")
    offset, _ = section(binary, ".debug_line")
    with open(binary, "rb") as f:
        f.seek(offset + 8)
        real = int.from_bytes(f.read(8), "little")
    liar = patched(binary, offset + 8, (real - 1).to_bytes(8, "little"), tmp_path, "liar")
    assert dwarflines.line_of(liar, symbol(liar, "handle_client")) is None
    assert any("another size" in reason for reason in elfindex.problems), elfindex.problems


@pytest.mark.parametrize("seed", range(6))
def test_garbage_line_programs_give_no_line_and_no_error(tmp_path, seed):
    binary = build(tmp_path)
    offset, size = section(binary, ".debug_line")
    rng = random.Random(seed)
    # Keep the unit header's length half the time, so the decoder goes deep.
    keep = 4 if seed % 2 else 0
    garbage = bytes(rng.randrange(256) for _ in range(size - keep))
    bad = patched(binary, offset + keep, garbage, tmp_path, f"bad{seed}")
    started = time.monotonic()
    for vaddr in range(symbol(bad, "handle_client"), symbol(bad, "handle_client") + 32, 4):
        hit = dwarflines.line_of(bad, vaddr)
        assert hit is None or (isinstance(hit[0], str) and isinstance(hit[1], int))
    assert time.monotonic() - started < 10


def test_a_debug_file_by_build_id_gives_the_lines_of_a_stripped_binary(tmp_path):
    binary = build(tmp_path)
    note = subprocess.run(["readelf", "-n", binary], capture_output=True, text=True).stdout
    build_id = note.split("Build ID:", 1)[1].split()[0]
    debug = tmp_path / "dbg" / ".build-id" / build_id[:2] / (build_id[2:] + ".debug")
    debug.parent.mkdir(parents=True)
    subprocess.run(["objcopy", "--only-keep-debug", binary, str(debug)], check=True)
    subprocess.run(["strip", "--strip-debug", binary], check=True)
    vaddr = symbol(binary, "handle_client")
    assert dwarflines.line_of(binary, vaddr) is None
    hit = dwarflines.line_of(binary, vaddr, build_id=build_id,
                             debug_roots=(str(tmp_path / "dbg"),))
    assert hit is not None and hit[0] == "srv.c"


def test_not_an_elf_and_a_fifo_are_no_line(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + os.urandom(200))
    assert dwarflines.line_of(str(junk), 0x1000) is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert dwarflines.line_of(str(fifo), 0x1000) is None       # never opened for a read
    assert time.monotonic() - started < 2
