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
            if rec["type"] == "start":
                lines = [json.dumps(rec, sort_keys=False)]
            else:
                lines = [json.dumps(rec, sort_keys=False)]
        else:
            lines = self.renderer.render(rec)
        try:
            for line in lines:
                sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
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
@click.version_option(__version__, "-V", "--version")
@click.pass_context
def main_group(ctx, threshold, lports, rports, ipv4, ipv6, as_json, wide, interval,
               max_tracked, verbose):
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
    tick_ns = interval or min(max(threshold // 2, 100_000_000), 1_000_000_000)
    run_live(threshold, socket_filter, as_json, wide, tick_ns, max_tracked, verbose)


def run_live(threshold_ns, socket_filter, as_json, wide, tick_ns, max_tracked, verbose):
    if os.geteuid() != 0:
        raise UserError("live tracing needs root (BPF)", EXIT_NOT_ROOT,
                        "run: sudo closewait-trace")
    from closewait_trace import kernel_headers
    from closewait_trace.probe import ProbeConfig, import_bcc
    from closewait_trace.tracer import LiveTracer

    import_bcc()

    choice = kernel_headers.choose_headers()
    kernel_headers.apply(choice)
    renderer = render.TextRenderer(wide=wide, verbose=verbose)
    out = Output(as_json, renderer)
    config = ProbeConfig(threshold_ns=threshold_ns, max_tracked=max_tracked,
                         lports=socket_filter.lports, rports=socket_filter.rports,
                         family=socket_filter.family)
    tracer = LiveTracer(config=config, socket_filter=socket_filter, emit=out,
                        tick_s=tick_ns / 1e9, headers=choice.describe())
    tracer.start()
    banner = render.banner(threshold_ns, socket_filter.describe())
    if verbose:
        click.echo(f"kernel headers: {choice.describe()}; {tracer.probe.transport}; "
                   f"compiled in {tracer.probe.compile_s:.2f}s", err=True)
    for line in banner:
        click.echo(line, err=as_json)
    if not as_json:
        click.echo(renderer.header())
    sys.stdout.flush()
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
