"""Command line: option parsing, output sinks, and turning every user error
into one line and a documented exit code."""

from __future__ import annotations

import json
import os
import select
import socket
import sys

import click

from closewait_trace import __version__, render
from closewait_trace.durations import parse_duration_ns
from closewait_trace.errors import (EXIT_NOT_ROOT, EXIT_USAGE, UserError)
from closewait_trace.filters import (HolderFilter, SocketFilter, describe_filters, parse_ports,
                                     validate_container)

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
  closewait-trace -w cw.jsonl.gz -C 100M -W 10  # compressed, 10 x 100 MB max
  closewait-trace -r cw.jsonl --comm java       # replay, no root needed
  closewait-trace report cw.jsonl  # postmortem: who, how many, how long
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


_SIZE = {"": 1_000_000, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


class SizeType(click.ParamType):
    """tcpdump's -C: a bare number is millions of bytes; 500k, 10M, 1G."""
    name = "SIZE"

    def convert(self, value, param, ctx):
        import re
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*", str(value))
        if not m or float(m.group(1)) <= 0:
            self.fail(f"{value!r} is not a size (examples: 10, 500k, 10M, 1G)", param, ctx)
        size = int(float(m.group(1)) * _SIZE[m.group(2).lower()])
        if size < 1024:
            self.fail("the rotation size must be at least 1k", param, ctx)
        return size


class WhenType(click.ParamType):
    name = "TIME"

    def convert(self, value, param, ctx):
        from closewait_trace.replay import parse_when
        try:
            parse_when(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value


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

    @property
    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    def emit(self, rec: dict) -> None:
        if self.quiet or self.closed:
            return
        if self.as_json:
            lines = [json.dumps(rec, check_circular=False)]
        else:
            lines = self.renderer.render(rec)
        self.write_lines(lines)

    def write_lines(self, lines) -> None:
        if self.closed:
            return
        try:
            out = self._out
            for line in lines:
                out.write(line + "\n")
        except BrokenPipeError:
            self._reader_gone()

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
    click.echo(err.one_line(), err=True)
    sys.exit(err.exit_code)


@click.group(invoke_without_command=True, epilog=EXAMPLES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 80})
@click.option("-t", "--threshold", type=DurationType(), default="1s", show_default=True,
              help="Report a socket once it has been in CLOSE_WAIT this long "
                   "(500ms, 2s, 1m).")
@click.option("-p", "--lport", "lports", type=PortsType(), multiple=True,
              help="Only sockets with this local port (repeat or comma-separate).")
@click.option("-P", "--rport", "rports", type=PortsType(), multiple=True,
              help="Only sockets with this remote port (repeat or comma-separate).")
@click.option("-4", "--ipv4", "ipv4", is_flag=True, help="Only IPv4 sockets.")
@click.option("-6", "--ipv6", "ipv6", is_flag=True, help="Only IPv6 sockets.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line (schema in the README).")
@click.option("--wide", is_flag=True, help="Wide address columns (long IPv6 addresses).")
@click.option("-i", "--interval", type=DurationType(), default=None,
              help="How often to look for sockets crossing the threshold "
                   "[default: threshold/2, at most 1s].")
@click.option("--max-tracked", type=click.IntRange(1024, 4_194_304), default=262_144,
              show_default=True, help="Capacity of the kernel's map of sockets in CLOSE_WAIT.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show holders' command lines and the headers bcc used.")
@click.option("--all", "all_transitions", is_flag=True,
              help="Also stream every TCP state transition (like tcpstates), "
                   "with the time spent in the previous state.")
@click.option("-w", "--write", "write_path", metavar="FILE",
              help="Record to FILE (private, 0600) while tailing; .gz compresses.")
@click.option("-q", "--quiet", is_flag=True, help="With -w: record without printing.")
@click.option("--force", is_flag=True, help="With -w: overwrite an existing recording.")
@click.option("-C", "rotate_size", type=SizeType(),
              help="With -w: start a new file after SIZE (bare number: MB).")
@click.option("-W", "rotate_count", type=click.IntRange(1, 100_000),
              help="With -C: keep at most this many files, replacing the oldest.")
@click.option("-z", "--compress", is_flag=True, help="With -w: gzip the recording.")
@click.option("--snapshot-interval", type=DurationType(), default="60s", show_default=True,
              help="With -w: how often to record the set of lingering sockets.")
@click.option("-r", "--read", "read_path", metavar="FILE",
              help="Replay a recording (no root needed); filters apply.")
@click.option("--pid", "pids", type=click.IntRange(1), multiple=True, metavar="PID",
              help="Only sockets this process held or closed (repeatable).")
@click.option("--comm", "comms", multiple=True, metavar="NAME",
              help="Only sockets a process with this name held or closed.")
@click.option("--cgroup", "cgroups", multiple=True, metavar="PATH",
              help="Only sockets held by processes in this cgroup (or below it).")
@click.option("--container", "containers", type=ParsedType("ID", validate_container), multiple=True,
              metavar="ID", help="Only sockets held by processes of this container "
                                 "(id or its first 4+ hex digits).")
@click.option("--unit", "units", multiple=True, metavar="NAME",
              help="Only sockets held by processes of this systemd unit.")
@click.option("--since", type=WhenType(), help="With -r: from this time (13:20, ISO 8601).")
@click.option("--until", type=WhenType(), help="With -r: up to this time.")
@click.version_option(__version__, "-V", "--version")
@click.pass_context
def main_group(ctx, threshold, lports, rports, ipv4, ipv6, as_json, wide, interval,
               max_tracked, verbose, all_transitions, write_path, quiet, force, rotate_size, rotate_count,
               compress, snapshot_interval, read_path, pids, comms, cgroups, containers, units,
               since, until):
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
    1 internal error.
    """
    if ctx.invoked_subcommand is not None:
        return
    if ipv4 and ipv6:
        raise click.UsageError("-4 and -6 exclude each other; give at most one")
    socket_filter = SocketFilter(
        lports=tuple(sorted({p for group in lports for p in group})),
        rports=tuple(sorted({p for group in rports for p in group})),
        family=socket.AF_INET if ipv4 else socket.AF_INET6 if ipv6 else None)
    holder_filter = HolderFilter(pids=tuple(pids), comms=tuple(comms), cgroups=tuple(cgroups),
                                 containers=tuple(containers), units=tuple(units))
    renderer = render.TextRenderer(wide=wide, verbose=verbose)
    if read_path:
        if write_path:
            raise click.UsageError("-r and -w exclude each other")
        run_replay(read_path, socket_filter, holder_filter, since, until,
                   Output(as_json, renderer))
        return
    for name, value in (("--since", since), ("--until", until)):
        if value:
            raise click.UsageError(f"{name} filters a replay: use it with -r FILE")
    if not write_path:
        for name, value in (("-q", quiet), ("--force", force), ("-C", rotate_size),
                            ("-W", rotate_count), ("-z", compress)):
            if value:
                raise click.UsageError(f"{name} goes with -w FILE")
    if rotate_count and not rotate_size:
        raise click.UsageError("-W caps the number of files made by -C: give -C too")
    tick_ns = interval or min(max(threshold // 2, 100_000_000), 1_000_000_000)
    recording = None
    if write_path:
        recording = dict(path=write_path, force=force,
                         compress=compress or write_path.endswith(".gz"),
                         max_bytes=rotate_size, max_files=rotate_count,
                         snapshot_s=snapshot_interval / 1e9)
    run_live(threshold, socket_filter, as_json, tick_ns, max_tracked, verbose,
             Output(as_json, renderer, quiet=quiet), recording, all_transitions,
             holder_filter)


def run_replay(path, socket_filter, holder_filter, since, until, out):
    from closewait_trace import recording, replay
    rec = recording.read([path])
    first_ts = next((r.get("start_ts") for r in rec.records if r.get("type") == "header"), None)
    keep = replay.ReplayFilter(
        sockets=socket_filter, holders=holder_filter,
        since=replay.parse_when(since, first_ts) if since else None,
        until=replay.parse_when(until, first_ts) if until else None)
    for r in replay.replay(rec.records, keep):
        out.emit(r)
    out.flush()
    warn_damage(rec)


def warn_damage(rec) -> None:
    if rec.skipped:
        click.echo(f"closewait-trace: warning: skipped {rec.skipped} damaged line(s); "
                   f"the rest was read", err=True)
    for problem in rec.problems:
        click.echo(f"closewait-trace: warning: {problem}", err=True)


@main_group.command("report", epilog="""\b
Examples:
  closewait-trace report cw.jsonl            # one capture (rotated parts too)
  closewait-trace report a.jsonl b.jsonl.gz  # several captures together
  closewait-trace report --json cw.jsonl | jq .by_process""")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for machines.")
@click.option("--top", type=click.IntRange(1, 10_000), default=15, show_default=True,
              help="Rows per table in the text report.")
def report_command(files, as_json, top):
    """Postmortem of recordings: which processes left sockets in CLOSE_WAIT,
    how many and for how long; by local port and remote peer; the duration
    histogram; a timeline; what was still lingering at the end; gaps and
    losses. Needs no root and no BPF."""
    from closewait_trace import recording, report
    rec = recording.read(files)
    rep = report.build(rec)
    out = Output(as_json, render.TextRenderer())
    if as_json:
        out.write_lines([json.dumps(rep)])
    else:
        out.write_lines(report.render_text(rep, top=top))
    out.flush()
    warn_damage(rec)


def run_live(threshold_ns, socket_filter, as_json, tick_ns, max_tracked, verbose, out,
             recording_options=None, all_transitions=False, holder_filter=HolderFilter()):
    if os.geteuid() != 0:
        raise UserError("live tracing needs root (BPF)", EXIT_NOT_ROOT,
                        "run: sudo closewait-trace")
    from closewait_trace import kernel_headers
    from closewait_trace.probe import KernelProbe, ProbeConfig, import_bcc
    from closewait_trace.tracer import LiveTracer

    import_bcc()

    config = ProbeConfig(threshold_ns=threshold_ns, max_tracked=max_tracked,
                         lports=socket_filter.lports, rports=socket_filter.rports,
                         family=socket_filter.family, all_transitions=all_transitions,
                         # --all streams every transition: a deeper ring (16 MiB)
                         # rides out bursts the default mode never sees.
                         ringbuf_pages=4096 if all_transitions else 256)
    probe = KernelProbe(config)
    # Said in the start record and the recording's header: a trace made
    # with a holder filter does not hold every socket.
    filters = {**socket_filter.as_dict(), **holder_filter.as_dict()}
    tracer = LiveTracer(config=config, socket_filter=socket_filter, probe=probe,
                        sinks=[out], holder_filter=holder_filter, tick_s=tick_ns / 1e9)
    # Nobody reads the trace any more (`| head -1`): end it the normal way.
    out.on_reader_gone = tracer.request_stop
    recorder = None
    if recording_options:
        # Open the file before loading anything into the kernel: a bad path
        # fails fast and leaves nothing behind.
        from closewait_trace.probe import kernel_at_least
        from closewait_trace.recording import Recorder
        from closewait_trace.sinks import RecordingSink
        from closewait_trace.tracer import kernel_clock_ns
        import time
        snapshot_s = recording_options.pop("snapshot_s")
        offset = time.time_ns() - kernel_clock_ns(kernel_at_least(5, 8))
        recorder = Recorder(threshold_ns=threshold_ns, filters=filters,
                            clock_offset_ns=offset,
                            mode="all" if all_transitions else "closewait",
                            **recording_options)
        recorder.open()
        tracer.sinks.append(RecordingSink(recorder, snapshot_s=snapshot_s))
    try:
        choice = kernel_headers.choose_headers()
        kernel_headers.apply(choice)
        tracer.headers = choice.describe()
        tracer.start()
    except BaseException:
        tracer.restore_signals()
        probe.close()
        if recorder is not None:
            recorder.discard()     # nothing was traced: leave no file behind
        raise
    # "Ready" means attached and the start-up snapshot taken: only now may
    # anyone waiting for the banner start a reproduction. (The text banner
    # is the start record, rendered on stdout by the same rule.)
    if as_json or out.quiet:
        for line in render.banner(threshold_ns, describe_filters(filters)):
            click.echo(line, err=True)
    if verbose:
        click.echo(f"kernel headers: {choice.describe()}; {probe.transport}; "
                   f"compiled in {probe.compile_s:.2f}s", err=True)
    tracer.run()


def usage_line(exc: click.ClickException) -> str:
    """click's four lines (Usage, Try, blank, Error) as the one line every
    other error is: what is wrong; what to do next."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "closewait-trace"
    message = " ".join(exc.format_message().split()).rstrip(".")
    return f"closewait-trace: {message}; see '{command} --help'"


def main() -> None:
    try:
        main_group.main(standalone_mode=False, prog_name="closewait-trace")
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
        click.echo(f"closewait-trace: internal error: {type(exc).__name__}: {exc}; "
                   f"set CLOSEWAIT_TRACE_DEBUG=1 for the traceback", err=True)
        sys.exit(1)
