"""The ring buffer's consumer protocol (kernel/ringreader.py) on a file laid
out as the kernel maps the buffer: a consumer page, a producer page, the
data; records with their 8-byte headers (length, busy and discard bits)."""

import mmap
import os
import struct

from closewait_trace.kernel import ringreader

PAGE = mmap.PAGESIZE
SIZE = 4 * PAGE
REC = struct.Struct("=QI4x")       # a 16-byte record: a number and a tag


def layout(tmp_path, records, producer=None):
    """records: [(payload, flags)] from position 0."""
    path = tmp_path / "ring"
    buf = bytearray(2 * PAGE + 2 * SIZE)
    pos = 0
    for payload, flags in records:
        at = 2 * PAGE + pos
        struct.pack_into("=II", buf, at, len(payload) | flags, 0)
        buf[at + 8:at + 8 + len(payload)] = payload
        pos += (len(payload) + 8 + 7) & ~7
    struct.pack_into("=Q", buf, PAGE, pos if producer is None else producer)
    path.write_bytes(bytes(buf))
    fd = os.open(path, os.O_RDWR)
    return fd, path


def test_records_are_read_in_order_and_the_position_published(tmp_path):
    recs = [(REC.pack(i, 7), 0) for i in range(10)]
    fd, path = layout(tmp_path, recs)
    try:
        r = ringreader.RingReader(fd, SIZE, REC.unpack_from)
        assert r.read(4) == [(i, 7) for i in range(4)]
        assert r.read(100) == [(i, 7) for i in range(4, 10)]
        assert r.read(100) == [] and r.pending_bytes() == 0
        r.close()
    finally:
        os.close(fd)
    consumer = struct.unpack_from("=Q", path.read_bytes(), 0)[0]
    assert consumer == 10 * 24 and r.taken == 10


def test_a_busy_record_stops_the_read_and_a_discarded_one_is_skipped(tmp_path):
    recs = [(REC.pack(1, 0), 0), (REC.pack(2, 0), ringreader.DISCARD_BIT),
            (REC.pack(3, 0), 0), (REC.pack(4, 0), ringreader.BUSY_BIT), (REC.pack(5, 0), 0)]
    fd, path = layout(tmp_path, recs)
    try:
        r = ringreader.RingReader(fd, SIZE, REC.unpack_from)
        assert r.read(100) == [(1, 0), (3, 0)]
        assert r.read(100) == []            # still busy: nothing past it
        r.close()
    finally:
        os.close(fd)
    assert struct.unpack_from("=Q", path.read_bytes(), 0)[0] == 3 * 24


def test_positions_are_single_8_byte_words(tmp_path):
    """The kernel reads our position while we write it: a store made byte
    by byte (struct's '=Q') let it see a value up to 16 MiB behind, and it
    refused reservations as if the buffer were full. The reader keeps its
    positions as native 8-byte words (a single store each)."""
    fd, _path = layout(tmp_path, [(REC.pack(1, 0), 0)])
    try:
        r = ringreader.RingReader(fd, SIZE, REC.unpack_from)
        assert r._cons.format == "Q" and r._cons.itemsize == 8
        assert r._prod.format == "Q" and r._prod.itemsize == 8
        r.close()
    finally:
        os.close(fd)
