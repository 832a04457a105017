"""When the tracer freezes what Python's cyclic collector walks.

With 100,000 sockets lingering, the loop keeps ~10 objects per socket the
collector tracks (Lingerer, Endpoints, Ownership, Holder, HolderEvidence,
Diagnosis, three lists): ~1 million. Every full collection walks them all again
(0.3-0.8 s measured, some during idle ticks, which are due every 500 ms),
although they only ever leave by reference counting: none of them is in a
cycle (bench/gc_scale.py: after every socket left, no full collection had
run and the tracked objects were back near the start).

So after many sockets were reported, the loop runs one full collection,
which frees the garbage cycles the batches made, and then freezes what
survived (gc.freeze): live objects only, which later full collections do not
walk. A frozen object still goes when its last reference does; only a cycle
among frozen objects would stay. Against that, when fewer than a quarter of
the sockets lingering at the freeze still linger, everything is unfrozen and
collected once (freeing any such cycle), and what is left is frozen again
if it is still many. That collection walks what is left (a quarter at
most), on a tick where sockets left, not an idle one.

Both happen only on a tick where sockets were reported or the kernel's map
changed, never on an idle tick. (So when every socket left at once, the
unfreeze waits for the next such tick; what the sockets kept has gone by
reference counting meanwhile.)

While a batch of sockets is reported (Tracer.resolve: owners unpickled,
diagnoses and records made, ~10 objects a socket), the collector is paused
(GcPolicy.paused): its passes over the batch's objects, which it cannot
free, were 10-15% of the batch (docs/benchmarks.md, "the cyclic collector
paused"). It is on again when the batch ends: what the batch left in a
cycle goes at its next pass, or at the full collection that begins the
freeze above when the batch was a large one.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

# Sockets reported since the last freeze that make the next one worth it:
# a full collection then walks about 10 objects per socket reported since
# (~15 ms for 10,000 on the bench machine), and it happens once per this many.
FREEZE_AFTER = 1000
# Unfrozen (and collected) when fewer than 1/UNFREEZE_BELOW of the sockets
# lingering at the freeze are left.
UNFREEZE_BELOW = 4


@dataclass
class GcPolicy:
    collect: Callable[[], object] = gc.collect
    freeze: Callable[[], None] = gc.freeze
    unfreeze: Callable[[], None] = gc.unfreeze
    disable: Callable[[], None] = gc.disable
    enable: Callable[[], None] = gc.enable
    isenabled: Callable[[], bool] = gc.isenabled
    freeze_after: int = FREEZE_AFTER
    reported_since: int = 0      # sockets reported since the last freeze
    frozen_lingering: int = 0    # sockets lingering at the last freeze (0: none frozen)
    freezes: int = 0
    unfreezes: int = 0

    @contextmanager
    def paused(self):
        """The collector off inside, back on after (on errors too) if it
        was on before."""
        was_on = self.isenabled()
        if was_on:
            self.disable()
        try:
            yield
        finally:
            if was_on:
                self.enable()

    def reported(self, n: int) -> None:
        self.reported_since += n

    def after_change(self, lingering: int) -> None:
        """Called after a tick that reported sockets or read a changed map,
        with the number of sockets whose state the loop keeps now (those
        lingering, and those that left within the tracker's grace)."""
        if self.frozen_lingering and lingering * UNFREEZE_BELOW < self.frozen_lingering:
            self.unfreeze()
            self.unfreezes += 1
            self.frozen_lingering = 0
            if lingering < self.freeze_after:
                # Few left: the collector walks them as before, and the
                # frozen cycles (if any) go at this collection.
                self.collect()
                self.reported_since = 0
                return
            self.reported_since = max(self.reported_since, self.freeze_after)
        if self.reported_since >= self.freeze_after:
            self.collect()           # the batches' garbage cycles, before they are frozen
            self.freeze()
            self.freezes += 1
            self.reported_since = 0
            self.frozen_lingering = max(self.frozen_lingering, lingering)
