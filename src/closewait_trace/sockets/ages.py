"""How long a socket found already in CLOSE_WAIT has been there, from the
kernel's struct tcp_info (pure).

For a socket in CLOSE_WAIT the peer's FIN is normally the last segment
received, so tcpi_last_ack_recv (ms since the last ACK arrived; the FIN
carries one) is its time in CLOSE_WAIT. Later ACKs (for data we sent after
the FIN, keepalive probes) make it smaller, never larger: it is a lower
bound that is usually exact. The FIN comes after the last data, so
tcpi_last_data_recv bounds the age from above. With keepalive on, the
peer's ACK to every probe renews last_ack_recv: the lower bound stays near
the probe interval however old the socket is (1 s probes: ~1 s shown for a
socket 24 s old), so it is no estimate at all, only a range. Both are u32 milliseconds
and wrap after 2^32 ms (49.7 days): a wrapped counter reads smaller than the
truth, so a reading taken when a wrap was possible is still a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TRACED = "traced"            # timed by the kernel program
ESTIMATED = "estimated"      # from tcp_info, with an upper bound
LOWER_BOUND = "lower_bound"  # at least this old; no upper bound known
RANGE = "range"              # keepalive: between the two tcp_info times, nothing nearer

U32_WRAP_NS = (1 << 32) * 1_000_000    # 49.7 days of milliseconds


@dataclass(frozen=True, slots=True)
class AgeEstimate:
    enter_ns: int                 # estimated entry into CLOSE_WAIT (kernel clock)
    enter_max_ns: Optional[int]   # earliest possible entry; None unless estimated
    source: str                   # ESTIMATED, RANGE or LOWER_BOUND


def estimate_entry(last_ack_recv_ms: Optional[int], last_data_recv_ms: Optional[int],
                   observed_ns: int, keepalive: bool = False,
                   observed_from_ns: Optional[int] = None) -> AgeEstimate:
    """When a socket entered CLOSE_WAIT, from its tcp_info times read at
    observed_ns (kernel clock, which counts from boot), or at some time
    from observed_from_ns to observed_ns (a dump is read over a while: the
    latest entry is then counted from the end, the earliest from the start).

    - no tcp_info: it entered no later than observed_ns; say only that.
    - the ACK reading reaches back before boot: nonsense, say only that.
    - uptime of 49.7 days or more: the ACK counter may have wrapped (the
      socket may be older than the counter can tell); its reading is a lower
      bound.
    - last data received more recently than the last ACK: impossible for a
      FIN after the data, unless a counter wrapped or the stack did not
      stamp the FIN's ACK; the ACK reading stays a lower bound, no upper one.
    - keepalive probes pending: a range, between last_ack_recv and
      last_data_recv, with no better guess inside it.
    - otherwise: estimated, between last_ack_recv and last_data_recv."""
    if last_ack_recv_ms is None:
        return AgeEstimate(observed_ns, None, LOWER_BOUND)
    ack_ns = last_ack_recv_ms * 1_000_000
    if ack_ns > observed_ns:
        return AgeEstimate(observed_ns, None, LOWER_BOUND)
    enter_ns = observed_ns - ack_ns
    if observed_ns >= U32_WRAP_NS:
        return AgeEstimate(enter_ns, None, LOWER_BOUND)
    if last_data_recv_ms is None or last_data_recv_ms < last_ack_recv_ms:
        return AgeEstimate(enter_ns, None, LOWER_BOUND)
    data_ns = last_data_recv_ms * 1_000_000
    since = observed_ns if observed_from_ns is None else min(observed_from_ns, observed_ns)
    return AgeEstimate(enter_ns, since - min(data_ns, since),
                       RANGE if keepalive else ESTIMATED)
