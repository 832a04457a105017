"""Replay filters over recorded records (the same filters as live)."""

from closewait_trace.files import replay
from closewait_trace.sockets.filters import HolderFilter


def linger(pid, comm, rport, **over):
    rec = {"type": "linger", "ts": 1000.0, "family": "ipv4", "laddr": "127.0.0.1",
           "lport": 80, "raddr": "127.0.0.1", "rport": rport,
           "owners": [{"pid": pid, "comm": comm, "fd": 3, "state": "S"}]}
    rec.update(over)
    return rec


def process(pid, unit=None, container=None, cgroup=None):
    if cgroup is None and (unit or container):
        cgroup = (f"/system.slice/docker-{container}.scope" if container
                  else f"/system.slice/{unit}")
    return {"type": "process", "ts": 999.0, "pid": pid,
            "identity": {"cgroup": cgroup, "unit": unit,
                         "container": {"runtime": "docker", "id": container} if container else None}}


def kept(records, holders):
    return [(r["type"], r.get("rport")) for r in replay.replay(records, replay.ReplayFilter(holders=holders))]


def test_unit_and_container_filters_use_the_process_records():
    recs = [process(1, unit="web.service"), linger(1, "a", 10),
            process(2, unit="db.service"), linger(2, "b", 20),
            process(4, container="ab12" * 16), linger(4, "d", 40),
            linger(3, "c", 30)]          # no process record: identity unknown
    assert kept(recs, HolderFilter(units=("web",))) == [
        ("process", None), ("linger", 10), ("process", None), ("process", None)]
    assert kept(recs, HolderFilter(containers=("ab12ab",))) == [
        ("process", None), ("process", None), ("process", None), ("linger", 40)]


def test_closed_record_matches_its_closer_and_listener_owners_count():
    closed = {"type": "closed", "ts": 1000.0, "family": "ipv4", "lport": 80, "rport": 40,
              "closed_by": {"pid": 7, "comm": "z"}}
    queued = linger(0, "", 50, owners=[], listener={"owners": [{"pid": 8, "comm": "srv"}]})
    assert kept([closed, queued], HolderFilter(comms=("z",))) == [("closed", 40)]
    assert kept([closed, queued], HolderFilter(pids=(8,))) == [("linger", 50)]


def test_hostile_record_shapes_do_not_crash_the_filter():
    recs = [linger(1, "a", 10, owners=[None, 5, "x"], listener="junk", closed_by=[1]),
            linger(1, "a", 11, owners=5, listener={"owners": "x"})]
    assert kept(recs, HolderFilter(pids=(1,))) == []


def test_closed_record_of_a_shown_socket_is_kept_whoever_closed_it():
    shown = linger(1, "a", 10)
    reset = {"type": "closed", "ts": 1001.0, "family": "ipv4", "laddr": "127.0.0.1",
             "lport": 80, "raddr": "127.0.0.1", "rport": 10, "closed_by": None}
    other = dict(reset, rport=20)
    assert kept([shown, reset, other], HolderFilter(pids=(1,))) == [("linger", 10),
                                                                   ("closed", 10)]


def test_the_command_line_replays_through_replay_replay(tmp_path, monkeypatch):
    """-r goes through replay.replay(), the one place that decides what a
    replay shows (cli.py rewrote it inline, and only the tests called it)."""
    from click.testing import CliRunner

    from closewait_trace import cli
    from closewait_trace.files import recording
    from tests.unit import recordfactory
    path = tmp_path / "cw.jsonl"
    r = recording.Recorder(path=str(path), threshold_ns=10**9,
                           filters=recordfactory.NO_FILTERS, clock_offset_ns=0)
    r.open()
    r.write(recordfactory.start())
    for port in (40000, 40001):
        r.write(recordfactory.linger(rport=port))
    r.close()
    seen = []
    real = replay.replay

    def counting(records, keep, *args, **kwargs):
        for rec in real(records, keep, *args, **kwargs):
            seen.append(rec.get("type"))
            yield rec
    monkeypatch.setattr(replay, "replay", counting)
    result = CliRunner().invoke(cli.main_group, ["-r", str(path), "-P", "40001", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == ["start", "linger"]
    assert [line for line in result.output.splitlines() if '"linger"' in line][0].count("40001")
