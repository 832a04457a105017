"""Where output records go, and what a sink may look at once per tick.

Minimal version from the w-ops branch, written to the shared contract
(CONTRACTS.md, "Sinks"); w-loop owns this module and its fuller version
replaces this one at merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol


@dataclass
class TickView:
    """What a sink may look at once per tick."""
    wall_ts: float            # time.time() of the tick
    now_ns: int               # kernel clock (for Lingerer.age_ns)
    threshold_ns: int
    counters: dict            # probe.counters(): cw_enter, cw_exit, events_lost, map_full, ...
    histogram: list           # probe.histogram(): log2 microsecond slots
    histogram_sum_ns: Optional[int]   # probe.histogram_sum_ns(); None if unknown
    lingering: Callable[[], list]     # Lingerers in CLOSE_WAIT >= threshold (lazy)


class Sink(Protocol):
    def emit(self, rec: dict) -> None: ...        # every output record, in order
    def tick(self, view: TickView) -> None: ...   # once after each tick
    def flush(self) -> None: ...                  # end of each pass of the loop
    def close(self) -> None: ...                  # at exit, after the summary
