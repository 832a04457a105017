"""-r against crafted recordings: what the replay's renderer and filter keep
is bounded by what they show, whatever a record carries, so that -r stays
under the bound docs/security.md states (MEMORY_BOUND_MB). Measured as in
test_report_bounds.py: peak RSS (VmHWM) of the command in a fresh
interpreter; each crafted recording costs the old code several times the
bound (figures in each test), so the margin is not the machine's noise."""

import pytest

from closewait_trace.output import render
from tests.bounds.test_report_bounds import MEMORY_BOUND_MB, run_cli
from tests.unit import hostile_recordings, recordfactory


def test_replay_keeps_only_what_v_shows_of_process_records(tmp_path):
    """16 valid process records with a 3 MB list under an extra key of
    their identity (tolerated by the schema, never capped): the renderer
    kept each whole for -v (render.MAX_PROCESSES of them), about 40 MB a
    record, and the old code peaked at ~650 MB (the review's 30 records of
    200,000 Python frames: 1.23 GB; its 40 of a 7 MB identity list: 3.7
    GB). Now what -v shows is kept: the reader's own cost of one such line."""
    path = tmp_path / "fatproc.jsonl.gz"
    hostile_recordings.fat_processes(str(path), 16, identity_extra=600_000)
    out, peak = run_cli("-r", str(path), "-v")
    assert peak < MEMORY_BOUND_MB, f"-r -v: peak RSS {peak:.0f} MiB"
    # Each holder shown with its thread and the first 8 of its frames.
    assert out.stdout.count(" LINGER ") == 16
    assert out.stdout.count("           thread ") == 16
    assert out.stdout.count("             py ") == 16 * render.SHOWN_FRAMES


def test_kept_process_is_what_v_shows():
    """A process record's extra keys, threads past the writer's 16 and
    frames past the 8 -v lists are not kept; -v shows the same lines."""
    thread = {"tid": 7, "state": "S", "wchan": "w", "syscall": "read", "syscall_fd": 3,
              "syscall_fd_target": "socket:[1]", "x": "y" * 100_000,
              "stack": [{"pc": "0x1", "function": "f", "offset": 1, "module": "/m",
                         "build_id": None, "method": "cfi", "symbols": "symtab",
                         "extra": ["z"] * 1000}] * 20,
              "python": [{"function": "g", "file": "a.py", "line": 3, "e": "q" * 1000}] * 20}
    proc = recordfactory.process(
        pid=42, threads=[thread] * 20,
        identity={"user": "u", "unit": "u.service", "x": ["ab"] * 100_000,
                  "container": {"runtime": "docker", "id": "0123456789abcdef" * 4, "e": 1},
                  "claimed": {"unit": "c.service", "under": "/", "e": "e" * 10_000}},
        stacks_not_read="timed out", extra=list(range(100_000)))
    linger = recordfactory.linger(owners=[recordfactory.holder(pid=42)])
    kept = render.shown_process(proc)
    # The threads past the writer's 16 are not kept; the first 16 show alike.
    assert render.evidence_lines(linger, {42: kept}) == render.evidence_lines(
        linger, {42: dict(proc, threads=proc["threads"][:16])})
    assert render._size(kept) < 200_000     # the record: megabytes
    r = render.TextRenderer(verbose=True)
    r.render(proc)
    assert r.processes[42] == kept
    assert render.TextRenderer(verbose=False).processes == {}


def test_kept_processes_are_forgotten_past_their_byte_budget(monkeypatch):
    """Past MAX_PROCESS_BYTES the oldest kept processes are forgotten, as
    past MAX_PROCESSES; the budget's account stays exact."""
    r = render.TextRenderer(verbose=True)
    one = render._size(render.shown_process(recordfactory.process(pid=1, cmdline="x")))
    monkeypatch.setattr(render, "MAX_PROCESS_BYTES", one * 3)
    for pid in range(1, 6):
        r.render(recordfactory.process(pid=pid))
    assert list(r.processes) == [3, 4, 5]
    r.render(recordfactory.process(pid=4))
    assert list(r.processes) == [3, 5, 4]
    assert r._process_bytes == sum(r._process_cost.values()) <= one * 3


def test_replay_unit_filter_keeps_no_identity(tmp_path):
    """--unit (like --cgroup and --container) needs each holder's identity
    from its process record: the filter kept the record's whole identity,
    extra keys included, for up to 20,000 pids. 16 identities with a 3 MB
    list under an extra key: the old code peaked at ~650 MB (the review's
    40 of 7 MB: 3.7 GB). Now only whether it passed is kept."""
    path = tmp_path / "fatident.jsonl.gz"
    hostile_recordings.fat_processes(str(path), 16, identity_extra=600_000)
    out, peak = run_cli("-r", str(path), "--unit", "u.service")
    assert peak < MEMORY_BOUND_MB, f"-r --unit: peak RSS {peak:.0f} MiB"


def test_replay_filter_keeps_a_shared_stand_in_per_identity():
    """What the filter keeps of 1,000 identities: two shared objects, and
    the same sockets pass as with the identities themselves."""
    from closewait_trace.files.replay import ReplayFilter
    from closewait_trace.sockets.filters import HolderFilter
    keep = ReplayFilter(holders=HolderFilter(units=("a.service",)))
    recs = []
    for pid in range(1, 1001):
        unit = "a" if pid % 2 else "b"
        recs.append(recordfactory.process(pid=pid, identity={
            "cgroup": f"/system.slice/{unit}.service", "x": ["ab"] * 100}))
        recs.append(recordfactory.linger(owners=[recordfactory.holder(pid=pid)],
                                         rport=pid))
    kept = [r["rport"] for r in recs if keep.keep(r) and r["type"] == "linger"]
    assert kept == list(range(1, 1001, 2))
    assert len({id(v) for v in keep.identities.values()}) == 2
    assert all("x" not in v for v in keep.identities.values())


@pytest.fixture(scope="module")
def fat_keys(tmp_path_factory):
    """60,000 sockets whose addresses are 4 KiB strings (3.4 MB of gzip)."""
    path = tmp_path_factory.mktemp("fatkeys") / "fatkeys.jsonl.gz"
    hostile_recordings.fat_keys(str(path), 60_000)
    return str(path)


@pytest.mark.parametrize("command", [["report", "--since", "2000"],
                                     ["-r", "--comm", "python"]])
def test_socket_keys_are_bounded(fat_keys, command):
    """report --since keeps the keys of sockets that lingered before the
    window (MAX_BEFORE, 100,000), -r with a holder filter those of the
    sockets it showed (MAX_SHOWN, 100,000); a key is the socket's addresses.
    Any string was taken for one: the old code peaked at 525 MB (report)
    and 528 MB (-r, in 62 s). An address is now an IP literal (45
    characters at most), anything else a damaged record."""
    out, peak = run_cli(command[0], fat_keys, *command[1:])
    assert peak < MEMORY_BOUND_MB, f"{command}: peak RSS {peak:.0f} MiB"
    assert "damaged" in out.stderr
