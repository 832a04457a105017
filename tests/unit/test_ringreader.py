"""The ring buffer's consumer protocol (kernel/ringreader.py) on a file laid
out as the kernel maps the buffer: a consumer page, a producer page, the
data; records with their 8-byte headers (length, busy and discard bits)."""

import mmap
import os
import select
import struct
import subprocess
import sys
import time

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


def ring_file(tmp_path, start, records):
    """A ring whose consumer is at `start` (its records wrap past the end),
    laid out as the kernel maps it: the data twice in a row, so a record
    that wraps reads as one piece. records: [(payload, flags)]."""
    path = tmp_path / "ring"
    buf = bytearray(2 * PAGE + 2 * SIZE)
    pos = start
    for payload, flags in records:
        rec = struct.pack("=II", len(payload) | flags, 0) + payload
        rec += b"\0" * (((len(rec) + 7) & ~7) - len(rec))
        for i, b in enumerate(rec):
            at = (pos + i) % SIZE
            buf[2 * PAGE + at] = buf[2 * PAGE + SIZE + at] = b
        pos += len(rec)
    struct.pack_into("=Q", buf, 0, start)
    struct.pack_into("=Q", buf, PAGE, pos)
    path.write_bytes(bytes(buf))
    return os.open(path, os.O_RDWR), path, pos


def read_all(fd, **kw):
    r = ringreader.RingReader(fd, SIZE, REC.unpack_from, **kw)
    got = []
    while True:
        rows = r.read(kw.pop("limit", 7))
        if not rows:
            break
        got += rows
    left = r.pending_bytes()
    r.close()
    return got, left


def test_runs_of_one_size_are_unpacked_at_once_as_one_by_one(tmp_path):
    """With `record` (--all: every record a struct cw_event), a run of
    records of that size is unpacked by one iter_unpack, across the end of
    the buffer too; a discarded record, one of another size or one still
    being written ends the run, and the rows and position are what reading
    them one by one gives."""
    other = struct.Struct("=QQI4x")           # 24 bytes: another size
    recs = [(REC.pack(i, 1), 0) for i in range(6)]
    recs += [(REC.pack(6, 0), ringreader.DISCARD_BIT), (other.pack(7, 7, 7), 0)]
    recs += [(REC.pack(i, 2), 0) for i in range(8, 20)]
    recs += [(REC.pack(20, 0), ringreader.BUSY_BIT), (REC.pack(21, 0), 0)]
    start = SIZE - 5 * 24                   # the sixth record wraps around
    results = []
    for kw in ({}, {"record": REC}):
        fd, path, _end = ring_file(tmp_path, start, recs)
        try:
            results.append(read_all(fd, **kw) + (struct.unpack_from("=Q", path.read_bytes(), 0)[0],))
        finally:
            os.close(fd)
    one_by_one, runs = results
    assert runs == one_by_one
    rows, left, consumer = runs
    # The 24-byte record is unpacked with REC (its first 16 bytes).
    assert rows == [(i, 1) for i in range(6)] + [(7, 7)] + [(i, 2) for i in range(8, 20)]
    assert consumer == start + 6 * 24 + 24 + 32 + 12 * 24 and left == 2 * 24


def test_a_run_stops_at_the_limit(tmp_path):
    fd, path, end = ring_file(tmp_path, 0, [(REC.pack(i, 0), 0) for i in range(10)])
    try:
        r = ringreader.RingReader(fd, SIZE, REC.unpack_from, record=REC)
        assert r.read(4) == [(i, 0) for i in range(4)]
        assert r.read(100) == [(i, 0) for i in range(4, 10)]
        assert r.read(100) == [] and r.taken == 10
        r.close()
    finally:
        os.close(fd)
    assert struct.unpack_from("=Q", path.read_bytes(), 0)[0] == end


def test_sip_moves_whole_committed_records_out_and_read_gives_them_first(tmp_path):
    """sip() (a burst: the loop busy for seconds while the kernel fills the
    ring) copies the committed records out of the ring and frees their
    space; read() gives them back first, in order, unpacked as from the
    ring, across the end of the buffer, and stops at a record still being
    written: with and without runs of one size."""
    other = struct.Struct("=QQI4x")
    recs = [(REC.pack(i, 1), 0) for i in range(6)]
    recs += [(REC.pack(6, 0), ringreader.DISCARD_BIT), (other.pack(7, 7, 7), 0)]
    recs += [(REC.pack(i, 2), 0) for i in range(8, 20)]
    recs += [(REC.pack(20, 0), ringreader.BUSY_BIT), (REC.pack(21, 0), 0)]
    start = SIZE - 5 * 24
    expected = [(i, 1) for i in range(6)] + [(7, 7)] + [(i, 2) for i in range(8, 20)]
    for kw in ({}, {"record": REC}):
        fd, path, _end = ring_file(tmp_path, start, recs)
        try:
            r = ringreader.RingReader(fd, SIZE, REC.unpack_from, **kw)
            # At most 3 records' bytes, whole records only: 24 + 24 + 24.
            assert r.sip(3 * 24 + 10) == 3 * 24
            assert r.sip(10**6) == 3 * 24 + 24 + 32 + 12 * 24   # up to the busy one
            assert r.sip(10**6) == 0
            assert r.pending_bytes() == 2 * 24                    # the ring: freed
            assert r.backlog_bytes == 6 * 24 + 24 + 32 + 12 * 24
            got = []
            while True:
                rows = r.read(5)
                if not rows:
                    break
                got += rows
            assert got == expected and r.taken == len(expected) and r.backlog_bytes == 0
            r.close()
        finally:
            os.close(fd)
        consumer = struct.unpack_from("=Q", path.read_bytes(), 0)[0]
        assert consumer == start + 6 * 24 + 24 + 32 + 12 * 24


def test_the_backlog_comes_before_what_the_ring_took_since(tmp_path):
    fd, path = layout(tmp_path, [(REC.pack(i, 0), 0) for i in range(10)], producer=4 * 24)
    try:
        r = ringreader.RingReader(fd, SIZE, REC.unpack_from, record=REC)
        assert r.sip(10**6) == 4 * 24
        # The kernel commits six more meanwhile.
        os.pwrite(fd, struct.pack("=Q", 10 * 24), PAGE)
        assert r.read(3) == [(0, 0), (1, 0), (2, 0)]
        assert r.read(100) == [(3, 0)]              # the rest of the backlog
        assert r.read(100) == [(i, 0) for i in range(4, 10)]
        assert r.read(100) == [] and r.taken == 10
        r.close()
    finally:
        os.close(fd)


def wait_for(cond, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class KernelLikeRing(ringreader.RingReader):
    """The sipper's wait as the kernel's ring makes it: ready while records
    are unread, else asleep until the producer's next record (notify) or
    the stop (a regular file, which the file ring is, always polls
    ready). `waits` counts the sipper's waits: a sipper that spun would
    make thousands."""

    notify = None           # (read end, write end): the producer's wake-up
    waits = 0

    def _wait_for_record(self) -> bool:
        self.waits += 1
        try:
            while os.read(self.notify[0], 64):
                pass
        except BlockingIOError:
            pass
        if self._prod[0] == self._cons[0]:
            select.select([self.notify[0], self._stop_pipe[0]], [], [],
                          ringreader.RECORD_WAIT_MS / 1000)
        return True


class Notified:
    """A KernelLikeRing on the file ring; produce() is the kernel
    committing records up to a number and waking the ring's waiters."""

    def __init__(self, tmp_path, records, producer):
        self.fd, self.path = layout(tmp_path, records, producer=producer)
        self.r = KernelLikeRing(self.fd, SIZE, REC.unpack_from, record=REC)
        self.pipe = os.pipe()
        os.set_blocking(self.pipe[0], False)
        self.r.notify = self.pipe

    def produce(self, upto: int) -> None:
        os.pwrite(self.fd, struct.pack("=Q", upto * 24), PAGE)
        os.write(self.pipe[1], b"r")

    def close(self) -> None:
        sipper = self.r._sipper
        self.r.close()
        assert sipper is None or not sipper.is_alive()
        for fd in (self.fd, *self.pipe):
            os.close(fd)


def rows_of(r) -> list:
    got = []
    while True:
        rows = r.read(100)
        if not rows:
            return got
        got += rows


def test_sip_when_full_follows_the_policy_the_ring_was_given(tmp_path):
    """sip_when_full() (the loop's sips between steps) takes the fill and
    the cap sip_in_background was given, the background thread's own: no
    policy, no backlog; below the fill, nothing moves; the backlog stays
    within the cap."""
    n = Notified(tmp_path, [(REC.pack(i, 0), 0) for i in range(12)], producer=0)
    r = n.r
    try:
        r.present()                             # the thread never sips here
        n.produce(6)
        assert r.sip_when_full() == 0 and r.pending_bytes() == 6 * 24
        r.sip_in_background(fill=8 * 24, cap=10 * 24, interval_s=0.2)
        assert r.sip_when_full() == 0 and r.backlog_bytes == 0     # 6 < 8
        n.produce(9)
        assert r.sip_when_full() == 9 * 24
        n.produce(12)
        assert r.sip_when_full() == 0           # 3 < 8 wait in the ring
        assert r.pending_bytes() == 3 * 24
        assert rows_of(r) == [(i, 0) for i in range(12)]
    finally:
        n.close()
    # The cap: 5 records' bytes in the backlog at most.
    n = Notified(tmp_path, [(REC.pack(i, 0), 0) for i in range(12)], producer=0)
    r = n.r
    try:
        r.present()
        r.sip_in_background(fill=2 * 24, cap=5 * 24, interval_s=0.2)
        n.produce(8)
        assert r.sip_when_full() == 5 * 24 and r.backlog_bytes == 5 * 24
        assert r.sip_when_full() == 0 and r.pending_bytes() == 3 * 24
    finally:
        n.close()


def test_the_background_sipper_moves_records_only_while_the_consumer_is_away(tmp_path):
    """sip_in_background: while the consumer is away (a write that blocks,
    a long step), a thread moves what the ring holds past `fill` into the
    backlog; once present() returned it moves nothing (a record moved after
    the consumer's last read would not wake its wait); close() ends it."""
    n = Notified(tmp_path, [(REC.pack(i, 0), 0) for i in range(12)], producer=0)
    r = n.r
    try:
        r.present()
        r.sip_in_background(fill=2 * 24, cap=10**6, interval_s=0.002)
        n.produce(4)
        time.sleep(0.05)                        # 25 intervals: present, so no sip
        assert r.backlog_bytes == 0 and r.pending_bytes() == 4 * 24
        r.away()
        assert wait_for(lambda: r.backlog_bytes == 4 * 24)
        assert r.pending_bytes() == 0
        # Below `fill`: left in the ring for the consumer's next read.
        n.produce(5)
        time.sleep(0.05)
        assert r.pending_bytes() == 24
        n.produce(8)
        assert wait_for(lambda: r.backlog_bytes == 8 * 24)
        r.present()
        n.produce(12)
        time.sleep(0.05)
        assert r.backlog_bytes == 8 * 24 and r.pending_bytes() == 4 * 24
        assert rows_of(r) == [(i, 0) for i in range(12)] and r.backlog_bytes == 0
    finally:
        n.close()


def test_the_sipper_works_before_the_first_read(tmp_path):
    """The consumer is away until its first read: the tracer writes its
    start-up (the banner, the sockets already lingering) before it polls,
    and a blocked write there must not lose a burst."""
    n = Notified(tmp_path, [(REC.pack(i, 0), 0) for i in range(6)], producer=0)
    try:
        n.r.sip_in_background(fill=24, cap=10**6, interval_s=0.002)
        n.produce(6)
        assert wait_for(lambda: n.r.backlog_bytes == 6 * 24)
    finally:
        n.close()


def test_the_sipper_waits_on_the_ring_while_it_is_empty(tmp_path):
    """No record, no wake-up: an idle or busy tracer with nothing in its
    ring pays nothing for the thread, before a burst and after it was
    taken. (A sipper that polled in a loop would wait thousands of times
    in these 0.3 s.)"""
    n = Notified(tmp_path, [(REC.pack(i, 0), 0) for i in range(4)], producer=0)
    r = n.r
    try:
        r.sip_in_background(fill=24, cap=10**6, interval_s=0.002)
        for upto in (2, 4):
            before = r.waits
            time.sleep(0.3)
            assert r.waits - before <= 1, r.waits - before
            n.produce(upto)                     # and it is awake when one comes
            assert wait_for(lambda: r.backlog_bytes == upto * 24)
            assert wait_for(lambda: r.pending_bytes() == 0)
    finally:
        n.close()


def test_no_background_sip_after_the_stop(tmp_path):
    """stop_sipping() while the sipper sleeps between two looks (records
    below `fill`, the consumer away): it moves nothing more and ends."""
    n = Notified(tmp_path, [(REC.pack(i, 0), 0) for i in range(8)], producer=0)
    try:
        n.r.sip_in_background(fill=4 * 24, cap=10**6, interval_s=0.2)
        n.produce(2)
        time.sleep(0.05)                        # asleep for its interval
        n.r.stop_sipping()
        os.pwrite(n.fd, struct.pack("=Q", 8 * 24), PAGE)
        assert wait_for(lambda: not n.r._sipper.is_alive())
        assert n.r.backlog_bytes == 0 and n.r.pending_bytes() == 8 * 24
    finally:
        n.close()


STOP_IN_A_HANDLER = """
import os, signal, struct, sys
from closewait_trace.kernel import ringreader
REC = struct.Struct("=QI4x")
fd = int(sys.argv[1])
for trial in range(200):
    r = ringreader.RingReader(fd, %d, REC.unpack_from, record=REC)
    r.sip_in_background(fill=10**9, cap=10**6, interval_s=0.01)
    fired = []
    def handler(_signum, _frame):       # as the tracer's stop signal: probe.detach
        fired.append(1)
        r.stop_sipping()
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0005 + 0.003 * (trial %% 7) / 7)
    while not fired:                    # the loop's turns: KernelProbe.poll
        r.present()
        r.away()
    r.close()
print("ended")
"""


def test_a_stop_signal_during_the_loops_turns_does_not_hang(tmp_path):
    """The stop signal's handler runs in the main thread between two of
    its bytecodes, maybe inside away() or present(): stop_sipping() there
    must take no lock those hold. With a threading.Event it waited for
    its own thread's lock: the tracer hung at Ctrl-C for good (a review;
    within a few of these 200 stops)."""
    fd, _path = layout(tmp_path, [(REC.pack(i, 0), 0) for i in range(4)], producer=4 * 24)
    try:
        out = subprocess.run([sys.executable, "-c", STOP_IN_A_HANDLER % SIZE, str(fd)],
                             pass_fds=(fd,), capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    except subprocess.TimeoutExpired:
        raise AssertionError("hung: a stop signal met a lock its own thread held")
    finally:
        os.close(fd)
    assert out.returncode == 0 and out.stdout.strip() == "ended", out.stderr[-2000:]
