"""The `top` view's sink, beside the other sinks (sinks.py: the interface
and the recording's; terminal.py; metrics.py): rich on a terminal (keys: q quits, g changes the grouping),
plain text blocks otherwise. The rows come from output/top.py's TopModel."""

from __future__ import annotations

import os
import select
import sys
import termios
import tty
from typing import Callable, Optional

from closewait_trace.output.sinks import TickView
from closewait_trace.output import fold, records, textsafe, top


class TopSink:
    quiet = False                 # live/session.py: no banner on stderr

    def __init__(self, grouping: str = "process", iterations: Optional[int] = None,
                 stream=None, keys=None):
        self.grouping = grouping
        self.iterations = iterations
        self.model = top.TopModel()
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = self.stream.isatty()
        self.keys = keys if keys is not None else sys.stdin
        self.on_reader_gone: Optional[Callable[[], None]] = None
        self.shown = 0
        self.threshold_s = 0.0
        self._live = None
        self._console = None
        self._saved_tty = None
        self.summary: Optional[dict] = None
        # id(lingerer) -> (lingerer, ownership, diagnosis, places version,
        # keys): a socket's row keys are worked out again only when what
        # they come from changed; the sockets gone are dropped each tick.
        self._keys: dict = {}

    # -------------------------------------------------- sink interface

    def emit(self, rec: dict) -> None:
        if rec.get("type") == "summary":
            self.summary = rec
        if rec.get("type") == "start":
            self.threshold_s = rec.get("threshold_s") or 0.0
            if self.interactive:
                self._open_screen()
        self.model.on_record(rec)

    def tick(self, view: TickView) -> None:
        if self.iterations is not None and self.shown >= self.iterations:
            return                  # done: the stop is under way
        rows = self.model.rows_of(self._lingering(view), self.grouping)
        if self.interactive:
            self._draw(rows)
        else:
            try:
                for line in top.plain_lines(rows, self.grouping, self.threshold_s,
                                            self.model.lost, view.wall_ts):
                    self.stream.write(textsafe.safe_line(line) + "\n")
                self.stream.flush()
            except BrokenPipeError:
                self._stop()
        self.shown += 1
        if self.iterations is not None and self.shown >= self.iterations:
            self._stop()

    def _lingering(self, view: TickView) -> list:
        """(keys, age in seconds, its source) of each lingering socket."""
        model, version, now = self.model, self.model.places_version, view.now_ns
        folding = model.folding
        cache, fresh, out = self._keys, {}, []
        for l in view.lingering():
            c = cache.get(id(l))
            if (c is None or c[0] is not l or c[1] is not l.ownership
                    or c[2] is not l.diagnosis or c[3] != version):
                c = (l, l.ownership, l.diagnosis, version,
                     top.keys_of(records.lingering_entry(l, 0), model.places))
                # What the kernel says of its holders (parent, uid, exe
                # link), for the fold of a server's forks into one row.
                if l.ownership is not None:
                    for h in l.ownership.holders:
                        folding.add_holder(h)
            fresh[id(l)] = c
            # A keepalive range's upper end (top.age_of), any other its age;
            # with its source, so that an estimate is shown as one.
            out.append((c[4], l.age_bound_ns(now) / 1e9, l.age_source))
        self._keys = fresh
        if len(folding) > top.MAX_PROCESSES:
            # Bounded: made again from the holders lingering now (once per
            # MAX_PROCESSES new holder processes, at most).
            model.folding = folding = fold.Fold()
            for l in view.lingering():
                if l.ownership is not None:
                    for h in l.ownership.holders:
                        folding.add_holder(h)
        return out

    def flush(self) -> None:
        if self.interactive:
            self._read_keys()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()           # the last frame stays on the screen
            self._live = None
        self._restore_tty()
        if self.summary is not None:
            from closewait_trace.output.render import fit_lines, summary_lines
            try:
                for line in fit_lines(summary_lines(self.summary)):
                    self.stream.write(textsafe.safe_line(line) + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                pass

    # -------------------------------------------------- the terminal

    def _stop(self) -> None:
        if self.on_reader_gone is not None:
            self.on_reader_gone()

    def _open_screen(self) -> None:
        from rich.console import Console
        from rich.live import Live
        self._console = Console(file=self.stream, highlight=False, markup=False, emoji=False)
        self._live = Live(console=self._console, auto_refresh=False, screen=False,
                          transient=False)
        self._live.start()
        try:
            fd = self.keys.fileno()
            if os.isatty(fd):
                self._saved_tty = (fd, termios.tcgetattr(fd))
                tty.setcbreak(fd)           # keys without Enter; Ctrl-C still a signal
        except (OSError, ValueError, termios.error):
            self._saved_tty = None

    def _restore_tty(self) -> None:
        if self._saved_tty is not None:
            fd, attrs = self._saved_tty
            try:
                termios.tcsetattr(fd, termios.TCSADRAIN, attrs)
            except (OSError, termios.error):
                pass
            self._saved_tty = None

    def _read_keys(self) -> None:
        if self._saved_tty is None:
            return
        fd = self._saved_tty[0]
        try:
            while select.select([fd], [], [], 0)[0]:
                key = os.read(fd, 1)
                if not key:
                    return
                if key in (b"q", b"Q"):
                    self._stop()
                elif key in (b"g", b"G"):
                    at = top.GROUPINGS.index(self.grouping)
                    self.grouping = top.GROUPINGS[(at + 1) % len(top.GROUPINGS)]
        except OSError:
            return

    def _draw(self, rows: list) -> None:
        if self._live is None:
            return
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text
        # The headline and the keys as lines of their own, the screen's
        # width: a table's title and caption wrap to the table's, which is
        # narrow when its columns are ("q quit, g grouping (process," on one
        # line and "container)" on the next, on a 200-column terminal).
        headline = Text(top.headline(rows, self.grouping, self.threshold_s, self.model.lost),
                        no_wrap=True, overflow="ellipsis")
        keys = Text("q quit, g grouping (" + ", ".join(top.GROUPINGS) + ")",
                    no_wrap=True, overflow="ellipsis")
        height = max(5, (self._console.size.height if self._console else 24) - 6)
        shown = [top.cells(row, self.grouping) for row in rows[:height]]
        # The counts as wide as they are, never cut: rich shrank every
        # column to fit 80, the counts too ("~1m2…" for the oldest age,
        # "SOCKE…"), and left the key padded (a newcomer's report). The key
        # gets what is left, its name cut and its causes kept
        # (top.cells); one space between two columns.
        widths = [max([len(name)] + [len(c[i]) for c in shown])
                  for i, name in enumerate(top.COLUMNS)]
        screen = self._console.size.width if self._console else 80
        key_columns = max(12, screen - sum(widths) - len(top.COLUMNS) - 1)
        table = Table(box=None, pad_edge=False, collapse_padding=True)
        for name, width in zip(top.COLUMNS, widths):
            table.add_column(name, justify="right", no_wrap=True, min_width=width)
        table.add_column(top.TITLES[self.grouping], no_wrap=True, overflow="ellipsis")
        for row in rows[:height]:
            # Escaped already (top.keys_of); Text, so that nothing is markup.
            table.add_row(*(Text(c) for c in top.cells(row, self.grouping, key_columns)))
        if len(rows) > height:
            table.add_row("", "", "", "", Text(f"... {len(rows) - height} more rows"))
        self._live.update(Group(headline, table, keys), refresh=True)
