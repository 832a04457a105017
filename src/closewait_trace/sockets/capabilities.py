"""Which capabilities the owner lookup and the diagnosis need, and what is
lost without each (pure decoding and decision; the one read is in effective()).

Found by running the tool as uid 0 under `setpriv --bounding-set=-all,+...`
against a holder run as another user (kernel 6.18):
- /proc/PID/fd of another user's process is mode 0500: listing it needs
  CAP_DAC_READ_SEARCH (or CAP_DAC_OVERRIDE).
- Reading its links, /proc/PID/fdinfo, ns/net, maps and mem, and
  task/TID/syscall, passes the ptrace access check: CAP_SYS_PTRACE, needed
  even for root's own processes once they hold capabilities we lack.
- sock_diag in another network namespace enters it with setns():
  CAP_SYS_ADMIN. Without it the table is parsed from /proc/PID/net/tcp.
Loading and attaching the BPF program needs CAP_BPF and CAP_PERFMON (or
CAP_SYS_ADMIN, which covers both): without them nothing can be traced, and
the kernel's own word for it ("Operation not permitted" on a map) would not
say why, so it is checked before anything is loaded (cannot_trace). On
Debian's kernels (kernel.perf_event_paranoid 3) attaching also needs
CAP_SYS_ADMIN: said after an attach fails (perf_restricted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from closewait_trace.errors import EXIT_NOT_ROOT, UserError

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

NAMES = {CAP_DAC_OVERRIDE: "CAP_DAC_OVERRIDE", CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH",
         CAP_SYS_PTRACE: "CAP_SYS_PTRACE", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
         CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}


@dataclass(frozen=True)
class Need:
    """Capabilities of which any one is enough, and what is lost without."""
    any_of: tuple[int, ...]
    lost: str

    def met(self, effective: int) -> bool:
        return any(effective >> cap & 1 for cap in self.any_of)

    def names(self) -> str:
        return " or ".join(NAMES[cap] for cap in self.any_of)


NEEDS = (
    Need((CAP_SYS_PTRACE,),
         "no holders among processes of other users or with more capabilities, "
         "nor their threads, stacks and network namespaces"),
    Need((CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE),
         "no fd tables, threads or stacks of other users' processes"),
    Need((CAP_SYS_ADMIN,),
         "other network namespaces read from /proc/PID/net instead of sock_diag "
         "(no listener backlog)"),
)


def parse_cap_eff(status_text: str) -> Optional[int]:
    """CapEff from /proc/PID/status (a 64-bit hex mask); None if absent."""
    for line in status_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key == "CapEff":
            try:
                return int(value.strip(), 16)
            except ValueError:
                return None
    return None


def missing(effective: int) -> list[Need]:
    return [need for need in NEEDS if not need.met(effective)]


def warning(effective: Optional[int]) -> Optional[str]:
    """One line for stderr naming what is missing and what is lost, or
    None when nothing is. Unknown capabilities (no CapEff) say nothing:
    no claim without a fact."""
    if effective is None:
        return None
    lacking = missing(effective)
    if not lacking:
        return None
    parts = [f"missing {need.names()}: {need.lost}" for need in lacking]
    hidden = any(need.any_of != (CAP_SYS_ADMIN,) for need in lacking)
    return ("closewait-trace: warning: " + "; ".join(parts)
            + ("; sockets they hold show as 'unknown: permission denied'" if hidden else "")
            + "; tracing goes on")


def cannot_trace(effective: Optional[int]) -> Optional[str]:
    """Why the kernel program cannot be loaded with these capabilities, or
    None (also when they are unknown: no claim without a fact)."""
    if effective is None or effective >> CAP_SYS_ADMIN & 1:
        return None
    lacking = [NAMES[cap] for cap in (CAP_BPF, CAP_PERFMON) if not effective >> cap & 1]
    if not lacking:
        return None
    return (f"live tracing needs {' and '.join(lacking)} (or CAP_SYS_ADMIN) to load the "
            f"kernel program, and this process lacks them")


PERF_EVENT_PARANOID = "/proc/sys/kernel/perf_event_paranoid"


def perf_event_paranoid(path: str = PERF_EVENT_PARANOID) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            return int(f.read(64).strip())
    except (OSError, ValueError):
        return None


def perf_restricted(effective: Optional[int], paranoid: Optional[int],
                    failure: str) -> Optional[str]:
    """Why attaching failed, when the reason is the kernel's perf events
    restriction: Debian's kernels (CONFIG_SECURITY_PERF_EVENTS_RESTRICT;
    measured on 6.1 and 6.12) set kernel.perf_event_paranoid to 3 and then
    refuse perf_event_open, which attaching to a tracepoint is, to a process
    without CAP_SYS_ADMIN, CAP_PERFMON or not (Ubuntu's patch does the same
    from 4). Mainline kernels treat values above 2 as 2. So this is said only
    for a failure to attach to the tracepoint (bcc: "... to tracepoint"),
    never for a compile or verifier error, and never as a prediction."""
    if effective is None or paranoid is None or paranoid < 3:
        return None
    if effective >> CAP_SYS_ADMIN & 1 or "to tracepoint" not in failure:
        return None
    return (f"this kernel restricts perf events (kernel.perf_event_paranoid={paranoid}, as "
            f"Debian's kernels do): attaching to the tracepoint needs CAP_SYS_ADMIN here, "
            f"and this process lacks it")


PERF_RESTRICTED_HINT = ("add CAP_SYS_ADMIN (a full root shell has it; so does the unit's "
                        "CapabilityBoundingSet), or set kernel.perf_event_paranoid=2, "
                        "mainline's default (it also lets unprivileged users profile "
                        "their own processes)")


def explain_refusal(refused: UserError) -> UserError:
    """The error to show for the probe's ProgramRefused (kernel/probe.py):
    the perf events restriction when it is the cause (perf_restricted,
    with this process's capabilities and the kernel's setting), else the
    refusal as the probe said it."""
    why = perf_restricted(effective(), perf_event_paranoid(),
                          getattr(refused, "kernel_error", ""))
    if why:
        return UserError(why, EXIT_NOT_ROOT, PERF_RESTRICTED_HINT)
    return refused


def effective(status_path: str = "/proc/self/status") -> Optional[int]:
    try:
        with open(status_path, "rb") as f:
            return parse_cap_eff(f.read(65536).decode("ascii", "replace"))
    except OSError:
        return None
