"""live/gcpolicy.py: when the per-socket state is frozen out of the cyclic
collector's full passes (issue 20 target 2, idle tick <= 5 ms at 100k)."""

import gc
import weakref

import pytest

from closewait_trace.live.gcpolicy import FREEZE_AFTER, GcPolicy


def recording(**kw):
    calls = []
    policy = GcPolicy(collect=lambda: calls.append("collect"),
                      freeze=lambda: calls.append("freeze"),
                      unfreeze=lambda: calls.append("unfreeze"), **kw)
    return policy, calls


def test_nothing_is_frozen_until_many_sockets_were_reported():
    policy, calls = recording(freeze_after=100)
    for _ in range(9):
        policy.reported(10)
        policy.after_change(lingering=90)
    assert calls == []
    policy.reported(10)             # 100 in all, over several ticks
    policy.after_change(lingering=100)
    # Collected first: the batches' garbage cycles are not frozen with them.
    assert calls == ["collect", "freeze"]
    assert policy.frozen_lingering == 100 and policy.reported_since == 0
    policy.after_change(lingering=100)
    assert calls == ["collect", "freeze"]      # once per freeze_after reported


def test_the_default_is_a_thousand_sockets():
    assert GcPolicy().freeze_after == FREEZE_AFTER == 1000


def test_when_three_quarters_of_the_frozen_sockets_left_all_is_unfrozen_and_collected():
    policy, calls = recording(freeze_after=100)
    policy.reported(1000)
    policy.after_change(lingering=1000)
    calls.clear()
    policy.after_change(lingering=250)          # three quarters left: not yet
    assert calls == []
    policy.after_change(lingering=249)          # more than that: unfrozen,
    # collected (cycles among frozen objects go) and, still many, frozen again.
    assert calls == ["unfreeze", "collect", "freeze"]
    assert policy.frozen_lingering == 249
    calls.clear()
    policy.after_change(lingering=63)           # a quarter of 249 still left
    assert calls == []
    policy.after_change(lingering=40)           # few left: not frozen again
    assert calls == ["unfreeze", "collect"]
    assert policy.frozen_lingering == 0 and (policy.freezes, policy.unfreezes) == (2, 2)
    policy.after_change(lingering=0)
    assert calls == ["unfreeze", "collect"]


class Node:
    __slots__ = ("other", "__weakref__")


@pytest.fixture
def real_gc():
    gc.collect()
    yield
    gc.unfreeze()                   # the test process's objects too
    gc.collect()


def test_with_the_real_collector_only_live_objects_are_frozen(real_gc):
    """The trial of "Python's cyclic collector" froze right after a batch
    and so froze that batch's garbage cycles too (kept for ten minutes).
    Collected before frozen: the garbage cycle is freed, the live state is
    frozen, and a frozen acyclic object still goes with its last reference."""
    garbage = Node()
    garbage.other = garbage                     # a cycle nothing refers to
    dead = weakref.ref(garbage)
    del garbage
    live = [Node() for _ in range(3)]           # per-socket state: acyclic
    gone = weakref.ref(live[0])
    policy = GcPolicy(freeze_after=3)
    policy.reported(3)
    policy.after_change(lingering=3)
    assert policy.freezes == 1
    assert dead() is None
    assert gc.get_freeze_count() > 0
    assert all(o is not live for o in gc.get_objects())    # frozen: not walked
    frozen = gc.get_freeze_count()
    del live[0]                                 # the socket left: freed at once
    assert gone() is None and gc.get_freeze_count() < frozen


def test_with_the_real_collector_a_frozen_cycle_goes_at_the_unfreeze(real_gc):
    policy = GcPolicy(freeze_after=2)
    sockets = [Node(), Node()]
    sockets[0].other = sockets[1]
    sockets[1].other = sockets[0]               # a cycle, alive when frozen
    policy.reported(2)
    policy.after_change(lingering=2)
    assert policy.freezes == 1
    cycle = weakref.ref(sockets[0])
    sockets.clear()                             # both left: only the cycle holds them
    gc.collect()
    assert cycle() is not None                  # frozen: the collector does not see it
    policy.after_change(lingering=0)
    assert policy.unfreezes == 1 and cycle() is None


def test_paused_turns_the_collector_off_inside_and_back_on_after():
    """Issue 20 target 2: a reporting batch's ~10 objects a socket were
    walked by the collector's passes while the batch was made (10-15% of
    it). Off inside, on again after, an error included; left off when it
    was off before (a caller that turned it off keeps it so)."""
    gc.enable()
    policy = GcPolicy()
    with policy.paused():
        assert not gc.isenabled()
        with policy.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()               # the inner one found it off
    assert gc.isenabled()
    with pytest.raises(RuntimeError):
        with policy.paused():
            raise RuntimeError("a batch failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with policy.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_with_the_real_collector_a_cycle_made_while_paused_goes_after(real_gc):
    policy = GcPolicy()
    with policy.paused():
        garbage = Node()
        garbage.other = garbage
        dead = weakref.ref(garbage)
        del garbage
        assert dead() is not None
    gc.collect()
    assert dead() is None
