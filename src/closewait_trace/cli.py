"""Command line: option parsing, and turning every user error into one line
and a documented exit code. What each command does is below it: the live
trace in live/session.py, `snapshot` in live/snapshot.py, the replay (-r)
and `report` in files/replay.py; they print through output/terminal.py."""

from __future__ import annotations

import os
import socket
import sys
from typing import Optional

import click

from closewait_trace import __version__
from closewait_trace.output import render, textsafe
from closewait_trace.output.terminal import TerminalSink
from closewait_trace.durations import parse_duration_ns
from closewait_trace.errors import EXIT_USAGE, UserError
from closewait_trace.sockets.filters import (HolderFilter, SocketFilter, parse_ports,
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
        from closewait_trace.output.metrics import parse_listen
        try:
            return parse_listen(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def run_live(*args, **kwargs) -> None:
    """A live trace (live/session.py), imported when one is asked for: the
    help and the other subcommands do not load the tracer."""
    from closewait_trace.live import session
    if session.run(*args, **kwargs):
        # Everything is written and closed: main() may skip the interpreter's
        # teardown (freeing every object of bcc, LLVM and the trace: 40-90 ms
        # measured under --all, a third of the exit's budget).
        global _TRACE_ENDED
        _TRACE_ENDED = True


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
              show_default=True, help="Capacity of the kernel's map of sockets in CLOSE_WAIT "
                                      "(and of those followed without it).")
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
    8 snapshot could not read the sockets (nothing printed), 1 internal
    error.
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
        from closewait_trace.files import replay
        replay.show(read_path, socket_filter, holder_filter, since, until,
                    TerminalSink(as_json, renderer))
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
             TerminalSink(as_json, renderer, quiet=quiet), recording, all_transitions,
             holder_filter, metrics_listen, metrics_no_comm, eof_stacks=not no_eof_stacks)


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
    from closewait_trace.files import replay
    from closewait_trace.output import report
    by = [g.strip() for value in groupings for g in value.split(",") if g.strip()]
    for g in by:
        if g not in report.GROUPINGS:
            raise click.UsageError(f"--by {g}: not a grouping; choose from "
                                   f"{', '.join(report.GROUPINGS)}")
    try:
        replay.write_report(list(files), by, since, until, as_json, top,
                            TerminalSink(as_json, render.TextRenderer()))
    except replay.WindowError as exc:
        raise click.UsageError(str(exc)) from None


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
    from closewait_trace.output.topview import TopSink
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
    from closewait_trace.live import snapshot
    # Run by main(), in a process of its own: once all is written, it ends
    # without the interpreter's teardown.
    own = click.get_current_context().obj == OWN_PROCESS
    snapshot.run(socket_filter, holder_filter, min_age, as_json, wide, verbose,
                 end=_quick_exit if own else None)


# Set once a live trace has ended cleanly (run() wrote the summary and closed
# every sink, the probe and the worker).
_TRACE_ENDED = False
# The context's obj when main() runs the command line: the command is the
# process's own, which may end without the interpreter's teardown once all
# is written (not when a test invokes the commands in its process).
OWN_PROCESS = "own process"


def _quick_exit() -> None:
    """Exit now, status 0, without the interpreter's teardown; what Python
    still buffers for stdout and stderr is written first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def usage_line(exc: click.ClickException, args: Optional[list] = None) -> str:
    """click's four lines (Usage, Try, blank, Error) as the one line every
    other error is: what is wrong; what to do next. args: the command line,
    for the subcommand whose --help to name when click's error does not
    say (an option missing its value)."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else command_path_of(args or [])
    possibilities = getattr(exc, "possibilities", None)
    if isinstance(exc, click.exceptions.NoSuchOption) and possibilities:
        # click runs its two sentences together ("No such option: --x Did
        # you mean --y?"): the suggestion kept apart.
        message = (f"{' '.join(exc.message.split()).rstrip('.')} "
                   f"(did you mean {' or '.join(sorted(possibilities))}?)")
    else:
        message = " ".join(exc.format_message().split()).rstrip(".")
    return f"closewait-trace: {message}; see '{command} --help'"


def command_path_of(args: list) -> str:
    """The command a command line names, as click parses it (its errors
    ignored): 'closewait-trace snapshot', or 'closewait-trace'."""
    try:
        ctx = main_group.make_context("closewait-trace", list(args), resilient_parsing=True)
        rest = list(ctx.protected_args) + list(ctx.args)
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        return "closewait-trace"
    if rest and rest[0] in main_group.commands:
        return f"closewait-trace {rest[0]}"
    return "closewait-trace"


def main() -> None:
    # A terminal or pipe that cannot encode a character (LANG=C, an ASCII
    # pipe) shows it as an escape rather than ending the trace.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    try:
        main_group.main(standalone_mode=False, prog_name="closewait-trace", obj=OWN_PROCESS)
        if _TRACE_ENDED:
            _quick_exit()
    except click.exceptions.Abort:
        sys.exit(0)
    except click.ClickException as exc:
        click.echo(usage_line(exc, sys.argv[1:]), err=True)
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
