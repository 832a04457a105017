"""The live session's wiring: what `closewait-trace` (and `top`) do between
the parsed options and the loop. Checks the privileges, builds the probe,
the resolver and the tracer, puts the sinks together (the terminal or the
`top` view, then --metrics, then -w's recording), attaches, and runs the
loop to its summary. The command line (cli.py) only parses options and
turns errors into exit codes; the loop itself is tracer.py."""

from __future__ import annotations

import os
import shlex
import sys

from closewait_trace.errors import EXIT_NOT_ROOT, UserError
from closewait_trace.output import textsafe
from closewait_trace.output.terminal import notice
from closewait_trace.sockets.filters import HolderFilter


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
        notice(textsafe.safe_line(
            f"closewait-trace: notice: --comm {textsafe.escape(pattern)} matches "
            f"{textsafe.escape(', '.join(names))} now"))
    missing = holder_filter.unmatched(people)
    if not missing:
        return
    # Without root, hidepid may hide other users' processes: say only what
    # was seen. The kernel keeps 15 bytes of a name: say so when one is longer.
    who = "no process" if os.geteuid() == 0 else "no process visible to you"
    long_names = [c for c in holder_filter.comms if f"--comm {c}" in missing
                  and len(c.encode("utf-8", "surrogateescape")) > 15]
    note = "; a process name has at most 15 bytes" if long_names else ""
    notice(textsafe.safe_line(
        f"closewait-trace: notice: {who} matches {textsafe.escape(', '.join(missing))} "
        f"now{note}; {consequence}"))


def run(threshold_ns, socket_filter, as_json, tick_ns, max_tracked, verbose, out,
        recording_options=None, all_transitions=False, holder_filter=HolderFilter(),
        metrics_listen=None, metrics_no_comm=False, eof_stacks=True) -> bool:
    """A live trace, from the checks to the summary: `out` is the terminal
    sink (output/terminal.py) or the `top` view (output/topview.py).
    Returns True once the trace ended cleanly: the summary written, every
    sink, the probe and the worker closed (the caller may then skip the
    interpreter's teardown)."""
    # The hint repeats the user's own arguments, so that pasting it runs
    # what was asked, as root.
    again = "sudo " + shlex.join(["closewait-trace"] + sys.argv[1:])
    if os.geteuid() != 0:
        raise UserError("live tracing needs root (BPF)", EXIT_NOT_ROOT,
                        f"as root, or with sudo: {again}")
    from closewait_trace.sockets import capabilities
    caps = capabilities.effective()
    why = capabilities.cannot_trace(caps)
    if why:
        raise UserError(why, EXIT_NOT_ROOT,
                        "run it with those capabilities (a full root shell, or the unit's "
                        "CapabilityBoundingSet)")
    capability_warning = capabilities.warning(caps)
    if capability_warning:      # say what a reduced set hides; trace anyway
        notice(capability_warning)
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
    # "Ready" means attached and the start-up snapshot taken: the start
    # record says it, rendered on stdout as text, or as the banner on
    # stderr when stdout carries JSON or nothing (output/terminal.py).
    if as_json or out.quiet:
        out.banner_on_stderr = True
    sinks = [out]
    if metrics_listen:
        from closewait_trace.output.metrics import MetricsSink
        metrics = MetricsSink(*metrics_listen, no_comm=metrics_no_comm)
        metrics.serve()          # a port in use fails before anything loads
        sinks.append(metrics)
    tracer = None
    gatherer = None
    recorder = None
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
        # The compile starts here when its thread has a working directory of
        # its own (bcc's chdir() into the header tree then moves only that
        # thread): the imports and the recording below overlap it (about
        # 30 ms). Otherwise after them (below).
        probe.load_in_background(own_cwd_only=True)
        from closewait_trace.live.tracer import LiveTracer, ProcResolver
        tracer = LiveTracer(config=config, socket_filter=socket_filter, probe=probe,
                            sinks=sinks, holder_filter=holder_filter,
                            tick_s=tick_ns / 1e9, resolver=ProcResolver(worker=gatherer))
        # Nobody reads the trace any more (`| head -1`): end it the normal way.
        out.on_reader_gone = tracer.request_stop
        if recording_options:
            # Opened before the program is loaded: a bad path fails fast and
            # leaves nothing behind.
            from closewait_trace.files.recording import Recorder
            from closewait_trace.output.sinks import RecordingSink
            recording_options = dict(recording_options)
            snapshot_s = recording_options.pop("snapshot_s")
            # Said in the recording's header, as in the start record: a trace
            # made with a holder filter does not hold every socket.
            filters = {**socket_filter.as_dict(), **holder_filter.as_dict()}
            # The tracer's clock offset (kernel clock to wall clock), the one
            # its records' times are made with.
            recorder = Recorder(threshold_ns=threshold_ns, filters=filters,
                                clock_offset_ns=tracer.clock_offset_ns(),
                                mode="all" if all_transitions else "closewait",
                                **recording_options)
            recorder.open()
            sinks.append(RecordingSink(recorder, snapshot_s=snapshot_s))
        # If not started above, only now: bcc's compile would move the whole
        # process into the kernel header tree (chdir, undone at the end), so
        # nothing in this thread may resolve a path relative to the user's
        # directory until start() has waited for the load (a relative -w
        # path, opened in the meantime, went into the header cache).
        probe.load_in_background()
        tracer.headers = choice.describe()
        # After run(), main() ends the process at once (cli's quick exit).
        tracer.exit_after_run = True
        tracer.start()
        if tracer.start_snapshot_failed:
            notice("closewait-trace: warning: the sockets already in CLOSE_WAIT could not "
                   f"be read at start ({textsafe.escape(tracer.start_snapshot_failed)}): "
                   "they are reported only once a census finds them, about a minute on "
                   "(those that enter it from now on, as always)")
        if tracer.start_unread_namespaces:
            from closewait_trace.live.snapshot import namespaces_not_read
            from closewait_trace.live.tracer import RESCAN_EVERY_S, START_OTHERS_BUDGET_S
            left = namespaces_not_read(tracer.start_unread_namespaces, START_OTHERS_BUDGET_S)
            notice(f"closewait-trace: {left} at start: the sockets already in CLOSE_WAIT "
                   f"there are read by the next rescans, a few every {RESCAN_EVERY_S:g}s, "
                   "each user's in turn")
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
    if verbose and (as_json or out.quiet):
        # In text mode the start record's rendering says it, before the
        # column header; here there is no text output to put it in.
        notice(textsafe.safe_line(f"kernel headers: {choice.describe()}; "
                                  f"{probe.features.describe()}; "
                                  f"compiled in {probe.compile_s:.2f}s"))
    tracer.run()
    if recorder is not None and recorder.stopped is not None:
        raise recorder.stopped     # said when it happened; exit 7 at the end
    return True
