"""Command line: option parsing, output sinks, and turning every user error
into one line and a documented exit code."""

from __future__ import annotations

import gc
import os
import select
import shlex
import socket
import sys

import click

from closewait_trace import __version__
from closewait_trace.output import render, textsafe, transitions
from closewait_trace.durations import parse_duration_ns
from closewait_trace.errors import (EXIT_GATHER, EXIT_NOT_ROOT, EXIT_USAGE, UserError)
from closewait_trace.sockets.filters import (HolderFilter, SocketFilter, describe_filters,
                                             parse_ports, validate_container)

EXAMPLES = """\b
Examples:
  closewait-trace                  # tail sockets in CLOSE_WAIT for >= 1s
  closewait-trace -t 500ms         # report after 500 ms instead
  closewait-trace -p 8080 -p 8443  # only local ports 8080 and 8443
  closewait-trace -P 5432 -4       # only IPv4 connections to remote port 5432
  closewait-trace --unit nginx     # only sockets held by nginx.service
  closewait-trace --json | jq .    # one JSON object per line
  closewait-trace -v               # evidence for each diagnosis, headers used
  closewait-trace --all -p 443     # every state transition on port 443
  closewait-trace -w cw.jsonl -q   # record quietly, for later
  closewait-trace -w cw.jsonl.gz -C 100M -W 10  # compressed, 10 x 100 MiB max
  closewait-trace -r cw.jsonl --comm java       # replay, no root needed
  closewait-trace report cw.jsonl  # postmortem: who, how many, how long
  closewait-trace snapshot         # what is in CLOSE_WAIT now (no BPF needed)
"""


class ParsedType(click.ParamType):
    """An option value parsed by a function of ours, whose ValueError says
    what is wrong (shown as the one-line usage error)."""

    def __init__(self, name: str, parse):
        self.name = name
        self.parse = parse

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value            # already parsed (click converts defaults too)
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class DurationType(ParsedType):
    def __init__(self):
        super().__init__("DURATION", parse_duration_ns)


class PortsType(ParsedType):
    def __init__(self):
        super().__init__("PORT[,PORT...]", lambda value: parse_ports([value]))


# tcpdump's -C units, kept exactly: a bare number is millions of bytes
# (decimal); the k, m, g suffixes are binary (KiB, MiB, GiB).
_SIZE = {"": 1_000_000, "k": 1024, "m": 1024**2, "g": 1024**3}
MIN_ROTATE_SIZE = 1024


class SizeType(click.ParamType):
    """-C SIZE as tcpdump reads it: 10 = 10,000,000 bytes; 500k = 500 KiB,
    10M = 10 MiB, 1G = 1 GiB."""
    name = "SIZE"

    def convert(self, value, param, ctx):
        import re
        if isinstance(value, int):
            return value
        # A "b" only after a unit (10MB): a bare "1000b" would read as 1000 million.
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kKmMgG])[bB]?)?\s*", str(value))
        if not m or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a size (examples: 10 = 10 million bytes, "
                      f"500k, 10M, 1G)", param, ctx)
        size = int(float(m.group(1)) * _SIZE[(m.group(2) or "").lower()])
        if size < MIN_ROTATE_SIZE:
            self.fail(f"{value!r} is {size} bytes; the rotation size must be at least 1k "
                      f"({MIN_ROTATE_SIZE} bytes)", param, ctx)
        return size


class WhenType(click.ParamType):
    name = "TIME"

    def convert(self, value, param, ctx):
        from closewait_trace.files.replay import parse_when
        try:
            parse_when(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value


class ListenType(click.ParamType):
    name = "[ADDR:]PORT|unix:PATH"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from closewait_trace.live.metrics import parse_listen
        try:
            return parse_listen(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Output:
    """The terminal sink: records to stdout as text or JSON lines.

    When the reader goes away (`| head -1`) output ends quietly and
    on_reader_gone is called (the live tracer then ends the trace: nobody
    reads it). A failing write (EPIPE) tells, but a tracer with nothing to
    print would never try one: so tick() also polls stdout for the closed
    pipe (POLLERR/POLLHUP)."""

    def __init__(self, as_json: bool, renderer: render.TextRenderer, quiet: bool = False,
                 on_reader_gone=None, stream=None):
        self.as_json = as_json
        self.renderer = renderer
        self.quiet = quiet
        self.closed = False
        self.on_reader_gone = on_reader_gone
        self.stream = stream
        self._lines = None          # the fast transition lines, made at first use

    @property
    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    def emit(self, rec: dict) -> None:
        if self.quiet and rec.get("type") == "summary":
            # Quiet (the service): the trace's end still reaches the journal,
            # as the summary's text on stderr; the recording has the record.
            try:
                for line in render.summary_lines(rec):
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
        else:
            lines = self.renderer.render(rec)
        self.write_lines(lines)

    def emit_transitions(self, rows, offset_ns: int) -> None:
        """--all's transitions, raw rows from the kernel (events.EventLayout),
        written as emit(records.transition(...)) would write each, in one
        write (output/transitions.py)."""
        if self.quiet or self.closed or not rows:
            return
        lines = self._lines
        if lines is None:
            lines = self._lines = (transitions.JsonLines() if self.as_json
                                   else transitions.TextLines(self.renderer))
        text = lines.lines(rows, offset_ns)
        try:
            self._write_text(text)
        except BrokenPipeError:
            self._reader_gone()

    def _write_text(self, text: str) -> None:
        """A large text written whole. Not through the stream's write():
        CPython 3.11's buffered writer loses data when a signal handler runs
        while a write larger than its buffer blocks on a full pipe (Ctrl-C
        while the reader is behind cut lines out of the middle of the
        output); os.write's partial writes are taken up here instead."""
        out = self._out
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):
            out.write(text)         # not a file (a test's StringIO)
            return
        out.flush()                 # what the stream still holds goes first
        data = memoryview(text.encode(getattr(out, "encoding", None) or "utf-8",
                                      getattr(out, "errors", None) or "strict"))
        while data:
            data = data[os.write(fd, data):]

    def write_lines(self, lines) -> None:
        if self.closed:
            return
        try:
            out = self._out
            for line in lines:
                # The last check, here where every line reaches the terminal:
                # a field some caller forgot to escape cannot get through raw.
                out.write(textsafe.safe_line(line) + "\n")
        except BrokenPipeError:
            self._reader_gone()

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
        try:
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


def fail(err: UserError) -> None:
    # Messages quote paths and file content: shown escaped, like all text.
    click.echo(textsafe.safe_line(err.one_line()), err=True)
    sys.exit(err.exit_code)


def socket_options(command):
    """-p, -P, -4, -6: the socket filters the live tail and snapshot share."""
    for option in reversed([
            click.option("-p", "--lport", "lports", type=PortsType(), multiple=True,
                         help="Only sockets with this local port (repeat or comma-separate; "
                              "a range: 8080-8090; at most 64 ports)."),
            click.option("-P", "--rport", "rports", type=PortsType(), multiple=True,
                         help="Only sockets with this remote port (as -p)."),
            click.option("-4", "--ipv4", "ipv4", is_flag=True, help="Only IPv4 sockets."),
            click.option("-6", "--ipv6", "ipv6", is_flag=True, help="Only IPv6 sockets.")]):
        command = option(command)
    return command


# Options that mean something only while tracing live.
DEFAULT_MAX_TRACKED = 262_144
LIVE_ONLY = ("threshold", "interval", "max_tracked", "all_transitions", "quiet", "force",
             "no_eof_stacks",
             "rotate_size", "rotate_seconds", "rotate_count", "compress", "snapshot_interval")


def holder_options(command):
    """--pid, --comm, --cgroup, --container, --unit: who holds the socket
    (live, replay and snapshot alike)."""
    for option in reversed([
            click.option("--pid", "pids", type=click.IntRange(1), multiple=True, metavar="PID",
                         help="Only sockets this process held or closed (repeatable)."),
            click.option("--comm", "comms", multiple=True, metavar="NAME",
                         help="Only sockets a process with this name held or closed: a "
                              "prefix (python matches python3) or a glob (*worker*)."),
            click.option("--cgroup", "cgroups", multiple=True, metavar="PATH",
                         help="Only sockets held by processes in this cgroup (or below it)."),
            click.option("--container", "containers", type=ParsedType("ID", validate_container),
                         multiple=True, metavar="ID",
                         help="Only sockets held by processes of this container "
                              "(id or its first 4+ hex digits)."),
            click.option("--unit", "units", multiple=True, metavar="NAME",
                         help="Only sockets held by processes of this systemd unit.")]):
        command = option(command)
    return command


def warn_unmatched_holders(holder_filter: HolderFilter, consequence: str) -> None:
    """One line on stderr when a holder filter value matches no process now
    (a typo, a service not running): an empty trace must not look like good
    news. A notice, not an error: the process may start later."""
    if not holder_filter.active:
        return
    from closewait_trace.sockets import identity
    people = identity.people_now(holder_filter.needs_identity)
    if holder_filter.comms:         # read whole: what each --comm caught is said
        people = list(people)
    for pattern, names in holder_filter.names_matched(people if holder_filter.comms
                                                      else []).items():
        # A prefix or a glob: say what it caught (python -> python3).
        click.echo(textsafe.safe_line(
            f"closewait-trace: notice: --comm {textsafe.escape(pattern)} matches "
            f"{textsafe.escape(', '.join(names))} now"), err=True)
    missing = holder_filter.unmatched(people)
    if not missing:
        return
    # Without root, hidepid may hide other users' processes: say only what
    # was seen. The kernel keeps 15 bytes of a name: say so when one is longer.
    who = "no process" if os.geteuid() == 0 else "no process visible to you"
    long_names = [c for c in holder_filter.comms if f"--comm {c}" in missing
                  and len(c.encode("utf-8", "surrogateescape")) > 15]
    note = "; a process name has at most 15 bytes" if long_names else ""
    click.echo(textsafe.safe_line(
        f"closewait-trace: notice: {who} matches {textsafe.escape(', '.join(missing))} "
        f"now{note}; {consequence}"), err=True)


def holder_filter_of(pids, comms, cgroups, containers, units) -> HolderFilter:
    return HolderFilter(pids=tuple(pids), comms=tuple(comms), cgroups=tuple(cgroups),
                        containers=tuple(containers), units=tuple(units))


def socket_filter_of(lports, rports, ipv4, ipv6) -> SocketFilter:
    if ipv4 and ipv6:
        raise click.UsageError("-4 and -6 exclude each other; give at most one")
    return SocketFilter(
        lports=tuple(sorted({p for group in lports for p in group})),
        rports=tuple(sorted({p for group in rports for p in group})),
        family=socket.AF_INET if ipv4 else socket.AF_INET6 if ipv6 else None)


@click.group(invoke_without_command=True, epilog=EXAMPLES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 80})
@click.option("-t", "--threshold", type=DurationType(), default="1s", show_default=True,
              help="Report a socket once it has been in CLOSE_WAIT this long "
                   "(500ms, 2s, 1m).")
@socket_options
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line (schema in docs/schema.md).")
@click.option("--wide", is_flag=True, help="Wide address columns (long IPv6 addresses).")
@click.option("--time-format", type=click.Choice(render.TIME_FORMATS), default="clock",
              show_default=True,
              help="TIME column: clock (HH:MM:SS, a date line when the day changes), "
                   "iso (ISO 8601), epoch (seconds), elapsed (seconds since the start), "
                   "entered (ENTERED: when each socket entered CLOSE_WAIT).")
@click.option("-i", "--interval", type=DurationType(), default=None,
              help="How often to look for sockets crossing the threshold "
                   "[default: threshold/2, at most 1s].")
@click.option("--max-tracked", type=click.IntRange(1024, 4_194_304), default=DEFAULT_MAX_TRACKED,
              show_default=True, help="Capacity of the kernel's map of sockets in CLOSE_WAIT.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show the evidence for each diagnosis: holders' command lines, "
                   "their threads' stacks (and Python frames), the stacks at the EOF "
                   "read and the connect(), and the headers bcc used.")
@click.option("--no-eof-stacks", is_flag=True,
              help="Do not copy the stack of a thread that reads a socket in "
                   "CLOSE_WAIT to its end or connects a client socket (the places "
                   "that read EOF and never closed, or opened the connection).")
@click.option("--all", "all_transitions", is_flag=True,
              help="Also stream every TCP state transition (like tcpstates), "
                   "with the time spent in the previous state.")
@click.option("-w", "--write", "write_path", metavar="FILE",
              help="Record to FILE (private, 0600) while tailing; .gz compresses; "
                   "- writes the recording to stdout.")
@click.option("-q", "--quiet", is_flag=True, help="With -w: record without printing.")
@click.option("--force", is_flag=True, help="With -w: overwrite an existing recording.")
@click.option("-C", "rotate_size", type=SizeType(),
              help="With -w: start a new file after SIZE bytes (tcpdump's units: "
                   "a bare number is millions, 500k/10M/1G are KiB/MiB/GiB).")
@click.option("-G", "rotate_seconds", type=DurationType(), metavar="SECONDS",
              help="With -w: start a new file every SECONDS (60, 10m, 1h).")
@click.option("-W", "rotate_count", type=click.IntRange(1, 100_000),
              help="With -C or -G: keep at most this many files, replacing the oldest.")
@click.option("-z", "--compress", is_flag=True,
              help="With -w: gzip the recording (FILE gets .gz if it lacks it).")
@click.option("--snapshot-interval", type=DurationType(), default="60s", show_default=True,
              help="With -w: how often to record the set of lingering sockets.")
@click.option("--metrics", "metrics_listen", type=ListenType(),
              help="Serve Prometheus metrics on [ADDR:]PORT (address 127.0.0.1 "
                   "unless given; 9477 is the usual port), or on a Unix socket only "
                   "root may connect to: unix:/run/closewait-trace/metrics.sock.")
@click.option("--metrics-no-comm", is_flag=True,
              help="With --metrics: no process names in the labels (other users' "
                   "names are hidden by /proc under hidepid=2).")
@click.option("-r", "--read", "read_path", metavar="FILE",
              help="Replay a recording (no root needed); - reads stdin; filters apply.")
@holder_options
@click.option("--since", type=WhenType(),
              help="With -r: from this time (13:20, ISO 8601, or 10m, 2h, 1d: that long ago).")
@click.option("--until", type=WhenType(), help="With -r: up to this time.")
@click.version_option(__version__, "-V", "--version")
@click.pass_context
def main_group(ctx, threshold, lports, rports, ipv4, ipv6, as_json, wide, time_format, interval,
               max_tracked, verbose, no_eof_stacks, all_transitions, write_path, quiet, force,
               rotate_size,
               rotate_seconds, rotate_count, compress, snapshot_interval, metrics_listen,
               metrics_no_comm, read_path, pids, comms, cgroups, containers, units, since, until):
    """Trace TCP sockets that linger in CLOSE_WAIT: which ones, since when, and
    every process holding them that never called close(), with a diagnosis of
    why.

    Ports and family (-p, -P, -4, -6) are filtered in the kernel, at no
    cost; --pid, --comm, --cgroup, --container and --unit are decided when a
    socket is resolved (after the threshold), so each socket that crosses
    it still costs one owner lookup.

    Needs root (BPF). SIGINT, SIGTERM and SIGHUP end the trace with its
    summary. Exit codes: 0 ok, 2 bad usage, 3 not root, 4 bcc missing,
    5 no kernel headers, 6 BPF or tracepoint unavailable, 7 file error,
    8 other processes could not be read in time (snapshot), 1 internal error.
    """
    if ctx.invoked_subcommand is not None:
        return
    socket_filter = socket_filter_of(lports, rports, ipv4, ipv6)
    holder_filter = holder_filter_of(pids, comms, cgroups, containers, units)
    renderer = render.TextRenderer(wide=wide, verbose=verbose, time_format=time_format)
    if read_path:
        if write_path:
            raise click.UsageError("-r and -w exclude each other")
        if metrics_listen or metrics_no_comm:
            raise click.UsageError("--metrics serves a live trace: it does not go with -r")
        # Options of a live trace would be ignored by a replay, silently: a
        # reader of `-r FILE -t 5s` would believe the threshold applied.
        for param in ctx.command.params:
            if (param.name in LIVE_ONLY and ctx.get_parameter_source(param.name)
                    == click.core.ParameterSource.COMMANDLINE):
                raise click.UsageError(f"{param.opts[0]} applies to a live trace, not to "
                                       f"a replay of one (-r)")
        run_replay(read_path, socket_filter, holder_filter, since, until,
                   Output(as_json, renderer))
        return
    for name, value in (("--since", since), ("--until", until)):
        if value:
            raise click.UsageError(f"{name} filters a replay: use it with -r FILE")
    if metrics_no_comm and not metrics_listen:
        raise click.UsageError("--metrics-no-comm goes with --metrics")
    if not write_path:
        for name, value in (("-q", quiet and not metrics_listen), ("--force", force),
                            ("-C", rotate_size), ("-G", rotate_seconds), ("-W", rotate_count),
                            ("-z", compress)):
            if value:
                raise click.UsageError(f"{name} goes with -w FILE")
    if write_path == "-":
        for name, value in (("-C", rotate_size), ("-G", rotate_seconds), ("-W", rotate_count)):
            if value:
                raise click.UsageError(f"{name} rotates files; -w - writes to standard output")
        if as_json:
            raise click.UsageError("-w - fills standard output with the recording; "
                                   "--json would print there too: drop one")
        quiet = True        # standard output carries the recording, nothing else
    elif write_path and compress and not write_path.endswith(".gz"):
        write_path += ".gz"     # so that a reader can tell from the name
    if rotate_count and not (rotate_size or rotate_seconds):
        raise click.UsageError("-W caps the number of files made by -C or -G: give one too")
    tick_ns = interval or min(max(threshold // 2, 100_000_000), 1_000_000_000)
    recording = None
    if write_path:
        recording = dict(path=write_path, force=force,
                         compress=compress or write_path.endswith(".gz"),
                         max_bytes=rotate_size, max_files=rotate_count,
                         max_seconds=rotate_seconds / 1e9 if rotate_seconds else None,
                         snapshot_s=snapshot_interval / 1e9)
    run_live(threshold, socket_filter, as_json, tick_ns, max_tracked, verbose,
             Output(as_json, renderer, quiet=quiet), recording, all_transitions,
             holder_filter, metrics_listen, metrics_no_comm, eof_stacks=not no_eof_stacks)


def run_replay(path, socket_filter, holder_filter, since, until, out):
    """Records are streamed from the reader to the output, one at a time
    (files/replay.py): memory is bounded by the reader's line cap and the
    renderer's and filter's caps, never by the size of the recording."""
    from closewait_trace.files import replay
    session = replay.Replay.open([path], socket_filter, holder_filter, since, until)
    out.renderer.replay = session.source
    for r in session.records(headers=not out.as_json, on_wait=out.flush):
        out.emit(r)
    if not out.as_json:
        for line in out.renderer.replay_end():
            out.write_line(line)
    out.flush()
    warn_damage(session.reader)


def warn_damage(rec) -> None:
    if rec.skipped:
        click.echo(f"closewait-trace: warning: skipped {rec.skipped} damaged line(s); "
                   f"the rest was read", err=True)
    for problem in rec.problems:
        # Problems quote file names and content: escaped like all text.
        click.echo(f"closewait-trace: warning: {textsafe.escape(problem)}", err=True)


@main_group.command("report", epilog="""\b
Examples:
  closewait-trace report cw.jsonl            # one capture (rotated parts too)
  closewait-trace report a.jsonl b.jsonl.gz  # several captures together
  closewait-trace report --by cause,program cw.jsonl  # only these tables
  closewait-trace report --json cw.jsonl | jq .by_program""")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for machines.")
@click.option("--top", type=click.IntRange(1, 10_000), default=15, show_default=True,
              help="Rows per table in the text report.")
@click.option("--by", "groupings", multiple=True, metavar="GROUPING[,GROUPING...]",
              help="Tables to show, in this order: cause, program, code, unit, container, "
                   "pod, port, peer, pid (repeat or comma-separate) [default: cause, "
                   "program, code/unit/container/pod where known, port, peer].")
@click.option("--since", type=WhenType(),
              help="Count from this time (13:20, ISO 8601, epoch, or 10m, 2h, 1d6h: that long ago).")
@click.option("--until", type=WhenType(), help="Count up to this time (same forms).")
def report_command(files, as_json, top, groupings, since, until):
    """Postmortem of recordings: what to fix. Sockets that lingered in
    CLOSE_WAIT by cause, by program (children of one server folded into one
    row), by systemd unit, container and pod where known, by local port and
    remote peer, with the cause in each row; the duration histograms; a
    timeline; what was still lingering at the end; gaps and losses. Needs no
    root and no BPF."""
    from closewait_trace.files import parts
    from closewait_trace.output import report
    by = [g.strip() for value in groupings for g in value.split(",") if g.strip()]
    for g in by:
        if g not in report.GROUPINGS:
            raise click.UsageError(f"--by {g}: not a grouping; choose from "
                                   f"{', '.join(report.GROUPINGS)}")
    # Streamed: the reader hands records one at a time to the report, whose
    # state is bounded (report.MAX_*), whatever the size of the recordings.
    reader = parts.RecordingReader(files)
    window = window_of(since, until, reader.first_header.get("start_ts"))
    rep = report.build(reader, source=reader, by=list(dict.fromkeys(by)), **window)
    out = Output(as_json, render.TextRenderer())
    if as_json:
        out.write_lines([textsafe.json_dumps(rep)])
    else:
        out.write_lines(report.render_text(rep, top=top))
    out.flush()
    warn_damage(reader)


def window_of(since, until, first_ts) -> dict:
    """--since/--until as epoch seconds (a time of day is on the first
    capture's day, as in a replay)."""
    from closewait_trace.files.replay import parse_when
    window = {"since": parse_when(since, first_ts) if since else None,
              "until": parse_when(until, first_ts) if until else None}
    if None not in window.values() and window["since"] > window["until"]:
        raise click.UsageError(f"--since {since} is after --until {until}")
    return window


class AgeType(DurationType):
    """A duration where 0 (any age) is allowed."""

    def convert(self, value, param, ctx):
        if str(value).strip() in ("0", "0s", "0ms"):
            return 0
        return super().convert(value, param, ctx)


@main_group.command("top", epilog="""\b
Examples:
  closewait-trace top                    # who piles up sockets, live
  closewait-trace top --by cause -p 8080 # by cause, local port 8080
  closewait-trace top -n 3 > top.txt     # three refreshes as text""")
@click.option("-t", "--threshold", type=DurationType(), default="1s", show_default=True,
              help="Count sockets at least this long in CLOSE_WAIT.")
@socket_options
@holder_options
@click.option("--by", "grouping",
              type=click.Choice(["process", "cause", "peer", "port", "container"]),
              default="process", show_default=True,
              help="Rows by holder process, cause, remote peer, local port or container "
                   "(container, pod or unit, else the cgroup) (g cycles).")
@click.option("-i", "--interval", type=DurationType(), default="1s", show_default=True,
              help="Refresh interval.")
@click.option("-n", "--iterations", type=click.IntRange(1), metavar="N",
              help="End after N refreshes (with a summary).")
def top_command(threshold, lports, rports, ipv4, ipv6, pids, comms, cgroups, containers, units,
                grouping, interval, iterations):
    """A live view for a pile-up, like top(1): one row per holder process
    (or cause, remote peer, local port) with its sockets in CLOSE_WAIT now,
    the oldest, and how many began lingering and closed in the last minute,
    biggest first. On a terminal: q quits, g changes the grouping; otherwise
    a text block per refresh. Needs root (BPF), as the live trace."""
    from closewait_trace.live.topview import TopSink
    socket_filter = socket_filter_of(lports, rports, ipv4, ipv6)
    holder_filter = holder_filter_of(pids, comms, cgroups, containers, units)
    run_live(threshold, socket_filter, False, interval, max_tracked=DEFAULT_MAX_TRACKED,
             verbose=False, out=TopSink(grouping, iterations), holder_filter=holder_filter)


@main_group.command("snapshot", epilog="""\b
Examples:
  closewait-trace snapshot               # every socket in CLOSE_WAIT now
  closewait-trace snapshot -t 1m -p 8080 # >= 1 minute old, port 8080
  closewait-trace snapshot --json > now.jsonl   # save one""")
@click.option("-t", "--min-age", type=AgeType(), default="0", show_default=True,
              help="Only sockets at least this long in CLOSE_WAIT (500ms, 2s, 1m).")
@socket_options
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line: the live tail's process and linger records.")
@click.option("--wide", is_flag=True, help="Wide address columns (long IPv6 addresses).")
@click.option("-v", "--verbose", is_flag=True,
              help="Show the evidence for each diagnosis, with the holders' user stacks.")
@holder_options
def snapshot_command(min_age, lports, rports, ipv4, ipv6, as_json, wide, verbose,
                     pids, comms, cgroups, containers, units):
    """Every socket in CLOSE_WAIT right now, oldest first: its age (estimated
    from the kernel's tcp_info: ~ estimated, >= at least), every process
    holding it (or the listener that never accepted it), why it is not
    closed, and a footer by holder process. Needs no BPF and no bcc; without
    root, other users' processes are hidden."""
    socket_filter = socket_filter_of(lports, rports, ipv4, ipv6)
    holder_filter = holder_filter_of(pids, comms, cgroups, containers, units)
    from closewait_trace.evidence.worker import GatherWorker
    # Other people's /proc, memory and files are read in a worker that is
    # abandoned at a deadline (evidence/worker.py): a holder never hangs it.
    # Started first, so that its start-up overlaps ours (imports, filters).
    gatherer = GatherWorker()
    gatherer.start()
    # One pass that keeps every object it makes to the end: the cyclic
    # collector would only walk them again and again (a third of the cost
    # of the records and of their text with 10,000 sockets), finding nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        write_snapshot(gatherer, socket_filter, holder_filter, min_age, as_json, wide, verbose)
    finally:
        gatherer.close()
        if collecting:
            gc.enable()


def write_snapshot(gatherer, socket_filter, holder_filter, min_age, as_json, wide, verbose):
    from closewait_trace.live import snapshot
    from closewait_trace.evidence.resolver import SNAPSHOT_STALL_S, ProcResolver
    from closewait_trace.evidence.worker import GatherFailed
    as_root = os.geteuid() == 0
    warn_unmatched_holders(holder_filter, "no socket this snapshot shows is theirs")
    resolver = ProcResolver(worker=gatherer)
    try:
        snap = snapshot.take(socket_filter, min_age, as_root=as_root, stacks=verbose,
                             holder_filter=holder_filter, resolver=resolver)
    except GatherFailed as e:
        raise UserError(f"the sockets and their owners could not be read ({e.why}: "
                        f"no read completed for {SNAPSHOT_STALL_S:g}s)", EXIT_GATHER,
                        "something on this host answers /proc reads slowly; try again, "
                        "or narrow it with -p/-P") from None
    finally:
        resolver.close()
    recs = snap.records()
    out = Output(as_json, render.TextRenderer(wide=wide, verbose=verbose))
    lingers = [r for r in recs if r["type"] == "linger"]
    if not as_json:
        described = "; ".join(t for t in (socket_filter.describe(),
                                          holder_filter.describe() if holder_filter.active
                                          else "") if t)
        out.write_lines(snapshot.title_lines(len(lingers), min_age, described,
                                             hidden=0 if as_root else snap.hidden)
                        + ([out.renderer.header()] if lingers else []))
    for rec in recs:
        out.emit(rec)
    if not as_json:
        out.write_lines(snapshot.footer_lines(lingers))
    out.flush()
    for line in snapshot.notice_lines(snap, as_root):
        click.echo(line, err=True)


def run_live(threshold_ns, socket_filter, as_json, tick_ns, max_tracked, verbose, out,
             recording_options=None, all_transitions=False, holder_filter=HolderFilter(),
             metrics_listen=None, metrics_no_comm=False, eof_stacks=True):
    # The hint repeats the user's own arguments, so that pasting it runs
    # what was asked, as root.
    again = "sudo " + shlex.join(["closewait-trace"] + sys.argv[1:])
    if os.geteuid() != 0:
        raise UserError("live tracing needs root (BPF)", EXIT_NOT_ROOT,
                        f"as root, or with sudo: {again}")
    from closewait_trace.kernel.probe import import_bcc_in_background
    import_bcc_in_background()
    from closewait_trace.sockets import capabilities
    caps = capabilities.effective()
    why = capabilities.cannot_trace(caps)
    if why:
        raise UserError(why, EXIT_NOT_ROOT,
                        "run it with those capabilities (a full root shell, or the unit's "
                        "CapabilityBoundingSet)")
    capability_warning = capabilities.warning(caps)
    if capability_warning:      # say what a reduced set hides; trace anyway
        click.echo(capability_warning, err=True)
    warn_unmatched_holders(holder_filter, "only sockets of processes that match later "
                                          "will be shown")
    from closewait_trace.kernel import kernel_headers
    from closewait_trace.kernel.probe import KernelProbe, ProbeConfig, ProgramRefused, bcc_missing

    # bcc itself (libbcc, LLVM and clang: about 30 ms to load) is imported
    # by the program's load, in its thread; a missing binding is said here,
    # before anything starts.
    bcc_missing()

    config = ProbeConfig(threshold_ns=threshold_ns, max_tracked=max_tracked,
                         lports=socket_filter.lports, rports=socket_filter.rports,
                         family=socket_filter.family, all_transitions=all_transitions,
                         # --all streams every transition: a deeper ring (16 MiB)
                         # rides out bursts the default mode never sees.
                         ringbuf_pages=4096 if all_transitions else 256,
                         eof_capture=eof_stacks)
    probe = KernelProbe(config)
    # Said in the start record and the recording's header: a trace made
    # with a holder filter does not hold every socket.
    filters = {**socket_filter.as_dict(), **holder_filter.as_dict()}
    sinks = [out]
    recorder = None
    if metrics_listen:
        from closewait_trace.live.metrics import MetricsSink
        metrics = MetricsSink(*metrics_listen, no_comm=metrics_no_comm)
        metrics.serve()          # a port in use fails before anything loads
        sinks.append(metrics)
    if recording_options:
        # Open the file before loading anything into the kernel: a bad path
        # fails fast and leaves nothing behind.
        from closewait_trace.files.recording import Recorder
        from closewait_trace.live.sinks import RecordingSink
        from closewait_trace.live.tracer import kernel_clock_ns
        import time
        snapshot_s = recording_options.pop("snapshot_s")
        offset = time.time_ns() - kernel_clock_ns(config.features.boot_clock)
        recorder = Recorder(threshold_ns=threshold_ns, filters=filters,
                            clock_offset_ns=offset,
                            mode="all" if all_transitions else "closewait",
                            **recording_options)
        recorder.open()
        sinks.append(RecordingSink(recorder, snapshot_s=snapshot_s))
    tracer = None
    gatherer = None
    try:
        choice = kernel_headers.choose_headers()
        kernel_headers.apply(choice)
        # Start-up in parallel (bench/startup.py; docs/benchmarks.md): the
        # gathering worker's interpreter starts, and the program compiles in
        # a thread (clang, in C), while this one imports the rest; the
        # tracer's start() waits for both. The worker first: the compile
        # points fd 2 at a file for clang's messages, which a worker started
        # meanwhile would inherit (its stderr, with CLOSEWAIT_TRACE_DEBUG).
        from closewait_trace.evidence.worker import GatherWorker
        # Other people's /proc, memory and files are read in a worker the
        # loop can abandon (evidence/worker.py).
        gatherer = GatherWorker()
        gatherer.start()
        probe.load_in_background()
        from closewait_trace.live.tracer import LiveTracer, ProcResolver
        tracer = LiveTracer(config=config, socket_filter=socket_filter, probe=probe,
                            sinks=sinks, holder_filter=holder_filter,
                            tick_s=tick_ns / 1e9, resolver=ProcResolver(worker=gatherer))
        # Nobody reads the trace any more (`| head -1`): end it the normal way.
        out.on_reader_gone = tracer.request_stop
        tracer.headers = choice.describe()
        # After run(), main() ends the process at once (_quick_exit).
        tracer.exit_after_run = True
        tracer.start()
        if tracer.start_snapshot_failed:
            click.echo("closewait-trace: warning: the sockets already in CLOSE_WAIT could not "
                       f"be read at start ({textsafe.escape(tracer.start_snapshot_failed)}): "
                       "they are not reported, only those that enter it from now on; "
                       "restart to try again", err=True)
    except BaseException as exc:
        if tracer is not None:
            tracer.restore_signals()
        if gatherer is not None:
            gatherer.close()
        probe.close()
        if recorder is not None:
            recorder.discard()     # nothing was traced: leave no file behind
        if isinstance(exc, ProgramRefused):    # said in terms of our capabilities
            raise capabilities.explain_refusal(exc) from None
        raise
    # "Ready" means attached and the start-up snapshot taken: only now may
    # anyone waiting for the banner start a reproduction. (The text banner
    # is the start record, rendered on stdout by the same rule.)
    if as_json or out.quiet:
        for line in render.banner(threshold_ns, describe_filters(filters),
                                  at_terminal=sys.stderr.isatty()):
            click.echo(line, err=True)
    if verbose and (as_json or out.quiet):
        # In text mode the start record's rendering says it, before the
        # column header; here there is no text output to put it in.
        click.echo(textsafe.safe_line(f"kernel headers: {choice.describe()}; "
                                      f"{probe.features.describe()}; "
                                      f"compiled in {probe.compile_s:.2f}s"), err=True)
    tracer.run()
    if recorder is not None and recorder.stopped is not None:
        raise recorder.stopped     # said when it happened; exit 7 at the end
    # Everything is written and closed: main() may skip the interpreter's
    # teardown (freeing every object of bcc, LLVM and the trace: 40-90 ms
    # measured under --all, a third of the exit's budget).
    global _TRACE_ENDED
    _TRACE_ENDED = True


# Set once a live trace has ended cleanly (run() wrote the summary and closed
# every sink, the probe and the worker).
_TRACE_ENDED = False


def _quick_exit() -> None:
    """Exit now, status 0, without the interpreter's teardown; what Python
    still buffers for stdout and stderr is written first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def usage_line(exc: click.ClickException) -> str:
    """click's four lines (Usage, Try, blank, Error) as the one line every
    other error is: what is wrong; what to do next."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "closewait-trace"
    message = " ".join(exc.format_message().split()).rstrip(".")
    return f"closewait-trace: {message}; see '{command} --help'"


def main() -> None:
    # A terminal or pipe that cannot encode a character (LANG=C, an ASCII
    # pipe) shows it as an escape rather than ending the trace.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    try:
        main_group.main(standalone_mode=False, prog_name="closewait-trace")
        if _TRACE_ENDED:
            _quick_exit()
    except click.exceptions.Abort:
        sys.exit(0)
    except click.ClickException as exc:
        click.echo(usage_line(exc), err=True)
        sys.exit(EXIT_USAGE if exc.exit_code == 2 else exc.exit_code)
    except UserError as err:
        fail(err)
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:
        sys.exit(0)
    except SystemExit:
        raise
    except Exception as exc:   # a bug: one line, the details on request
        if os.environ.get("CLOSEWAIT_TRACE_DEBUG"):
            raise
        click.echo(textsafe.safe_line(
            f"closewait-trace: internal error: {type(exc).__name__}: {exc}; "
            f"set CLOSEWAIT_TRACE_DEBUG=1 for the traceback"), err=True)
        sys.exit(1)
