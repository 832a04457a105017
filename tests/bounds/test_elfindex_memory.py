"""What the ELF index's caches hold, measured (issue 20, target 4: memory
flat with history). The bytes each cache accounts must be what its entries
really hold, as tracemalloc sees it: an estimate that drifts from the truth
by more than a factor of 2 fails here. No root; deterministic (tracemalloc
counts allocations, not RSS, and nothing here is timed)."""

import gc
import os
import shutil
import sys
import tracemalloc

import pytest

from closewait_trace.evidence import elfindex
from tests import hostile_elf

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None and os.environ.get("CI") != "true",
                               reason="needs gcc (installed by scripts/setup.sh)")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    return hostile_elf.compile_base(str(tmp_path_factory.mktemp("memory")))


@pytest.fixture(autouse=True)
def fresh():
    elfindex.CACHE.clear()
    yield
    elfindex.CACHE.clear()


@pytest.fixture
def traced():
    gc.collect()
    tracemalloc.start()
    yield
    tracemalloc.stop()


def traced_now() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def held_by_entry(path, cache) -> int:
    """Bytes freed when the one entry cache holds for path is dropped."""
    index, reason = elfindex.load(path, cache=cache)
    assert index is not None, reason
    del index
    with_entry = traced_now()
    cache.clear()
    return with_entry - traced_now()


def module_files(base, tmp_path):
    files = [sys.executable]                                    # dynsym, 10,000 FDEs
    if base is not None:
        files.append(base)                                      # small, .symtab
        # 5,000 function symbols and 3,000 FDEs walked without .eh_frame_hdr.
        files.append(hostile_elf.within_limits(base, str(tmp_path / "wide"), 5000, 3000))
    return files


@pytest.mark.parametrize("which", [0, 1, 2])
def test_size_estimate_is_what_a_module_holds(traced, tmp_path, request, which):
    base = request.getfixturevalue("base") if which else None
    path = module_files(base, tmp_path)[which]
    cache = elfindex.IndexCache()
    held_by_entry(path, cache)                          # warm: lazily built globals
    held = held_by_entry(path, cache)
    index, _ = elfindex.load(path, cache=elfindex.IndexCache())
    estimate = index.size_estimate()
    assert estimate / 2 <= held <= estimate * 2, (path, held, estimate)


@needs_gcc
def test_a_module_does_not_grow_after_it_is_cached(base):
    """The cache accounts an entry once, when it is put: unwinding through
    the module later must not add to what the module holds."""
    index, _ = elfindex.load(base)
    before = index.size_estimate()
    for loc in index.fde_locs:
        assert index.fde_for(loc).get_decoded().table
    assert index.size_estimate() == before


def test_decoded_fdes_are_accounted_at_what_they_hold(traced, monkeypatch):
    """FDE_CACHE's bytes against tracemalloc, over a real binary's FDEs
    (PLT entries with CFA expressions included)."""
    monkeypatch.setattr(elfindex, "FDE_CACHE", elfindex.FDECache(max_bytes=1 << 30))
    index, _ = elfindex.load(sys.executable)
    step = max(1, len(index.fde_locs) // 400)
    locs = list(index.fde_locs[::step])
    for loc in locs[:20]:                               # warm
        index.fde_for(loc)
    elfindex.FDE_CACHE.clear()
    empty = traced_now()
    found = [index.fde_for(loc) for loc in locs]
    assert sum(e is not None for e in found) > len(locs) * 0.9
    del found
    held = traced_now() - empty
    accounted = elfindex.FDE_CACHE.bytes
    assert accounted / 2 <= held <= accounted * 2, (held, accounted)


@needs_gcc
def test_the_cache_honours_its_byte_bound_over_many_modules(traced, base, tmp_path, monkeypatch):
    """60 distinct modules (copies: distinct identities) through a cache
    that holds about 10 of them, each unwound through every FDE: what the
    process holds stays within the two caches' bounds, measured."""
    fde_bound = 64 << 10
    monkeypatch.setattr(elfindex, "FDE_CACHE", elfindex.FDECache(max_bytes=fde_bound))
    one, _ = elfindex.load(base, cache=elfindex.IndexCache())
    bound = 10 * one.size_estimate()
    del one
    cache = elfindex.IndexCache(max_bytes=bound)
    copies = []
    for i in range(60):
        copies.append(str(tmp_path / f"module{i}"))
        shutil.copy(base, copies[-1])

    def use(path):
        index, reason = elfindex.load(path, cache=cache)
        assert index is not None, reason
        for loc in index.fde_locs:
            index.fde_for(loc)

    use(copies[0])                                      # warm, then start empty
    cache.clear()
    empty = traced_now()
    most = 0
    for path in copies:
        use(path)
        most = max(most, traced_now() - empty)
        assert cache.bytes <= bound and elfindex.FDE_CACHE.bytes <= fde_bound
    assert len(cache) < len(copies)                     # it did evict
    # What the entries really hold, not what they were estimated at.
    assert most <= 1.25 * (bound + fde_bound) + 16 * 1024, (most, bound, fde_bound)


@needs_gcc
def test_pyelftools_structs_are_shared_not_built_per_entry(base):
    index, _ = elfindex.load(base)
    fdes = [elfindex.parse_fde(index.eh_frame, off, index.eh_frame_addr, True, 8)
            for off in index.fde_offsets]
    assert len(fdes) >= 2
    assert len({id(f.structs) for f in fdes} | {id(f.cie.structs) for f in fdes}) == 1
