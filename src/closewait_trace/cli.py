"""Command line: option parsing, output sinks, and turning every user error
into one line and a documented exit code."""

from __future__ import annotations

import json
import os
import socket
import sys

import click

from closewait_trace import __version__, render
from closewait_trace.durations import parse_duration_ns
from closewait_trace.errors import (EXIT_NOT_ROOT, EXIT_USAGE, UserError)
from closewait_trace.filters import SocketFilter, parse_ports

EXAMPLES = """\b
Examples:
  closewait-trace                  # tail sockets in CLOSE_WAIT for >= 1s
  closewait-trace -t 500ms         # report after 500 ms instead
  closewait-trace -p 8080 -p 8443  # only local ports 8080 and 8443
  closewait-trace -P 5432 -4       # only IPv4 connections to remote port 5432
  closewait-trace --json | jq .    # one JSON object per line
  closewait-trace -v               # evidence for each diagnosis, headers used
  closewait-trace --all -p 443     # every state transition on port 443
  closewait-trace -w cw.jsonl -q   # record quietly, for later
  closewait-trace -w cw.jsonl.gz -C 100M -W 10  # compressed, 10 x 100 MB max
  closewait-trace -r cw.jsonl --comm java       # replay, no root needed
  closewait-trace report cw.jsonl  # postmortem: who, how many, how long
"""


class DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_duration_ns(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class PortsType(click.ParamType):
    name = "PORT[,PORT...]"

    def convert(self, value, param, ctx):
        try:
            return parse_ports([value])
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


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
    """Writes records to stdout as text or JSON lines. A closed pipe (the
    reader went away, e.g. `| head`) ends output quietly."""

    def __init__(self, as_json: bool, renderer: render.TextRenderer, quiet: bool = False):
        self.as_json = as_json
        self.renderer = renderer
        self.quiet = quiet
        self.closed = False

    def __call__(self, rec: dict) -> None:
        if self.quiet or self.closed:
            return
        if self.as_json:
            lines = [json.dumps(rec, check_circular=False)]
        else:
            lines = self.renderer.render(rec)
        try:
            for line in lines:
                sys.stdout.write(line + "\n")
        except BrokenPipeError:
            self._reader_gone()

    def flush(self) -> None:
        """Called once per pass of the main loop (at least every 100 ms):
        output stays live without a write per record under a flood."""
        if self.closed:
            return
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        self.closed = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


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
@click.option("--pid", "pids", type=int, multiple=True,
              help="With -r: only sockets this process held or closed.")
@click.option("--comm", "comms", multiple=True,
              help="With -r: only sockets a process with this name held or closed.")
@click.option("--since", type=WhenType(), help="With -r: from this time (13:20, ISO 8601).")
@click.option("--until", type=WhenType(), help="With -r: up to this time.")
@click.version_option(__version__, "-V", "--version")
@click.pass_context
def main_group(ctx, threshold, lports, rports, ipv4, ipv6, as_json, wide, interval,
               max_tracked, verbose, all_transitions, write_path, quiet, force, rotate_size, rotate_count,
               compress, snapshot_interval, read_path, pids, comms, since, until):
    """Trace TCP sockets that linger in CLOSE_WAIT: which ones, since when, and
    every process holding them that never called close(), with a diagnosis of
    why.

    Needs root (BPF). Exit codes: 0 ok, 2 bad usage, 3 not root, 4 bcc missing,
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
    renderer = render.TextRenderer(wide=wide, verbose=verbose)
    if read_path:
        if write_path:
            raise click.UsageError("-r and -w exclude each other")
        run_replay(read_path, socket_filter, pids, comms, since, until,
                   Output(as_json, renderer))
        return
    for name, value in (("--pid", pids), ("--comm", comms), ("--since", since),
                        ("--until", until)):
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
             Output(as_json, renderer, quiet=quiet), recording, all_transitions)


def run_replay(path, socket_filter, pids, comms, since, until, out):
    from closewait_trace import recording, replay
    rec = recording.read([path])
    first_ts = next((r.get("start_ts") for r in rec.records if r.get("type") == "header"), None)
    keep = replay.ReplayFilter(
        sockets=socket_filter, pids=tuple(pids), comms=tuple(comms),
        since=replay.parse_when(since, first_ts) if since else None,
        until=replay.parse_when(until, first_ts) if until else None)
    for r in replay.replay(rec.records, keep):
        out(r)
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
    if as_json:
        click.echo(json.dumps(rep))
    else:
        for line in report.render_text(rep, top=top):
            click.echo(line)
    warn_damage(rec)


def run_live(threshold_ns, socket_filter, as_json, tick_ns, max_tracked, verbose, out,
             recording_options=None, all_transitions=False):
    if os.geteuid() != 0:
        raise UserError("live tracing needs root (BPF)", EXIT_NOT_ROOT,
                        "run: sudo closewait-trace")
    from closewait_trace import kernel_headers
    from closewait_trace.probe import ProbeConfig, import_bcc
    from closewait_trace.tracer import LiveTracer

    import_bcc()

    config = ProbeConfig(threshold_ns=threshold_ns, max_tracked=max_tracked,
                         lports=socket_filter.lports, rports=socket_filter.rports,
                         family=socket_filter.family, all_transitions=all_transitions,
                         # --all streams every transition: a deeper ring (16 MiB)
                         # rides out bursts the default mode never sees.
                         ringbuf_pages=4096 if all_transitions else 256)
    sinks = [out]
    tracer = LiveTracer(config=config, socket_filter=socket_filter,
                        emit=lambda rec: [sink(rec) for sink in sinks],
                        tick_s=tick_ns / 1e9, flush=out.flush)
    if recording_options:
        # Open the file before loading anything into the kernel: a bad path
        # fails fast and leaves nothing behind.
        from closewait_trace.recording import Recorder
        from closewait_trace.tracer import kernel_clock_ns
        import time
        tracer.snapshot_s = recording_options.pop("snapshot_s")
        offset = time.time_ns() - kernel_clock_ns(config.features.boot_clock)
        recorder = Recorder(threshold_ns=threshold_ns, filters=socket_filter.as_dict(),
                            clock_offset_ns=offset, snapshot_source=tracer.snapshot,
                            mode="all" if all_transitions else "closewait",
                            **recording_options)
        recorder.open()
        tracer.recorder = recorder
        sinks.append(recorder)
    choice = kernel_headers.choose_headers()
    kernel_headers.apply(choice)
    tracer.headers = choice.describe()
    if as_json or out.quiet:
        for line in render.banner(threshold_ns, socket_filter.describe()):
            click.echo(line, err=True)
    try:
        tracer.start()
    except BaseException:
        if tracer.recorder is not None:
            tracer.recorder.discard()     # nothing was traced: leave no file behind
        raise
    if verbose:
        click.echo(f"kernel headers: {choice.describe()}; {tracer.probe.features.describe()}; "
                   f"compiled in {tracer.probe.compile_s:.2f}s", err=True)
    tracer.run()


def main() -> None:
    try:
        main_group.main(standalone_mode=False, prog_name="closewait-trace")
    except click.exceptions.Abort:
        sys.exit(0)
    except click.ClickException as exc:
        exc.show()
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
