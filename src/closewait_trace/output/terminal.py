"""The terminal sink: records to stdout as text (output/render.py) or JSON
lines, and the one way a line of notice reaches stderr. Every subcommand
that prints records prints them through it: the live trace, `top` aside
(output/topview.py), the replay (-r), `report` and `snapshot`."""

from __future__ import annotations

import fcntl
import os
import select
import stat
import sys

from closewait_trace.output import changefold, lingerlines, render, textsafe, transitions
from closewait_trace.sockets.filters import describe_filters
from closewait_trace.wholewrite import is_unbuffered, write_all


# --all's output into a pipe: the pipe's buffer, raised from Linux's 64 KiB.
# A batch of lines (256 JSON lines are about 85 KB) then no longer fills it
# each time, and the tracer no longer waits for its reader to be scheduled
# every couple of hundred lines: under a saturating workload it blocked in
# write() 1,100-1,750 times in 3 s (a quarter of its time), 8-49 times with
# 1 MiB, and left far less unwritten when stopped (docs/benchmarks.md,
# "Fourth pass"). So does a live trace's batch of linger records (hold_batch:
# 100,000 lines of 2.3 KB blocked the loop 0.27-0.50 s with 64 KiB, 0.09 s
# with 1 MiB). 1 MiB is Linux's default pipe-max-size: what any user may
# ask for; the kernel memory is taken only as the pipe fills.
PIPE_BYTES = 1 << 20


def widen_pipe(stream) -> None:
    """Raise the buffer of the pipe stream writes to (stdout) to PIPE_BYTES.
    Anything else (a terminal, a file, a socket, no file at all) is left as
    it is, and so is a pipe the kernel will not widen (a user over its pipe
    quota): the output is the same bytes either way, only its pace
    differs."""
    try:
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_BYTES:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError, ValueError):
        pass


def notice(line: str) -> None:
    """One line on stderr (a warning, a notice, the banner of a trace whose
    stdout is JSON or nothing), written at once."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# Characters a holding sink keeps before it writes them (a JSON line of a
# snapshot is 0.5-3 KB, a text line 80 characters).
HOLD_CHARS = 1 << 20
# The same for a live trace's batch of records (hold_batch): smaller, so
# that the first of 100,000 linger lines are not kept back long (256 KiB:
# about 110 of 2.3 KB, a few ms of work).
BATCH_CHARS = 1 << 18


def _as_is(line: str) -> str:
    return line


class TerminalSink:
    """The terminal sink: records to stdout as text or JSON lines.

    When the reader goes away (`| head -1`) output ends quietly and
    on_reader_gone is called (the live tracer then ends the trace: nobody
    reads it). A failing write (EPIPE) tells, but a tracer with nothing to
    print would never try one: so tick() also polls stdout for the closed
    pipe (POLLERR/POLLHUP)."""

    def __init__(self, as_json: bool, renderer: render.TextRenderer, quiet: bool = False,
                 on_reader_gone=None, stream=None, hold: bool = False):
        self.as_json = as_json
        self.renderer = renderer
        self.quiet = quiet
        self.closed = False
        self.on_reader_gone = on_reader_gone
        self.stream = stream
        self._lines = None          # the fast transition lines, made at first use
        # A live trace whose stdout is JSON or nothing: the start record's
        # banner goes to stderr (said "ready": a reproduction may start).
        self.banner_on_stderr = False
        # hold: lines are kept and written HOLD_CHARS at a time, and at
        # flush(), in one write each (a one-shot output: snapshot). Written
        # line by line, 10,000 sockets were 20,000 write(2)s wherever
        # stdout is unbuffered (PYTHONUNBUFFERED=1, common in containers).
        self._held: list | None = [] if hold else None
        self._held_chars = 0
        self._always_held = hold
        # Linger records' JSON lines, made from the socket (emit_linger).
        self._linger_json = lingerlines.LingerJson()
        self._linger_text = lingerlines.LingerText(renderer)
        # The text's CHANGE rows of one run, folded (output/changefold.py):
        # closed by any other record, a batch's end, a flush, the end.
        self._changes = changefold.ChangeFold()
        self._run_day = None        # the local day of the run's CHANGE records
        self._run_second = None     # and the second of the last of them

    @property
    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    def emit(self, rec: dict) -> None:
        if self.banner_on_stderr and rec.get("type") == "start":
            # The banner has one source, the start record: rendered on
            # stdout in text mode (render.TextRenderer), said on stderr
            # when stdout carries JSON or nothing (--json, -q, -w -).
            self._banner(rec)
        if self.quiet and rec.get("type") == "summary":
            # Quiet (the service): the trace's end still reaches the journal,
            # as the summary's text on stderr; the recording has the record.
            try:
                # Fitted as the text renderer fits it (a still-lingering
                # line naming three holders was 120 columns and more).
                for line in render.fit_lines(render.summary_lines(rec)):
                    if line:
                        sys.stderr.write(textsafe.safe_line(line) + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            return
        if self.quiet or self.closed:
            return
        if self.as_json:
            lines = [textsafe.json_dumps(rec, check_circular=False)]
        elif render.is_change(rec):
            self._same_day(rec.get("ts"))
            if not self._changes.admit(self.renderer.change_key(rec),
                                       lambda: self.renderer.change_description(rec)):
                self.renderer.count_folded()
                return
            lines = self.renderer.render(rec)
        else:
            self._close_changes()
            lines = self.renderer.render(rec)
        self._put_lines(lines)

    def emit_linger(self, report: lingerlines.LingerReport) -> None:
        """A linger record: its line made from the socket, without the
        record's dict (a JSON line is safe: LingerJson checks it)."""
        if self.quiet or self.closed:
            return                  # as emit() does with a linger record
        if self.as_json:
            self._put_lines([self._linger_json.line(report)], checked=True)
            return
        if not report.update:
            self._close_changes()
        else:
            self._same_day(report.ts)
            if not self._changes.admit(self._linger_text.change_key(report),
                                       lambda: self._linger_text.change_description(report)):
                return
        # Checked too: LingerText's lines, and render()'s.
        self._put_lines(self._linger_text.lines(report), checked=True)

    def _same_day(self, ts) -> None:
        """A run of CHANGE rows is of one day: a record of another (a run
        over midnight, a replay's records) closes it first, so that its line
        is written before that day's date line, not under it."""
        # A batch's records share their second: its day looked up once.
        second = int(ts) if type(ts) is float and abs(ts) < 1e18 else None   # (not NaN)
        if second is not None and second == self._run_second:
            return
        self._run_second = second
        day = render.day_of(ts)
        if day != self._run_day:
            self._close_changes()
            self._run_day = day

    def _close_changes(self) -> None:
        """The open run of CHANGE rows ended: its folded groups' lines."""
        if self._changes.open:
            self._put_lines(self.renderer.finished(self._changes.close()), checked=True)

    def _banner(self, rec: dict) -> None:
        threshold = rec.get("threshold_s")
        threshold_ns = round(threshold * 1e9) if isinstance(threshold, (int, float)) else 0
        for line in render.banner(threshold_ns, describe_filters(rec.get("filters")),
                                  at_terminal=sys.stderr.isatty()):
            notice(line)

    def emit_transitions(self, rows, offset_ns: int) -> None:
        """--all's transitions, raw rows from the kernel (events.EventLayout),
        written as emit(records.transition(...)) would write each, in one
        write (output/transitions.py)."""
        if self.quiet or self.closed or not rows:
            return
        if not self.as_json:
            self._close_changes()
        lines = self._lines
        if lines is None:
            lines = self._lines = (transitions.JsonLines() if self.as_json
                                   else transitions.TextLines(self.renderer))
            widen_pipe(self._out)       # a flood of lines starts: see PIPE_BYTES
        text = lines.lines(rows, offset_ns)
        try:
            if self._held:
                self._write_held()      # the lines before these go first
            self._write_text(text)
        except BrokenPipeError:
            self._reader_gone()

    def _write_text(self, text: str) -> None:
        """A text written whole (wholewrite.write_all), not through the
        stream's write(): where stdout is unbuffered (PYTHONUNBUFFERED=1),
        that dropped what a write(2) interrupted on a full pipe did not
        take (Ctrl-C while the reader was behind cut lines out of the
        middle of the output)."""
        out = self._out
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):
            out.write(text)         # not a file (a test's StringIO)
            return
        out.flush()                 # what the stream still holds goes first
        write_all(fd, text.encode(getattr(out, "encoding", None) or "utf-8",
                                  getattr(out, "errors", None) or "strict"))

    def write_lines(self, lines, checked: bool = False) -> None:
        """Lines of the caller's own (a title, a footer, a replay's end),
        after what the records before them left to write. checked: every
        line has been through textsafe.safe_line already."""
        if self.closed:
            return
        self._close_changes()
        self._put_lines(lines, checked)

    def _put_lines(self, lines, checked: bool = False) -> None:
        """A record's lines. checked: as write_lines' (a linger line:
        lingerlines.LingerJson and LingerText check their own)."""
        if self.closed:
            return
        held = self._held
        safe = _as_is if checked else textsafe.safe_line
        try:
            if held is not None:
                for line in lines:
                    line = safe(line) + "\n"
                    held.append(line)
                    self._held_chars += len(line)
                if self._held_chars >= (HOLD_CHARS if self._always_held else BATCH_CHARS):
                    self._write_held()
                return
            out = self._out
            # The last check, here where every line reaches the terminal:
            # a field some caller forgot to escape cannot get through raw.
            if is_unbuffered(out):
                # Each write() would be a write(2) of its own, which drops
                # what a pipe did not take (a JSON line with many holders
                # is longer than the 4 KB it takes in one piece): these
                # lines in one write taken whole instead.
                self._write_text("".join(safe(line) + "\n" for line in lines))
                return
            for line in lines:
                out.write(safe(line) + "\n")
        except BrokenPipeError:
            self._reader_gone()

    def hold_batch(self, on: bool) -> None:
        """A live trace's batch of records (a resolve's process and linger
        records: 100,000 at once when a holder stops closing). On: its lines
        are kept and written BATCH_CHARS at a time, each in one write; off:
        what is kept is written, and lines go out as they come again. Line
        by line, a 2.3 KB linger line went through the stream's 8 KB buffer:
        a write(2) to the reader's pipe every three or four records (11 us
        a record under cProfile at 100,000). A batch widens the pipe it
        writes to (widen_pipe). The same bytes in the same order either
        way."""
        if not self.closed:
            self._close_changes()       # a batch is a run of its own
        if self._always_held:
            return
        if on:
            if self._held is None:
                self._held = []
            if not (self.quiet or self.closed):   # -q: stdout is not ours (-w -)
                widen_pipe(self._out)
            return
        try:
            if self._held:
                self._write_held()
        except BrokenPipeError:
            self._reader_gone()
        self._held = None

    def _write_held(self) -> None:
        text, self._held[:], self._held_chars = "".join(self._held), [], 0
        self._write_text(text)

    def write_line(self, line: str) -> None:
        self.write_lines([line])

    def tick(self, _view=None) -> None:
        if self.quiet or self.closed:
            return
        if reader_gone(self._out):
            self._reader_gone()

    def flush(self) -> None:
        """Called once per pass of the main loop (at least every 100 ms):
        output stays live without a write per record under a flood."""
        if self.closed:
            return
        self._close_changes()
        try:
            if self._held:
                self._write_held()
            self._out.flush()
        except BrokenPipeError:
            self._reader_gone()

    def close(self) -> None:
        self.flush()

    def _reader_gone(self) -> None:
        self.closed = True
        # What is still buffered can never be written: point stdout at
        # /dev/null so that the interpreter's final flush cannot fail.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._out.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        if self.on_reader_gone is not None:
            self.on_reader_gone()


def reader_gone(stream) -> bool:
    """Whether the reader of this output closed it: the write end of a pipe
    whose reader exited polls POLLERR, a socket POLLHUP. A terminal or a
    file never does. Costs one poll(2) with no wait."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    p = select.poll()
    p.register(fd, 0)           # POLLERR and POLLHUP are always reported
    try:
        events = p.poll(0)
    except OSError:
        return False
    return any(ev & (select.POLLERR | select.POLLHUP) for _fd, ev in events)
