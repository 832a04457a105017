"""Reading the BPF ring buffer straight from its mapping (issue 20).

libbpf's ring_buffer__poll, through bcc, calls back into Python once per
record: a ctypes trampoline, a cast and a decode each time, a good part of
--all's cost per event. The ring buffer's consumer protocol is simple and
stable (kernel/bpf/ringbuf.c, the same one libbpf implements): the map is
mapped as a consumer page (our position, writable), a producer page (the
kernel's position) and the data pages, mapped twice in a row so that a
record that wraps around reads as one piece. Each record starts with an
8-byte header: its length, with a busy bit (still being written) and a
discard bit. Here a batch of records is read at once, each unpacked
straight from the mapping into a tuple (events.EventLayout), and our
position is published once per batch.

The positions are read and written as plain loads and stores: on x86-64
(TSO) loads are not reordered with loads nor stores with stores, which is
all the acquire/release pairs of the protocol ask. Elsewhere the tracer
keeps libbpf's reader (available() says whether this one may be used).
Each is one aligned 8-byte access, through memoryview casts (native 'Q':
a single load or store), never struct's standard-size '=Q', which reads
and writes byte by byte: the kernel, reading our position while such a
store was half done, saw it up to 16 MiB behind and refused reservations
as if the buffer were full (1-13 events lost a run at 8,000-20,000
connections a second, none with libbpf's reader).
"""

from __future__ import annotations

import collections
import mmap
import os
import platform
import select
import signal
import struct
import threading

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8
# The background sipper's longest wait on an empty ring (_wait_for_record).
RECORD_WAIT_MS = 1000


def available(machine: str = "") -> bool:
    return (machine or platform.machine()) in ("x86_64", "AMD64", "amd64")


class RingReader:
    """The consumer side of one BPF_MAP_TYPE_RINGBUF map."""

    def __init__(self, map_fd: int, data_size: int, unpack_from, page_size: int = 0,
                 record=None):
        self.page = page_size or mmap.PAGESIZE
        if data_size <= 0 or data_size & (data_size - 1) or data_size % self.page:
            raise ValueError(f"ring buffer size {data_size} is not a power-of-2 number of pages")
        self.size = data_size
        self.mask = data_size - 1
        self.unpack_from = unpack_from
        self._consumer = mmap.mmap(map_fd, self.page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data = mmap.mmap(map_fd, self.page + 2 * data_size, mmap.MAP_SHARED,
                               mmap.PROT_READ, offset=self.page)
        # One aligned 8-byte word each: our position, the kernel's; and
        # the data as 4-byte words for the records' headers.
        self._cons = memoryview(self._consumer).cast("Q")
        self._prod = memoryview(self._data).cast("Q")
        self._words = memoryview(self._data).cast("I")
        self._bytes = memoryview(self._data)
        # Records all of one size (record: their struct.Struct, with
        # standard sizes) are unpacked a run at a time: their headers
        # checked as one strided slice of words, the run unpacked by one
        # iter_unpack of a struct that skips each header and the padding.
        self._run = None
        if record is not None and record.format[:1] in ("=", "<"):
            stride = (record.size + HEADER + 7) & ~7
            self._run = (struct.Struct(f"{record.format[0]}{HEADER}x{record.format[1:]}"
                                       f"{stride - HEADER - record.size}x"),
                         stride, record.size)
        self._map_fd = map_fd
        self._poll = select.poll()
        self._poll.register(map_fd, select.POLLIN)
        self.taken = 0          # records read (not discarded)
        # Copies sip() made of the ring's records, oldest first, read before
        # the ring; _backlog_at: how far the first has been read.
        self._backlog: collections.deque = collections.deque()
        self._backlog_at = 0
        self.backlog_bytes = 0
        # read() and sip() move our position and the backlog: from the loop's
        # thread and from the background sipper's (sip_in_background), one
        # at a time.
        self._lock = threading.Lock()
        # The backlog's policy, set once by sip_in_background: the fill
        # that moves records, and the backlog's cap in bytes (none moved
        # before it is set).
        self._sip_fill = 0
        self._sip_cap = 0
        self._sipper: threading.Thread | None = None
        # Whether the consumer is away from the ring (away() .. present());
        # away until its first read (its start-up writes come first).
        self._away = True
        self._sipping = False
        # A stop signal must end a wait at once: Python retries poll() after
        # running the handler (PEP 475), so the handler's flag would be seen
        # only at the timeout. The interpreter writes a byte to a wakeup fd
        # at every signal: waiting on it too ends the wait. Only when nobody
        # else set one, and from the main thread.
        self._wakeup = None
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:          # not the main thread
            old = None
        if old != -1:
            if old is not None:
                signal.set_wakeup_fd(old)
            os.close(r)
            os.close(w)
            return
        self._wakeup = (r, w)
        self._poll.register(r, select.POLLIN)

    def pending_bytes(self) -> int:
        """Bytes the kernel has committed or reserved that we have not read."""
        return self._prod[0] - self._cons[0]

    def read(self, limit: int) -> list:
        """Up to `limit` records, unpacked, oldest first; [] when none is
        ready. Our position moves past what was read, so the kernel may
        reuse that space once this returns. What sip() moved out of the
        ring comes first (it is older than anything still in the ring)."""
        with self._lock:
            return self._read(limit)

    def _read(self, limit: int) -> list:
        if self._backlog:
            return self._read_backlog(limit)
        cons = self._cons[0]
        prod = self._prod[0]
        if cons >= prod:
            return []
        at = self.page + (cons & self.mask)
        rows: list = []
        # The data pages are mapped twice in a row: from `at`, the whole
        # unread part (at most one buffer's size) reads as one piece.
        cons += self._take(self._words, self._bytes, at, at + (prod - cons), limit, rows) - at
        self._cons[0] = cons
        self.taken += len(rows)
        return rows

    def _take(self, words, view, at: int, end: int, limit: int, rows: list) -> int:
        """Records of one contiguous piece (the mapping, or a copy sip()
        made) from `at` to `end` into rows, at most `limit`; returns where
        it stopped: at `end`, at the limit, or before a record still being
        written."""
        if self._run is not None:
            run, stride, size = self._run
            n = min((end - at) // stride, limit)
            if n > 1:
                step = stride >> 2
                heads = words[at >> 2:(at >> 2) + n * step:step].tolist()
                if heads.count(size) != n:
                    # A record still busy, discarded or of another size:
                    # the run ends before it, the loop below takes it.
                    n = next(i for i, h in enumerate(heads) if h != size)
                if n:
                    rows.extend(run.iter_unpack(view[at:at + n * stride]))
                    at += n * stride
        unpack_from = self.unpack_from
        append_row = rows.append
        while at < end and len(rows) < limit:
            length = words[at >> 2]
            if length & BUSY_BIT:
                break                   # still being written: the rest waits
            if not length & DISCARD_BIT:
                append_row(unpack_from(view, at + HEADER))
            length &= ~(BUSY_BIT | DISCARD_BIT)
            at += (length + HEADER + 7) & ~7
        return at

    # ---------------------------------------------------------- the backlog
    #
    # A burst (100,000 sockets leaving at once when their holder exits)
    # fills the default 1 MiB ring (9,362 events) in about a tenth of a
    # second, while the loop may be busy for seconds (the departures' tick,
    # writing the events it took). sip() copies what the kernel committed
    # out of the mapping (a memory copy: ~120 bytes an event, raw, not
    # unpacked) and frees its space; read() unpacks it later, first.
    # Memory only while a burst is being written, instead of a larger ring
    # held all the time (docs/benchmarks.md, "A burst of departures").

    def sip(self, room: int) -> int:
        """Move the committed records from the ring into the backlog, at
        most `room` bytes (whole records); returns the bytes moved."""
        with self._lock:
            return self._sip(room)

    def sip_when_full(self) -> int:
        """sip() by the policy sip_in_background was given, as its thread
        does: once that fill waits in the ring, keeping the backlog within
        that cap (nothing before the policy is set)."""
        with self._lock:
            return self._sip_when_full()

    def _sip_when_full(self) -> int:
        if not self._sip_cap or self._prod[0] - self._cons[0] < self._sip_fill:
            return 0
        return self._sip(self._sip_cap - self.backlog_bytes)

    def _sip(self, room: int) -> int:
        cons = self._cons[0]
        prod = self._prod[0]
        if cons >= prod or room <= 0:
            return 0
        at = self.page + (cons & self.mask)
        end = self._extent(at, at + min(prod - cons, room))
        if end <= at:
            return 0
        self._backlog.append(bytes(self._bytes[at:end]))
        self.backlog_bytes += end - at
        self._cons[0] = cons + (end - at)
        return end - at

    # ---------------------------------------------- sipping in the background
    #
    # The loop sips between the steps of its long work, but it cannot while
    # a step does not return: a write to a reader that stopped reading (a
    # pipe, a terminal scrolled back), a disk's journal, the scheduler
    # giving both CPUs to the exiting processes that make the burst. A
    # 19,000-socket burst fills the ring in about 45 ms; a loop away longer
    # lost the rest (759 events in one CI run of tests/kernel/
    # test_burst_live.py). While the consumer is away (between away() and
    # present()), a thread of its own sips. It needs the interpreter only
    # for the copy: a loop blocked in a system call lets it run at once, a
    # loop running Python lets it in within the interpreter's switch
    # interval (5 ms). Never while the consumer reads or waits: a record
    # moved out of the ring after the consumer's last read would not wake
    # its wait.
    #
    # Its wake-ups: none while the ring is empty, whatever the loop does (it
    # waits on the ring, and the kernel wakes it at the next record). Once a
    # record came, it looks every interval until the ring is empty again:
    # at most two wake-ups an interval (200 a second) under a steady flow of
    # events, and none for the loop's turns (away() and present() only set
    # a flag).
    #
    # No lock and no threading.Event is taken by stop_sipping(): the stop
    # signal's handler calls it, in the main thread, possibly while that
    # thread holds one (an Event's own lock in away() was such a deadlock).

    def sip_in_background(self, fill: int, cap: int, interval_s: float) -> None:
        """Keep a backlog: records move out of the ring once `fill` bytes
        wait in it, the backlog within `cap` bytes (the policy of every
        sip_when_full() from now on), and a thread of its own does that
        every interval_s while the consumer is away (until present(), and
        again from away()) and records wait in the ring."""
        if self._sipper is not None:
            return
        self._sip_fill, self._sip_cap = fill, cap
        self._stop_pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._on_record = select.poll()         # the next record, or the stop
        self._on_record.register(self._map_fd, select.POLLIN)
        self._on_record.register(self._stop_pipe[0], select.POLLIN)
        self._on_stop = select.poll()           # an interval, or the stop
        self._on_stop.register(self._stop_pipe[0], select.POLLIN)
        self._sipping = True
        self._sipper = threading.Thread(target=self._sip_while_away,
                                        args=(max(1, round(interval_s * 1000)),),
                                        name="ring-sip", daemon=True)
        self._sipper.start()

    def stop_sipping(self) -> None:
        """No background sip from now on (the stop: what is left is read
        or counted). A flag and a byte written, nothing locked: a signal
        handler may call it."""
        if not self._sipping:
            return
        self._sipping = False
        try:
            os.write(self._stop_pipe[1], b"x")      # ends the sipper's waits
        except OSError:
            pass

    def away(self) -> None:
        """The consumer goes to other work: the sipper may sip."""
        self._away = True

    def present(self) -> None:
        """The consumer reads (and maybe waits on) the ring itself: once
        this returns, the sipper moves nothing until away()."""
        with self._lock:                # a sip under way ends first
            self._away = False

    def _sip_while_away(self, interval_ms: int) -> None:
        while self._sipping:
            if self._prod[0] == self._cons[0]:
                if not self._wait_for_record():
                    return              # the ring's fd is gone: nothing to wait on
                continue
            self._on_stop.poll(interval_ms)     # the consumer may take them meanwhile
            with self._lock:
                if self._sipping and self._away:
                    self._sip_when_full()

    def _wait_for_record(self) -> bool:
        """Until a record waits in the ring, the stop, or RECORD_WAIT_MS;
        False when the ring's fd is gone. The kernel wakes the ring's
        waiters only for a record committed at our position: the loop
        reading that record in the instants between its commit and that
        check, and stopping at one still being written, would leave this
        wait without a wake-up (a review: two races at once). The timeout
        bounds that to RECORD_WAIT_MS, at one wake-up a second."""
        ready = self._on_record.poll(RECORD_WAIT_MS)
        bad = select.POLLERR | select.POLLHUP | select.POLLNVAL
        return not any(ev & bad for _fd, ev in ready)

    def _extent(self, at: int, end: int) -> int:
        """Where the records that are whole and committed end, from `at`,
        not past `end`."""
        words = self._words
        run = self._run
        while at < end:
            length = words[at >> 2]
            if run is not None and length == run[2]:
                # A run of records of the one size: their headers read as
                # one strided slice (bounded, so a run broken often costs
                # no more than one record at a time would).
                stride = run[1]
                n = min((end - at) // stride, 1024)
                step = stride >> 2
                heads = words[at >> 2:(at >> 2) + n * step:step].tolist()
                if heads.count(run[2]) != n:
                    n = next(i for i, h in enumerate(heads) if h != run[2])
                if n:
                    at += n * stride
                    continue
            if length & BUSY_BIT:
                break
            nxt = at + (((length & ~(BUSY_BIT | DISCARD_BIT)) + HEADER + 7) & ~7)
            if nxt > end:
                break
            at = nxt
        return at

    def _read_backlog(self, limit: int) -> list:
        chunk = self._backlog[0]
        at = self._backlog_at
        view = memoryview(chunk)
        words = view.cast("I")
        rows: list = []
        end = self._take(words, view, at, len(chunk), limit, rows)
        words.release()
        view.release()
        self.backlog_bytes -= end - at
        if end >= len(chunk):
            self._backlog.popleft()
            self._backlog_at = 0
        else:
            self._backlog_at = end
        self.taken += len(rows)
        return rows

    def wait(self, timeout_ms: int) -> None:
        """Until the kernel says there is something to read (it wakes the
        consumer when a record is committed at the position we reached),
        or the timeout."""
        try:
            self._poll.poll(timeout_ms)
        except InterruptedError:
            pass
        if self._wakeup is not None:
            try:
                while os.read(self._wakeup[0], 256):
                    pass
            except OSError:         # empty (EAGAIN)
                pass

    def close(self) -> None:
        if self._sipper is not None:
            # Ended before the mapping goes: it reads it.
            self.stop_sipping()
            self._sipper.join()
            self._sipper = None
            for fd in self._stop_pipe:
                os.close(fd)
        if self._wakeup is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        for view in (self._cons, self._prod, self._words, self._bytes):
            view.release()
        for m in (self._consumer, self._data):
            try:
                m.close()
            except (BufferError, ValueError):
                pass
