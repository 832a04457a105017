"""Which kernel facilities the probe uses, and the testing knob that forces
the older kernels' fallbacks (pure: no bcc, no root)."""

import pytest

from closewait_trace.kernel import probe
from closewait_trace.errors import EXIT_NO_BPF, EXIT_NOT_ROOT, EXIT_USAGE, UserError


@pytest.mark.parametrize("release,ringbuf,boot", [
    ("6.18.44-fc", True, True), ("5.8.0-1", True, True), ("5.7.19", False, False),
    ("5.4.0-216-generic", False, False), ("4.18.0-553.el8_10.x86_64", False, False),
    ("garbage", False, False),
])
def test_features_follow_the_kernel_release(release, ringbuf, boot):
    f = probe.detect_features(release=release, environ={})
    assert (f.ringbuf, f.boot_clock, f.batch_read, f.forced) == (ringbuf, boot, True, ())


def test_force_gives_a_new_kernel_the_5_4_path():
    f = probe.detect_features(release="6.18.0",
                              environ={probe.FORCE_ENV: "perfbuf, monotonic,PERKEY"})
    assert (f.ringbuf, f.boot_clock, f.batch_read) == (False, False, False)
    assert f.transport == "perf buffer" and f.clock == "monotonic"
    assert f.describe().startswith("perf buffer, monotonic clock, per-key map reads, socket namespaces ")
    assert f.describe().endswith(
        " (forced by CLOSEWAIT_TRACE_FORCE=perfbuf,monotonic,perkey)")


def test_force_one_feature_leaves_the_others_to_the_kernel():
    f = probe.detect_features(release="6.18.0", environ={probe.FORCE_ENV: "perfbuf"})
    assert (f.ringbuf, f.boot_clock, f.batch_read) == (False, True, True)


def test_unknown_force_word_is_a_usage_error():
    with pytest.raises(UserError) as exc:
        probe.detect_features(release="6.18.0", environ={probe.FORCE_ENV: "perfbuff"})
    assert exc.value.exit_code == EXIT_USAGE
    assert "'perfbuff'" in exc.value.one_line() and "perfbuf" in exc.value.hint


def test_cflags_follow_the_features():
    config = probe.ProbeConfig(threshold_ns=1, features=probe.detect_features(
        release="5.4.0", environ={}))
    flags = config.cflags(config.features.ringbuf, config.features.boot_clock)
    assert "-DUSE_RINGBUF" not in flags and "-DUSE_BOOT_CLOCK" not in flags


class _FailingBPF:
    """bcc's BPF class as it fails: one message, after libbcc's own lines."""
    message = ""

    def __init__(self, **_kwargs):
        raise Exception(self.message)


@pytest.mark.parametrize("message,paranoid,exit_code", [
    # Debian 12's 6.1 kernel, CAP_BPF + CAP_PERFMON: bcc's words there.
    ("Failed to attach BPF program b'tracepoint__sock__inet_sock_set_state' to tracepoint "
     "b'sock:inet_sock_set_state'", 3, EXIT_NOT_ROOT),
    # The same failure on a kernel that does not restrict perf events.
    ("Failed to attach BPF program b'x' to tracepoint b'sock:inet_sock_set_state'", 2, EXIT_NO_BPF),
    # A verifier rejection is never blamed on the restriction.
    ("Failed to load BPF program b'x': Permission denied", 3, EXIT_NO_BPF),
])
def test_a_failed_attach_names_the_perf_restriction_only_when_it_is_the_cause(
        monkeypatch, message, paranoid, exit_code):
    from closewait_trace.sockets import capabilities
    bpf = type("BPF", (_FailingBPF,), {"message": message})
    monkeypatch.setattr(probe, "import_bcc", lambda: bpf)
    monkeypatch.setattr(probe, "ensure_tracefs", lambda: "/sys/kernel/tracing")
    monkeypatch.setattr(probe, "check_tracepoint", lambda _tracefs: None)
    unit_without_admin = sum(1 << c for c in (capabilities.CAP_BPF, capabilities.CAP_PERFMON,
                                              capabilities.CAP_SYS_PTRACE,
                                              capabilities.CAP_DAC_READ_SEARCH))
    monkeypatch.setattr(capabilities, "effective", lambda *a: unit_without_admin)
    monkeypatch.setattr(capabilities, "perf_event_paranoid", lambda *a: paranoid)
    config = probe.ProbeConfig(threshold_ns=1, features=probe.detect_features(
        release="6.1.0", environ={}))
    # The probe says what the kernel refused; what to make of it is said
    # above kernel/ (the command line turns it into the error it shows).
    with pytest.raises(probe.ProgramRefused) as exc:
        probe.KernelProbe(config).start(lambda ev: None)
    assert exc.value.exit_code == EXIT_NO_BPF and exc.value.kernel_error == message
    shown = capabilities.explain_refusal(exc.value)
    assert isinstance(shown, UserError) and shown.exit_code == exit_code
    line = shown.one_line()
    assert ("kernel.perf_event_paranoid=3" in line) == (exit_code == EXIT_NOT_ROOT), line


def _fake_load(monkeypatch, bpf):
    monkeypatch.setattr(probe, "import_bcc", lambda: bpf)
    monkeypatch.setattr(probe, "ensure_tracefs", lambda: "/sys/kernel/tracing")
    monkeypatch.setattr(probe, "check_tracepoint", lambda _tracefs: None)
    return probe.ProbeConfig(threshold_ns=1, features=probe.detect_features(
        release="6.1.0", environ={}))


def test_a_load_in_the_background_fails_in_the_caller(monkeypatch):
    """The program compiles in a thread during the start-up (cli.run_live):
    its refusal is raised by start(), in the caller's thread, as the same
    error a load in the caller gives."""
    config = _fake_load(monkeypatch, type("BPF", (_FailingBPF,), {"message": "refused"}))
    p = probe.KernelProbe(config)
    p.load_in_background()
    with pytest.raises(probe.ProgramRefused) as exc:
        p.start(lambda ev: None)
    assert exc.value.kernel_error == "refused"
    p.close()


def test_close_during_a_background_load_waits_then_unloads(monkeypatch):
    """A start-up that fails elsewhere (a port in use, Ctrl-C) while the
    program compiles: close() waits for the load and unloads what it
    loaded, rather than leave it attached."""
    import threading
    release = threading.Event()
    made = []

    class SlowBPF:
        def __init__(self, **_kwargs):
            release.wait(5)
            made.append(self)
            self.cleaned = False

        def cleanup(self):
            self.cleaned = True

    config = _fake_load(monkeypatch, SlowBPF)
    p = probe.KernelProbe(config)
    p.load_in_background()
    closer = threading.Thread(target=p.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()            # waiting for the load
    release.set()
    closer.join(5)
    assert not closer.is_alive()
    assert len(made) == 1 and made[0].cleaned and p.bpf is None


def test_at_the_exit_only_the_events_tracepoint_is_waited_for(monkeypatch):
    """The stop detaches the tracepoint that makes events (and its counts),
    which the final counts wait for. The others (EOF reads, exec tracking)
    were copied to a holder at the start (the gathering worker, whose end
    detaches them): at the exit ours are closed while it still holds them,
    and closed (detached) here when it does not."""
    import os as _os

    def probe_with_pipes():
        pipes = {name: _os.pipe() for name in ("events", "recv", "exec")}
        fake = type("BPF", (), {})()
        fake.tracepoint_fds = {b"sock:inet_sock_set_state": pipes["events"][1],
                               b"sock:sock_recv_length": pipes["recv"][1],
                               b"sched:sched_process_exec": pipes["exec"][1]}
        p = probe.KernelProbe(probe.ProbeConfig(threshold_ns=1, features=probe.detect_features(
            release="6.1.0", environ={})))
        p.bpf = fake
        return p, fake, pipes

    def all_closed(pipes):
        for r, _w in pipes.values():        # every write end closed: EOF
            assert _os.read(r, 1) == b""
            _os.close(r)

    for still_held in (True, False):
        p, fake, pipes = probe_with_pipes()
        given = []
        assert p.hand_over_quiet(lambda fds: given.extend(fds) or (lambda: still_held))
        assert given == [pipes["recv"][1], pipes["exec"][1]]
        p.detach(events_only=True)
        p.wait_detached()
        assert list(fake.tracepoint_fds) == [b"sock:sock_recv_length",
                                             b"sched:sched_process_exec"]
        p.release_for_exit()
        assert fake.tracepoint_fds == {}
        all_closed(pipes)
    # Nobody took a copy: the release detaches every tracepoint itself.
    p, fake, pipes = probe_with_pipes()
    assert not p.hand_over_quiet(lambda fds: None)
    p.release_for_exit()
    assert fake.tracepoint_fds == {}
    all_closed(pipes)


def test_a_thread_with_its_own_directory_moves_only_itself(tmp_path):
    """bcc's compile chdir()s into the header tree; in the load's thread,
    after own_working_directory(), that moves the thread and not the
    process (whose relative paths: -w FILE, PYTHONPATH=src imports). In the
    main thread it is never done: that directory is the process's."""
    import os
    import threading
    here = os.getcwd()
    seen = {}

    def thread():
        seen["own"] = probe.own_working_directory()
        os.chdir(tmp_path)
        seen["thread cwd"] = os.getcwd()

    t = threading.Thread(target=thread)
    t.start()
    t.join()
    assert seen == {"own": True, "thread cwd": str(tmp_path)}
    assert os.getcwd() == here
    assert probe.own_working_directory() is False


def test_the_state_changes_come_from_the_raw_tracepoint_where_btf_gives_the_fields(monkeypatch):
    state = probe.btf.StateOffsets(family=16, protocol=532, sport=814, dport=12, saddr=4,
                                   daddr=0, v6_saddr=72, v6_daddr=56)
    monkeypatch.setattr(probe, "btf_offsets", lambda: (None, state))
    f = probe.detect_features(release="6.18.0", environ={})
    assert f.state == state
    assert "state changes from the raw tracepoint" in f.describe()
    flags = probe.ProbeConfig(threshold_ns=1, features=f).cflags(True, True)
    assert "-DRAW_STATE_CHANGE" in flags and "-DSK_PROTOCOL_OFF=532" in flags
    # Forced onto the tracepoint's perf event (as without BTF, or before
    # 5.6), and without BTF at all: no raw reading.
    for words in ("perftp", "nobtf", "perfbuf,monotonic,perkey,perftp"):
        f = probe.detect_features(release="6.18.0", environ={probe.FORCE_ENV: words})
        assert f.state is None, words
        assert "state changes from the tracepoint's perf event" in f.describe()
        flags = probe.ProbeConfig(threshold_ns=1, features=f).cflags(True, True)
        assert not any(flag.startswith(("-DRAW_STATE_CHANGE", "-DSK_")) for flag in flags)


def test_the_raw_tracepoint_is_the_events_one_at_the_exit():
    """With the state changes on the raw tracepoint (its fd is the
    attachment, in bcc's raw_tracepoint_fds), the stop detaches it, and
    every perf-event tracepoint is a quiet one, handed over at the start."""
    import os as _os
    pipes = {name: _os.pipe() for name in ("events", "recv", "exec")}
    fake = type("BPF", (), {})()
    fake.raw_tracepoint_fds = {b"inet_sock_set_state": pipes["events"][1]}
    fake.tracepoint_fds = {b"sock:sock_recv_length": pipes["recv"][1],
                           b"sched:sched_process_exec": pipes["exec"][1]}
    p = probe.KernelProbe(probe.ProbeConfig(threshold_ns=1, features=probe.detect_features(
        release="6.18.0", environ={})))
    p.bpf = fake
    given = []
    assert p.hand_over_quiet(lambda fds: given.extend(fds) or (lambda: True))
    assert given == [pipes["recv"][1], pipes["exec"][1]]
    p.detach(events_only=True)
    p.wait_detached()
    assert fake.raw_tracepoint_fds == {}
    assert _os.read(pipes["events"][0], 1) == b""       # closed: detached
    assert len(fake.tracepoint_fds) == 2
    p.release_for_exit()
    assert fake.tracepoint_fds == {}
    for r, _w in pipes.values():
        _os.close(r)
