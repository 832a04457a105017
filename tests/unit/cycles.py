"""What code leaves in reference cycles: the owner lookups and a reported
batch run with Python's cyclic collector paused (gathering.
WITHOUT_COLLECTOR, GcPolicy.paused), so whatever they leave in cycles
stays until the pause ends."""

import gc
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Left:
    count: int = 0                                  # objects found in cycles
    kinds: list = field(default_factory=list)       # their type names


@contextmanager
def cycles_left():
    """Within: the collector off. After: what a collection found in cycles
    that were made within (set on the Left yielded)."""
    left = Left()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield left
        left.count = gc.collect()
        left.kinds = sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
