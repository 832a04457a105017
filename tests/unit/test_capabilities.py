import os
from closewait_trace.sockets import capabilities as caps
from closewait_trace.sockets import capabilities


def mask(*numbers):
    out = 0
    for n in numbers:
        out |= 1 << n
    return out


FULL = (1 << 41) - 1


def test_parse_cap_eff():
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n"
    assert caps.parse_cap_eff(status) == FULL
    assert caps.parse_cap_eff("Name:\tx\n") is None
    assert caps.parse_cap_eff("CapEff:\tzz\n") is None


def test_full_root_says_nothing():
    assert caps.warning(FULL) is None


def test_unknown_capabilities_claim_nothing():
    assert caps.warning(None) is None


def test_bpf_and_perfmon_only_names_every_loss_in_one_line():
    line = caps.warning(mask(caps.CAP_BPF, caps.CAP_PERFMON))
    assert "\n" not in line and line.startswith("closewait-trace: warning: ")
    for name in ("CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH or CAP_DAC_OVERRIDE", "CAP_SYS_ADMIN"):
        assert f"missing {name}:" in line
    assert "unknown: permission denied" in line and line.endswith("tracing goes on")


def test_either_dac_capability_is_enough():
    for dac in (caps.CAP_DAC_READ_SEARCH, caps.CAP_DAC_OVERRIDE):
        got = caps.missing(mask(dac, caps.CAP_SYS_PTRACE, caps.CAP_SYS_ADMIN))
        assert got == []


def test_only_sys_admin_missing_hides_no_holder():
    line = caps.warning(mask(caps.CAP_BPF, caps.CAP_PERFMON, caps.CAP_SYS_PTRACE,
                             caps.CAP_DAC_READ_SEARCH))
    assert "missing CAP_SYS_ADMIN" in line and "CAP_SYS_PTRACE" not in line
    assert "unknown: permission denied" not in line


def test_effective_reads_our_own_status(tmp_path):
    path = tmp_path / "status"
    path.write_text("CapEff:\t0000000000080004\n")
    assert caps.effective(str(path)) == mask(caps.CAP_SYS_PTRACE, caps.CAP_DAC_READ_SEARCH)
    assert caps.effective(str(tmp_path / "missing")) is None


def test_cannot_trace_names_the_missing_bpf_capabilities():
    from closewait_trace.sockets.capabilities import (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN,
                                                      cannot_trace)
    assert cannot_trace(None) is None                       # unknown: no claim
    assert cannot_trace(1 << CAP_SYS_ADMIN) is None         # covers both
    assert cannot_trace(1 << CAP_BPF | 1 << CAP_PERFMON) is None
    why = cannot_trace(1 << CAP_BPF)
    assert "CAP_PERFMON" in why and "CAP_BPF " not in why and "CAP_SYS_ADMIN" in why
    assert "CAP_BPF and CAP_PERFMON" in cannot_trace(0)


def caps_of(*names):
    number = {name: cap for cap, name in capabilities.NAMES.items()}
    return sum(1 << number[n] for n in names)


ATTACH_FAILED = ("Failed to attach BPF program b'tracepoint__sock__inet_sock_set_state' "
                 "to tracepoint b'sock:inet_sock_set_state'")      # bcc's words, seen on 6.1


def test_perf_restriction_is_named_only_where_it_applies():
    unit_without_admin = caps_of("CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH")
    for paranoid in (3, 4):
        why = capabilities.perf_restricted(unit_without_admin, paranoid, ATTACH_FAILED)
        assert f"kernel.perf_event_paranoid={paranoid}" in why and "CAP_SYS_ADMIN" in why
    # Mainline's levels, CAP_SYS_ADMIN present, nothing known, or another
    # failure (compile, verifier): no claim.
    assert capabilities.perf_restricted(unit_without_admin, 2, ATTACH_FAILED) is None
    assert capabilities.perf_restricted(unit_without_admin, -1, ATTACH_FAILED) is None
    assert capabilities.perf_restricted(unit_without_admin | caps_of("CAP_SYS_ADMIN"), 3,
                                        ATTACH_FAILED) is None
    assert capabilities.perf_restricted(None, 3, ATTACH_FAILED) is None
    assert capabilities.perf_restricted(unit_without_admin, None, ATTACH_FAILED) is None
    assert capabilities.perf_restricted(unit_without_admin, 3,
                                        "Failed to load BPF program b'x': Permission denied") is None


def test_perf_event_paranoid_is_read_or_unknown(tmp_path):
    f = tmp_path / "p"
    f.write_text("3\n")
    assert capabilities.perf_event_paranoid(str(f)) == 3
    f.write_text("x")
    assert capabilities.perf_event_paranoid(str(f)) is None
    assert capabilities.perf_event_paranoid(str(tmp_path / "missing")) is None
    if os.path.exists(capabilities.PERF_EVENT_PARANOID):
        assert isinstance(capabilities.perf_event_paranoid(), int)  # this machine's
